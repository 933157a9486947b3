"""SPA-ViT: any timm ``VisionTransformer`` with SPA blocks from ``start_layer`` on.

``patch`` converts a model in place, ToMe-style: the weights stay, each converted block gets a
fresh gate, and prefix tokens (class, registers) are always kept. Presets are registered with
timm, so ``timm.create_model("spa_vit_small_patch16_224")`` works.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD
from timm.models import VisionTransformer, build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import checkpoint_filter_fn as vit_checkpoint_filter_fn
from torch import Tensor, nn

from spa_viz.layers.attention import check_attention_module
from spa_viz.layers.block import SPAContext, convert_block, find_context, spa_blocks
from spa_viz.layers.config import SPAConfig
from spa_viz.layers.gate import TokenGate
from spa_viz.models.timm_contract import dense_on_meta, set_spa_grad_checkpointing

__all__ = ["SPAVisionTransformer", "patch", "configure", "spa_context", "spa_blocks", "is_spa_model"]


class SPAModelMixin:
    """Mixed in front of a timm ``VisionTransformer``: sets the token grid before the blocks run."""

    spa_context: SPAContext

    def _spa_begin(self, x: Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(f"expected images (B, C, H, W), got a tensor of shape {tuple(x.shape)}")
        height, width = x.shape[-2:]
        patch_h, patch_w = self.patch_embed.patch_size
        if height % patch_h or width % patch_w:
            raise ValueError(
                f"image size {height}x{width} is not divisible by the patch size {patch_h}x{patch_w}; "
                "resize or pad the image to a multiple of the patch size"
            )
        if getattr(self.patch_embed, "strict_img_size", False) and (height, width) != tuple(self.patch_embed.img_size):
            expected = "x".join(map(str, self.patch_embed.img_size))
            raise ValueError(
                f"this model takes {expected} images, got {height}x{width}; resize the input "
                "(or create the model with dynamic_img_size=True)"
            )
        if self.training and not isinstance(self.patch_drop, nn.Identity):
            raise ValueError("SPA needs the full token grid: build the model with patch_drop_rate=0")
        self.spa_context.begin((height // patch_h, width // patch_w))

    def forward_features(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        self._spa_begin(x)
        with dense_on_meta(self.spa_context, x):
            return super().forward_features(x, *args, **kwargs)

    def forward_intermediates(self, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        self._spa_begin(x)
        with dense_on_meta(self.spa_context, x):
            return super().forward_intermediates(x, *args, **kwargs)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's activation checkpointing; SPA blocks re-run on the context state their first run saw."""
        set_spa_grad_checkpointing(self, self.spa_context, spa_blocks(self), enable)
        super().set_grad_checkpointing(enable)


