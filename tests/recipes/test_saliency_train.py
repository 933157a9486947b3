"""The saliency recipe on a tiny stand-in model and synthetic teacher data (the photo corpus is not
needed): both phases run, the adapters and the tuned decoder learn, the best val state is kept."""

from __future__ import annotations

import json
import math
import shlex
from collections.abc import Sequence
from dataclasses import asdict, replace
from typing import Any

import pytest
import torch
from timm.models import VisionTransformer

import spa_viz
from spa_viz.io.config import ConfigError
from spa_viz.models.saliency.decoder import DecoderConfig, DinoSaliency, SaliencyDecoder
from spa_viz.models.spa_vit import spa_blocks
from spa_viz.models.zoo import checkpoints_dir
from spa_viz.recipes.saliency import train

GRID = 4  # 56 px / 14 px patches


class SyntheticTeacher:
    """Stand-in for :class:`train.TeacherTokens`: random tokens, a blob-shaped map and its labels."""

    def __init__(self, count: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.tokens_in = torch.randn(count, 1 + GRID * GRID, 32, generator=generator)
        self.tokens_out = torch.randn(count, 1 + GRID * GRID, 32, generator=generator)
        centres = torch.rand(count, 2, generator=generator) * 56
        ys, xs = torch.meshgrid(torch.arange(56.0), torch.arange(56.0), indexing="ij")
        distance = (ys[None] - centres[:, 0, None, None]) ** 2 + (xs[None] - centres[:, 1, None, None]) ** 2
        self.saliency = torch.exp(-distance / 200.0)[:, None]
        self.labels = torch.nn.functional.max_pool2d(self.saliency, 14).flatten(1) > 0.5

    def __len__(self) -> int:
        return len(self.tokens_in)

    def rows(self, index: Sequence[int]) -> dict[str, torch.Tensor]:
        index = torch.as_tensor(list(index))
        return {
            "tokens_in": self.tokens_in[index].half(),
            "tokens_out": self.tokens_out[index].half(),
            "saliency": self.saliency[index].half(),
            "labels": self.labels[index],
        }


def tiny_base() -> DinoSaliency:
    torch.manual_seed(0)
    backbone = VisionTransformer(
        img_size=56, patch_size=14, embed_dim=32, depth=4, num_heads=2, num_classes=0, init_values=1e-5
    )
    return DinoSaliency(backbone, SaliencyDecoder(DecoderConfig(in_dim=32, channels=(8, 4, 2)))).eval()


def tiny_recipe(spa: dict[str, Any] | None = None, **changes: Any) -> train.SaliencyRecipe:
    """The shipped recipe with SPA from block 1 (of the 4 of :func:`tiny_base`) and ``changes``."""
    shipped = train.load_recipe()
    return replace(shipped, spa={**shipped.spa, "start_layer": 1, **(spa or {})}, **changes)


def test_architecture_config_lists_the_spa_blocks_before_the_dense_tail() -> None:
    config = train.architecture_config(train.load_recipe())
    assert config["spa_layers"] == list(range(3, 11)) and config["adapters"]["layers"] == list(range(3, 12))
    assert config["architecture"] == "img_focus_spa" and config["partial"] and config["tuned_decoder"]


def _parse(command: str) -> Any:
    return train._parser().parse_args(shlex.split(command)[3:])  # after "spa-viz train saliency"


def test_recipe_file_and_recorded_flags_give_the_shipped_checkpoint_config() -> None:
    """The default recipe with the flags its config.json records is the shipped model's config: the
    architecture (v2 spelled soft gating as a bool and had no unkept key), the training settings
    (keys added since take their recipe values; v2 had no drop_scaled adapter key) and the command
    itself."""
    saved = json.loads((checkpoints_dir() / train.NAME / "config.json").read_text())
    args = _parse(saved["command"])
    recipe = train.recipe_from_args(args)
    architecture = train.architecture_config(recipe)
    spa = dict(saved["spa"])
    if isinstance(spa["soft_gating"], bool):
        spa["soft_gating"] = "always" if spa["soft_gating"] else "off"
    spa.setdefault("unkept", "copy")
    adapters = dict(saved["adapters"])
    adapters.setdefault("drop_scaled", False)
    if recipe.max_keep is not None:  # the operating threshold was chosen on the val views
        architecture["spa"]["threshold"] = spa["threshold"]
    assert architecture == {**{k: saved[k] for k in architecture}, "spa": spa, "adapters": adapters}
    assert {k: v for k, v in asdict(recipe.train).items() if k in saved["training"]} == saved["training"]
    assert train._recorded_command(args, recipe.train) == saved["command"]


def test_flags_override_the_recipe_file(tmp_path) -> None:
    args = _parse(
        "spa-viz train saliency --out o --minutes 5 --rank 0 --no-tuned-decoder --unkept refresh --max-keep 0.3"
    )
    recipe = train.recipe_from_args(args)
    assert recipe.adapters is None and not recipe.tuned_decoder and recipe.max_keep == 0.3
    assert recipe.train.minutes == 5 and recipe.spa["unkept"] == "refresh" and recipe.spa["start_layer"] == 3
    recipe = train.recipe_from_args(_parse("spa-viz train saliency --out o --rank 4 --full-layers 11"))
    assert recipe.adapters == train.AdapterSettings(rank=4, alpha=4.0, full_layers=(11,))

    gates_only = tmp_path / "gates.json"
    gates_only.write_text(json.dumps({"spa": {"start_layer": 2}, "adapters": None, "train": {"steps": 7}}))
    recipe = train.recipe_from_args(_parse(f"spa-viz train saliency --out o --config {gates_only} --full-layers 5"))
    assert recipe.adapters == train.AdapterSettings(rank=0, alpha=0.0, full_layers=(5,))
    assert recipe.train.steps == 7 and recipe.train.minutes == train.TrainConfig.minutes
    assert train._recorded_command(_parse(f"spa-viz train saliency --out o --config {gates_only}"), recipe.train) == (
        f"spa-viz train saliency --out o --minutes 90 --seed 0 --config {gates_only}"
    )


@pytest.mark.parametrize(
    "recipe, message",
    [
        ({"spa": {"start_layer": 3}, "train": {"epocs": 2}}, r"train: unknown keys \['epocs'\]"),
        ({"spa": {"start_layer": 3}, "adapter": None}, r"unknown keys \['adapter'\]"),
        ({"spa": {"threshold": 0.5}}, "start_layer"),
        ({"spa": {"start_layer": 3}, "train": {"minutes": 0}}, "minutes must be > 0"),
    ],
)
def test_a_bad_recipe_fails_with_what_is_wrong(tmp_path, recipe: dict[str, Any], message: str) -> None:
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(recipe))
    with pytest.raises(ConfigError, match=message):
        train.load_recipe(path)


