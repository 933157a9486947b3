"""Run timm's own model test-suite (``tests/test_models.py`` of the installed timm's sdist) on our presets.

``make test-timm`` (also part of ``make test-slow``; never of ``make test``: it downloads the sdist
once, into the git-ignored ``.cache/timm-sdist/``) runs::

    python -m tests.timm_upstream [extra pytest arguments]

It unpacks ``test_models.py`` next to timm's ``pyproject.toml`` (its pytest markers), tells the suite which
timm families our presets belong to (see :data:`FAMILY_LINES`), and runs it with ``spa_viz``
imported (``-p spa_viz``, which registers the ``spa_vit_*`` and ``spt_*`` presets) on

    -k "(spa_vit or spt_) and not pretrained and not fx"

Left out, and why:

* ``*pretrained*`` tests download hub weights (and our SPT presets have none).
* ``*fx*`` tests trace the model symbolically with torch.fx; SPA's token counts, pack plans and
  container shapes depend on the gate scores, which a symbolic trace cannot follow.
* TorchScript (``test_model_forward_torchscript``, skipped through timm's own ``EXCLUDE_JIT_FILTERS``):
  SPA blocks keep their per-forward state in a shared Python dataclass and build pack plans with
  data-dependent Python control flow, which ``torch.jit.script`` cannot compile (TorchScript is
  deprecated in PyTorch; timm excludes several of its own families the same way).

Measured (timm 1.0.31): 79 tests, all pass, in 30 min in one process on the 2-core CPU while it
was busy with other jobs; most of it is ``test_prune_intermediate_layers_contract`` (deep copies
and prunes every model at every feature index; 4 min for spa_vit_base_patch16_224).
``make test-timm TIMM_TEST_ARGS="-n 2"`` spreads it over both cores.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import timm

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache"
KEYWORDS = "(spa_vit or spt_) and not pretrained and not fx"
#: timm's per-test time limit (its ``TIMEOUT`` variable; 120-360 s by default). Pruning ViT-B at every
#: index took 226 s on a busy 2-core CPU, so allow more.
DEFAULT_TIMEOUT_S = 1200

#: Inserted into test_models.py after its filter lists, before ``TARGET_FWD_SIZE = ...``. The suite sorts models into families by
#: name and module: ``spa_vit_*`` are ViTs (token output, like timm's ``vit_*``: non-standard
#: spatial API, feature maps through ``forward_intermediates``); ``spt_*`` keep Swin's standard
#: spatial API. Both modules join the families whose ``forward_intermediates`` and pruning the suite
#: checks.
FAMILY_LINES = """
# spa-viz: our presets join the families they belong to (see spa-viz tests/timm_upstream.py)
NON_STD_FILTERS += ['spa_vit_*']
FEAT_INTER_FILTERS += ['spa_vit', 'spt']
EXCLUDE_JIT_FILTERS += ['spa_vit_*', 'spt_*']
"""
_ANCHOR = "TARGET_FWD_SIZE = MAX_FWD_SIZE = 384"

_log = logging.getLogger("timm_upstream")


def fetch_sdist(version: str) -> Path:
    """The timm ``version`` sdist, downloaded once with pip into ``.cache/timm-sdist/``."""
    folder = CACHE / "timm-sdist"
    archive = folder / f"timm-{version}.tar.gz"
    if not archive.is_file():
        _log.info("downloading the timm %s sdist into %s", version, folder)
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-binary",
                ":all:",
                "--no-deps",
                f"timm=={version}",
                "-d",
                str(folder),
            ],
            check=True,
        )
    return archive


def prepare_suite(archive: Path, version: str) -> Path:
    """Unpack timm's model tests and pytest config into ``.cache/timm-tests/VERSION/``, with the family lines."""
    target = CACHE / "timm-tests" / version
    target.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as sdist:
        source = sdist.extractfile(f"timm-{version}/tests/test_models.py").read().decode()
        pyproject = sdist.extractfile(f"timm-{version}/pyproject.toml").read()
    if source.count(_ANCHOR) != 1:
        raise RuntimeError(
            f"timm {version}'s test_models.py has changed: {_ANCHOR!r} not found once; update FAMILY_LINES"
        )
    (target / "test_models.py").write_text(source.replace(_ANCHOR, FAMILY_LINES + _ANCHOR))
    (target / "pyproject.toml").write_bytes(pyproject)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog="other arguments go to pytest (e.g. -n 2)"
    )
    _, pytest_args = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    version = timm.__version__
    suite = prepare_suite(fetch_sdist(version), version)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.setdefault("TIMEOUT", str(DEFAULT_TIMEOUT_S))
    command = [sys.executable, "-m", "pytest", "test_models.py", "-p", "spa_viz", "-p", "no:cacheprovider"]
    command += ["-k", KEYWORDS, "-q", "-rfEs", *pytest_args]
    _log.info("timm %s model tests in %s: %s", version, suite, " ".join(command[1:]))
    return subprocess.run(command, cwd=suite, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
