"""Compare, trade-off and token over HTTP (gradio_client): the endpoints answer with real content, the
equal-compute switch reaches the first column's MACs, and a clicked token is served from the cache."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from app.examples import build_examples
from app.settings import AppSettings
from tests.app.conftest import TINY, Served

pytestmark = pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")


@pytest.fixture(scope="module")
def photo() -> Path:
    return build_examples(AppSettings().examples_dir).photos[0]


@pytest.fixture(scope="module")
def client(served: Served, tmp_path_factory: pytest.TempPathFactory) -> Client:
    return Client(served.url, verbose=False, download_files=str(tmp_path_factory.mktemp("downloads")))


COLUMNS = [
    {"model": TINY, "method": "learned_gate", "amount": 0.5},
    {"model": TINY, "method": "feature_norm", "amount": 0.9},
    {"model": TINY, "method": "cls_attention"},
    {"model": TINY, "method": "token_merging", "amount": 0},
]


def test_compare_answers_four_columns_at_equal_compute(client: Client, photo: Path) -> None:
    out = client.predict(
        files=[handle_file(str(photo))],
        columns=COLUMNS,
        equal_compute=True,
        layer=3,
        image_index=0,
        api_name="/compare",
    )
    status, pictures, table, summary = out[0], out[1:17], out[17], out[18]
    assert "chelsea" in status and "equal compute" in status
    for number in range(4):
        title, tokens, output, difference = pictures[4 * number : 4 * number + 4]
        assert f"{number + 1}." in title
        assert all(Path(p).stat().st_size > 1000 for p in (tokens, output, difference))
    columns = summary["columns"]
    target = columns[0]["gmacs_per_image"]
    for column in columns[1:]:
        assert abs(column["gmacs_per_image"] / target - 1) <= 0.02 or summary["notes"], column
    assert columns[3]["method"] == "token_merging" and columns[3]["run_as"]["amount"] > 0, "ToMe had to merge"
    assert all(column["latency_ms"]["dense"] > 0 for column in columns), "the paired wall-clock is measured"
    assert len(table["data"]) == 4 and table["headers"][0] == "column"


def test_compare_refuses_bad_columns_with_a_message(client: Client, photo: Path) -> None:
    with pytest.raises(AppError, match="compare 2 to 4 columns"):
        client.predict(files=[handle_file(str(photo))], columns=COLUMNS[:1], api_name="/compare")
    with pytest.raises(AppError, match=r"unknown column keys \['treshold'\]"):
        client.predict(files=[handle_file(str(photo))], columns=[COLUMNS[0], {"treshold": 0.3}], api_name="/compare")
    with pytest.raises(AppError, match="method 'gradcam' does not run on"):
        client.predict(
            files=[handle_file(str(photo))], columns=[COLUMNS[0], {"method": "gradcam"}], api_name="/compare"
        )


def test_tradeoff_gives_a_curve_per_method(client: Client, photo: Path) -> None:
    figure, info = client.predict(
        files=[handle_file(str(photo))],
        model=TINY,
        methods=["learned_gate", "feature_norm", "token_merging"],
        points=3,
        api_name="/tradeoff",
    )
    assert {p["method"] for p in info["points"]} == {"learned_gate", "feature_norm", "token_merging"}
    assert len(info["points"]) == 9 and info["error_measure"].startswith("class-probability distance")
    feature_norm = sorted((p for p in info["points"] if p["method"] == "feature_norm"), key=lambda p: p["amount"])
    assert [p["gmacs_per_image"] for p in feature_norm] == sorted(p["gmacs_per_image"] for p in feature_norm)
    assert "plot" in figure


def test_token_endpoint_reads_the_cached_forward(client: Client, photo: Path) -> None:
    args = dict(files=[handle_file(str(photo))], model=TINY, selector="learned gate", threshold=0.5, layer=3)
    picture, info = client.predict(**args, row=4, column=5, api_name="/token")
    assert Path(picture).stat().st_size > 1000
    assert (info["row"], info["column"], info["layer"]) == (4, 5, 3)
    assert set(info) >= {"gate_logit", "sigmoid(score / tau)", "fusion_decided", "packed_row", "slot"}
    started = time.perf_counter()
    _, again = client.predict(**args, row=6, column=2, api_name="/token")
    assert again["seconds"] <= 0.3, "a click after the first reads the cached block inputs"
    assert time.perf_counter() - started < 5
    with pytest.raises(AppError, match="outside layer 3's 14 x 14 grid"):
        client.predict(**args, row=20, column=0, api_name="/token")
