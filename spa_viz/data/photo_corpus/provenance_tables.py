"""What a model card says about the corpus: its provenance record and markdown tables (packages,
photos per package and split, views per split, the second check)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from spa_viz.data.photo_corpus.reader import ViewSet, load_index
from spa_viz.data.photo_corpus.splits import CORPUS_SPLITS
from spa_viz.data.views import ViewConfig

__all__ = ["provenance", "provenance_markdown"]


def provenance(seed: int = 0, config: ViewConfig | None = None, root: Path | str | None = None) -> dict[str, Any]:
    """What the model card needs: packages used (name, version, .deb size), every photo and object
    with package, version, path, license and split, the rejected candidates, and view counts."""
    _, index = load_index(seed, config, root)
    return {
        "packages": index["packages"],
        "inspected_unused": index["inspected_unused"],
        "photos": index["photos"],
        "objects": index["objects"],
        "rejected": index["rejected"],
        "views": {split: len(specs) for split, specs in index["views"].items()},
        "labels": index["labels"],
        "teacher": index["teacher"],
        "seed": index["seed"],
        "command": f"python -m spa_viz.data.photo_corpus prepare --seed {index['seed']}",
    }


def _summary(index: dict[str, Any], second: ViewSet | None = None) -> dict[str, Any]:
    """Counts per package and split, view counts, and the second check's object-token coverage."""
    per_package: dict[str, dict[str, int]] = {}
    for record in index["photos"] + index["objects"]:
        counts = per_package.setdefault(record["package"], {})
        counts[record["split"]] = counts.get(record["split"], 0) + 1
        counts["duplicates merged"] = counts.get("duplicates merged", 0) + len(record["duplicates"])
    kinds: dict[str, dict[str, int]] = {}
    for split, specs in index["views"].items():
        for spec in specs:
            kinds.setdefault(split, {}).setdefault(spec["kind"], 0)
            kinds[split][spec["kind"]] += 1
    summary = {"per_package": per_package, "views": kinds, "rejected": len(index["rejected"])}
    if second is not None:
        columns = second.tensors()
        summary["second_check"] = {
            "images": len(second),
            "object_token_coverage": round(float(columns["object_tokens"].float().mean()), 4),
            "object_pixel_coverage": round(float(columns["object_mask"].float().mean()), 4),
            "teacher_keep": round(float(columns["labels"].float().mean()), 4),
        }
    return summary


def provenance_markdown(seed: int = 0, config: ViewConfig | None = None, root: Path | str | None = None) -> str:
    """Markdown tables for a model card: packages used, photos per package and split, views per split."""
    directory, index = load_index(seed, config, root)
    summary = _summary(index, ViewSet(directory, "second_check", index))
    lines = ["| package | version | .deb size | role |", "|---|---|---|---|"]
    for p in index["packages"]:
        lines.append(f"| {p['name']} | {p['version']} | {p['deb_size'] / 1e6:.1f} MB | {p['role']} |")
    lines += [
        "",
        "| source | " + " | ".join(CORPUS_SPLITS) + " | duplicates merged |",
        "|---" * (len(CORPUS_SPLITS) + 2) + "|",
    ]
    for package, counts in sorted(summary["per_package"].items()):
        lines.append(
            f"| {package} | "
            + " | ".join(str(counts.get(s, 0)) for s in CORPUS_SPLITS)
            + f" | {counts['duplicates merged']} |"
        )
    lines += ["", "| split | " + " | ".join(["plain", "augment", "paste", "object", "total"]) + " |", "|---" * 6 + "|"]
    for split in CORPUS_SPLITS:
        kinds = summary["views"][split]
        lines.append(
            f"| {split} | "
            + " | ".join(str(kinds.get(k, 0)) for k in ("plain", "augment", "paste", "object"))
            + f" | {sum(kinds.values())} |"
        )
    check = summary["second_check"]
    lines += [
        "",
        f"Second check: {check['images']} photographed objects (exact alpha masks) on held-out backgrounds; "
        f"objects cover {check['object_token_coverage']:.1%} of the tokens ({check['object_pixel_coverage']:.1%} of the pixels).",
    ]
    return "\n".join(lines)
