"""The offline photo collection, its held-out split, and augmentation."""

from __future__ import annotations

import numpy as np
import pytest

from spa_viz.data import photos
from spa_viz.data.digits import BACKGROUND_SPLITS


@pytest.mark.parametrize("name", sorted(photos.PHOTOS))
def test_every_photo_loads_as_rgb_uint8(name) -> None:
    image = photos.load_photo(name)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert min(image.shape[:2]) >= 128
    assert not image.flags.writeable


def test_held_out_split() -> None:
    held, train = set(photos.HELD_OUT), set(photos.TRAIN_PHOTOS)
    assert len(held) >= 6 and not held & train and held | train == set(photos.PHOTOS)
    assert not held & set(BACKGROUND_SPLITS["train"])  # digit composites never show a held-out photo
    assert list(photos.held_out_photos()) == list(photos.HELD_OUT)


def test_unknown_photo() -> None:
    with pytest.raises(ValueError, match="unknown photo"):
        photos.load_photo("unicorn")


def test_augment_is_deterministic_and_varied() -> None:
    image = photos.load_photo("astronaut")
    first = photos.augment(image, np.random.default_rng(0))
    assert first.shape == (224, 224, 3) and first.dtype == np.uint8
    assert np.array_equal(first, photos.augment(image, np.random.default_rng(0)))
    assert not np.array_equal(first, photos.augment(image, np.random.default_rng(1)))
    zoomed = photos.augment(image, np.random.default_rng(0), photos.AugmentConfig(zoom_out_p=1.0, size=64))
    assert zoomed.shape == (64, 64, 3)
