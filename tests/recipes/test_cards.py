"""Model cards come from the templates in ``spa_viz/recipes/cards``: every shipped README is exactly the
card its config.json and metrics.json render to, so cards and code cannot drift apart."""

from __future__ import annotations

import json

import pytest

from spa_viz.models.zoo import checkpoints_dir
from spa_viz.recipes.cards import render_card
from spa_viz.recipes.detection.card import model_card as detection_card
from spa_viz.recipes.saliency.card import model_card as saliency_card
from tests.recipes.shipped import DIGIT_DETECTORS
from tests.recipes.shipped import present as shipped_present

SHIPPED = (*DIGIT_DETECTORS, "spa-dinov2-s14-saliency")


def present() -> list[str]:
    return shipped_present(SHIPPED)


@pytest.mark.parametrize("name", present())
def test_shipped_readme_is_the_rendered_card(name: str) -> None:
    folder = checkpoints_dir() / name
    config = json.loads((folder / "config.json").read_text())
    metrics = json.loads((folder / "metrics.json").read_text())
    if config["architecture"] == "img_focus_spa":
        card = saliency_card(config, metrics)
    else:
        card = detection_card(config, metrics, metrics.get("command", ""))
    assert card == (folder / "README.md").read_text()


def test_a_missing_field_is_named() -> None:
    with pytest.raises(KeyError, match="table"):
        render_card("detection_curve", {})
