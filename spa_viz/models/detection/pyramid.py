"""Feature pyramids that turn an SPA backbone into torchvision's detection backbone contract.

torchvision's two-stage detectors take a ``backbone`` module with an ``out_channels`` attribute whose
forward maps a padded image batch (B, 3, H, W) to an ordered dict of NCHW maps. The two pyramids here
are such modules, each also telling the token grids (shape and pixel stride) of its SPA blocks for an
input size, which is what selection labels are made at:

* :class:`SPTFeaturePyramid` (as torchvision's ``BackboneWithFPN``): SPT's four stage maps at strides
  4, 8, 16, 32, each layer-normed (as the Swin detection backbones do; the last by SPT's own final
  norm), into torchvision's ``FeaturePyramidNetwork`` with the max-pool P6 (``LastLevelMaxPool``).
* :class:`SimpleFeaturePyramid` (ViTDet, Li et al. 2022): a plain ViT's last token map at its patch
  stride, turned into maps at strides 4, 8, 16, 32 by stride-2 transposed convolutions (up) or max
  pooling (down), each followed by a 1x1 and a 3x3 convolution with channel LayerNorms, plus P6.

Both return the keys ``"0", "1", "2", "3", "pool"`` that torchvision's default RoI poolers read.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch.nn.functional as F
from timm.layers import LayerNorm2d
from timm.models import VisionTransformer
from torch import Tensor, nn
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

from spa_viz.models.spt import SPT
from spa_viz.selection.labels import TokenGrid

__all__ = ["PYRAMID_STRIDES", "SPTFeaturePyramid", "SimpleFeaturePyramid"]

#: Pixel strides of the pyramid levels "0".."3"; "pool" (P6) is at twice the last.
PYRAMID_STRIDES = (4, 8, 16, 32)


class SPTFeaturePyramid(nn.Module):
    """SPT stage maps -> per-stage LayerNorm -> torchvision FPN (+ P6): torchvision's backbone contract.

    ``body`` is the SPT (its SPA blocks, gates and context; its classifier is dropped, so every
    parameter takes part in the loss), ``fpn`` the torchvision FPN; the layout follows
    ``torchvision.models.detection.backbone_utils.BackboneWithFPN``.
    """

    def __init__(self, body: SPT, out_channels: int) -> None:
        super().__init__()
        if not isinstance(body, SPT):
            raise ValueError(f"SPTFeaturePyramid takes an SPT backbone, got {type(body).__name__}")
        strides = tuple(int(info["reduction"]) for info in body.feature_info)
        if strides != PYRAMID_STRIDES:
            raise ValueError(f"the SPT's stages have strides {strides}; the pyramid needs {PYRAMID_STRIDES} (patch 4)")
        widths = [int(info["num_chs"]) for info in body.feature_info]
        body.reset_classifier(0, "")
        self.body = body
        self.norms = nn.ModuleList(LayerNorm2d(width) for width in widths[:-1])
        self.fpn = FeaturePyramidNetwork(widths, out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, images: Tensor) -> OrderedDict[str, Tensor]:
        maps = self.body.forward_intermediates(images, norm=True, intermediates_only=True)
        normed = [norm(m) for norm, m in zip(self.norms, maps)] + [maps[-1]]
        return self.fpn(OrderedDict((str(i), m) for i, m in enumerate(normed)))

    def token_grids(self, image_size: tuple[int, int]) -> list[TokenGrid]:
        """The token grid of every SPA stage for an input of ``image_size`` (the padded batch)."""
        return self.body.token_grids(image_size)[self.body.config.spa_start_stage - 1 :]


def _level(dim: int, scale: float, out_channels: int) -> nn.Sequential:
    """One simple-pyramid level: resample the patch-stride map by ``scale``, then 1x1 and 3x3 convs."""
    layers: list[nn.Module] = []
    width = dim
    if scale > 1:
        steps = int(math.log2(scale))
        for step in range(steps):
            layers.append(nn.ConvTranspose2d(width, width // 2, 2, stride=2))
            width //= 2
            if step < steps - 1:
                layers += [LayerNorm2d(width), nn.GELU()]
    elif scale < 1:
        layers.append(nn.MaxPool2d(int(round(1 / scale))))
    layers += [
        nn.Conv2d(width, out_channels, 1, bias=False),
        LayerNorm2d(out_channels),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
        LayerNorm2d(out_channels),
    ]
    return nn.Sequential(*layers)


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid on a plain (SPA-)ViT: one token map -> strides 4, 8, 16, 32 (+ P6).

    The ViT (its classifier dropped) runs once (``forward_features``, final norm included); its patch
    tokens, reshaped to the
    (B, C, H/p, W/p) grid, are up-sampled by ``log2(p / s)`` stride-2 transposed convolutions (the
    width halving each time) or max-pooled by ``s / p`` for each pyramid stride ``s``.
    """

    def __init__(self, body: VisionTransformer, out_channels: int) -> None:
        super().__init__()
        if not isinstance(body, VisionTransformer):
            raise ValueError(f"SimpleFeaturePyramid takes a timm VisionTransformer, got {type(body).__name__}")
        patch_h, patch_w = body.patch_embed.patch_size
        if patch_h != patch_w or patch_h & (patch_h - 1):
            raise ValueError(f"the simple pyramid needs a square power-of-two patch, got {(patch_h, patch_w)}")
        dim = int(body.embed_dim)
        for stride in PYRAMID_STRIDES:
            if patch_h > stride and dim % (patch_h // stride):
                raise ValueError(f"width {dim} cannot be halved down to stride {stride} from patch {patch_h}")
        body.reset_classifier(0)  # the token map is all the pyramid reads
        self.body = body
        self.patch = int(patch_h)
        self.stages = nn.ModuleList(_level(dim, self.patch / stride, out_channels) for stride in PYRAMID_STRIDES)
        self.out_channels = out_channels

    def forward(self, images: Tensor) -> OrderedDict[str, Tensor]:
        tokens = self.body.forward_features(images)
        grid = (images.shape[-2] // self.patch, images.shape[-1] // self.patch)
        patches = tokens[:, self.body.num_prefix_tokens :]
        feature_map = patches.transpose(1, 2).reshape(patches.shape[0], patches.shape[2], *grid)
        maps = OrderedDict((str(i), stage(feature_map)) for i, stage in enumerate(self.stages))
        maps["pool"] = F.max_pool2d(maps[str(len(self.stages) - 1)], kernel_size=1, stride=2)
        return maps

    def token_grids(self, image_size: tuple[int, int]) -> list[TokenGrid]:
        """The one token grid every SPA block of the ViT runs on, for an input of ``image_size``."""
        height, width = image_size
        if height % self.patch or width % self.patch:
            raise ValueError(f"image size {tuple(image_size)} is not a multiple of the patch size {self.patch}")
        return [TokenGrid((height // self.patch, width // self.patch), (self.patch, self.patch))]
