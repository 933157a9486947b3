"""The evaluations' dense-vs-SPA latencies come from the one paired timer: the detection record's fields
and speed-up, and the saliency check's alternating runs over the same images."""

from __future__ import annotations

import pytest
import torch

import spa_viz
from spa_viz.recipes.detection.measures import latency_record
from spa_viz.recipes.saliency.evaluate import latency
from tests.conftest import tiny_vit


def _spa_model() -> torch.nn.Module:
    return spa_viz.patch(tiny_vit(), 1).eval()


def test_detection_latency_record_pairs_the_dense_twin_and_spa() -> None:
    record = latency_record(_spa_model(), torch.randn(2, 3, 32, 32), repeats=3)
    assert (record["batch"], record["device"], record["repeats"]) == (2, "cpu", 3)
    assert record["threads"] == torch.get_num_threads()
    assert record["dense_ms_per_image"] > 0 and record["spa_ms_per_image"] > 0
    assert record["speedup"] == pytest.approx(record["dense_ms_per_image"] / record["spa_ms_per_image"])


def test_detection_latency_record_without_spa_times_the_dense_model_only() -> None:
    model = _spa_model()
    spa_viz.spa_context(model).config.update(enabled=False)
    record = latency_record(model, torch.randn(1, 3, 32, 32), repeats=2)
    assert record["batch"] == 1 and record["dense_ms_per_image"] > 0
    assert "spa_ms_per_image" not in record and "speedup" not in record


def test_saliency_latency_alternates_over_the_same_images() -> None:
    model = _spa_model()
    config = spa_viz.spa_context(model).config
    images = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 3, 32, 32).contiguous()
    seen: list[tuple[str, int]] = []
    model.register_forward_pre_hook(
        lambda module, args: seen.append(("spa" if config.enabled else "dense", int(args[0][0, 0, 0, 0])))
    )
    threads = torch.get_num_threads()
    result = latency(model, images, repeats=4, threads=1)
    assert torch.get_num_threads() == threads, "the caller's thread count is restored"
    # two warm-up rounds then four timed ones; round k runs image k % 3 through the dense twin, then SPA
    assert seen == [(kind, k % 3) for k in range(6) for kind in ("dense", "spa")]
    assert (result["repeats"], result["threads"]) == (4, 1)
    assert result["latency_ratio"] == pytest.approx(result["spa_ms"] / result["dense_ms"])
