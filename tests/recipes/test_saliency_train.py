"""The saliency recipe's training set never touches a held-out photo."""

from __future__ import annotations

from spa_viz.data import digits, photos
from spa_viz.recipes.saliency import train


def test_training_images_never_touch_held_out_photos(monkeypatch) -> None:
    loaded = []
    real = photos.load_photo

    def spy(name: str):
        loaded.append(name)
        return real(name)

    monkeypatch.setattr(train, "load_photo", spy)
    monkeypatch.setattr(digits, "load_photo", spy)
    images = train.training_images(views_per_photo=1, num_digits=1, seed=0, config=photos.AugmentConfig(size=32))
    assert not set(loaded) & set(photos.HELD_OUT)
    assert [source for source, _ in images] == list(photos.TRAIN_PHOTOS) + ["digits"]
    assert all(image.shape == (32, 32, 3) for _, image in images)
