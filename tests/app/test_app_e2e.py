"""The app over HTTP, driven by gradio_client: analyses, live settings, bad inputs, other endpoints.

Every bad input must give a clear message and leave the app serving: each bad case asserts the
message and then that a good request still works.
"""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

import spa_viz
from app.examples import build_examples
from app.settings import REPO_ROOT, AppSettings
from tests.app.conftest import TINY, Served, default_checkpoint_available, serve

# gradio's queue uses pandas options that pandas 3 deprecates; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")

# the /analyze answer in its documented order (app/README.md): a client reads it by position
OUTPUTS = (
    "status",
    "stats",
    "gate",
    "kept",
    "labels",
    "labels_text",
    "strip",
    "age",
    "layout",
    "macs",
    "histogram",
    "predictions",
    "gallery",
    "summary",
)


@pytest.fixture(scope="module")
def examples():
    return build_examples(AppSettings().examples_dir)


@pytest.fixture(scope="module")
def client(served: Served, tmp_path_factory: pytest.TempPathFactory) -> Client:
    return Client(served.url, verbose=False, download_files=str(tmp_path_factory.mktemp("downloads")))


def analyze(client: Client, files: list[Path | str], **settings) -> dict:
    settings.setdefault("model", TINY)
    settings.setdefault("selector", "learned gate")
    result = client.predict(files=[handle_file(str(f)) for f in files], api_name="/analyze", **settings)
    return dict(zip(OUTPUTS, result, strict=True))


def assert_good_request_works(client: Client, image: Path) -> None:
    out = analyze(client, [image])
    assert out["summary"]["images"] == [image.name]


def test_analysis_returns_every_view(client: Client, examples) -> None:
    photo = examples.photos[0]
    out = analyze(client, [photo, examples.digits[0]], threshold=0.5, layer=5)
    assert TINY in out["status"] and "random weights" in out["status"], "untrained models are labelled"
    assert "Backbone GMACs" in out["stats"] and "1 MAC = 2 FLOPs" in out["stats"]
    assert "Wall-clock** (cpu): measuring" in out["stats"] and "MACs saved" in out["stats"], "/timing measures"
    for name in ("gate", "kept", "strip", "predictions"):
        assert Image.open(out[name]).size[0] >= 448
    summary = out["summary"]
    assert summary["layer"] == 5 and summary["images"] == [photo.name, examples.digits[0].name]
    assert summary["trace"]["batch_size"] == 2
    files = [handle_file(str(f)) for f in (photo, examples.digits[0])]
    stats, timed = client.predict(
        files=files, model=TINY, selector="learned gate", threshold=0.5, layer=5, api_name="/timing"
    )
    assert re.search(r"Wall-clock\*\* \(cpu, batch of 2, \d+ threads?; median of \d+ runs each", stats)
    assert "no tracing" in stats and "MACs saved" in stats
    latency = timed["latency_ms"]
    assert latency["dense"] > 0 and latency["spa"] > 0 and latency["batch"] == 2 and latency["device"] == "cpu"
    title = {name: json.loads(out[name]["plot"])["layout"]["title"]["text"] for name in ("layout", "macs", "histogram")}
    assert "B′ =" in title["layout"] and "MACs per SPA layer" in title["macs"]
    assert "Kept tokens per image · layer 5" in title["histogram"]
    assert len(out["gallery"]) == 2


def test_digit_example_has_selection_labels(client: Client, examples) -> None:
    out = analyze(client, [examples.digits[1]])
    metrics = out["summary"]["selection_labels"]
    assert metrics["source"] == "object masks of the example"
    assert set(metrics["per_layer"]["3"]) >= {"precision", "recall", "iou"}
    assert out["labels"] is not None and "precision" in out["labels_text"]


def test_threshold_changes_the_forward_and_layer_only_rerenders(client: Client, served: Served, examples) -> None:
    photo = examples.photos[3]
    low = analyze(client, [photo], threshold=0.3, layer=4)
    high = analyze(client, [photo], threshold=0.7, layer=4)
    ratio = lambda out: out["summary"]["trace"]["mean_keep_ratio"]  # noqa: E731
    assert ratio(high) < ratio(low)
    assert Path(low["kept"]).read_bytes() != Path(high["kept"]).read_bytes()
    assert low["stats"] != high["stats"], "FLOP numbers follow the threshold"
    forwards = served.service.forward_count
    moved = analyze(client, [photo], threshold=0.7, layer=9, image_index=0)
    assert served.service.forward_count == forwards, "moving the layer slider runs no forward pass"
    assert moved["summary"]["layer"] == 9
    container = analyze(client, [photo, examples.photos[4]], threshold=0.7, policy="container", container_len=49)
    assert container["summary"]["trace"]["layers"][0]["row_len"] == 49


