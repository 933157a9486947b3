"""Copy-paste composites and pasted objects: pixels and masks are what they claim to be."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFilter

from spa_viz.data.views import ViewConfig, paste_cutout, paste_object, salient_cutout


def _noise(rng: np.random.Generator, height: int = 224, width: int = 224) -> np.ndarray:
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def _blob_saliency(size: int = 224) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return np.exp(-(((yy - 80) / 30.0) ** 2 + ((xx - 130) / 45.0) ** 2))


def test_salient_cutout_is_the_thresholded_region() -> None:
    image = _noise(np.random.default_rng(0))
    saliency = _blob_saliency()
    cutout = salient_cutout(image, saliency, 0.5)
    rows, cols = np.nonzero(saliency > 0.5)
    assert cutout.mask.shape == (rows.max() - rows.min() + 1, cols.max() - cols.min() + 1)
    assert cutout.mask.sum() == (saliency > 0.5).sum()
    assert np.array_equal(cutout.pixels, image[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1])
    assert cutout.area == pytest.approx((saliency > 0.5).mean())
    with pytest.raises(ValueError, match="salient"):
        salient_cutout(image, np.zeros((224, 224)), 0.5)


@pytest.mark.parametrize("seed", range(4))
def test_paste_cutout_pastes_exactly_the_cut_out(seed: int) -> None:
    rng = np.random.default_rng(seed)
    base = _noise(rng)
    donor = np.full((224, 224, 3), (7, 150, 201), dtype=np.uint8)  # one colour: resizing keeps it exact
    cutout = salient_cutout(donor, _blob_saliency(), 0.5)
    composite, mask, params = paste_cutout(base, cutout, np.random.default_rng(seed), side=(0.3, 0.8))
    left, top, width, height = params["box"]
    assert 0.3 * 224 - 1 <= max(width, height) <= 0.8 * 224 + 1
    assert np.all(composite[mask] == (7, 150, 201))  # every pasted pixel comes from the cut-out
    assert np.array_equal(composite[~mask], base[~mask])  # nothing else changed
    assert not mask[:top].any() and not mask[top + height :].any()
    assert not mask[:, :left].any() and not mask[:, left + width :].any()
    expected = np.asarray(Image.fromarray(cutout.mask).resize((width, height), Image.Resampling.NEAREST))
    if params["flip"]:
        expected = expected[:, ::-1]
    assert np.array_equal(mask[top : top + height, left : left + width], expected)  # the cut-out's own shape
    assert params["pasted_area"] == pytest.approx(mask.mean())


def test_paste_cutout_is_deterministic() -> None:
    base, donor = _noise(np.random.default_rng(1)), _noise(np.random.default_rng(2))
    cutout = salient_cutout(donor, _blob_saliency(), 0.5)
    first = paste_cutout(base, cutout, np.random.default_rng(5))
    second = paste_cutout(base, cutout, np.random.default_rng(5))
    assert np.array_equal(first[0], second[0]) and first[2] == second[2]
    assert not np.array_equal(first[0], paste_cutout(base, cutout, np.random.default_rng(6))[0])


def _object(size: int = 300) -> np.ndarray:
    """An RGBA disk: opaque green inside, a half-transparent rim, transparent outside."""
    yy, xx = np.mgrid[:size, :size]
    radius = np.hypot(yy - size / 2, xx - size / 2)
    rgba = np.zeros((size, size, 4), dtype=np.uint8)
    rgba[..., :3] = (10, 200, 30)
    rgba[..., 3] = np.where(radius < 100, 255, np.where(radius < 110, 100, 0))
    return rgba


@pytest.mark.parametrize("seed", range(4))
def test_paste_object_mask_is_exact(seed: int) -> None:
    background = np.full((224, 224, 3), 50, dtype=np.uint8)
    composite, mask, params = paste_object(background, _object(), np.random.default_rng(seed), area=(0.05, 0.15))
    left, top, width, height = params["box"]
    assert 0.05 * 0.9 <= mask.mean() <= 0.15 * 1.1  # the opaque disk covers the drawn share of the view
    assert params["object_area"] == pytest.approx(mask.mean())
    outside = np.ones_like(mask)
    outside[top : top + height, left : left + width] = False
    assert np.all(composite[outside] == 50)  # the background is untouched outside the object's box
    # the mask is where the object shows more than the background: green dominates inside it
    assert np.all(composite[mask][:, 1] > composite[mask][:, 0])
    core = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).filter(ImageFilter.MinFilter(5))) > 0
    # opaque pixels are the object's own (up to the ringing of the Lanczos resize near its rim)
    assert np.abs(composite[core].astype(int) - (10, 200, 30)).max() <= 2
    assert not mask[composite[..., 1] == 50].any()


def test_view_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="paste_fraction"):
        ViewConfig(paste_fraction=1.0)
    with pytest.raises(ValueError, match="object_area"):
        ViewConfig(object_area=(0.2, 0.1))
    with pytest.raises(ValueError, match="views per photo"):
        ViewConfig(train_views_per_photo=0)
