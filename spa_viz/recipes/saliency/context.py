"""What limits the photo model at its operating point: the kept tokens' lost context, or the unkept
tokens' borrowed update?

An SPA block loses information on two sides. Its kept tokens attend only to each other (the unkept
tokens are missing as keys and values), and its unkept tokens do not run the block at all (with
``unkept="refresh"`` they borrow the update of their most similar kept token). This study runs the
SPA blocks of a ViT saliency model as dense tensors with attention masks, with the checkpoint's own
gates deciding, and restores one side at a time:

* ``spa``: the block as the kernel runs it (kept attend kept; unkept refreshed). It equals the SPA
  kernel's output (``tests/recipes/test_saliency_context.py``), which validates the simulation;
* ``all_keys``: kept tokens attend to every token (unkept ones as keys and values too); unkept refreshed;
* ``exact_unkept``: unkept tokens run the block as queries over the kept keys (attention and MLP):
  only the keys are sparse;
* ``pooled_key``: one extra key per image, the mean of its unkept tokens with ToMe's proportional
  attention bias ``log(count)`` (EViT's fused token as a key); unkept refreshed;
* ``dense``: every token everywhere (the teacher; a check of the simulation).

Every variant runs on the imported weights (adapters and tuned decoder off), so the numbers compare
selection and token handling alone. ``spa-viz evaluate saliency-context [--checkpoint NAME]
[--thresholds 0.5] [--views 48]`` prints the saliency MAE against the dense teacher per variant on the
corpus' validation views (``python -m spa_viz.data.photo_corpus prepare`` builds them), or on the
held-out package photos with ``--package-photos``.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from spa_viz.layers.block import nearest_kept
from spa_viz.layers.gate import ensure_min_keep, gumbel_keep
from spa_viz.models.saliency.spa import adapter_mode
from spa_viz.models.spa_vit import configure, spa_context
from spa_viz.models.twin import dense_twin
from spa_viz.viz.tables import markdown_table

__all__ = ["VARIANTS", "ContextRow", "context_study", "main", "simulated_saliency"]

log = logging.getLogger(__name__)

VARIANTS = ("spa", "all_keys", "exact_unkept", "pooled_key", "dense")
BATCH = 8


@dataclass(frozen=True)
class ContextRow:
    """Saliency MAE vs the dense teacher of one variant at one threshold, and the mean keep ratio over
    the SPA layers."""

    threshold: float
    variant: str
    mae: float
    keep: float


def _attention(block: nn.Module, x: Tensor, keys: Tensor, bias: Tensor) -> Tensor:
    """The block's attention branch (before ``ls1``) on ``x`` (B, T, C), every query seeing the keys where
    ``keys`` (B, T) is True, with an additive per-key ``bias`` (B, T)."""
    attn = block.attn
    batch, tokens, dim = x.shape
    heads = attn.num_heads
    qkv = attn.qkv(block.norm1(x)).view(batch, tokens, 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    mask = bias.masked_fill(~keys, float("-inf"))[:, None, None, :].to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(batch, tokens, -1)
    return attn.proj_drop(attn.proj(out))


def _spa_block(block: nn.Module, x: Tensor, variant: str) -> tuple[Tensor, float]:
    """One SPA block of ``variant`` on ``x`` (B, P + N, C) with the block's own gate deciding; returns the
    block output and the share of patch tokens kept."""
    ctx = block.spa_context
    cfg, prefix = ctx.config, ctx.num_prefix
    batch, tokens, _ = x.shape
    scores, _ = ctx.fuse(block.gate(x, prefix), ctx.grid, 0)
    keep = gumbel_keep(scores, threshold=cfg.threshold, tau=cfg.tau)[0]
    keep = ensure_min_keep(keep, scores, cfg.min_keep)
    counts = keep.sum(1).tolist()
    kept = F.pad(keep, (prefix, 0), value=True)
    factor = torch.sigmoid(scores) if cfg.soft_gating_active(False) else torch.ones_like(scores)
    factor = F.pad(factor, (prefix, 0), value=1.0).unsqueeze(-1)
    bias = x.new_zeros(batch, tokens)
    if variant == "exact_unkept":
        y = x + factor * block.ls1(_attention(block, x, kept, bias))
        return y + factor * block.ls2(block.mlp(block.norm2(y))), float(keep.float().mean())
    queries, keys = x, torch.ones_like(kept) if variant == "all_keys" else kept
    if variant == "pooled_key":
        unkept = (~kept).to(x.dtype)
        count = unkept.sum(1)
        pooled = (x * unkept.unsqueeze(-1)).sum(1) / count.clamp(min=1).unsqueeze(-1)
        queries = torch.cat([x, pooled.unsqueeze(1)], 1)
        keys = torch.cat([kept, (count > 0).unsqueeze(1)], 1)
        bias = torch.cat([bias, count.clamp(min=1).log().unsqueeze(1)], 1)
        factor = F.pad(factor, (0, 0, 0, 1), value=1.0)
    y = queries + factor * block.ls1(_attention(block, queries, keys, bias))
    y = (y + factor * block.ls2(block.mlp(block.norm2(y))))[:, :tokens]
    out = torch.where(kept.unsqueeze(-1), y, x)
    nearest = nearest_kept(x[:, prefix:], keep, counts)
    update = (out - x)[:, prefix:]
    borrowed = update.gather(1, nearest.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    patches = out[:, prefix:] + borrowed * (~keep).unsqueeze(-1) * factor[:, prefix:tokens]
    return torch.cat([out[:, :prefix], patches], 1), float(keep.float().mean())


def simulated_saliency(model: nn.Module, images: Tensor, variant: str) -> tuple[Tensor, float]:
    """The saliency of ``images`` with every SPA block of ``model`` run as ``variant`` (see the module
    docstring) on the imported weights, and the mean keep ratio over the SPA layers."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {VARIANTS}")
    backbone = model.backbone
    ctx = spa_context(model)
    if not ctx.config.sparse_mlp or ctx.config.policy != "image":
        raise ValueError(
            "the study simulates SPA blocks with sparse_mlp=True and the image packing policy (attention "
            "exactly per image), the photo model's settings"
        )
    keeps = []
    with adapter_mode(model, "off"):
        backbone._spa_begin(images)
        x = backbone.norm_pre(backbone.patch_drop(backbone._pos_embed(backbone.patch_embed(images))))
        for block in backbone.blocks:
            if hasattr(block, "spa_layer") and variant != "dense":
                x, keep = _spa_block(block, x, variant)
                keeps.append(keep)
            else:
                with dense_twin(backbone):
                    x = block(x)
        with dense_twin(model):
            saliency = model.decode(backbone.norm(x), tuple(images.shape[-2:]))
    return saliency, (sum(keeps) / len(keeps) if keeps else 1.0)


