"""Detection and multi-label heads, and the Detector wrapper on SPA-ViT and SPT backbones."""

from __future__ import annotations

import math

import pytest
import torch

import spa_viz
from spa_viz.io.checkpoint import load_checkpoint, save_checkpoint
from spa_viz.models.detection.detector import Detector, build_spa_vit_detector, build_spt_detector, keep_ratios
from spa_viz.models.detection.heads import (
    CenterNetHead,
    LightFPN,
    MultiLabelHead,
    centernet_loss,
    decode_centernet,
    focal_loss,
    multi_hot,
)

VIT_CONFIG = {
    "architecture": "spa_vit_detector",
    "backbone": {
        "timm_name": "spa_vit_digits",
        "timm_kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 3, "num_heads": 2},
        "spa": {"start_layer": 1},
    },
    "head": {"num_classes": 4, "hidden": 16},
}
SPT_CONFIG = {
    "architecture": "spt_detector",
    "backbone": {
        "timm_name": "spt_digits",
        "timm_kwargs": {"img_size": 64, "embed_dim": 16, "num_heads": [1, 2, 4, 8]},
    },
    "head": {"num_classes": 4, "hidden": 16, "fpn_channels": 16},
}
TARGETS = [
    {"boxes": torch.tensor([[2.0, 3.0, 14.0, 17.0]]), "labels": torch.tensor([1])},
    {"boxes": torch.tensor([[16.0, 16.0, 30.0, 28.0], [0.0, 20.0, 9.0, 31.0]]), "labels": torch.tensor([0, 3])},
]


def test_centernet_head_shapes_and_stride() -> None:
    head = CenterNetHead(24, 5, stride=16, hidden=8, upsample=1)
    out = head(torch.randn(2, 24, 4, 6))
    assert head.output_stride == 8
    assert out["heatmap"].shape == (2, 5, 8, 12)
    assert out["size"].shape == out["offset"].shape == (2, 2, 8, 12)
    assert torch.allclose(torch.sigmoid(out["heatmap"]).mean(), torch.tensor(0.1), atol=0.05)  # prior
    with pytest.raises(ValueError, match="NCHW"):
        head(torch.randn(2, 24, 4))


def test_focal_loss_toy_target() -> None:
    target = torch.zeros(1, 1, 5, 5)
    target[0, 0, 2, 2] = 1.0
    target[0, 0, 2, 3] = 0.5  # near a centre: down-weighted negative
    good = torch.full_like(target, -8.0)
    good[0, 0, 2, 2] = 8.0
    bad = -good
    assert focal_loss(good, target) < 1e-3
    assert focal_loss(bad, target) > 1.0
    # a confident false peak right next to the centre costs less than the same peak far away
    near, far = good.clone(), good.clone()
    near[0, 0, 2, 3], far[0, 0, 0, 0] = 4.0, 4.0
    assert focal_loss(near, target) < focal_loss(far, target)
    # normalised by the number of centres
    two = torch.cat([target, target], dim=1)
    assert torch.isclose(focal_loss(torch.cat([bad, bad], 1), two), focal_loss(bad, target))


def test_decode_recovers_boxes_from_synthetic_heatmap() -> None:
    stride, grid = 8, (6, 7)
    boxes = torch.tensor([[3.0, 5.0, 21.0, 30.0], [30.0, 10.0, 50.0, 22.0]])
    labels = torch.tensor([2, 0])
    heat = torch.full((1, 3, *grid), -10.0)
    size = torch.zeros(1, 2, *grid)
    offset = torch.zeros(1, 2, *grid)
    scores = [0.9, 0.7]
    for box, label, score in zip(boxes, labels, scores):
        cx, cy = (box[0] + box[2]) / 2 / stride, (box[1] + box[3]) / 2 / stride
        x, y = int(cx), int(cy)
        heat[0, label, y, x] = math.log(score / (1 - score))
        heat[0, label, y, min(x + 1, grid[1] - 1)] = 0.0  # a weaker neighbour the 3x3 max-pool removes
        size[0, :, y, x] = torch.tensor([box[2] - box[0], box[3] - box[1]]) / stride
        offset[0, :, y, x] = torch.tensor([cx - x, cy - y])
    out_boxes, out_scores, out_labels = decode_centernet(
        {"heatmap": heat, "size": size, "offset": offset}, stride, top_k=10, threshold=0.6
    )[0]
    assert out_labels.tolist() == labels.tolist()
    assert torch.allclose(out_scores, torch.tensor(scores), atol=1e-5)
    assert torch.allclose(out_boxes, boxes, atol=1e-4)


