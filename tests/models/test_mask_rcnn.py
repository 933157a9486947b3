"""Mask R-CNN on SPA backbones: builders, losses, keep-all = dense twin, labels after torchvision's
transform, box-only fallback, checkpoints, trace."""

from __future__ import annotations

import pytest
import torch
from timm.models.swin_transformer import SwinTransformer

import spa_viz
from spa_viz.io.checkpoint import load_checkpoint, save_checkpoint
from spa_viz.io.config import ConfigError
from spa_viz.models.detection import SPAMaskRCNN, spa_vit_mask_rcnn, spt_mask_rcnn, swin_mask_rcnn
from spa_viz.models.spt import load_swin_weights
from spa_viz.models.twin import dense_twin
from spa_viz.selection.labels import labels_from_boxes, labels_from_masks

SPT_BODY = {"img_size": 64, "embed_dim": 16, "depths": [1, 1, 2, 2], "num_heads": [1, 2, 4, 4]}
VIT_BODY = {"img_size": 64, "embed_dim": 32, "depth": 3, "num_heads": 2}
HEAD = {
    "fpn_channels": 16,
    "rpn_pre_nms_top_n_test": 100,
    "rpn_post_nms_top_n_test": 50,
    "box_representation": 32,
    "box_batch_size_per_image": 32,
    "mask_layers": [16],
    "mask_predictor_channels": 16,
}
TRANSFORM = {"min_size": [64], "max_size": 96}
KEEP_ALL = {"threshold": 0.0, "soft_gating": False}


def tiny_spt(**settings) -> SPAMaskRCNN:
    torch.manual_seed(0)
    return spt_mask_rcnn("digits", 3, backbone_kwargs=SPT_BODY, head=HEAD, transform=TRANSFORM, **settings)


def tiny_vit(**settings) -> SPAMaskRCNN:
    torch.manual_seed(0)
    return spa_vit_mask_rcnn("digits", 3, backbone_kwargs=VIT_BODY, head=HEAD, transform=TRANSFORM, **settings)


BUILDERS = {"spt": tiny_spt, "vit": tiny_vit}


def targets(count: int = 2, size: tuple[int, int] = (64, 64), masks: bool = True) -> list[dict]:
    out = []
    for i in range(count):
        boxes = torch.tensor([[4.0 + i, 6.0, 30.0, 28.0], [36.0, 30.0, 60.0, 62.0]])
        target = {"boxes": boxes, "labels": torch.tensor([0, 2])}
        if masks:
            mask = torch.zeros(2, *size, dtype=torch.bool)
            mask[0, 8:26, 6 + i : 28] = True
            mask[1, 32:60, 40:58] = True
            target["masks"] = mask
        out.append(target)
    return out


def _random_gates(model: SPAMaskRCNN) -> None:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for block in spa_viz.spa_blocks(model):
            block.gate.proj.weight.copy_(torch.randn(block.gate.proj.weight.shape, generator=generator))
            block.gate.proj.bias.zero_()


