"""The Mask R-CNN task adapter: letterboxed input, predictions with masks, the drawing, and an
attribution target that follows the top detection through perturbed inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spa_viz.analysis.attribution import attribute
from spa_viz.models.detection import spt_mask_rcnn
from spa_viz.viz.tasks import MaskRCNNTask, adapter_for

HEAD = {"fpn_channels": 16, "box_representation": 32, "mask_layers": [16], "mask_predictor_channels": 16}
BODY = {"img_size": 64, "embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 2, 4]}


@pytest.fixture(scope="module")
def adapted() -> tuple[MaskRCNNTask, torch.Tensor, list[dict]]:
    torch.manual_seed(0)
    model = spt_mask_rcnn("digits", 3, backbone_kwargs=BODY, head=HEAD, transform={"min_size": [64], "max_size": 64})
    config = {**model.architecture_config(), "image_size": 64, "class_names": ["a", "b", "c"]}
    adapter = adapter_for(model.eval(), config)
    adapter.min_score = 0.0  # an untrained model: show every detection torchvision keeps
    pixels = np.random.default_rng(0).integers(0, 255, (48, 80, 3), dtype=np.uint8)
    x = adapter.preprocess(pixels)
    with torch.no_grad():
        output = model(x[None])
    return adapter, x, output


def test_adapter_is_chosen_by_architecture_and_letterboxes(adapted) -> None:
    adapter, x, output = adapted
    assert isinstance(adapter, MaskRCNNTask) and adapter.task == "detection"
    assert x.shape == (3, 64, 64) and len(output) == 1


def test_predictions_and_drawing_include_masks(adapted) -> None:
    adapter, x, output = adapted
    found = adapter.predictions(output, 0)["detections"]
    assert found and all(d["label"] in "abc" and d["mask_pixels"] >= 0 for d in found)
    display = np.zeros((128, 128, 3), np.uint8)
    drawn = adapter.draw(display, output, 0)
    assert drawn.shape[1] == 128 and drawn.shape[0] > 128 and drawn[-128:].any()  # title strip + painted masks


def test_attribution_target_follows_the_top_detection(adapted) -> None:
    adapter, x, output = adapted
    target, described = adapter.target(output, 0)
    assert "top detection" in described
    images = x[None].repeat(2, 1, 1, 1).requires_grad_(True)
    scores = target(adapter.model(images))
    assert scores.shape == (2,) and torch.allclose(scores[0], output[0]["scores"][0], atol=1e-5)
    scores.sum().backward()
    assert images.grad.abs().sum() > 0
    maps = attribute(adapter.model, x[None], target, "integrated_gradients", n_steps=2)
    assert maps.maps.shape == (1, 16, 16) and maps.maps.abs().sum() > 0
