"""A Mask R-CNN in the app's service: the analysis draws its boxes and masks, lists its detections,
scores selection against the example's masks, and attributes the top detection's score."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

from app.examples import Examples, build_examples
from app.models import ModelRegistry
from app.service import AnalysisService, SPASettings, UserError
from app.settings import AppSettings
from spa_viz.io.checkpoint import set_checkpoint_config
from spa_viz.models.detection import spt_mask_rcnn

NAME = "test-spt-mask-rcnn (random weights)"


def mask_rcnn() -> nn.Module:
    torch.manual_seed(0)
    body = {"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 2, 4]}
    head = {"fpn_channels": 16, "box_representation": 32, "mask_layers": [16], "mask_predictor_channels": 16}
    model = spt_mask_rcnn("digits", 10, backbone_kwargs=body, head=head, spa={"gate_init_bias": 0.0})
    config = {**model.architecture_config(), "image_size": 128, "class_names": [str(d) for d in range(10)]}
    set_checkpoint_config(model, {**config, "trained_gates": False, "trained_weights": False})
    return model.eval()


@pytest.fixture(scope="module")
def examples() -> Examples:
    return build_examples(AppSettings().examples_dir)


@pytest.fixture(scope="module")
def service(examples: Examples) -> Iterator[AnalysisService]:
    settings = AppSettings(device="cpu", report_files=2)
    service = AnalysisService(settings, ModelRegistry(settings.torch_device, extra={NAME: mask_rcnn}), examples)
    try:
        yield service
    finally:
        service.close()


def test_analysis_draws_detections_and_scores_selection(service: AnalysisService, examples: Examples) -> None:
    result = service.analyze(examples.digits[:2], NAME, SPASettings(threshold=0.5), measure=False)
    summary = result.summary
    assert summary["task"] == "detection" and isinstance(summary["predictions"]["detections"], list)
    assert [layer["grid"] for layer in summary["trace"]["layers"]] == [[8, 8], [4, 4]]
    assert summary["selection_labels"]["source"] == "object masks of the example"
    assert result.predictions is not None and result.predictions.ndim == 3


def test_attribution_explains_a_detection_score(service: AnalysisService, examples: Examples) -> None:
    view = service.attribute(examples.digits[:1], NAME, SPASettings(), 0, "feature_ablation")
    assert "detection" in view.info["target"] and len(view.info["map"]) == 32


def test_only_methods_that_run_are_offered(service: AnalysisService, examples: Examples) -> None:
    """Mask R-CNN on SPT: no attention rollout (windowed stages), no integrated gradients (no gradient
    through torchvision's detection post-processing); asking for one names the reason and the others."""
    entry = service.model(NAME)
    assert entry.methods == ["feature_ablation", "occlusion"]
    with pytest.raises(UserError, match=r"integrated_gradients does not run.*gradient.*feature_ablation"):
        service.attribute(examples.digits[:1], NAME, SPASettings(), 0, "integrated_gradients")
    with pytest.raises(UserError, match=r"attention_rollout does not run.*plain ViT"):
        service.attribute(examples.digits[:1], NAME, SPASettings(), 0, "attention_rollout")