def test_training_runs_both_phases_and_keeps_the_best_val_state() -> None:
    adapters = train.AdapterSettings(rank=2, full_layers=(3,))
    architecture = train.architecture_config(tiny_recipe(adapters=adapters), depth=4)
    assert architecture["spa_layers"] == [1, 2] and architecture["adapters"]["layers"] == [1, 2, 3]
    model = train.build_model(architecture, base=tiny_base())
    trained = {id(p) for p in train.trained_tensors_parameters(model)}
    assert all(p.requires_grad == (id(p) in trained) for p in model.parameters())
    before = {k: v.clone() for k, v in train.trained_tensors(model).items()}
    config = train.TrainConfig(
        gate_steps=2, gate_batch=4, steps=4, batch_size=2, val_every=2, log_every=1, warmup_steps=1
    )
    result = train.train(model, SyntheticTeacher(8, 0), SyntheticTeacher(4, 1), config, deadline=math.inf)
    assert result["steps_run"] == 6 and result["stopped_by"] == "steps"
    phases = [record["phase"] for record in result["history"]]
    assert phases[:2] == ["gates", "gates"] and "joint" in phases
    scored = [record for record in result["history"] if "val" in record]
    assert len(scored) == 2 and result["best"]["error"] == min(r["val"]["mae"] for r in scored)
    after = train.trained_tensors(model)
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert any(".lora_b" in k for k in changed) and any(".delta" in k for k in changed)
    assert any(k.startswith("tuned_decoder.") for k in changed) and any(".gate." in k for k in changed)
    assert not model.training and len(spa_blocks(model.backbone)) == 2


