"""Renderers of the closer looks: click -> token, containers per image, merge groups, token attention."""

from __future__ import annotations

import numpy as np
import torch

import spa_viz
from spa_viz.analysis.token import inspect_token, record_block_inputs
from spa_viz.viz import inspection, overlays
from tests.layers.small_models import random_gates, small_vit


def test_a_click_maps_to_the_token_under_it_and_the_title_to_nothing() -> None:
    top = inspection.title_height(448)
    assert top == overlays.add_title(np.zeros((448, 448, 3), np.uint8), "a", "b").shape[0] - 448
    assert inspection.token_at(0, top, (448, 448), (16, 16), top) == (0, 0)
    assert inspection.token_at(447, top + 447, (448, 448), (16, 16), top) == (15, 15)
    assert inspection.token_at(28 * 5 + 3, top + 28 * 7 + 27, (448, 448), (16, 16), top) == (7, 5)
    assert inspection.token_at(10, top - 1, (448, 448), (16, 16), top) is None
    assert inspection.token_at(10, top + 448, (448, 448), (16, 16), top) is None


def _traced(policy: str, container_len: int | None = None):
    model = small_vit(policy=policy, container_len=container_len)
    random_gates(model, seed=3)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return model, images, *record_block_inputs(model, images)


def test_container_map_numbers_each_images_runs_and_marks_unkept_tokens() -> None:
    _, _, _, record, _ = _traced("image")
    layer = record.layers[0]
    for image in range(2):
        runs = inspection.container_map(layer, image).flatten()
        assert torch.equal(runs >= 0, layer.keep[image]), "kept tokens are in a run, the others are -1"
        assert set(runs[runs >= 0].tolist()) == {0}, "the image policy packs an image in one run"
    _, _, _, record, _ = _traced("container", 8)
    runs = inspection.container_map(record.layers[0], 0)
    kept = int(record.layers[0].keep[0].sum())
    assert int(runs.max()) + 1 >= kept // 8, "short containers split an image into several runs"


def test_token_attention_panel_draws_heads_and_greys_what_the_token_could_not_see() -> None:
    model, _, _, record, inputs = _traced("image")
    layer = record.layers[1]
    index = int((~layer.keep[0]).nonzero()[0]) if (~layer.keep[0]).any() else 0
    kept_index = int(layer.keep[0].nonzero()[0])
    width = layer.grid[1]
    display = np.full((128, 128, 3), 200, np.uint8)
    view = inspect_token(model, record, inputs, layer.layer, 0, kept_index // width, kept_index % width)
    heads = spa_viz.spa_blocks(model)[0].attn.num_heads
    panel = inspection.token_attention_panel(display, view, layer, panel_size=64)
    assert panel.shape[1] >= (heads + 1) * 64, "one tile per head plus the mean"
    dropped = inspect_token(model, record, inputs, layer.layer, 0, index // width, index % width)
    if not dropped.kept:
        assert dropped.spa_attention is None
        assert inspection.token_attention_panel(display, dropped, layer, panel_size=64).shape == panel.shape


def test_merge_groups_panel_colours_groups_and_highlights_one() -> None:
    display = np.full((64, 64, 3), 128, np.uint8)
    groups = torch.arange(16).reshape(4, 4)
    groups[0, 1] = groups[0, 0]  # patches (0, 0) and (0, 1) merged
    plain = inspection.merge_groups_panel(display, groups, "ToMe")
    top = plain.shape[0] - 64
    assert not np.array_equal(plain[top + 2, 2], display[2, 2]), "a merged group is tinted"
    assert np.array_equal(plain[top + 40, 40], display[40, 40]), "a lone patch is left as it is"
    focused = inspection.merge_groups_panel(display, groups, "ToMe", highlight=(0, 1))
    assert focused[top + 40, 40].sum() < display[40, 40].sum(), "patches of other groups are dimmed"
    assert np.array_equal(focused[top + 8, 8], display[8, 8]), "the clicked patch's group is shown as it is"
