"""``spa-viz analyze``: what an SPA model kept, packed and predicted for images on disk.

For every image it writes, into ``OUT/<image name>/``: gate-score and keep-mask overlays per SPA
layer (PNG), the predictions drawn on the input, the packed layout of each SPA layer (plotly HTML
plus a PNG drawn with pillow, since plotly's own PNG export needs kaleido and Chrome), an optional
attribution map, and ``summary.json`` (kept counts, FLOPs, timings). ``OUT/summary.json`` lists what
was analysed and skipped. Exit codes: 0 ok, 1 some inputs skipped, 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, UnidentifiedImageError
from plotly.offline import get_plotlyjs
from torch import nn
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

import spa_viz
from spa_viz.analysis import render
from spa_viz.analysis.attribution import attribute
from spa_viz.analysis.trace import LayerTrace, Trace
from spa_viz.checkpoint import CheckpointError
from spa_viz.tasks import TaskAdapter, adapter_for

__all__ = ["main"]

_log = logging.getLogger("spa_viz.cli")
ATTRIBUTIONS = {
    "ig": "integrated_gradients",
    "ablation": "feature_ablation",
    "occlusion": "occlusion",
    "rollout": "attention_rollout",
}
PLOTLY_JS = "plotly.min.js"
RUN_SUMMARY = "summary.json"
DETECTION_MIN_SCORE = 0.3
DISPLAY_SIZE = 384


class UsageError(Exception):
    """A bad command line or output folder: exit code 2."""


def read_image(path: Path) -> np.ndarray:
    """RGB uint8 pixels of an image file; alpha is composited on white, grayscale expanded."""
    with Image.open(path) as image:
        image.load()
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


def layout_png(record: LayerTrace, cell: int = 14) -> np.ndarray:
    """The packed layout of one SPA layer as a picture, in the colours of ``packed_layout_figure``."""
    plan = record.plan
    slot_image, slot_token = plan.slot_image.numpy(), plan.slot_token.numpy()
    rows, length = slot_image.shape
    canvas = Image.new("RGB", (length * cell + 2, rows * (cell + 3) + 2), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r in range(rows):
        for c in range(length):
            x0, y0 = 1 + c * cell, 1 + r * (cell + 3)
            box = [x0, y0, x0 + cell - 2, y0 + cell - 1]
            image = int(slot_image[r, c])
            draw.rectangle(box, fill=render.PADDING_COLOR if image < 0 else render.image_color(image))
            if image < 0:
                draw.line(box, fill=(68, 68, 68), width=2)
                draw.line([box[0], box[3], box[2], box[1]], fill=(68, 68, 68), width=2)
            elif slot_token[r, c] < record.num_prefix:
                draw.ellipse([x0 + 3, y0 + 3, x0 + cell - 5, y0 + cell - 4], fill=(255, 255, 255), outline=(0, 0, 0))
    subtitle = (
        f"{rows} row(s) x {length} slots · fill {plan.fill_ratio:.1%} · "
        f"{plan.num_slots - plan.num_kept} padding slots (crossed) · prefix tokens dotted"
    )
    panel = np.asarray(canvas)
    if panel.shape[1] < 360:
        panel = np.pad(panel, ((0, 0), (0, 360 - panel.shape[1]), (0, 0)), constant_values=255)
    return render.add_title(panel, f"Packed batch · layer {record.layer} · {plan.policy} policy", subtitle)


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
    taken = [out / RUN_SUMMARY] + [out / name for name in names]
    clashes = [str(p) for p in taken if p.exists() and (p.is_file() or any(p.iterdir()))]
    if clashes:
        shown = ", ".join(clashes[:3]) + (f" and {len(clashes) - 3} more" if len(clashes) > 3 else "")
        raise UsageError(f"refusing to overwrite existing output in {out}: {shown}; pass --overwrite to replace it")


def save_png(path: Path, pixels: np.ndarray) -> None:
    Image.fromarray(pixels).save(path)


def _enlarge(pixels: np.ndarray) -> np.ndarray:
    """Nearest-neighbour enlargement to at least DISPLAY_SIZE px, so tokens stay readable."""
    factor = max(1, -(-DISPLAY_SIZE // max(pixels.shape[:2])))
    return np.ascontiguousarray(pixels.repeat(factor, 0).repeat(factor, 1))


def analyze_image(
    pixels: np.ndarray, task: TaskAdapter, folder: Path, threshold: float, attribution: str | None
) -> dict[str, Any]:
    """Run, draw and summarise one image into ``folder``; returns its JSON summary."""
    timings: dict[str, float] = {}
    start = time.perf_counter()
    x = task.preprocess(pixels)[None]
    timings["preprocess_s"] = time.perf_counter() - start
    start = time.perf_counter()
    output, tr = spa_viz.trace(task.model, x)
    timings["forward_s"] = time.perf_counter() - start
    start = time.perf_counter()
    display = _enlarge(task.display(x[0]))
    preds = task.predictions(output, 0)
    folder.mkdir(parents=True, exist_ok=True)
    files = ["predictions.png"]
    save_png(folder / files[0], task.draw(display, output, 0))
    layers = _draw_layers(tr, display, folder, threshold)
    files += [name for record in layers for name in record["files"]]
    timings["render_s"] = time.perf_counter() - start
    summary: dict[str, Any] = {"task": task.task, "input_size": list(task.input_size), "predictions": preds}
    if attribution is not None:
        start = time.perf_counter()
        target, explained = task.target(output, 0)
        result = attribute(task.model, x, target, attribution)
        files.append("attribution.png")
        picture = render.attribution_overlay(display, result.maps[0])
        picture = render.add_title(picture, f"Attribution · {attribution}", explained)
        save_png(folder / files[-1], picture)
        summary["attribution"] = {"method": attribution, "target": explained, "settings": result.settings}
        timings["attribution_s"] = time.perf_counter() - start
    summary |= {
        "kept_counts": {str(r["layer"]): r["kept"] for r in layers},
        "flops": {
            "backbone_dense": tr.backbone_flops_dense,
            "backbone_run": tr.backbone_flops_run,
            "backbone_saving": round(tr.backbone_saving, 4),
        },
        "trace": tr.summary(),
        "timings": {k: round(v, 4) for k, v in timings.items()},
        "files": files + ["summary.json"],
    }
    (folder / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _draw_layers(tr: Trace, display: np.ndarray, folder: Path, threshold: float) -> list[dict[str, Any]]:
    """Gate, keep and packed-layout pictures of every SPA layer."""
    drawn = []
    for record in tr.layers:
        total = record.keep.shape[1]
        kept = int(record.kept_counts[0])
        gate_map = record.soft_gate[0].reshape(record.grid)
        gate = render.score_overlay(display, gate_map, threshold=threshold)
        keep = render.keep_overlay(display, record.keep_map(0))
        layer = record.layer
        names = [f"gate_L{layer}.png", f"keep_L{layer}.png", f"layout_L{layer}.html", f"layout_L{layer}.png"]
        outline = f"white outline: gate > {threshold:g}"
        save_png(folder / names[0], render.add_title(gate, f"Soft gate · layer {layer}", outline))
        save_png(folder / names[1], render.add_title(keep, f"Kept tokens · layer {layer}", f"{kept} of {total} kept"))
        figure = render.packed_layout_figure(
            record.plan,
            grid=record.grid,
            num_prefix=record.num_prefix,
            scores=record.soft_gate,
            image_names=[folder.name],
        )
        figure.write_html(folder / names[2], include_plotlyjs=f"../{PLOTLY_JS}")
        save_png(folder / names[3], layout_png(record))
        drawn.append({"layer": layer, "kept": kept, "files": names})
    return drawn


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spa-viz", description="Look inside Select and Pack Attention models.")
    commands = parser.add_subparsers(dest="command", required=True)
    analyze = commands.add_parser("analyze", help="overlays, packed layouts and a JSON summary per image")
    analyze.add_argument("inputs", nargs="+", type=Path, metavar="IMAGES_OR_FOLDERS")
    analyze.add_argument("--model", required=True, help="checkpoint name, checkpoint folder or timm model name")
    analyze.add_argument("--out", required=True, type=Path, help="output folder")
    analyze.add_argument("--threshold", type=float, help="keep tokens whose gate exceeds this (default: the model's)")
    analyze.add_argument("--policy", choices=("image", "container"), help="packing policy (default: the model's)")
    analyze.add_argument("--container-len", type=int, help="row length L of the container policy")
    analyze.add_argument("--attribution", choices=("none", *ATTRIBUTIONS), default="none")
    analyze.add_argument("--overwrite", action="store_true", help="replace existing output files")
    analyze.add_argument("--device", default="cpu")
    return parser


def _load(args: argparse.Namespace) -> tuple[nn.Module, TaskAdapter]:
    try:
        model = spa_viz.load(args.model, device=args.device)
        settings = {"threshold": args.threshold, "policy": args.policy, "container_len": args.container_len}
        changes = {k: v for k, v in settings.items() if v is not None}
        if changes:
            spa_viz.configure(model, **changes)
        task = adapter_for(model, getattr(model, "spa_viz_config", None) or {})
    except (CheckpointError, ValueError) as err:
        raise UsageError(str(err)) from err
    return model, task


def analyze(args: argparse.Namespace) -> int:
    """The ``analyze`` command; returns the exit code."""
    files, folders = collect_inputs(args.inputs)
    names = output_names(files)
    check_out(args.out, names, args.overwrite)
    model, task = _load(args)
    config = spa_viz.spa_context(model).config
    if not (getattr(model, "spa_viz_config", {}) or {}).get("trained_gates", True):
        _log.warning("%s has untrained gates: the keep masks are not meaningful", args.model)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / PLOTLY_JS).write_text(get_plotlyjs())
    analysed: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    with logging_redirect_tqdm():
        for path, name in tqdm(list(zip(files, names)), desc="analyze", unit="image", disable=not folders):
            try:
                pixels = read_image(path)
            except UnidentifiedImageError:
                skipped.append({"input": str(path), "reason": "not an image"})
            except (OSError, SyntaxError, ValueError) as err:
                skipped.append({"input": str(path), "reason": f"corrupt image ({err})"})
            else:
                method = ATTRIBUTIONS.get(args.attribution)
                summary = analyze_image(pixels, task, args.out / name, config.threshold, method)
                analysed.append({"input": str(path), "output": name, "kept_counts": summary["kept_counts"]})
                continue
            _log.warning("skipped %s: %s", path, skipped[-1]["reason"])
    run = {
        "model": str(args.model),
        "task": task.task,
        "spa": {"threshold": config.threshold, "policy": config.policy, "container_len": config.container_len},
        "analysed": analysed,
        "skipped": skipped,
    }
    (args.out / RUN_SUMMARY).write_text(json.dumps(run, indent=2))
    print(f"spa-viz: analysed {len(analysed)} image(s), skipped {len(skipped)}; results in {args.out}")
    return 1 if skipped else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point of ``spa-viz``; returns (and, as a script, exits with) the exit code."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return analyze(args)
    except UsageError as err:
        _log.error("%s", err)
        return 2


if __name__ == "__main__":
    sys.exit(main())
