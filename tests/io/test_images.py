"""Image input: every unusable file gets a reason and a message; pixels become the documented model input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from spa_viz.io.images import IMAGENET_MEAN, IMAGENET_STD, ImageInputError, denormalize, load_image, resize_normalize


@pytest.mark.parametrize(
    ("content", "reason"),
    [(b"", "empty file"), (b"not a picture\n" * 10, "not an image"), ("truncated", "corrupt image")],
)
def test_unusable_files_have_a_reason(tmp_path: Path, content, reason: str) -> None:
    path = tmp_path / "bad.png"
    if content == "truncated":
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
        path.write_bytes(path.read_bytes()[:200])
    else:
        path.write_bytes(content)
    with pytest.raises(ImageInputError) as info:
        load_image(path)
    assert info.value.reason == reason and "bad.png" in str(info.value)


def test_limits_refuse_and_downscale(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    Image.new("RGB", (300, 200), (10, 20, 30)).save(path)
    with pytest.raises(ImageInputError, match="megapixels") as info:
        load_image(path, max_pixels=1000)
    assert info.value.reason == "too large"
    small = load_image(path, max_side=150)
    assert small.pixels.shape == (100, 150, 3) and small.original_size == (200, 300) and small.notes
    assert load_image(path).pixels.shape == (200, 300, 3)


def test_resize_normalize_and_back() -> None:
    white = resize_normalize(np.full((30, 40, 3), 255, dtype=np.uint8), 224)
    assert white.shape == (3, 224, 224)
    expected = (1.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(white[:, 0, 0].numpy(), expected, rtol=1e-5)
    pixels = np.random.default_rng(0).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    x = resize_normalize(pixels, (16, 24))
    assert x.shape == (3, 16, 24) and np.array_equal(denormalize(x), pixels)
    assert torch.equal(resize_normalize(pixels[..., 0], 8), resize_normalize(np.repeat(pixels[..., :1], 3, 2), 8))
