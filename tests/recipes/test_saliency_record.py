"""The saliency checkpoint's record goes through the one writer: ``--write-card`` re-renders the shipped
card from its two JSON files, an existing record is kept unless asked, and a checkpoint written
before its evaluation gets its metrics.json (training record) alone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from spa_viz.io.files import OutputExistsError
from spa_viz.models.zoo import checkpoints_dir
from spa_viz.recipes.saliency import train
from spa_viz.recipes.saliency.card import PEER_PNG, write_card
from spa_viz.recipes.saliency.evaluate import CHECKPOINT, write_checkpoint
from tests.recipes.test_saliency_train import tiny_base, tiny_recipe

SHIPPED = checkpoints_dir() / CHECKPOINT


@pytest.mark.skipif(not (SHIPPED / "metrics.json").is_file(), reason="the saliency checkpoint is not here")
def test_write_card_rerenders_the_shipped_record_and_keeps_it_unless_asked(tmp_path) -> None:
    folder = tmp_path / CHECKPOINT
    folder.mkdir()
    for name in ("config.json", "metrics.json", "README.md"):
        shutil.copy(SHIPPED / name, folder / name)
    metrics = json.loads((SHIPPED / "metrics.json").read_text())
    with pytest.raises(OutputExistsError, match="overwrite"):
        write_card(folder, metrics)
    (folder / "README.md").write_text("stale\n")
    write_card(folder, metrics, overwrite=True)
    assert (folder / "README.md").read_text() == (SHIPPED / "README.md").read_text()
    assert (folder / "metrics.json").read_text() == (SHIPPED / "metrics.json").read_text()
    assert (folder / PEER_PNG).stat().st_size > 0


def test_checkpoint_written_before_its_evaluation_has_its_training_record(tmp_path: Path) -> None:
    architecture = train.architecture_config(tiny_recipe(adapters=train.AdapterSettings(rank=2)), depth=4)
    model = train.build_model(architecture, base=tiny_base())
    training = {"command": "spa-viz train saliency --out o", "steps_run": 0}
    write_checkpoint(model, tmp_path / "ckpt", architecture, training, evaluate_now=False)
    assert json.loads((tmp_path / "ckpt" / "metrics.json").read_text()) == {"training": training}
    assert not (tmp_path / "ckpt" / "README.md").exists()
    with pytest.raises(ValueError, match="overwrite"):
        write_checkpoint(model, tmp_path / "ckpt", architecture, training, evaluate_now=False)
