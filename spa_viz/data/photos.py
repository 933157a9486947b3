"""Real photos that ship inside installed packages, a fixed held-out split, and augmentation.

Why: spa-viz must train and evaluate its real-photo model offline. The photos come from
scikit-image (``skimage.data``), scikit-learn (``load_sample_image``), matplotlib's sample data and
gradio's bundled media assets; nothing is downloaded. :data:`HELD_OUT` names the evaluation photos:
they are never trained on, not even augmented (the digits generator's *train* backgrounds exclude
them too: :data:`spa_viz.data.digits.BACKGROUND_SPLITS`).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

__all__ = [
    "HELD_OUT",
    "PHOTOS",
    "TRAIN_PHOTOS",
    "AugmentConfig",
    "augment",
    "held_out_photos",
    "load_photo",
    "resize_square",
]

#: Every photo name and where it comes from.
PHOTOS: dict[str, str] = {
    "astronaut": "skimage.data",
    "chelsea": "skimage.data",
    "coffee": "skimage.data",
    "rocket": "skimage.data",
    "stereo_motorcycle": "skimage.data (left view)",
    "hubble_deep_field": "skimage.data",
    "retina": "skimage.data",
    "coins": "skimage.data",
    "camera": "skimage.data",
    "moon": "skimage.data",
    "immunohistochemistry": "skimage.data",
    "clock": "skimage.data",
    "cell": "skimage.data",
    "brick": "skimage.data",
    "grass": "skimage.data",
    "gravel": "skimage.data",
    "colorwheel": "skimage.data",
    "page": "skimage.data",
    "text": "skimage.data",
    "china": "sklearn.datasets.load_sample_image",
    "flower": "sklearn.datasets.load_sample_image",
    "grace_hopper": "matplotlib sample data",
    "present": "matplotlib sample data (Minduka_Present_Blue_Pack.png)",
    "cheetah": "gradio media_assets/images/cheetah.jpg",
    "cheetah_face": "gradio media_assets/images/cheetah1.jpg",
    "groot": "gradio media_assets/images/groot.jpeg",
    "lion": "gradio media_assets/images/lion.jpg",
    "tower": "gradio media_assets/images/tower.jpg",
}

#: Evaluation photos (one clear object each, varied object size). None is a digits-train background.
HELD_OUT: tuple[str, ...] = ("coffee", "stereo_motorcycle", "flower", "lion", "tower", "cheetah")
#: Training photos: everything else.
TRAIN_PHOTOS: tuple[str, ...] = tuple(name for name in PHOTOS if name not in HELD_OUT)

_GRADIO_FILES = {
    "cheetah": "cheetah.jpg",
    "cheetah_face": "cheetah1.jpg",
    "groot": "groot.jpeg",
    "lion": "lion.jpg",
    "tower": "tower.jpg",
}
_MATPLOTLIB_FILES = {"grace_hopper": "grace_hopper.jpg", "present": "Minduka_Present_Blue_Pack.png"}


def _gradio_image(file_name: str) -> Image.Image:
    """A photo from gradio's media assets, found without importing gradio (slow to import)."""
    spec = importlib.util.find_spec("gradio")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the gradio package ships some of the photos; install it (pip install -r requirements.txt)")
    for location in spec.submodule_search_locations:
        path = Path(location) / "media_assets" / "images" / file_name
        if path.is_file():
            return Image.open(path)
    raise FileNotFoundError(f"gradio is installed but media_assets/images/{file_name} is missing")


@cache
def load_photo(name: str) -> np.ndarray:
    """Photo ``name`` as a read-only uint8 [H, W, 3] RGB array (grey images repeated to 3 channels)."""
    if name not in PHOTOS:
        raise ValueError(f"unknown photo {name!r}; known: {sorted(PHOTOS)}")
    if name in _GRADIO_FILES:
        image = np.asarray(_gradio_image(_GRADIO_FILES[name]).convert("RGB"))
    elif name in _MATPLOTLIB_FILES:
        from matplotlib.cbook import get_sample_data

        image = np.asarray(Image.open(get_sample_data(_MATPLOTLIB_FILES[name], asfileobj=False)).convert("RGB"))
    elif name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        image = load_sample_image(f"{name}.jpg")
    else:
        import skimage.data

        image = getattr(skimage.data, name)()
        if name == "stereo_motorcycle":
            image = image[0]
    image = np.asarray(image, dtype=np.uint8)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    image = np.ascontiguousarray(image[:, :, :3])
    image.setflags(write=False)
    return image


def held_out_photos() -> dict[str, np.ndarray]:
    """The evaluation photos, in :data:`HELD_OUT` order."""
    return {name: load_photo(name) for name in HELD_OUT}


def resize_square(image: np.ndarray, size: int = 224) -> np.ndarray:
    """Plain bicubic resize to ``size`` x ``size`` (what the saliency model's preprocessing does)."""
    return np.asarray(Image.fromarray(np.asarray(image)).resize((size, size), Image.Resampling.BICUBIC))


@dataclass(frozen=True)
class AugmentConfig:
    """Random resized crop, zoom-out, horizontal flip and colour jitter settings."""

    size: int = 224
    crop_scale: tuple[float, float] = (0.25, 1.0)  # crop area as a share of the photo
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # crop aspect ratio (w / h)
    zoom_out_p: float = 0.25  # chance of shrinking the crop onto a mean-colour canvas
    zoom_out_scale: tuple[float, float] = (0.5, 0.9)  # side of the shrunk crop / canvas side
    flip_p: float = 0.5
    brightness: float = 0.3  # factors drawn from [1 - x, 1 + x]
    contrast: float = 0.3
    saturation: float = 0.3


def _random_crop(image: Image.Image, rng: np.random.Generator, config: AugmentConfig) -> Image.Image:
    """A crop of random area and aspect ratio (torchvision RandomResizedCrop's rule, then clamped)."""
    width, height = image.size
    area = width * height * rng.uniform(*config.crop_scale)
    ratio = float(np.exp(rng.uniform(np.log(config.crop_ratio[0]), np.log(config.crop_ratio[1]))))
    crop_w = int(round(min(width, np.sqrt(area * ratio))))
    crop_h = int(round(min(height, np.sqrt(area / ratio))))
    left = int(rng.integers(0, width - crop_w + 1))
    top = int(rng.integers(0, height - crop_h + 1))
    return image.crop((left, top, left + crop_w, top + crop_h))


def augment(image: np.ndarray, rng: np.random.Generator, config: AugmentConfig = AugmentConfig()) -> np.ndarray:
    """One augmented ``size`` x ``size`` uint8 view of ``image``, fully determined by ``rng``."""
    size = config.size
    view = _random_crop(Image.fromarray(np.asarray(image)), rng, config)
    if rng.random() < config.zoom_out_p:
        side = max(int(round(size * rng.uniform(*config.zoom_out_scale))), 1)
        mean = tuple(int(c) for c in np.asarray(view).reshape(-1, 3).mean(0))
        canvas = Image.new("RGB", (size, size), mean)
        left, top = (int(rng.integers(0, size - side + 1)) for _ in range(2))
        canvas.paste(view.resize((side, side), Image.Resampling.BICUBIC), (left, top))
        view = canvas
    else:
        view = view.resize((size, size), Image.Resampling.BICUBIC)
    if rng.random() < config.flip_p:
        view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    for enhancer, amount in (
        (ImageEnhance.Brightness, config.brightness),
        (ImageEnhance.Contrast, config.contrast),
        (ImageEnhance.Color, config.saturation),
    ):
        view = enhancer(view).enhance(float(rng.uniform(1 - amount, 1 + amount)))
    return np.asarray(view)
