"""``spa-viz``: ``analyze`` on a folder of good, corrupt and non-image files, its overwrite guard and default
model; the other commands run the recipes and name themselves ``spa-viz ...``."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import spa_viz
from spa_viz.cli import DELEGATED, main
from spa_viz.io.checkpoint import save_checkpoint
from spa_viz.models.zoo import build_timm_spa_vit

GOOD = ("rgb", "rgba", "gray")
#: a small random ViT-SPA checkpoint: 64 px input, 8 px patches, SPA in layers 1-3
TINY = {
    "architecture": "timm_spa_vit",
    "timm_name": "vit_tiny_patch16_224",
    "timm_kwargs": {"img_size": 64, "patch_size": 8, "embed_dim": 48, "depth": 4, "num_heads": 2, "num_classes": 7},
    "spa": {"start_layer": 1},
    "image_size": 64,
    "class_names": [f"shape {i}" for i in range(7)],
    "trained_gates": False,
}


@dataclass
class Run:
    code: int
    messages: list[str]
    stdout: str


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def run_cli(*argv: str) -> Run:
    """``main(argv)`` with the CLI's log messages and stdout captured."""
    handler = _Records()
    logger = logging.getLogger("spa_viz.cli")
    logger.addHandler(handler)
    stdout = io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout):
            code = main(list(argv))
    finally:
        logger.removeHandler(handler)
    return Run(code, handler.messages, stdout.getvalue())


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)).save(folder / "rgb.png")
    Image.fromarray(rng.integers(0, 256, (64, 64, 4), dtype=np.uint8), "RGBA").save(folder / "rgba.png")
    Image.fromarray(rng.integers(0, 256, (50, 70), dtype=np.uint8), "L").save(folder / "gray.jpg")
    (folder / "corrupt.jpg").write_bytes((folder / "gray.jpg").read_bytes()[:120])
    (folder / "notes.txt").write_text("not an image")
    return folder


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = tmp_path_factory.mktemp("models") / "tiny"
    return str(save_checkpoint(build_timm_spa_vit(TINY), folder, TINY))


