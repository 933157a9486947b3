"""Installed the way Python tools are installed, spa-viz runs from any folder: the wheel holds the
library, the app (as ``spa_viz_app``, no top-level ``app``) and the default checkpoints, stays small,
and, installed into a fresh venv, ``spa-viz analyze`` and ``spa-viz app`` work outside the checkout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ("spa-dinov2-s14-saliency", "spa-vit-digits")  # the wheel's checkpoints: the app's default, analyze's
MAX_WHEEL_BYTES = 30 * 2**20  # the two shipped checkpoints are ~10 MB; the other checkpoints stay in the checkout
SOURCES = ("pyproject.toml", "README.md", "spa_viz", "app", "checkpoints")  # what the build reads


def _run(command: list[str | Path], cwd: Path, env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built from a copy of the sources (a build writes build/ and *.egg-info where it runs)."""
    source = tmp_path_factory.mktemp("source")
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, source / name)
    dist = tmp_path_factory.mktemp("dist")
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", dist, source]
    build = _run(command, cwd=source, env=dict(os.environ))
    assert build.returncode == 0, build.stderr
    (built,) = dist.glob("spa_viz-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel installed (no index, no dependencies: those are this venv's,
    reached through a .pth line, which puts the folder on sys.path without running its .pth files,
    so this checkout's editable install stays out)."""
    venv = tmp_path_factory.mktemp("venv")
    assert _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=venv, env=dict(os.environ)).returncode == 0
    python = venv / "bin" / "python"
    site_packages = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    (site_packages / "project_dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    command = [sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", wheel]
    install = _run(command, cwd=venv, env=dict(os.environ))
    assert install.returncode == 0, install.stderr
    return venv


@pytest.fixture
def outside(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A working folder outside the checkout and an environment that does not point into it."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SPA_VIZ_CHECKPOINTS", "VIRTUAL_ENV")}
    env["SPA_VIZ_CACHE"] = str(tmp_path / "cache")
    return tmp_path, env


def test_the_wheel_holds_the_library_the_app_and_the_shipped_checkpoints(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    tops = {name.split("/")[0] for name in names}
    assert tops == {"spa_viz", "spa_viz_app", "spa_viz-0.1.0.dist-info"}, "no generic top-level app package"
    modules = [p.relative_to(ROOT).as_posix() for p in sorted((ROOT / "spa_viz").rglob("*.py"))]
    missing = [m for m in modules if m not in names]
    assert not missing, f"add their packages to [tool.setuptools] packages in pyproject.toml: {missing}"
    app = [f"spa_viz_app/{p.name}" for p in sorted((ROOT / "app").glob("*.py"))]
    assert set(app) <= names and "spa_viz_app/README.md" in names
    shipped = {name.split("/")[2] for name in names if name.startswith("spa_viz/checkpoints/")}
    assert shipped == set(SHIPPED)
    for name in SHIPPED:
        for file in ("config.json", "model.safetensors", "metrics.json", "README.md"):
            assert f"spa_viz/checkpoints/{name}/{file}" in names
    assert wheel.stat().st_size < MAX_WHEEL_BYTES, f"{wheel.stat().st_size / 2**20:.1f} MB"


def test_installed_spa_viz_finds_its_checkpoints_from_any_folder(
    installed: Path, outside: tuple[Path, dict[str, str]]
) -> None:
    folder, env = outside
    probe = (
        "import importlib.util, json, spa_viz; from spa_viz.io.paths import checkpoint_search_path; "
        "print(json.dumps({'spa_viz': spa_viz.__file__, 'app': importlib.util.find_spec('spa_viz_app').origin, "
        "'top_level_app': importlib.util.find_spec('app') is not None, "
        "'search': [str(p) for p in checkpoint_search_path()], 'available': spa_viz.available()}))"
    )
    run = _run([installed / "bin" / "python", "-c", probe], cwd=folder, env=env)
    assert run.returncode == 0, run.stderr
    found = json.loads(run.stdout)
    assert all(Path(found[key]).is_relative_to(installed) for key in ("spa_viz", "app")), found
    assert not found["top_level_app"]
    assert [Path(p).relative_to(installed).parts[-2:] for p in found["search"]] == [("spa_viz", "checkpoints")]
    assert found["available"] == sorted(SHIPPED)


def test_installed_spa_viz_analyze_runs_outside_the_checkout(
    installed: Path, outside: tuple[Path, dict[str, str]]
) -> None:
    folder, env = outside
    picture = Image.new("RGB", (64, 64), (20, 20, 20))
    ImageDraw.Draw(picture).rectangle((16, 16, 40, 48), fill=(240, 240, 240))
    picture.save(folder / "digit.png")
    spa_viz = installed / "bin" / "spa-viz"
    run = _run([spa_viz, "analyze", "digit.png", "--model", "spa-vit-digits", "--out", "out"], cwd=folder, env=env)
    assert run.returncode == 0, run.stderr
    summary = json.loads((folder / "out" / "summary.json").read_text())
    assert summary["model"] == "spa-vit-digits" and [a["output"] for a in summary["analysed"]] == ["digit"]
    written = json.loads((folder / "out" / "digit" / "summary.json").read_text())["files"]
    assert "predictions.png" in written and all((folder / "out" / "digit" / name).is_file() for name in written)

    extra = folder / "my-checkpoints"
    extra.mkdir()
    command = [spa_viz, "analyze", "digit.png", "--model", "no-such-model", "--checkpoints", extra, "--out", "o"]
    missing = _run(command, cwd=folder, env=env)
    assert missing.returncode == 2
    assert str(extra.resolve()) in missing.stderr and "$SPA_VIZ_CHECKPOINTS" in missing.stderr, missing.stderr
    assert str(Path("spa_viz", "checkpoints")) in missing.stderr, "the shipped folder is named as searched"


def test_installed_spa_viz_app_takes_its_options(installed: Path, outside: tuple[Path, dict[str, str]]) -> None:
    folder, env = outside
    run = _run([installed / "bin" / "spa-viz", "app", "--help"], cwd=folder, env=env)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("usage: spa-viz app") and "--port" in run.stdout and "--checkpoints" in run.stdout


def test_spa_viz_app_passes_every_option_to_the_app(capsys: pytest.CaptureFixture[str]) -> None:
    from spa_viz.cli import main

    with pytest.raises(SystemExit) as shown:
        main(["app", "--help"])
    assert shown.value.code == 0 and capsys.readouterr().out.startswith("usage: spa-viz app")
    with pytest.raises(SystemExit) as refused:
        main(["app", "--port", "not-a-port"])
    assert refused.value.code == 2 and "--port: invalid int value" in capsys.readouterr().err