class SPAVisionTransformer(SPAModelMixin, VisionTransformer):
    """A timm ``VisionTransformer`` with SPA blocks from ``start_layer`` on, built as one (the presets).

    ``spa`` holds the :func:`patch` settings; everything else goes to ``VisionTransformer``. Being
    the model class itself, timm's builder can load ViT weights into it and wrap it for
    ``features_only``. :func:`patch` turns existing ViTs into this class too.
    """

    def __init__(self, start_layer: int, spa: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        patch(self, start_layer, **(spa or {}))


_MODEL_CLASSES: dict[type, type] = {VisionTransformer: SPAVisionTransformer, SPAVisionTransformer: SPAVisionTransformer}


def is_spa_model(model: nn.Module) -> bool:
    return isinstance(getattr(model, "spa_context", None), SPAContext)


def spa_context(model: nn.Module) -> SPAContext:
    """The shared SPA state of a patched model or its SPA backbone (ValueError if there is none)."""
    return find_context(model)


def patch(
    model: VisionTransformer,
    start_layer: int,
    *,
    policy: str = "image",
    container_len: int | None = None,
    threshold: float = 0.5,
    **settings: Any,
) -> VisionTransformer:
    """Convert a timm ``VisionTransformer`` in place so blocks ``start_layer..end`` are SPA blocks.

    Other ``settings`` are :class:`SPAConfig` fields (``tau``, ``min_keep``, ``sparse_mlp``,
    ``soft_gating``, ``backend``, ``gate_init_bias``, ``fusion``, ``enabled``). Returns the same model.
    """
    if not isinstance(model, VisionTransformer):
        raise ValueError(f"spa_viz.patch takes a timm VisionTransformer, got {type(model).__name__}")
    if is_spa_model(model):
        raise ValueError("this model is already patched; change settings with spa_viz.configure(model, ...)")
    depth = len(model.blocks)
    if not 0 <= start_layer < depth:
        raise ValueError(f"start_layer must be in [0, {depth - 1}] for this {depth}-block model, got {start_layer}")
    for block in model.blocks[start_layer:]:
        check_attention_module(block.attn)
    config = SPAConfig(
        start_layer=start_layer, policy=policy, container_len=container_len, threshold=threshold, **settings
    )
    ctx = SPAContext(config=config, num_prefix=model.num_prefix_tokens)
    reference = next(model.parameters())
    for layer, block in enumerate(model.blocks):
        if layer < start_layer:
            continue
        gate = TokenGate(block.attn.qkv.in_features, init_bias=config.gate_init_bias)
        convert_block(block, gate.to(device=reference.device, dtype=reference.dtype), ctx, layer)
    base = type(model)
    if base not in _MODEL_CLASSES:
        _MODEL_CLASSES[base] = type(f"SPA{base.__name__}", (SPAModelMixin, base), {})
    model.__class__ = _MODEL_CLASSES[base]
    model.spa_context = ctx
    return model


def configure(model: nn.Module, **changes: Any) -> SPAConfig:
    """Change SPA settings of a patched model live (e.g. ``threshold=0.3``, ``policy="container"``)."""
    config = spa_context(model).config
    if "start_layer" in changes:
        raise ValueError("start_layer is fixed when the model is patched; patch a fresh model instead")
    config.update(**changes)
    return config


def _vit_cfg(hub_id: str | None, **overrides: Any) -> dict[str, Any]:
    """A ``pretrained_cfg``: timm's ViT weights ``hub_id`` (its gates start fresh), 224 px by default."""
    defaults = dict(
        input_size=(3, 224, 224),
        fixed_input_size=True,
        interpolation="bicubic",
        crop_pct=0.9,
        mean=IMAGENET_INCEPTION_MEAN,
        std=IMAGENET_INCEPTION_STD,
        num_classes=1000,
        pool_size=None,
        first_conv="patch_embed.proj",
        classifier="head",
        paper_ids="arXiv:2410.23608",
    )
    return {**defaults, "hf_hub_id": hub_id, **overrides}


default_cfgs = generate_default_cfgs(
    {
        "spa_vit_tiny_patch16_224.augreg_in21k_ft_in1k": _vit_cfg(
            "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k", license="apache-2.0"
        ),
        "spa_vit_small_patch16_224.augreg_in21k_ft_in1k": _vit_cfg(
            "timm/vit_small_patch16_224.augreg_in21k_ft_in1k", license="apache-2.0"
        ),
        "spa_vit_base_patch16_224.augreg2_in21k_ft_in1k": _vit_cfg(
            "timm/vit_base_patch16_224.augreg2_in21k_ft_in1k", license="apache-2.0"
        ),
        "spa_vit_small_patch14_dinov2.lvd142m": _vit_cfg(
            "timm/vit_small_patch14_dinov2.lvd142m",
            crop_pct=1.0,
            mean=IMAGENET_DEFAULT_MEAN,
            std=IMAGENET_DEFAULT_STD,
            num_classes=0,
            license="apache-2.0",
        ),
        "spa_vit_digits": _vit_cfg(
            None,
            input_size=(3, 128, 128),
            mean=IMAGENET_DEFAULT_MEAN,
            std=IMAGENET_DEFAULT_STD,
            num_classes=0,
            notes=("no hub weights: train it (spa-viz train) or load a checkpoint with spa_viz.load",),
        ),
    }
)


def _filter_vit_weights(state_dict: dict[str, Tensor], model: SPAVisionTransformer) -> dict[str, Tensor]:
    """timm's ViT checkpoint conversion, plus the model's own fresh gates (ViT weights have none)."""
    state = vit_checkpoint_filter_fn(state_dict, model)
    for key, value in model.state_dict().items():
        if key not in state and ".gate." in key:
            state[key] = value
    return state


def _spa_vit(
    variant: str, pretrained: bool, start_layer: int, spa: dict[str, Any] | None, **kwargs: Any
) -> SPAVisionTransformer:
    """Build a preset through timm's builder (pretrained_cfg, ViT weights, ``features_only``)."""
    out_indices = kwargs.pop("out_indices", 3)
    return build_model_with_cfg(
        SPAVisionTransformer,
        variant,
        pretrained,
        pretrained_filter_fn=_filter_vit_weights,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        start_layer=start_layer,
        spa=spa,
        **kwargs,
    )


@register_model
def spa_vit_tiny_patch16_224(
    pretrained: bool = False, start_layer: int = 3, spa: dict | None = None, **kwargs: Any
) -> VisionTransformer:
    """ViT-Ti/16 with SPA blocks from layer 3 (``pretrained=True`` fetches timm's ViT weights)."""
    model_args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3)
    return _spa_vit("spa_vit_tiny_patch16_224", pretrained, start_layer, spa, **{**model_args, **kwargs})


@register_model
def spa_vit_small_patch16_224(
    pretrained: bool = False, start_layer: int = 3, spa: dict | None = None, **kwargs: Any
) -> VisionTransformer:
    """ViT-S/16 with SPA blocks from layer 3."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return _spa_vit("spa_vit_small_patch16_224", pretrained, start_layer, spa, **{**model_args, **kwargs})


@register_model
def spa_vit_base_patch16_224(
    pretrained: bool = False, start_layer: int = 3, spa: dict | None = None, **kwargs: Any
) -> VisionTransformer:
    """ViT-B/16 with SPA blocks from layer 3."""
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
    return _spa_vit("spa_vit_base_patch16_224", pretrained, start_layer, spa, **{**model_args, **kwargs})


@register_model
def spa_vit_small_patch14_dinov2(
    pretrained: bool = False, start_layer: int = 4, spa: dict | None = None, **kwargs: Any
) -> VisionTransformer:
    """DINOv2 ViT-S/14 (layer scale, 224 input by default) with SPA blocks from layer 4."""
    model_args = dict(img_size=224, patch_size=14, embed_dim=384, depth=12, num_heads=6, init_values=1e-5)
    return _spa_vit("spa_vit_small_patch14_dinov2", pretrained, start_layer, spa, **{**model_args, **kwargs})


@register_model
def spa_vit_digits(
    pretrained: bool = False, start_layer: int = 2, spa: dict | None = None, **kwargs: Any
) -> VisionTransformer:
    """A small ViT for 128 px cluttered-digit images (patch 8, dim 192, depth 8) that trains on a CPU."""
    if pretrained:
        raise ValueError("spa_vit_digits has no hub weights; load a trained checkpoint with spa_viz.load")
    model_args = dict(img_size=128, patch_size=8, embed_dim=192, depth=8, num_heads=3, mlp_ratio=4.0, num_classes=0)
    return _spa_vit("spa_vit_digits", pretrained, start_layer, spa, **{**model_args, **kwargs})