@pytest.mark.parametrize("kind", ["spt", "vit"])
def test_training_losses_include_selection_and_reach_every_part(kind: str) -> None:
    model = BUILDERS[kind]().train()
    losses = model(torch.randn(2, 3, 64, 64), targets())
    expected = {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask", "loss_select"}
    assert set(losses) == expected
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    sum(losses.values()).backward()
    gates = [b.gate.proj.weight.grad for b in spa_viz.spa_blocks(model)]
    assert gates and all(g is not None and g.abs().sum() > 0 for g in gates)
    mask_head = next(model.roi_heads.mask_predictor.parameters()).grad
    assert mask_head is not None and mask_head.abs().sum() > 0


@pytest.mark.parametrize("kind", ["spt", "vit"])
def test_eval_returns_detections_with_zero_based_labels_and_masks(kind: str) -> None:
    model = BUILDERS[kind]().eval()
    with torch.no_grad():
        out = model([torch.randn(3, 64, 64), torch.randn(3, 40, 80)])
    assert len(out) == 2
    for detection, size in zip(out, [(64, 64), (40, 80)]):
        n = len(detection["boxes"])
        assert detection["masks"].shape == (n, 1, *size)
        assert n == 0 or (detection["labels"].min() >= 0 and detection["labels"].max() < 3)
        assert n == 0 or (detection["boxes"][:, 2] <= size[1] + 1e-3).all()


# Backbone features: float32 recomputation of the same sums in another order (packed vs windowed) agrees
# to ~1e-6 on the CPUs seen; 1e-5 leaves headroom.
FEATURE_ATOL = 1e-5
# Detections of the trained model: scores to 1e-5 like the features; boxes to 1e-5 relative (+1e-4 px);
# mask probabilities pass the mask head and a bilinear paste that amplify the features' ~1e-6
# differences (measured up to 1.6e-5 on an AMD EPYC), so 1e-4.
SCORE_ATOL, MASK_ATOL = 1e-5, 1e-4


@pytest.mark.parametrize("kind", ["spt", "vit"])
@pytest.mark.parametrize("size_divisible", [32, 128])
def test_keep_all_equals_the_dense_twin(kind: str, size_divisible: int) -> None:
    """Keep-all SPA in eval = the dense twin: backbone features to 1e-5. SPT: on grids its windows tile
    (square 64 px inputs with size_divisible 32; any inputs once size_divisible = 32 x window pads them
    to such grids). With random weights many proposals tie in score to ~1e-7, and NMS breaks such ties by
    differences far below the feature tolerance, so detections are compared as sorted score lists; the
    trained model (next test) is compared detection by detection."""
    model = BUILDERS[kind](spa=KEEP_ALL).eval()
    model.transform.size_divisible = size_divisible
    model.roi_heads.detections_per_img = 1000  # no cut among near-tied scores
    images = (
        [torch.randn(3, 64, 64), torch.randn(3, 64, 64)]
        if size_divisible == 32
        else [
            torch.randn(3, 64, 64),
            torch.randn(3, 50, 80),
        ]
    )
    with torch.no_grad():
        image_list, _, _ = model.prepare(images)
        spa_features, spa_out = model.backbone(image_list.tensors), model(images)
        with dense_twin(model):
            dense_features, dense_out = model.backbone(image_list.tensors), model(images)
    assert spa_viz.spa_context(model).config.enabled
    assert max(float((spa_features[k] - dense_features[k]).abs().max()) for k in spa_features) < FEATURE_ATOL
    for spa, dense in zip(spa_out, dense_out):
        assert len(spa["labels"]) == len(dense["labels"]) > 0
        spa_scores = spa["scores"].sort(descending=True).values
        dense_scores = dense["scores"].sort(descending=True).values
        assert float((spa_scores - dense_scores).abs().max()) < SCORE_ATOL


@pytest.mark.skipif("spt-maskrcnn-digits" not in spa_viz.available(), reason="the trained checkpoint is not here")
def test_trained_model_keep_all_detections_equal_the_dense_twin() -> None:
    from spa_viz.data.splits import data_config, load_split
    from spa_viz.io.checkpoint import checkpoint_config

    model = spa_viz.load("spt-maskrcnn-digits").eval()
    spa_viz.configure(model, **KEEP_ALL)
    dataset = load_split(data_config(checkpoint_config(model)["data"]), "test", None, num=2)
    images = [dataset[i][0] for i in range(2)]
    with torch.no_grad():
        spa_out = model(images)
        with dense_twin(model):
            dense_out = model(images)
    for spa, dense in zip(spa_out, dense_out):
        assert len(spa["labels"]) == len(dense["labels"]) > 0
        assert _matched(spa, dense)


def _matched(spa: dict, dense: dict) -> bool:
    """Every dense detection has its own SPA detection of the same class with score within SCORE_ATOL,
    mask within MASK_ATOL and box within 1e-5 relative (near-tied scores may list them in another order)."""
    free = list(range(len(spa["labels"])))
    for i in range(len(dense["labels"])):
        for j in free:
            if (
                spa["labels"][j] == dense["labels"][i]
                and abs(float(spa["scores"][j] - dense["scores"][i])) < SCORE_ATOL
                and torch.allclose(spa["boxes"][j], dense["boxes"][i], rtol=1e-5, atol=1e-4)
                and torch.allclose(spa["masks"][j], dense["masks"][i], atol=MASK_ATOL)
            ):
                free.remove(j)
                break
        else:
            return False
    return True


def test_swin_twin_is_timm_swin_with_the_same_heads() -> None:
    swin = SwinTransformer(
        img_size=64, embed_dim=16, depths=(1, 1, 2, 2), num_heads=(1, 2, 4, 4), window_size=4, num_classes=0
    ).eval()
    twin = swin_mask_rcnn("digits", 3, backbone_kwargs=SPT_BODY, head=HEAD, transform=TRANSFORM).eval()
    spa_model = tiny_spt()
    assert not spa_viz.spa_context(twin).config.enabled and spa_viz.spa_context(spa_model).config.enabled
    assert {k for k in twin.state_dict() if ".gate." not in k} == {
        k for k in spa_model.state_dict() if ".gate." not in k
    }
    load_swin_weights(twin.backbone.body, swin.state_dict())
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = swin.forward_intermediates(images, intermediates_only=True)
        got = twin.backbone.body.forward_pyramid(images)
    assert max(float((a - b).abs().max()) for a, b in zip(expected, got)) < 1e-5


def test_selection_labels_are_made_after_resize_and_padding() -> None:
    """A 50x80 image is resized to 60x96 (min 64 / max 96) and padded to 64x96: the labels live on the
    padded batch's grids at the real strides 16 and 32, from the resized masks (boxes without masks)."""
    model = tiny_spt().eval()
    target = {"boxes": torch.tensor([[70.0, 10.0, 79.0, 20.0]]), "labels": torch.tensor([1])}
    image_list, moved, _ = model.prepare([torch.randn(3, 50, 80)], [target])
    padded = tuple(image_list.tensors.shape[-2:])
    assert padded == (64, 96) and image_list.image_sizes == [(60, 96)]
    labels = model.selection_labels(moved, padded)
    assert sorted(labels) == [(2, 3), (4, 6)]
    expected = labels_from_boxes(torch.tensor([[84.0, 12.0, 94.8, 24.0]]), padded, (4, 6), 16)
    assert torch.equal(labels[(4, 6)][0], expected)
    assert labels[(4, 6)][0].reshape(4, 6)[:, 5].any() and not labels[(4, 6)][0].reshape(4, 6)[:, :5].any()

    mask = torch.zeros(1, 50, 80, dtype=torch.bool)
    mask[0, 5:20, 5:20] = True
    image_list, moved, _ = model.prepare([torch.randn(3, 50, 80)], [{**target, "masks": mask}])
    labels = model.selection_labels(moved, padded)
    resized = torch.zeros(64, 96, dtype=torch.bool)
    resized[:60] = moved[0]["masks"][0].bool()
    assert torch.equal(labels[(4, 6)][0], labels_from_masks(resized, (4, 6), 16))
    assert labels[(4, 6)][0].reshape(4, 6)[0, 0] and not labels[(4, 6)][0].reshape(4, 6)[:, 5].any()


def test_selection_loss_follows_alpha_and_spa() -> None:
    model = tiny_spt().train()
    model.select_alpha = 0.0
    assert model(torch.randn(2, 3, 64, 64), targets())["loss_select"].item() == 0.0
    with dense_twin(model):
        assert "loss_select" not in model(torch.randn(2, 3, 64, 64), targets())


def test_box_only_targets_train_the_box_branch_alone() -> None:
    model = tiny_spt().train()
    losses = model(torch.randn(2, 3, 64, 64), targets(masks=False))
    assert "loss_mask" not in losses and "loss_select" in losses
    sum(losses.values()).backward()
    assert all(p.grad is None for p in model.roi_heads.mask_head.parameters())
    assert model.roi_heads.has_mask()  # the mask branch is back for the next batch
    with torch.no_grad():
        assert "masks" in model.eval()([torch.randn(3, 64, 64)])[0]


def test_checkpoint_round_trip(tmp_path) -> None:
    model = tiny_spt(spa={"threshold": 0.3}).eval()
    _random_gates(model)
    save_checkpoint(model, tmp_path / "ckpt", model.architecture_config())
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert isinstance(loaded, SPAMaskRCNN) and spa_viz.spa_context(loaded).config.threshold == 0.3
    images = [torch.randn(3, 64, 64)]
    with torch.no_grad():
        for a, b in zip(model(images), loaded(images)):
            assert all(torch.equal(a[k], b[k]) for k in a)


def test_trace_records_every_spa_layer_on_the_padded_grids() -> None:
    model = tiny_spt().eval()
    _random_gates(model)
    out, tr = spa_viz.trace(model, torch.randn(2, 3, 64, 64))
    assert len(out) == 2 and [t.grid for t in tr.layers] == [(4, 4), (4, 4), (2, 2), (2, 2)]
    assert 0 < tr.backbone_macs_run < tr.backbone_macs_dense


def test_bad_input_fails_clearly() -> None:
    with pytest.raises(ValueError, match="unknown size"):
        spt_mask_rcnn("huge", 3)
    with pytest.raises(ConfigError, match="fpn_width"):
        spt_mask_rcnn("digits", 3, head={"fpn_width": 8})
    with pytest.raises(ValueError, match="num_classes"):
        spt_mask_rcnn("digits", 0)
    model = tiny_spt().train()
    with pytest.raises(ValueError, match="needs targets"):
        model(torch.randn(1, 3, 64, 64))
    bad = [{"boxes": torch.tensor([[10.0, 10.0, 10.0, 20.0]]), "labels": torch.tensor([0])}]
    with pytest.raises(ValueError, match="positive width and height"):
        model(torch.randn(1, 3, 64, 64), bad)
