"""The CenterNet digit detectors shipped in checkpoints/ (their cards and CI subsets are tested)."""

from spa_viz.models.zoo import checkpoints_dir

DIGIT_DETECTORS = (
    "dense-vit-digits",
    "spa-vit-digits",
    "spa-vit-digits-noselect",
    "spa-vit-digits-noselect-bias0",
    "spa-vit-digits-refresh",
    "spa-vit-digits-paper",
    "spa-vit-digits-noselect-refresh",
    "spa-vit-digits-softoff",
    "spa-vit-digits-gradient",
    "dense-spt-digits",
    "spt-digits",
)


def present(names: tuple[str, ...]) -> list[str]:
    """Those of ``names`` whose checkpoint folder holds a metrics.json."""
    return [name for name in names if (checkpoints_dir() / name / "metrics.json").is_file()]