def test_centernet_loss_is_low_for_the_right_outputs_and_handles_empty_images() -> None:
    stride = 8
    targets = [
        {"boxes": torch.tensor([[8.0, 8.0, 24.0, 24.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},
    ]
    heat = torch.full((2, 2, 4, 4), -9.0, requires_grad=True)
    size = torch.zeros(2, 2, 4, 4)
    size[0, :, 2, 2] = 2.0
    offset = torch.zeros(2, 2, 4, 4)
    losses = centernet_loss({"heatmap": heat, "size": size, "offset": offset}, targets, stride)
    assert losses["size"] == 0 and losses["offset"] == 0
    assert losses["heatmap"] > 1.0  # the centre is missing from the heat-map
    losses["task"].backward()
    assert heat.grad[0, 1, 2, 2] < 0  # gradient raises the centre logit


def test_light_fpn_and_multilabel_head() -> None:
    fpn = LightFPN([8, 16, 32], 12)
    out = fpn([torch.randn(2, 8, 12, 12), torch.randn(2, 16, 6, 6), torch.randn(2, 32, 3, 3)])
    assert out.shape == (2, 12, 12, 12)
    head = MultiLabelHead(12, 4)
    for features in (out, out.flatten(2).transpose(1, 2), out.mean((2, 3))):
        assert head(features).shape == (2, 4)
    hot = multi_hot(TARGETS, 4)
    assert hot.tolist() == [[0, 1, 0, 0], [1, 0, 0, 1]]
    loss = head.loss(head(out), TARGETS)
    assert loss.ndim == 0 and loss > 0
    with pytest.raises(ValueError, match="outside"):
        multi_hot(TARGETS, 2)


@pytest.mark.parametrize("config, size", [(VIT_CONFIG, 32), (SPT_CONFIG, 64)])
def test_detector_forward_loss_decode_trace(config, size) -> None:
    builder = build_spa_vit_detector if config["architecture"] == "spa_vit_detector" else build_spt_detector
    detector = builder(config).train()
    images = torch.randn(2, 3, size, size)
    out = detector(images)
    cells = size // detector.stride
    assert out["heatmap"].shape == (2, 4, cells, cells)
    losses = detector.loss(out, TARGETS)
    select = detector.selection_loss(TARGETS, (size, size), alpha=0.5)
    (losses["task"] + select).backward()
    gates = [b.gate.proj.weight.grad for b in spa_viz.spa_blocks(detector)]
    assert gates and all(g is not None for g in gates)
    grids = {gate.grid for gate in spa_viz.spa_context(detector).gates}
    assert grids == {grid.shape for grid in detector.selection_grids((size, size))}
    assert len(keep_ratios(detector)) == len(spa_viz.spa_blocks(detector))

    detector.eval()
    out, tr = spa_viz.trace(detector, images)
    assert [t.layer for t in tr.layers] == [b.spa_layer for b in spa_viz.spa_blocks(detector)]
    assert tr.backbone_flops_dense > 0
    for boxes, scores, labels in detector.decode(out):
        assert boxes.shape[1] == 4 and len(boxes) == len(scores) == len(labels) <= detector.top_k
        assert (boxes >= 0).all() and (boxes <= size).all()


def test_detector_checkpoint_roundtrip_keeps_live_spa_settings(tmp_path) -> None:
    detector = build_spa_vit_detector(VIT_CONFIG).eval()
    spa_viz.configure(detector, threshold=0.3)
    folder = save_checkpoint(detector, tmp_path / "det", detector.architecture_config())
    loaded = spa_viz.load(folder)
    assert isinstance(loaded, Detector)
    assert spa_viz.spa_context(loaded).config.threshold == 0.3
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a, b = detector(images), loaded(images)
    assert all(torch.equal(a[k], b[k]) for k in a)
    spt = build_spt_detector(SPT_CONFIG)
    loaded_spt = load_checkpoint(save_checkpoint(spt, tmp_path / "spt", spt.architecture_config()))
    assert all(torch.equal(x, y) for x, y in zip(spt.state_dict().values(), loaded_spt.state_dict().values()))


def test_detector_rejects_bad_configs() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        build_spa_vit_detector({**VIT_CONFIG, "head": {"hidden": 8}})
    with pytest.raises(ValueError, match="start_layer"):
        build_spa_vit_detector({**VIT_CONFIG, "backbone": {**VIT_CONFIG["backbone"], "spa": {}}})
    with pytest.raises(ValueError, match="unsupported backbone"):
        Detector(torch.nn.Linear(2, 2), 3)