def context_study(
    model: nn.Module, images: Tensor, thresholds: Sequence[float] = (0.5,), variants: Sequence[str] = VARIANTS
) -> list[ContextRow]:
    """MAE vs the dense teacher of each variant at each threshold on ``images`` (B, 3, H, W, preprocessed),
    in batches of 8; the model's threshold is restored afterwards."""
    config = spa_context(model).config
    saved = config.threshold
    teacher = []
    with torch.no_grad(), dense_twin(model):
        for start in range(0, len(images), BATCH):
            teacher.append(model(images[start : start + BATCH]))
    rows = []
    try:
        for threshold in thresholds:
            configure(model, threshold=threshold)
            for variant in variants:
                error = keep = 0.0
                for index, start in enumerate(
                    tqdm(range(0, len(images), BATCH), desc=f"{variant} at {threshold:g}", unit="batch", leave=False)
                ):
                    with torch.no_grad():
                        saliency, kept = simulated_saliency(model, images[start : start + BATCH], variant)
                    count = len(saliency)
                    error += float((saliency - teacher[index]).abs().mean()) * count
                    keep += kept * count
                rows.append(ContextRow(threshold, variant, error / len(images), keep / len(images)))
                log.info("threshold %g, %s: MAE %.4f, keep %.3f", threshold, variant, rows[-1].mae, rows[-1].keep)
    finally:
        configure(model, threshold=saved)
    return rows


def format_rows(rows: Sequence[ContextRow]) -> str:
    header = ["threshold", "variant", "keep (mean over SPA layers)", "MAE vs teacher"]
    return markdown_table(header, [[f"{r.threshold:g}", r.variant, f"{r.keep:.3f}", f"{r.mae:.4f}"] for r in rows])


def _images(package_photos: bool, views: int) -> Tensor:
    """Preprocessed images: the first ``views`` validation views of the corpus, or the package photos."""
    from spa_viz.recipes.saliency.evaluate import held_out_batch

    if package_photos:
        return held_out_batch()
    from spa_viz.data.photo_corpus import load_views, to_model_input

    return to_model_input(load_views("val").tensors()["images"][:views])


def main(argv: Sequence[str] | None = None) -> list[ContextRow]:
    """CLI: ``spa-viz evaluate saliency-context``."""
    from spa_viz.models.zoo import load

    parser = argparse.ArgumentParser(prog="spa-viz evaluate saliency-context", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="spa-dinov2-s14-saliency")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.5])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--views", type=int, default=48, help="validation views of the corpus to score")
    parser.add_argument("--package-photos", action="store_true", help="score the held-out package photos instead")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    model = load(args.checkpoint).eval()
    rows = context_study(model, _images(args.package_photos, args.views), args.thresholds, args.variants)
    print(format_rows(rows))
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