def test_training_free_selector(client: Client, examples) -> None:
    out = analyze(client, [examples.photos[0]], selector="feature_norm", selector_amount=0.25)
    ratios = [layer["keep_ratio_per_image"][0] for layer in out["summary"]["trace"]["layers"]]
    assert all(r == pytest.approx(49 / 196) for r in ratios)


@pytest.mark.skipif("spt-digits" not in spa_viz.available(), reason="the spt-digits checkpoint is not here")
def test_selector_a_model_cannot_run_is_refused_with_the_ones_it_can(client: Client, examples) -> None:
    with pytest.raises(
        AppError, match=r"needs a class token.*\['learned gate', 'feature_norm', 'random', 'uniform_topk'\]"
    ):
        analyze(client, [examples.digits[0]], model="spt-digits", selector="cls_attention")
    out = analyze(client, [examples.digits[0]], model="spt-digits", selector="uniform_topk", selector_amount=0.5)
    assert {layer["selector"] for layer in out["summary"]["trace"]["layers"]} == {"uniform_topk"}
    info = client.predict(source="spt-digits", api_name="/load_model")
    assert "cls_attention" not in info["selectors"] and "feature_norm" in info["selectors"]


def test_fusion_mode_changes_the_later_layers(client: Client, examples) -> None:
    photo = [examples.photos[1]]
    own = analyze(client, photo, fusion="none", threshold=0.5)["summary"]["trace"]["layers"]
    chain = analyze(client, photo, fusion="chain", threshold=0.5)
    layers = chain["summary"]["trace"]["layers"]
    assert all(layer["score_source"] == "own logit" and layer["fusion"] == "none" for layer in own)
    assert layers[0]["score_source"] == "own logit", "the first SPA layer has nothing to fuse with"
    assert all(layer["score_source"] == "fused" and layer["fused_share"] > 0 for layer in layers[1:])
    kept = lambda trace: [layer["kept_per_image"][0] for layer in trace]  # noqa: E731
    assert kept(layers)[1:] != kept(own)[1:] and all(k >= kept(layers)[0] for k in kept(layers)[1:])
    with pytest.raises(AppError, match=r"stage.*chain.*none"):
        analyze(client, photo, fusion="cascade")
    assert_good_request_works(client, examples.photos[0])


def test_unkept_argument_switches_the_path(client: Client, examples) -> None:
    photo = [examples.photos[1]]
    copy = analyze(client, photo, unkept="copy", threshold=0.6)["summary"]["trace"]
    paper = analyze(client, photo, unkept="paper", threshold=0.6)["summary"]["trace"]
    assert {layer["unkept"] for layer in copy["layers"]} == {"copy"}
    assert {layer["unkept"] for layer in paper["layers"]} == {"paper"}
    assert paper["backbone_macs_run"] > copy["backbone_macs_run"], "the output projection of unkept tokens is counted"
    saved = analyze(client, photo, unkept="saved", fusion="saved", threshold=0.6)["summary"]
    assert saved["settings"]["unkept"] == saved["saved_unkept"] == "copy", "the API takes 'saved', as documented"
    assert saved["settings"]["fusion"] == saved["saved_fusion"]
    with pytest.raises(AppError, match=r"copy.*paper.*refresh"):
        analyze(client, photo, unkept="drop")


