"""The saliency-context study: its simulated SPA block is the kernel's, and each variant restores what
it says (every key, the unkept tokens' own update, a pooled key)."""

from __future__ import annotations

import pytest
import torch

from spa_viz.models.saliency.spa import adapter_mode, spa_saliency
from spa_viz.models.spa_vit import configure, spa_blocks
from spa_viz.models.twin import dense_twin
from spa_viz.recipes.saliency.context import VARIANTS, context_study, main, simulated_saliency
from tests.models.test_saliency_spa import tiny_saliency

SPA = {"start_layer": 1, "threshold": 0.5, "unkept": "refresh", "policy": "image"}


def student(soft_gating: str = "gradient", **spa: object):
    """A tiny photo-model stand-in (layer scales 1, so blocks move the tokens) whose random gates drop
    about half the tokens."""
    imported = tiny_saliency()
    with torch.no_grad():
        for block in imported.backbone.blocks:
            block.ls1.gamma.fill_(1.0)
            block.ls2.gamma.fill_(1.0)
    model = spa_saliency(
        imported,
        {**SPA, "soft_gating": soft_gating, **spa},
        dense_tail=1,
        adapters={"rank": 4, "alpha": 4.0, "drop_scaled": True},
        tuned_decoder=True,
    )
    torch.manual_seed(1)
    with torch.no_grad():
        for block in spa_blocks(model.backbone):
            block.gate.proj.weight.normal_(0, 1.0)
            block.gate.proj.bias.zero_()
    return model.eval()


@pytest.mark.parametrize("soft_gating", ["gradient", "always"])
def test_the_simulated_spa_block_is_the_kernel(soft_gating: str) -> None:
    model = student(soft_gating)
    images = torch.randn(3, 3, 56, 56)
    with torch.no_grad(), adapter_mode(model, "off"):
        kernel = model(images)
        simulated, keep = simulated_saliency(model, images, "spa")
    assert 0.2 < keep < 0.9
    torch.testing.assert_close(simulated, kernel, atol=1e-5, rtol=0)


def test_variants_restore_what_they_name() -> None:
    model = student()
    images = torch.randn(3, 3, 56, 56)
    with torch.no_grad():
        with dense_twin(model):
            teacher = model(images)
        outputs = {variant: simulated_saliency(model, images, variant)[0] for variant in VARIANTS}
        torch.testing.assert_close(outputs["dense"], teacher, atol=1e-5, rtol=0)
        for variant in ("all_keys", "exact_unkept", "pooled_key"):
            assert (outputs[variant] - outputs["spa"]).abs().max() > 1e-4, variant
        configure(model, threshold=0.0)  # every token kept: nothing to restore, every variant is the teacher
        for variant in VARIANTS:
            torch.testing.assert_close(simulated_saliency(model, images, variant)[0], teacher, atol=1e-5, rtol=0)


def test_study_scores_each_variant_and_restores_the_threshold(capsys: pytest.CaptureFixture[str]) -> None:
    model = student()
    images = torch.randn(10, 3, 56, 56)  # two batches of the study's 8
    rows = context_study(model, images, thresholds=(0.5, 0.0), variants=("spa", "dense"))
    assert [(r.threshold, r.variant) for r in rows] == [(0.5, "spa"), (0.5, "dense"), (0.0, "spa"), (0.0, "dense")]
    by = {(r.threshold, r.variant): r for r in rows}
    assert by[(0.5, "spa")].mae > 1e-5 and by[(0.5, "spa")].keep < 0.9  # the tiny decoder's maps vary little
    assert by[(0.5, "dense")].mae < 1e-7 and by[(0.0, "spa")].mae < 1e-7 and by[(0.0, "spa")].keep == 1.0
    assert model.backbone.spa_context.config.threshold == 0.5


def test_unsupported_settings_are_refused() -> None:
    images = torch.randn(1, 3, 56, 56)
    with pytest.raises(ValueError, match="unknown variant 'half'"):
        simulated_saliency(student(), images, "half")
    with pytest.raises(ValueError, match="image packing policy"):
        simulated_saliency(student(policy="container", container_len=4), images, "spa")


def test_cli_needs_the_corpus_or_takes_the_package_photos() -> None:
    with pytest.raises(SystemExit):
        main(["--variants", "half"])
