"""Cluttered-digits generator: determinism, tight boxes/masks, held-out splits, COCO output."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from spa_viz.data.digits import (
    BACKGROUND_SPLITS,
    SPLITS,
    DigitsConfig,
    background_image,
    digit_pool,
    generate_split,
    main,
    mnist_digits,
    to_coco,
    write_split,
)
from spa_viz.selection.labels import labels_from_boxes, labels_from_masks
from tests.selection.test_labels import reference_box_mask, reference_labels


@pytest.fixture(scope="module")
def train_samples() -> list:
    return generate_split("train", 24, seed=1)


def test_same_seed_gives_identical_files(tmp_path: Path) -> None:
    first = write_split(tmp_path / "a", "val", 5, seed=3)
    main(["--out", str(tmp_path / "b"), "--seed", "3", "--train", "0", "--val", "5", "--test", "0"])
    second = tmp_path / "b" / "val" / "annotations.json"
    assert first.read_bytes() == second.read_bytes()
    for png in sorted((tmp_path / "a" / "val" / "images").iterdir()):
        assert png.read_bytes() == (tmp_path / "b" / "val" / "images" / png.name).read_bytes()
    other = write_split(tmp_path / "c", "val", 5, seed=4)
    assert other.read_bytes() != first.read_bytes()


def test_prefix_stable_and_seeded() -> None:
    long, short = generate_split("val", 4, seed=7), generate_split("val", 2, seed=7)
    for a, b in zip(long, short):
        assert np.array_equal(a.image, b.image) and np.array_equal(a.boxes, b.boxes)


def test_boxes_tight_to_masks(train_samples: list) -> None:
    _, mnist_labels = mnist_digits()
    assert sum(len(s.labels) for s in train_samples) >= len(train_samples)
    for sample in train_samples:
        assert sample.image.shape == (128, 128, 3) and sample.image.dtype == np.uint8
        k = len(sample.labels)
        assert 1 <= k <= 6 and sample.masks.shape == (k, 128, 128) and sample.boxes.shape == (k, 4)
        assert (sample.masks.sum(0) <= 1).all()  # visible masks do not overlap
        np.testing.assert_array_equal(sample.labels, mnist_labels[sample.digit_ids])
        for box, mask in zip(sample.boxes.astype(int), sample.masks):
            rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
            assert list(box) == [cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]
            x1, y1, x2, y2 = box
            assert mask[y1:y2, x1:x2].sum() == mask.sum()  # mask inside box
            assert 8 <= max(x2 - x1, y2 - y1) <= 40


def test_splits_hold_out_digits_and_backgrounds(tmp_path: Path) -> None:
    pools = {split: set(digit_pool(split).tolist()) for split in SPLITS}
    assert sum(map(len, pools.values())) == 5000 and len(set.union(*pools.values())) == 5000
    assert [len(pools[s]) for s in SPLITS] == [3500, 750, 750]
    names = [set(BACKGROUND_SPLITS[s]) for s in SPLITS]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    assert len(names[2]) >= 2
    used: dict[str, tuple[set, set]] = {}
    for split, count in (("train", 40), ("test", 20)):
        coco = json.loads(write_split(tmp_path, split, count, seed=0).read_text())
        digits = {d for im in coco["images"] for d in im["digit_ids"] + im["fragment_ids"]}
        backgrounds = {im["background"] for im in coco["images"]}
        assert digits <= pools[split] and backgrounds <= set(BACKGROUND_SPLITS[split])
        assert {a["mnist_index"] for a in coco["annotations"]} <= digits
        used[split] = (digits, backgrounds)
    assert not used["train"][0] & used["test"][0] and not used["train"][1] & used["test"][1]


def test_all_backgrounds_load_offline() -> None:
    for names in BACKGROUND_SPLITS.values():
        for name in names:
            image = background_image(name)
            assert image.ndim == 3 and image.shape[2] == 3 and min(image.shape[:2]) >= 128


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_coco_json_round_trip(tmp_path: Path) -> None:
    samples = generate_split("test", 3, seed=5)
    coco = json.loads(write_split(tmp_path, "test", 3, seed=5).read_text())
    assert [c["id"] for c in coco["categories"]] == list(range(1, 11))
    assert [c["name"] for c in coco["categories"]] == [str(d) for d in range(10)]
    for image, sample in zip(coco["images"], samples):
        anns = [a for a in coco["annotations"] if a["image_id"] == image["id"]]
        assert (tmp_path / "test" / "images" / image["file_name"]).is_file()
        for ann, box, label, mask in zip(anns, sample.boxes, sample.labels, sample.masks):
            x, y, w, h = ann["bbox"]
            assert [x, y, x + w, y + h] == box.tolist() and ann["category_id"] == label + 1
            assert np.array_equal(mask_utils.decode(ann["segmentation"]).astype(bool), mask)
            assert ann["area"] == mask.sum() and ann["iscrowd"] == 0


@pytest.mark.parametrize(
    ("grid", "stride"), [((4, 4), (32, 32)), ((7, 7), (19, 19)), ((5, 9), (26, 15)), ((16, 16), (8, 8))]
)
def test_labels_match_reference(train_samples: list, grid: tuple[int, int], stride: tuple[int, int]) -> None:
    sample = train_samples[0]
    expected_masks = reference_labels(sample.masks.any(0), grid, stride)
    got = labels_from_masks(torch.from_numpy(sample.masks), grid, stride)
    np.testing.assert_array_equal(got.numpy(), expected_masks)
    expected_boxes = reference_labels(reference_box_mask(sample.boxes, 128, 128), grid, stride)
    got = labels_from_boxes(torch.from_numpy(sample.boxes), (128, 128), grid, stride)
    np.testing.assert_array_equal(got.numpy(), expected_boxes)
    assert (expected_boxes >= expected_masks).all()


def test_other_canvas_size() -> None:
    sample = generate_split("val", 1, seed=0, canvas_size=64)[0]
    assert sample.image.shape == (64, 64, 3) and sample.masks.shape[1:] == (64, 64)


def test_cli_refuses_non_empty_output(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--train", "1", "--val", "0", "--test", "0"])
    main(["--out", str(tmp_path), "--train", "1", "--val", "0", "--test", "0", "--overwrite"])
    main(["--out", str(tmp_path), "--train", "2", "--val", "0", "--test", "0", "--overwrite"])
    assert len(list((tmp_path / "train" / "images").iterdir())) == 2


@pytest.mark.parametrize(
    "call",
    [
        lambda: generate_split("holdout", 1, seed=0),
        lambda: generate_split("train", -1, seed=0),
        lambda: generate_split("train", 1, seed=0, canvas_size=64, config=DigitsConfig()),
        lambda: DigitsConfig(num_digits=(3, 1)),
        lambda: DigitsConfig(digit_size=(16, 400)),
        lambda: DigitsConfig(alpha_threshold=0.9),
        lambda: background_image("lena"),
    ],
)
def test_bad_input_raises(call: Callable[[], object]) -> None:
    with pytest.raises(ValueError):
        call()


def test_digit_free_images() -> None:
    samples = generate_split("val", 2, seed=0, config=DigitsConfig(num_digits=(0, 0)))
    assert all(s.masks.shape == (0, 128, 128) and s.boxes.shape == (0, 4) for s in samples)
    assert to_coco(samples, "val", 0, DigitsConfig())["annotations"] == []