@pytest.fixture(scope="module")
def out(inputs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("runs") / "out"


@pytest.fixture(scope="module")
def first(inputs: Path, out: Path, model: str) -> Run:
    return run_cli("analyze", str(inputs), "--model", model, "--out", str(out), "--threshold", "0.6")


def test_folder_run_skips_bad_files_with_exit_code_1(first: Run, inputs: Path, out: Path) -> None:
    assert first.code == 1
    warnings = "\n".join(first.messages)
    assert f"skipped {inputs / 'corrupt.jpg'}: corrupt image" in warnings
    assert f"skipped {inputs / 'notes.txt'}: not an image" in warnings
    assert "untrained gates" in warnings
    assert first.stdout.strip() == f"spa-viz: analysed 3 image(s), skipped 2; results in {out}"


def test_outputs_per_image(first: Run, out: Path) -> None:
    run = json.loads((out / "summary.json").read_text())
    assert sorted(a["output"] for a in run["analysed"]) == sorted(GOOD)
    assert {Path(s["input"]).name: s["reason"].split(" (")[0] for s in run["skipped"]} == {
        "corrupt.jpg": "corrupt image",
        "notes.txt": "not an image",
    }
    assert run["spa"]["threshold"] == 0.6 and run["task"] == "classification"
    assert run["skipped"] and all(s["reason"] for s in run["skipped"])
    assert (out / "plotly.min.js").stat().st_size > 100_000
    for name in GOOD:
        summary = json.loads((out / name / "summary.json").read_text())
        layers = [str(layer["layer"]) for layer in summary["trace"]["layers"]]
        assert layers and list(summary["kept_counts"]) == layers
        assert summary["compute"]["backbone_macs_dense"] > 0 and summary["compute"]["backbone_macs_run"] > 0
        assert {"preprocess_s", "forward_s", "render_s"} <= set(summary["timings"])
        assert set(summary["score_sources"]) == set(layers) and {"layers.png", "token_age.png"} <= set(summary["files"])
        assert summary["input_size"] == [64, 64]
        assert summary["predictions"]["top5"][0]["label"].startswith("shape ")
        assert sorted(summary["files"]) == sorted(p.name for p in (out / name).iterdir())
        for layer in layers:
            for kind in ("gate", "keep", "layout"):
                with Image.open(out / name / f"{kind}_L{layer}.png") as picture:
                    assert picture.mode == "RGB" and min(picture.size) > 50
            html = (out / name / f"layout_L{layer}.html").read_text()
            assert "../plotly.min.js" in html and "Packed tokens of one image" in html  # one image: its token grid


def test_refuses_to_overwrite_without_flag(first: Run, inputs: Path, out: Path, model: str) -> None:
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    again = run_cli("analyze", str(inputs / "rgb.png"), "--model", model, "--out", str(out))
    assert again.code == 2
    assert any("refusing to overwrite" in m and "--overwrite" in m for m in again.messages)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_overwrite_flag_replaces_outputs(first: Run, inputs: Path, out: Path, model: str) -> None:
    summary = out / "rgb" / "summary.json"
    summary.write_text("{}")
    again = run_cli("analyze", str(inputs / "rgb.png"), "--model", model, "--out", str(out), "--overwrite")
    assert again.code == 0
    assert "kept_counts" in json.loads(summary.read_text())


def test_single_file_with_container_policy(tmp_path: Path, model: str) -> None:
    Image.new("RGB", (40, 40), (10, 200, 30)).save(tmp_path / "green.jpg")
    args = ["--policy", "container", "--container-len", "64", "--attribution", "rollout"]
    run = run_cli("analyze", str(tmp_path / "green.jpg"), "--model", model, "--out", str(tmp_path / "o"), *args)
    assert run.code == 0
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["spa"]["policy"] == "container"
    summary = json.loads((tmp_path / "o" / "green" / "summary.json").read_text())
    assert summary["attribution"]["method"] == "attention_rollout"
    assert (tmp_path / "o" / "green" / "attribution.png").is_file()


def test_fusion_switch_changes_what_later_layers_select_by(tmp_path: Path, model: str) -> None:
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    runs = {}
    for fusion in ("chain", "none"):
        out = tmp_path / fusion
        assert (
            run_cli("analyze", str(tmp_path / "a.png"), "--model", model, "--out", str(out), "--fusion", fusion).code
            == 0
        )
        assert json.loads((out / "summary.json").read_text())["spa"]["fusion"] == fusion
        runs[fusion] = json.loads((out / "a" / "summary.json").read_text())
    assert set(runs["none"]["score_sources"].values()) == {"own logit"}
    chain = runs["chain"]["score_sources"]
    assert chain["1"] == "own logit" and all(source.startswith("fused") for key, source in chain.items() if key != "1")
    assert [layer["fusion"] for layer in runs["chain"]["trace"]["layers"]] == ["chain"] * 3
    with pytest.raises(SystemExit) as exit_info, contextlib.redirect_stderr(io.StringIO()) as err:
        main(["analyze", str(tmp_path / "a.png"), "--model", model, "--out", str(tmp_path / "x"), "--fusion", "max"])
    assert exit_info.value.code == 2 and "'stage', 'chain', 'none'" in err.getvalue()


def test_usage_errors_exit_2(tmp_path: Path, model: str) -> None:
    assert run_cli("analyze", str(tmp_path / "missing.png"), "--model", model, "--out", str(tmp_path / "o")).code == 2
    assert not (tmp_path / "o").exists()
    with pytest.raises(SystemExit) as exit_info:
        main(["analyze", str(tmp_path), "--model", model, "--out", str(tmp_path / "o"), "--policy", "rows"])
    assert exit_info.value.code == 2


def test_analyze_opens_on_the_apps_default_model(tmp_path: Path, model: str, monkeypatch: pytest.MonkeyPatch) -> None:
    shipped = tmp_path / "checkpoints"
    shutil.copytree(model, shipped / "spa-vit-digits")  # stands in for the shipped default
    monkeypatch.setenv("SPA_VIZ_CHECKPOINTS", str(shipped))
    monkeypatch.setattr("spa_viz.io.paths.BUILTIN_CHECKPOINT_DIRS", ())  # the search path: only that folder
    Image.new("RGB", (40, 40), (200, 30, 30)).save(tmp_path / "red.png")
    run = run_cli("analyze", str(tmp_path / "red.png"), "--out", str(tmp_path / "o"))
    assert run.code == 0
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["model"] == "spa-vit-digits"


def test_train_evaluate_and_bench_run_the_recipes(capsys: pytest.CaptureFixture[str]) -> None:
    if "spa-vit-digits" not in spa_viz.available():
        pytest.skip("the shipped spa-vit-digits checkpoint is not here")
    assert (
        main(["evaluate", "detection", "--checkpoint", "spa-vit-digits", "--num", "2", "--no-timing", "--no-cache"])
        == 0
    )
    assert "| AP50 |" in capsys.readouterr().out
    for command in (["train", "saliency", "--help"], ["bench", "spt", "--help"]):
        with pytest.raises(SystemExit) as exit_info:
            main(command)
        assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--gate-steps" in out and "--rank" in out and "--ratios" in out


@pytest.mark.parametrize("command", sorted(DELEGATED))
def test_every_target_names_the_spa_viz_command_in_its_usage(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    """``--help`` of each target shows the command a user types (the recipes record it in metrics.json)."""
    for target in DELEGATED[command]:
        with pytest.raises(SystemExit) as exit_info:
            main([command, target, "--help"])
        assert exit_info.value.code == 0
        assert capsys.readouterr().out.startswith(f"usage: spa-viz {command} {target} "), target
