"""COCO loader: category mapping, mask decoding, letterbox/flip alignment, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torch.utils.data import DataLoader

from spa_viz.data.coco import CocoDetection, InMemoryDetection, collate
from spa_viz.data.digits import DigitsConfig, generate_split, write_split
from spa_viz.selection.labels import TokenGrid, labels_from_boxes, labels_from_masks

HEIGHT, WIDTH = 60, 90
# xyxy rectangles of the hand-made file, one per segmentation format.
RECTS = {"polygon": (10, 5, 40, 25), "rle_list": (50, 30, 88, 58), "rle_str": (0, 40, 20, 60)}


def _rect_mask(rect: tuple[int, int, int, int]) -> np.ndarray:
    mask = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    x1, y1, x2, y2 = rect
    mask[y1:y2, x1:x2] = 1
    return mask


def _uncompressed_rle(mask: np.ndarray) -> dict:
    flat = mask.flatten(order="F")
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    return {"size": [HEIGHT, WIDTH], "counts": np.diff(np.concatenate([[0], changes])).tolist()}


@pytest.fixture()
def handmade(tmp_path: Path) -> tuple[Path, Path]:
    """A 60x90 image with three rectangles in three segmentation formats and odd category ids."""
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(image_dir / "a.png")
    x1, y1, x2, y2 = RECTS["polygon"]
    compressed = mask_utils.encode(np.asfortranarray(_rect_mask(RECTS["rle_str"])))
    segmentations = {
        "polygon": [[x1, y1, x2, y1, x2, y2, x1, y2]],
        "rle_list": _uncompressed_rle(_rect_mask(RECTS["rle_list"])),
        "rle_str": {"size": [HEIGHT, WIDTH], "counts": compressed["counts"].decode()},
    }
    categories = {"polygon": 17, "rle_list": 5, "rle_str": 90}
    annotations = [
        {
            "id": i + 1,
            "image_id": 7,
            "category_id": categories[k],
            "iscrowd": 0,
            "bbox": [r[0], r[1], r[2] - r[0], r[3] - r[1]],
            "segmentation": segmentations[k],
        }
        for i, (k, r) in enumerate(RECTS.items())
    ]
    annotations += [
        {
            "id": 10,
            "image_id": 7,
            "category_id": 5,
            "iscrowd": 1,
            "bbox": [0, 0, 5, 5],
            "segmentation": segmentations["polygon"],
        },
        {
            "id": 11,
            "image_id": 7,
            "category_id": 5,
            "iscrowd": 0,
            "bbox": [3, 3, 0, 4],
            "segmentation": segmentations["polygon"],
        },
    ]
    coco = {
        "images": [{"id": 7, "file_name": "a.png", "height": HEIGHT, "width": WIDTH}],
        "annotations": annotations,
        "categories": [{"id": 90, "name": "c"}, {"id": 5, "name": "a"}, {"id": 17, "name": "b"}],
    }
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(coco))
    return path, image_dir


def _tight_box(mask: torch.Tensor) -> torch.Tensor:
    rows, cols = torch.nonzero(mask.any(1)).flatten(), torch.nonzero(mask.any(0)).flatten()
    return torch.tensor([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=torch.float32)


def _assert_aligned(target: dict, tolerance: float = 1.0) -> None:
    for box, mask in zip(target["boxes"], target["masks"]):
        assert torch.allclose(_tight_box(mask), box, atol=tolerance), (box, _tight_box(mask))


def test_categories_and_masks(handmade: tuple[Path, Path]) -> None:
    dataset = CocoDetection(*handmade, size=90)
    assert dataset.class_names == ["a", "b", "c"] and dataset.label_to_cat_id == [5, 17, 90]
    image, target = dataset[0]
    assert image.shape == (3, 90, 90) and image.dtype == torch.float32
    assert target["labels"].tolist() == [1, 0, 2] and target["image_id"] == 7
    assert target["orig_size"] == (HEIGHT, WIDTH) and target["valid_size"] == (HEIGHT, WIDTH)
    expected = torch.tensor([RECTS[k] for k in ("polygon", "rle_list", "rle_str")], dtype=torch.float32)
    assert torch.equal(target["boxes"], expected)
    for rect, mask in zip(RECTS.values(), target["masks"]):
        assert torch.equal(mask[:HEIGHT], torch.from_numpy(_rect_mask(rect)).bool())
    assert not target["masks"][:, HEIGHT:].any() and (image[:, HEIGHT:] == 0).all()


@pytest.mark.parametrize("size", [64, 128, 160])
@pytest.mark.parametrize("flip", [False, True])
def test_letterbox_and_flip_keep_alignment(handmade: tuple[Path, Path], size: int, flip: bool) -> None:
    dataset = CocoDetection(*handmade, size=size, train=True, hflip_prob=float(flip))
    image, target = dataset[0]
    valid_h, valid_w = target["valid_size"]
    assert image.shape == (3, size, size) and valid_w == size and valid_h == round(HEIGHT * size / WIDTH)
    _assert_aligned(target)
    scale = size / WIDTH
    for (x1, y1, x2, y2), box in zip(RECTS.values(), target["boxes"]):
        if flip:
            x1, x2 = WIDTH - x2, WIDTH - x1
        assert torch.allclose(box, torch.tensor([x1, y1, x2, y2]) * scale, atol=0.5)
    assert (image[:, valid_h:] == 0).all() and not target["masks"][:, valid_h:].any()


def test_flip_is_seeded(handmade: tuple[Path, Path]) -> None:
    dataset = CocoDetection(*handmade, size=64, train=True)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        runs.append([dataset[0][1]["boxes"] for _ in range(8)])
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    assert len({tuple(b[0].tolist()) for b in runs[0]}) == 2  # both orientations occur


@pytest.fixture()
def digits_coco(tmp_path: Path) -> tuple[Path, Path]:
    path = write_split(tmp_path, "val", 4, seed=0, config=DigitsConfig.for_canvas(64))
    return path, path.parent / "images"


def test_digits_coco_matches_in_memory(digits_coco: tuple[Path, Path]) -> None:
    samples = generate_split("val", 4, seed=0, canvas_size=64)
    from_disk = CocoDetection(*digits_coco, size=64)
    in_memory = InMemoryDetection(samples, size=64)
    assert from_disk.class_names == [str(d) for d in range(10)] and len(in_memory) == 4
    for index, sample in enumerate(samples):
        image, target = from_disk[index]
        image_mem, target_mem = in_memory[index]
        assert torch.equal(image, image_mem) and target["image_id"] == target_mem["image_id"]
        assert torch.equal(target["boxes"], torch.from_numpy(sample.boxes))
        assert torch.equal(target["labels"], torch.from_numpy(sample.labels))
        assert torch.equal(target["masks"], torch.from_numpy(sample.masks))
        for key in ("boxes", "labels", "masks"):
            assert torch.equal(target[key], target_mem[key])


def test_selection_labels_and_collate(digits_coco: tuple[Path, Path]) -> None:
    # the last grid covers a padded image (5 tokens of 20 px over 96 px), as SPT's padded stages do
    grids = [TokenGrid((12, 12), (8, 8)), TokenGrid((6, 6), (16, 16)), TokenGrid((5, 5), (20, 20))]
    dataset = CocoDetection(*digits_coco, size=96, train=True, select_grids=grids)
    images, targets = next(iter(DataLoader(dataset, batch_size=3, collate_fn=collate)))
    assert images.shape == (3, 3, 96, 96) and len(targets) == 3
    for target in targets:
        _assert_aligned(target, tolerance=1.5)
        for grid, labels in zip(grids, target["select_labels"]):
            assert torch.equal(labels, labels_from_masks(target["masks"], grid.shape, grid.stride))
            assert (labels <= labels_from_boxes(target["boxes"], (96, 96), grid.shape, grid.stride)).all()


def test_missing_and_corrupt_images(handmade: tuple[Path, Path]) -> None:
    path, image_dir = handmade
    (image_dir / "a.png").write_bytes(b"not a png")
    dataset = CocoDetection(path, image_dir, size=64)
    with pytest.raises(ValueError, match=r"a\.png"):
        dataset[0]
    Image.fromarray(np.zeros((10, 10, 3), dtype=np.uint8)).save(image_dir / "a.png")
    with pytest.raises(ValueError, match="JSON says"):
        dataset[0]
    (image_dir / "a.png").unlink()
    with pytest.raises(ValueError, match="missing"):
        CocoDetection(path, image_dir, size=64)


def test_bad_annotations(handmade: tuple[Path, Path], tmp_path: Path) -> None:
    path, image_dir = handmade
    coco = json.loads(path.read_text())
    coco["annotations"][0]["category_id"] = 3
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(coco))
    with pytest.raises(ValueError, match="category"):
        CocoDetection(bad, image_dir, size=64)
    bad.write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="COCO"):
        CocoDetection(bad, image_dir, size=64)
    with pytest.raises(ValueError):
        CocoDetection(path, tmp_path / "nowhere", size=64)
    with pytest.raises(ValueError):
        CocoDetection(path, image_dir, size=0)
    with pytest.raises(ValueError):
        collate([])


def test_images_without_objects() -> None:
    samples = generate_split("val", 2, seed=0, config=DigitsConfig(num_digits=(0, 0)))
    dataset = InMemoryDetection(samples, size=80, train=True, select_grids=[(5, 5)])  # 16 px tokens tile 80 px
    images, targets = collate([dataset[0], dataset[1]])
    assert images.shape == (2, 3, 80, 80)
    for target in targets:
        assert target["boxes"].shape == (0, 4) and target["masks"].shape == (0, 80, 80)
        assert not target["select_labels"][0].any()
