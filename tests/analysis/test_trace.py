import json

import pytest
import torch

import spa_viz
from tests.conftest import mixed_gate_tiny_vit, tiny_vit


@pytest.fixture
def traced():
    model = mixed_gate_tiny_vit()
    images = torch.randn(3, 3, 32, 32)
    out, tr = spa_viz.trace(model, images)
    return model, images, out, tr


def test_trace_output_equals_plain_forward(traced) -> None:
    model, images, out, _ = traced
    with torch.no_grad():
        assert torch.equal(out, model(images))


def test_trace_records_every_spa_layer(traced) -> None:
    _, _, _, tr = traced
    assert [t.layer for t in tr.layers] == [1, 2, 3]
    for layer in tr.layers:
        assert layer.scores.shape == layer.keep.shape == (3, 16)
        assert layer.grid == (4, 4) and layer.score_map(1).shape == (4, 4)
        assert layer.scores.device.type == "cpu" and layer.plan.slot_source.device.type == "cpu"
        assert torch.equal(layer.keep, layer.scores > 0), "eval threshold 0.5 means logit > 0"
        assert torch.equal(layer.kept_counts + 1, layer.plan.kept_counts), "plan counts include the class token"
        assert layer.plan.row_len == 6 and layer.backend in ("sdpa", "sdpa_runs")
        assert torch.allclose(layer.soft_gate, torch.sigmoid(layer.scores))
        assert torch.equal(layer.raw_scores, layer.scores), "a plain SPA-ViT has one scale: no fusion"
        assert layer.selector == "learned" and layer.learned and layer.fusion == "stage"


def test_trace_summary_is_json(traced) -> None:
    _, _, _, tr = traced
    summary = json.loads(json.dumps(tr.summary()))
    assert summary["batch_size"] == 3
    assert 0 < summary["backbone_saving"] < 1
    assert summary["layers"][0]["row_len"] == 6
    with pytest.raises(ValueError, match="not an SPA layer"):
        tr.layer(0)
    assert tr.layer(2).layer == 2


def test_trace_leaves_no_recording_behind(traced) -> None:
    model, images, _, _ = traced
    assert spa_viz.spa_context(model).records is None
    with torch.no_grad():
        model(images)
    assert spa_viz.spa_context(model).records is None


def test_trace_of_unpatched_model_raises() -> None:
    with pytest.raises(ValueError, match="no SPA blocks"):
        spa_viz.trace(tiny_vit(), torch.randn(1, 3, 32, 32))