def test_timing_endpoint_measures_once_and_the_layer_slider_reuses_it(client: Client, served: Served, examples) -> None:
    common = dict(files=[handle_file(str(examples.photos[5]))], model=TINY, selector="learned gate", threshold=0.42)
    stats, summary = client.predict(**common, layer=4, api_name="/timing")
    assert "median of" in stats and summary["latency_ms"]["dense"] > 0
    measured = served.service.timing_count
    stats_again, _ = client.predict(**common, layer=7, api_name="/timing")
    assert served.service.timing_count == measured, "another layer of the same batch and settings is not re-timed"
    assert stats_again.split("  \n")[1] == stats.split("  \n")[1]


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("text.png", "not an image file"),
        ("empty.png", "empty (0 bytes)"),
        ("truncated.png", "corrupt or truncated"),
        ("huge.png", "megapixels is over the limit"),
    ],
)
def test_bad_image_gives_a_message_and_the_app_keeps_serving(
    client: Client, examples, tmp_path: Path, case: str, message: str
) -> None:
    if case == "text.png":
        bad = _write(tmp_path / case, b"this is text, not a picture\n" * 10)
    elif case == "empty.png":
        bad = _write(tmp_path / case, b"")
    elif case == "truncated.png":
        data = Path(examples.digits[0]).read_bytes()
        bad = _write(tmp_path / case, data[: len(data) // 3])
    else:
        bad = tmp_path / case
        Image.new("1", (12000, 12000)).save(bad)  # 144 megapixels in a few kB
    with pytest.raises(AppError, match=re.escape(message)):
        analyze(client, [bad])
    assert_good_request_works(client, examples.photos[0])


def test_bad_file_in_a_batch_is_skipped_with_a_warning(client: Client, examples, tmp_path: Path) -> None:
    bad = _write(tmp_path / "notes.txt", b"hello")
    out = analyze(client, [bad, examples.photos[1]])
    assert out["summary"]["images"] == [examples.photos[1].name]
    assert "skipped notes.txt: not an image file" in out["status"]


def test_unusual_image_modes_are_converted(client: Client, examples, tmp_path: Path) -> None:
    rgba = tmp_path / "rgba.png"
    Image.new("RGBA", (300, 200), (255, 0, 0, 100)).save(rgba)
    palette = tmp_path / "palette.gif"
    Image.new("P", (120, 90), 3).save(palette)
    deep = tmp_path / "gray16.png"
    Image.fromarray((np.arange(160 * 120).reshape(120, 160) * 3).astype(np.uint16)).save(deep)
    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (160, 90), (0, 90, 200)).save(rotated, exif=exif)
    out = analyze(client, [rgba, palette, deep, rotated])
    assert len(out["summary"]["images"]) == 4
    for note in (
        "transparency composited on white",
        "converted to RGB",
        "reduced to 8 bits",
        "rotated upright from its EXIF orientation",
    ):
        assert note in out["status"]


def test_upload_over_the_size_limit_is_refused(client: Client, examples, tmp_path: Path) -> None:
    noisy = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (1000, 1000, 3), dtype=np.uint8)).save(noisy)
    assert noisy.stat().st_size > 2_000_000
    with pytest.raises(Exception, match=r"(?i)size|large|413"):
        analyze(client, [noisy])
    assert_good_request_works(client, examples.photos[0])


def test_model_sources_are_checked(client: Client, served: Served, examples, allow_dir: Path) -> None:
    with pytest.raises(AppError, match=r"outside the folders this app may load from \(checkpoints/") as refused:
        client.predict(source="/etc", api_name="/load_model")
    assert str(REPO_ROOT) not in str(refused.value) and str(allow_dir) not in str(refused.value), "no server paths"
    assert_good_request_works(client, examples.photos[0])

    with pytest.raises(AppError, match=r"neither a checkpoint .* nor a timm model name"):
        client.predict(source="no-such-model", api_name="/load_model")
    with pytest.raises(AppError, match=r"does not exist|not a checkpoint folder"):
        client.predict(source=str(allow_dir / "missing"), api_name="/load_model")

    mismatched = allow_dir / "mismatched"
    mismatched.mkdir()
    import torch
    from safetensors.torch import save_file

    config = {
        "format": "spa-viz/1",
        "architecture": "timm_spa_vit",
        "timm_name": "vit_tiny_patch16_224",
        "spa": {"start_layer": 3},
    }
    (mismatched / "config.json").write_text(json.dumps(config))
    save_file({"blocks.3.gate.proj.weight": torch.zeros(1, 7)}, str(mismatched / "model.safetensors"))
    with pytest.raises(AppError, match=r"shape mismatch|missing tensors"):
        analyze(client, [examples.photos[0]], model=str(mismatched))
    assert_good_request_works(client, examples.photos[0])

    info = client.predict(source="vit_tiny_patch16_224", api_name="/load_model")
    assert info["model"] == "vit_tiny_patch16_224" and info["spa_layers"][0] == 3
    assert info["trained_weights"] is False and "random weights" in info["badge"]


def test_no_image_gives_a_message(client: Client, examples) -> None:
    with pytest.raises(AppError, match="no image"):
        client.predict(files=[], model=TINY, api_name="/analyze")
    assert_good_request_works(client, examples.photos[0])