def test_validation_scores_match_a_direct_computation() -> None:
    architecture = train.architecture_config(tiny_recipe(adapters=train.AdapterSettings(rank=2)), depth=4)
    model = train.build_model(architecture, base=tiny_base())
    data = SyntheticTeacher(5, 2)
    scores = train.validate(model, data, 0, batch_size=2)
    rows = data.rows(range(5))
    with torch.no_grad():
        logits, _ = train.student_forward(model, rows["tokens_in"].float())
    expected = (torch.sigmoid(logits) - rows["saliency"].float()).abs().mean()
    assert math.isclose(scores.mae, float(expected), rel_tol=1e-5)
    assert 0.0 <= scores.keep_first <= 1.0 and 0.0 <= scores.recall_first <= 1.0


def test_gates_only_refresh_recipe_keeps_the_teacher_at_keep_all_and_chooses_its_threshold() -> None:
    """SPA v3's photo recipe: no adapters, no tuned decoder, refresh, soft gating in training only.
    Only the gates train; with every token kept the student is its teacher exactly (the v2 drift cannot
    happen); the operating threshold is the lowest val MAE under the keep cap."""
    recipe = tiny_recipe({"unkept": "refresh", "soft_gating": "train"}, adapters=None, tuned_decoder=False)
    architecture = train.architecture_config(recipe, depth=4)
    assert architecture["adapters"] is None and not architecture["tuned_decoder"]
    model = train.build_model(architecture, base=tiny_base())
    assert {k.split(".gate.")[0] for k in train.trained_tensors(model)} == {"backbone.blocks.1", "backbone.blocks.2"}
    before = {k: v.clone() for k, v in train.trained_tensors(model).items()}
    config = train.TrainConfig(gate_steps=1, gate_batch=4, steps=3, batch_size=2, val_every=3, log_every=1)
    val = SyntheticTeacher(4, 1)
    train.train(model, SyntheticTeacher(8, 0), val, config, deadline=math.inf)
    after = train.trained_tensors(model)
    assert all(not torch.equal(after[k], before[k]) for k in after if k.endswith(".weight"))

    rows = val.rows(range(4))
    spa_viz.configure(model.backbone, threshold=0.0)
    with torch.no_grad():
        student, _ = train.student_forward(model, rows["tokens_in"].float())
        with spa_viz.dense_twin(model.backbone):
            teacher, _ = train.student_forward(model, rows["tokens_in"].float())
    assert torch.equal(student, teacher)

    threshold, sweep = train.choose_threshold(model, val, max_keep=0.6, thresholds=(0.2, 0.5, 0.8))
    allowed = [row for row in sweep if row["keep_first"] <= 0.6]
    expected = min(allowed, key=lambda row: row["mae"]) if allowed else min(sweep, key=lambda row: row["keep_first"])
    assert threshold == expected["threshold"] == spa_viz.spa_context(model.backbone).config.threshold
    assert [row["threshold"] for row in sweep] == [0.2, 0.5, 0.8]


def test_keep_all_term_trains_and_selects_on_the_keep_all_error_too() -> None:
    """With ``keep_all_weight``: each joint step adds a keep-all forward's error, validation measures the
    keep-all MAE (equal to a direct computation at threshold 0) and the best state minimises the sum."""
    recipe = tiny_recipe({"unkept": "refresh", "soft_gating": "gradient"}, adapters=train.AdapterSettings(rank=2))
    architecture = train.architecture_config(recipe, depth=4)
    model = train.build_model(architecture, base=tiny_base())
    config = train.TrainConfig(
        gate_steps=1, gate_batch=4, steps=4, batch_size=2, val_every=2, log_every=1, keep_all_weight=1.0
    )
    val = SyntheticTeacher(4, 1)
    result = train.train(model, SyntheticTeacher(8, 0), val, config, deadline=math.inf)
    joint = [record for record in result["history"] if record["phase"] == "joint"]
    assert joint and all(record["keep_all"] > 0 for record in joint)
    scored = [record["val"] for record in result["history"] if "val" in record]
    assert result["best"]["error"] == min(v["mae"] + v["mae_keep_all"] for v in scored)

    scores = train.validate(model, val, 0, keep_all=True)
    rows = val.rows(range(4))
    spa_viz.configure(model.backbone, threshold=0.0)
    with torch.no_grad():
        logits, _ = train.student_forward(model, rows["tokens_in"].float())
    expected = (torch.sigmoid(logits) - rows["saliency"].float()).abs().mean()
    assert math.isclose(scores.mae_keep_all, float(expected), rel_tol=1e-5)
