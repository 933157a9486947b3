"""A detector = an SPA backbone (SPA-ViT or SPT) + a CenterNet head, saved and rebuilt from JSON.

Why one wrapper for both backbones: training, evaluation, ``spa_viz.trace`` and the checkpoint
format stay the same whichever backbone sits inside. A plain ViT's patch tokens are reshaped to
their (B, C, gh, gw) grid (the class token is dropped); SPT's stride-8/16/32 maps are merged by a
light FPN to one stride-8 map. The dense twin is the same network with ``spa.enabled = false``.

Checkpoint architectures (``config.json``):

* ``spa_vit_detector``: ``backbone = {"timm_name", "timm_kwargs", "spa": {"start_layer", ...},
  "stem"}``; a ``spa_*`` timm name (e.g. ``spa_vit_digits``) gets ``start_layer``/``spa`` as
  factory arguments, any other timm ViT name is built plain and then patched. ``stem`` (optional)
  lists the widths of a :class:`ConvStemEmbed` that replaces the linear patch embedding.
* ``spt_detector``: ``backbone = {"timm_name": "spt_digits", "timm_kwargs": {..., "spa": {...}}}``.

Both take ``head = {"num_classes", "hidden", "upsample", "fpn_levels", "fpn_channels",
"size_weight", "offset_weight", "top_k"}`` (all but ``num_classes`` optional).
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import timm
import torch
from timm.layers import PatchEmbed
from timm.models import VisionTransformer
from torch import Tensor, nn

import spa_viz.models.spt  # noqa: F401  (registers the spt_* timm models)
from spa_viz.io.checkpoint import register_architecture
from spa_viz.layers.block import find_context
from spa_viz.models.detection.heads import CenterNetHead, Detections, LightFPN, centernet_loss, decode_centernet
from spa_viz.models.spa_vit import is_spa_model, patch
from spa_viz.selection.labels import TokenGrid, multiscale_labels
from spa_viz.selection.loss import model_selection_loss

__all__ = [
    "ConvStemEmbed",
    "Detector",
    "build_spa_vit_detector",
    "build_spt_detector",
    "keep_ratios",
    "spa_vit_backbone",
]

Grid = tuple[int, int]
_HEAD_KEYS = (
    "num_classes",
    "hidden",
    "upsample",
    "fpn_levels",
    "fpn_channels",
    "size_weight",
    "offset_weight",
    "top_k",
)


class ConvStemEmbed(PatchEmbed):
    """ViT patch embedding by early convolutions (Xiao et al., NeurIPS 2021): stride-2 3x3 conv + BN +
    ReLU layers down to the patch stride, then a 1x1 ``proj`` to the embedding width.

    Why: a small ViT trained from scratch on a few thousand images converges much faster with a
    convolutional stem than with one linear projection per patch; the token grid stays the same.
    A drop-in ``embed_layer`` for timm's ``VisionTransformer`` (``channels``: one width per halving).
    """

    def __init__(self, *args: Any, channels: Sequence[int] = (24, 48, 96), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        patch_h, patch_w = self.patch_size
        steps = math.log2(patch_h)
        if patch_h != patch_w or steps != int(steps) or len(channels) != int(steps):
            raise ValueError(
                f"a conv stem needs a square power-of-two patch and one width per halving: "
                f"patch {self.patch_size}, channels {list(channels)}"
            )
        layers: list[nn.Module] = []
        width = self.in_chans = self.proj.in_channels
        for out in channels:
            layers += [
                nn.Conv2d(width, out, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(out),
                nn.ReLU(inplace=True),
            ]
            width = out
        self.stem = nn.Sequential(*layers)
        self.proj = nn.Conv2d(width, self.proj.out_channels, 1, bias=self.proj.bias is not None)

    def forward(self, x: Tensor) -> Tensor:
        patch_h, patch_w = self.patch_size
        if x.shape[-2] % patch_h or x.shape[-1] % patch_w:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not divisible by the patch size {self.patch_size}")
        x = self.proj(self.stem(x))
        return self.norm(x.flatten(2).transpose(1, 2))


class Detector(nn.Module):
    """Backbone + (FPN) + :class:`CenterNetHead`; ``forward`` gives ``heatmap``, ``size``, ``offset``.

    ``spec`` is the architecture config the detector was built from; :meth:`architecture_config`
    returns it with the backbone's current SPA settings, ready for ``save_checkpoint``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        *,
        hidden: int = 64,
        upsample: int = 0,
        fpn_levels: Sequence[int] = (1, 2, 3),
        fpn_channels: int = 96,
        size_weight: float = 1.0,
        offset_weight: float = 1.0,
        top_k: int = 100,
        spec: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.size_weight = size_weight
        self.offset_weight = offset_weight
        self.top_k = top_k
        self.spec = copy.deepcopy(spec) if spec is not None else None
        if hasattr(backbone, "forward_pyramid"):
            self.fpn_levels = tuple(int(i) for i in fpn_levels)
            info = backbone.feature_info
            if not self.fpn_levels or any(not 0 <= i < len(info) for i in self.fpn_levels):
                raise ValueError(f"fpn_levels {list(fpn_levels)} must index the {len(info)} pyramid levels")
            self.neck: nn.Module | None = LightFPN([info[i]["num_chs"] for i in self.fpn_levels], fpn_channels)
            stride, channels = int(info[self.fpn_levels[0]]["reduction"]), fpn_channels
        elif isinstance(backbone, VisionTransformer):
            self.fpn_levels = ()
            self.neck = None
            patch_h, patch_w = backbone.patch_embed.patch_size
            if patch_h != patch_w:
                raise ValueError("the detector head needs square patches")
            stride, channels = int(patch_h), int(backbone.embed_dim)
        else:
            raise ValueError(
                f"unsupported backbone {type(backbone).__name__}: use a timm VisionTransformer or a model "
                "with forward_pyramid (SPT)"
            )
        self.head = CenterNetHead(channels, num_classes, stride=stride, hidden=hidden, upsample=upsample)

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    @property
    def stride(self) -> int:
        """Input pixels per output cell of the head."""
        return self.head.output_stride

    def features(self, images: Tensor) -> Tensor:
        """The NCHW map the head reads: the ViT's normed patch-token grid, or the FPN output."""
        if self.neck is not None:
            pyramid = self.backbone.forward_pyramid(images)
            return self.neck([pyramid[i] for i in self.fpn_levels])
        tokens = self.backbone.forward_features(images)
        patch_h, patch_w = self.backbone.patch_embed.patch_size
        grid = (images.shape[-2] // patch_h, images.shape[-1] // patch_w)
        patches = tokens[:, self.backbone.num_prefix_tokens :]
        return patches.transpose(1, 2).reshape(patches.shape[0], patches.shape[2], *grid)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """Head outputs for images (B, 3, H, W): ``heatmap`` logits (B, K, h, w), ``size``, ``offset``."""
        return self.head(self.features(images))

    def loss(self, outputs: Mapping[str, Tensor], targets: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
        """The task loss ``task`` (= heat-map focal + size L1 + offset L1) and its parts."""
        return centernet_loss(
            outputs, targets, self.stride, size_weight=self.size_weight, offset_weight=self.offset_weight
        )

    def decode(self, outputs: Mapping[str, Tensor], *, threshold: float = 0.0) -> list[Detections]:
        """Per image ``(boxes xyxy input pixels, scores, labels)``, at most ``top_k`` each."""
        return decode_centernet(outputs, self.stride, top_k=self.top_k, threshold=threshold)

    def selection_grids(self, image_size: tuple[int, int]) -> list[TokenGrid]:
        """Token grids (shape and pixel stride) of the backbone's SPA stages for an input of ``image_size``."""
        height, width = image_size
        if self.neck is None:
            patch_h, patch_w = self.backbone.patch_embed.patch_size
            return [TokenGrid((height // patch_h, width // patch_w), (patch_h, patch_w))]
        return self.backbone.token_grids(image_size)[self.backbone.config.spa_start_stage - 1 :]

    def selection_labels(self, targets: Sequence[Mapping[str, Any]], image_size: tuple[int, int]) -> dict[Grid, Tensor]:
        """Selection labels per SPA grid: the targets' ``select_labels`` when present, else from masks/boxes."""
        grids = self.selection_grids(image_size)
        if all("select_labels" in t for t in targets):
            if any(len(t["select_labels"]) != len(grids) for t in targets):
                raise ValueError(f"targets carry select_labels for other grids than this backbone's {grids}")
            per_grid = [torch.stack([t["select_labels"][i] for t in targets]) for i in range(len(grids))]
        else:
            per_grid = multiscale_labels(targets, image_size, grids)
        return {grid.shape: labels for grid, labels in zip(grids, per_grid)}

    def selection_loss(self, targets: Sequence[Mapping[str, Any]], image_size: tuple[int, int], alpha: float) -> Tensor:
        """``alpha * L_select`` on the scores of the last forward (needs SPA enabled)."""
        return model_selection_loss(self, self.selection_labels(targets, image_size), alpha)

    def architecture_config(self) -> dict[str, Any]:
        """The build config with the backbone's current SPA settings (for ``save_checkpoint``)."""
        if self.spec is None:
            raise ValueError("this Detector was built by hand; build it from a config to save it")
        spec = copy.deepcopy(self.spec)
        settings = find_context(self.backbone).config.to_dict()
        if spec["architecture"] == "spt_detector":
            settings.pop("start_layer")
            spec["backbone"].setdefault("timm_kwargs", {})["spa"] = settings
        else:
            spec["backbone"]["spa"] = settings
        return spec


def keep_ratios(model: nn.Module) -> list[tuple[int, float]]:
    """(layer, share of patch tokens kept) of the last forward, per learned SPA gate."""
    return [(gate.layer, float(gate.keep.float().mean())) for gate in find_context(model).gates]


def _head_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
    head = dict(config.get("head", {}))
    unknown = sorted(set(head) - set(_HEAD_KEYS))
    if unknown or "num_classes" not in head:
        raise ValueError(f"head config needs num_classes and takes only {list(_HEAD_KEYS)}; got unknown {unknown}")
    return head


def spa_vit_backbone(backbone_cfg: Mapping[str, Any]) -> VisionTransformer:
    """The SPA-ViT of a ``backbone`` config section (``timm_name``, ``timm_kwargs``, ``spa``, ``stem``)."""
    name, kwargs = backbone_cfg["timm_name"], dict(backbone_cfg.get("timm_kwargs", {}))
    spa = dict(backbone_cfg.get("spa", {}))
    if "start_layer" not in spa:
        raise ValueError("backbone.spa needs start_layer (the first SPA block)")
    start = spa.pop("start_layer")
    if backbone_cfg.get("stem"):
        kwargs["embed_layer"] = functools.partial(ConvStemEmbed, channels=tuple(backbone_cfg["stem"]))
    if name.startswith("spa_"):
        backbone = timm.create_model(name, pretrained=False, start_layer=start, spa=spa, **kwargs)
    else:
        backbone = patch(timm.create_model(name, pretrained=False, **kwargs), start, **spa)
    if not is_spa_model(backbone):
        raise ValueError(f"{name} did not give an SPA ViT")
    return backbone


@register_architecture("spa_vit_detector")
def build_spa_vit_detector(config: dict[str, Any]) -> Detector:
    """SPA-ViT detector from its config (no hub weights are fetched)."""
    return Detector(spa_vit_backbone(config["backbone"]), spec=config, **_head_kwargs(config))


@register_architecture("spt_detector")
def build_spt_detector(config: dict[str, Any]) -> Detector:
    """SPT detector (light FPN on the stride-8/16/32 maps) from its config."""
    backbone_cfg = config["backbone"]
    backbone = timm.create_model(backbone_cfg["timm_name"], pretrained=False, **backbone_cfg.get("timm_kwargs", {}))
    if not hasattr(backbone, "forward_pyramid"):
        raise ValueError(f"{backbone_cfg['timm_name']} has no forward_pyramid; spt_detector needs an SPT backbone")
    return Detector(backbone, spec=config, **_head_kwargs(config))