def test_attribution_endpoint(client: Client, examples) -> None:
    common = dict(files=[handle_file(str(examples.photos[0]))], model=TINY, selector="learned gate")
    image, text = client.predict(**common, method="attention_rollout", api_name="/attribute")
    assert Image.open(image).size[0] >= 448 and "Attention rollout" in text
    image, text = client.predict(**common, method="feature_ablation", api_name="/attribute")
    assert "Feature ablation" in text and "token_group" in text
    with pytest.raises(AppError, match="not in the list of choices"):
        client.predict(**common, method="gradcam", api_name="/attribute")
    assert_good_request_works(client, examples.photos[0])


def test_report_and_models_endpoints(client: Client, examples) -> None:
    path = client.predict(files=[handle_file(str(examples.digits[0]))], model=TINY, layer=5, api_name="/report")
    with zipfile.ZipFile(path) as archive:
        names = set(archive.namelist())
        summary = json.loads(archive.read("summary.json"))
    assert {
        "gate_scores.png",
        "kept_tokens.png",
        "selection_labels.png",
        "all_layers.png",
        "token_age.png",
        "predictions.png",
        "packed_layout.plotly.json",
        "macs_per_layer.plotly.json",
        "kept_histogram.plotly.json",
        "summary.json",
    } <= names
    assert summary["layer"] == 5 and summary["trace"]["layers"] and summary["latency_ms"]["spa"] > 0
    listing = client.predict(api_name="/models")
    assert TINY in listing["models"] and "attention_rollout" in listing["attribution_methods"]
    assert listing["fusion_modes"] == ["stage", "chain", "none", "saved"]


@pytest.mark.skipif(
    not default_checkpoint_available(), reason="the default real-photo checkpoint is not in checkpoints/"
)
def test_default_checkpoint_end_to_end(examples) -> None:
    with serve(None) as app:
        client = Client(app.url, verbose=False)
        out = dict(zip(OUTPUTS, client.predict(files=[handle_file(str(examples.photos[0]))], api_name="/analyze")))
        assert "task: saliency" in out["status"] and "trained gates" in out["status"]
        assert out["summary"]["selection_labels"]["source"] == "dense teacher's saliency > 0.5"
        assert out["summary"]["trace"]["mean_keep_ratio"] < 1.0
        gap = out["summary"]["output_vs_dense"]
        assert gap["measure"] == "saliency MAE vs the dense teacher" and 0.0 < gap["value"] < 0.5
        assert "Output vs the dense twin" in out["stats"]


DETECTORS = [
    name for name in ("spa-vit-digits", "dense-vit-digits", "spa-vit-digits-noselect") if name in spa_viz.available()
]


@pytest.mark.skipif(not DETECTORS, reason="no digit detector checkpoint in checkpoints/")
def test_api_layer_follows_the_requested_model(client: Client, examples) -> None:
    """The API's layer range is not the default model's slider range: layer 2 of spa-vit-digits is shown."""
    if "spa-vit-digits" not in spa_viz.available():
        pytest.skip("the spa-vit-digits checkpoint is not here")
    out = analyze(client, [examples.digits[0]], model="spa-vit-digits", layer=2)
    assert out["summary"]["layer"] == 2


def test_detector_checkpoint_draws_boxes_and_labels(client: Client, examples) -> None:
    out = analyze(client, [examples.digits[0]], model=DETECTORS[0])
    assert "task: detection" in out["status"]
    detections = out["summary"]["predictions"]["detections"]
    assert detections, "the trained detector finds digits in the example"
    gap = out["summary"]["output_vs_dense"]
    assert gap["measure"].startswith("detections agreeing with the dense twin") and 0.5 <= gap["value"] <= 1.0
    names = {str(digit) for digit in range(10)}
    height, width = Image.open(examples.digits[0]).size[::-1]
    for detection in detections:
        x0, y0, x1, y1 = detection["box_xyxy"]
        assert detection["label"] in names and detection["score"] >= 0.3
        assert -1 <= x0 < x1 <= width + 1 and -1 <= y0 < y1 <= height + 1, "boxes in the image's own pixels"
    with Image.open(out["predictions"]) as drawn:
        assert drawn.size[0] >= width, "the predictions are drawn on the enlarged display image"
    assert out["summary"]["selection_labels"]["source"] == "object masks of the example"
    _, text = client.predict(
        files=[handle_file(str(examples.digits[0]))],
        model=DETECTORS[0],
        method="attention_rollout",
        api_name="/attribute",
    )
    assert "detection" in text or "heat-map" in text
