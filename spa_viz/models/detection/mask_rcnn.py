"""Mask R-CNN on SPA backbones: torchvision's detector with SPT + FPN or SPA-ViT + a simple pyramid.

The paper's detection setting (Zhang et al., arXiv 2410.23608) is a Swin-style SPT backbone in a
Cascade Mask R-CNN. torchvision has no Cascade R-CNN, so this is the closest detector it ships:
``torchvision.models.detection.MaskRCNN`` (one box head instead of three cascaded stages at rising
IoU thresholds; the cascade is worth about +3-4 box AP for Swin-T on COCO in the Swin paper, so
absolute numbers here sit below the paper's while the SPA-vs-dense comparison is like for like).

:class:`SPAMaskRCNN` runs torchvision's own pipeline (``GeneralizedRCNNTransform`` resizes and pads
the batch; RPN; RoI heads; post-processing back to input pixels) and adds, in training, the SPA
selection loss to torchvision's loss dict as ``loss_select = select_alpha * L_select``: every learned
gate's logits against selection labels made from the targets' masks (boxes when an image has none)
**after** the transform, on the padded batch, at each SPA stage's real token grid and stride. So
``sum(loss_dict.values())`` is the paper's ``L_task + alpha * L_select``.

Inputs follow spa-viz's convention: ImageNet-normalized float images (the transform's own
normalization is the identity); any size, since the transform resizes to ``min_size`` / ``max_size``.

Checkpoint architectures (``config.json``):

* ``spt_mask_rcnn``: ``backbone = {"timm_name": "spt_tiny", "timm_kwargs": {..., "spa": {...}}}``
* ``spa_vit_mask_rcnn``: ``backbone = {"timm_name", "timm_kwargs", "spa": {"start_layer", ...}}``

Both take ``head`` (:class:`MaskRCNNHeadConfig`) and ``transform`` (:class:`RCNNTransformConfig``).
The dense twin is the same network with ``spa.enabled = false``: for SPT that is Swin exactly (SPT's
dense blocks are timm's Swin computation), which is what :func:`swin_mask_rcnn` builds.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import MultiScaleRoIAlign

import spa_viz.models.spt  # noqa: F401  (registers the spt_* timm models)
from spa_viz.io.checkpoint import register_architecture
from spa_viz.io.config import from_dict, to_dict
from spa_viz.layers.block import find_context
from spa_viz.models.detection.detector import spa_vit_backbone
from spa_viz.models.detection.pyramid import SimpleFeaturePyramid, SPTFeaturePyramid
from spa_viz.selection.labels import TokenGrid, multiscale_labels
from spa_viz.selection.loss import DEFAULT_ALPHA, model_selection_loss

__all__ = [
    "MASK_RCNN_ARCHITECTURES",
    "MaskRCNNHeadConfig",
    "RCNNTransformConfig",
    "SIZES",
    "SPAMaskRCNN",
    "build_spa_vit_mask_rcnn",
    "build_spt_mask_rcnn",
    "spa_vit_mask_rcnn",
    "spt_mask_rcnn",
    "swin_mask_rcnn",
]

log = logging.getLogger(__name__)

Grid = tuple[int, int]
#: The checkpoint architectures of this module.
MASK_RCNN_ARCHITECTURES = ("spt_mask_rcnn", "spa_vit_mask_rcnn")
#: Backbone sizes of the builders: SPT-T/S/B (Swin-T/S/B widths), ViT-Ti/S/B, and the CPU-sized digits models.
SIZES = ("tiny", "small", "base", "digits")
_SPA_VIT_NAMES = {
    "tiny": "spa_vit_tiny_patch16_224",
    "small": "spa_vit_small_patch16_224",
    "base": "spa_vit_base_patch16_224",
    "digits": "spa_vit_digits",
}


@dataclass(frozen=True)
class MaskRCNNHeadConfig:
    """Pyramid width, RPN and RoI heads (``head`` in config.json); defaults are torchvision's COCO ones.

    ``num_classes`` counts object classes (torchvision's background class is added inside).
    ``anchor_sizes``: one anchor side per pyramid level (P2..P6), in input pixels. The box head is
    torchvision's two-layer MLP of width ``box_representation``; the mask head is ``mask_layers``
    3x3 convolutions on ``mask_roi_size`` RoIs, then a 2x transposed convolution
    (``mask_predictor_channels``) and per-class mask logits.
    """

    num_classes: int
    fpn_channels: int = 256
    anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512)
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    rpn_convs: int = 1
    rpn_pre_nms_top_n_train: int = 2000
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_test: int = 1000
    rpn_batch_size_per_image: int = 256
    box_roi_size: int = 7
    box_representation: int = 1024
    box_batch_size_per_image: int = 512
    box_score_thresh: float = 0.05
    box_detections_per_img: int = 100
    mask_roi_size: int = 14
    mask_layers: tuple[int, ...] = (256, 256, 256, 256)
    mask_predictor_channels: int = 256

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise ValueError(
                f"num_classes must be >= 1 (object classes, background not counted), got {self.num_classes}"
            )
        if len(self.anchor_sizes) != 5:
            raise ValueError(f"anchor_sizes needs one size per pyramid level P2..P6 (5), got {list(self.anchor_sizes)}")
        if not self.mask_layers:
            raise ValueError("mask_layers needs at least one convolution width")


@dataclass(frozen=True)
class RCNNTransformConfig:
    """torchvision's ``GeneralizedRCNNTransform`` (``transform`` in config.json).

    Training resizes the shorter side to a random one of ``min_size`` (multi-scale), evaluation to the
    last; the longer side stays <= ``max_size``; the batch is zero-padded bottom/right to a multiple of
    ``size_divisible``.
    """

    min_size: tuple[int, ...] = (800,)
    max_size: int = 1333
    size_divisible: int = 32

    def __post_init__(self) -> None:
        if not self.min_size or min(self.min_size) < 1 or self.max_size < max(self.min_size):
            raise ValueError(f"need min_size sides >= 1 and max_size >= them, got {self.min_size}, {self.max_size}")
        if self.size_divisible < 32 or self.size_divisible % 32:
            raise ValueError(
                f"size_divisible must be a multiple of 32 (the pyramid's coarsest stride), got {self.size_divisible}"
            )


#: Heads and input size of the CPU-sized ``digits`` models (128 px images, digits of 16-40 px).
DIGITS_HEAD = dict(
    fpn_channels=64,
    anchor_sizes=(8, 16, 32, 64, 128),
    rpn_pre_nms_top_n_train=600,
    rpn_pre_nms_top_n_test=300,
    rpn_post_nms_top_n_train=300,
    rpn_post_nms_top_n_test=100,
    rpn_batch_size_per_image=128,
    box_representation=128,
    box_batch_size_per_image=64,
    box_detections_per_img=20,
    mask_layers=(32, 32),
    mask_predictor_channels=32,
)
DIGITS_TRANSFORM = dict(min_size=(128,), max_size=128)


def head_config(config: Mapping[str, Any]) -> MaskRCNNHeadConfig:
    """The strict ``head`` section (a ValueError names unknown keys or a missing ``num_classes``)."""
    return from_dict(MaskRCNNHeadConfig, config.get("head", {}), where="head")


def transform_config(config: Mapping[str, Any]) -> RCNNTransformConfig:
    """The strict ``transform`` section (defaults: torchvision's 800 / 1333)."""
    return from_dict(RCNNTransformConfig, config.get("transform", {}), where="transform")


class SPAMaskRCNN(MaskRCNN):
    """torchvision's Mask R-CNN whose backbone is an SPA pyramid; adds ``loss_select`` in training.

    ``backbone`` is a :class:`SPTFeaturePyramid` or :class:`SimpleFeaturePyramid`; ``num_classes``
    counts object classes. ``select_alpha`` weighs ``L_select`` in the loss dict (the paper: 0.01).
    Forward: ``model(images, targets)`` in training returns torchvision's losses plus ``loss_select``
    (when SPA is on); in evaluation ``model(images)`` returns per image ``boxes`` (xyxy input pixels),
    ``labels`` (0-based object classes), ``scores`` and ``masks`` (N, 1, H, W) probabilities.
    ``images`` is a list of (3, H, W) tensors or one (B, 3, H, W) batch.
    """

    def __init__(
        self,
        backbone: SPTFeaturePyramid | SimpleFeaturePyramid,
        head: MaskRCNNHeadConfig,
        transform: RCNNTransformConfig | None = None,
        *,
        select_alpha: float = DEFAULT_ALPHA,
        spec: dict[str, Any] | None = None,
    ) -> None:
        transform = transform or RCNNTransformConfig()
        channels = backbone.out_channels
        anchors = AnchorGenerator(tuple((s,) for s in head.anchor_sizes), (tuple(head.aspect_ratios),) * 5)
        levels = ["0", "1", "2", "3"]
        box_pool = MultiScaleRoIAlign(levels, head.box_roi_size, sampling_ratio=2)
        mask_pool = MultiScaleRoIAlign(levels, head.mask_roi_size, sampling_ratio=2)
        super().__init__(
            backbone,
            num_classes=None,
            min_size=tuple(transform.min_size),
            max_size=transform.max_size,
            image_mean=[0.0, 0.0, 0.0],
            image_std=[1.0, 1.0, 1.0],
            size_divisible=transform.size_divisible,
            rpn_anchor_generator=anchors,
            rpn_head=RPNHead(channels, anchors.num_anchors_per_location()[0], conv_depth=head.rpn_convs),
            rpn_pre_nms_top_n_train=head.rpn_pre_nms_top_n_train,
            rpn_pre_nms_top_n_test=head.rpn_pre_nms_top_n_test,
            rpn_post_nms_top_n_train=head.rpn_post_nms_top_n_train,
            rpn_post_nms_top_n_test=head.rpn_post_nms_top_n_test,
            rpn_batch_size_per_image=head.rpn_batch_size_per_image,
            box_roi_pool=box_pool,
            box_head=TwoMLPHead(channels * head.box_roi_size**2, head.box_representation),
            box_predictor=FastRCNNPredictor(head.box_representation, head.num_classes + 1),
            box_score_thresh=head.box_score_thresh,
            box_detections_per_img=head.box_detections_per_img,
            box_batch_size_per_image=head.box_batch_size_per_image,
            mask_roi_pool=mask_pool,
            mask_head=MaskRCNNHeads(channels, tuple(head.mask_layers), 1),
            mask_predictor=MaskRCNNPredictor(head.mask_layers[-1], head.mask_predictor_channels, head.num_classes + 1),
        )
        self.head_config = head
        self.transform_config = transform
        self.select_alpha = float(select_alpha)
        self.spec = copy.deepcopy(spec) if spec is not None else None

    @property
    def num_classes(self) -> int:
        """Object classes (torchvision's background class not counted)."""
        return self.head_config.num_classes

    def spa_enabled(self) -> bool:
        return find_context(self.backbone).config.enabled

    # ------------------------------------------------------------------------------ selection labels
    def selection_grids(self, padded_size: tuple[int, int]) -> list[TokenGrid]:
        """Token grids (shape, pixel stride) of the SPA blocks for a padded batch of ``padded_size``."""
        return self.backbone.token_grids(padded_size)

    def selection_labels(
        self, targets: Sequence[Mapping[str, Tensor]], padded_size: tuple[int, int]
    ) -> dict[Grid, Tensor]:
        """Selection labels per SPA grid of targets already in the transformed frame (after
        ``self.transform``): masks (zero-padded to the batch) where an image has them, else boxes."""
        padded = []
        for target in targets:
            entry: dict[str, Tensor] = {"boxes": target["boxes"]}
            masks = target.get("masks")
            if masks is not None:
                height, width = masks.shape[-2:]
                entry["masks"] = F.pad(masks, (0, padded_size[1] - width, 0, padded_size[0] - height))
            padded.append(entry)
        grids = self.selection_grids(padded_size)
        return {grid.shape: labels for grid, labels in zip(grids, multiscale_labels(padded, padded_size, grids))}

    # ---------------------------------------------------------------------------------- forward
    @contextmanager
    def _mask_branch(self, targets: Sequence[Mapping[str, Tensor]] | None) -> Iterator[None]:
        """Train the box branch only for a batch whose targets lack masks (box-only annotations)."""
        if not self.training or targets is None or all("masks" in t for t in targets):
            yield
            return
        pool = self.roi_heads.mask_roi_pool
        self.roi_heads.mask_roi_pool = None  # torchvision's RoIHeads.has_mask() reads this
        try:
            yield
        finally:
            self.roi_heads.mask_roi_pool = pool

    def prepare(
        self, images: Sequence[Tensor] | Tensor, targets: Sequence[Mapping[str, Any]] | None = None
    ) -> tuple[ImageList, list[dict[str, Tensor]] | None, list[Grid]]:
        """torchvision's transform: (padded batch with per-image sizes, targets in its frame, input sizes)."""
        original_sizes = [(int(image.shape[-2]), int(image.shape[-1])) for image in images]
        moved = None if targets is None else [_torchvision_target(t) for t in targets]
        image_list, moved = self.transform(list(images), moved)
        if moved is not None:
            _check_boxes(moved)
        return image_list, moved, original_sizes

    def detect(
        self,
        image_list: ImageList,
        features: Mapping[str, Tensor],
        targets: list[dict[str, Tensor]] | None,
        original_sizes: list[Grid],
    ) -> tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
        """RPN and RoI heads on the pyramid: (losses in training, detections in input pixels otherwise)."""
        proposals, rpn_losses = self.rpn(image_list, features, targets)
        with self._mask_branch(targets):
            detections, roi_losses = self.roi_heads(features, proposals, image_list.image_sizes, targets)
        if self.training:
            return {**rpn_losses, **roi_losses}, []
        detections = self.transform.postprocess(detections, image_list.image_sizes, original_sizes)
        for detection in detections:
            detection["labels"] = detection["labels"] - 1  # torchvision's class 0 is the background
        return {}, detections

    def forward(
        self, images: Sequence[Tensor] | Tensor, targets: Sequence[Mapping[str, Any]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        if self.training and targets is None:
            raise ValueError("SPAMaskRCNN in training mode needs targets (boxes, labels, masks)")
        image_list, targets, original_sizes = self.prepare(images, targets)
        features = self.backbone(image_list.tensors)
        losses, detections = self.detect(image_list, features, targets, original_sizes)
        if not self.training:
            return detections
        if self.spa_enabled():
            labels = self.selection_labels(targets, tuple(image_list.tensors.shape[-2:]))
            losses["loss_select"] = model_selection_loss(self.backbone, labels, self.select_alpha)
        return losses

    def architecture_config(self) -> dict[str, Any]:
        """The build config with the backbone's current SPA settings (for ``save_checkpoint``)."""
        if self.spec is None:
            raise ValueError("this SPAMaskRCNN was built by hand; build it from a config to save it")
        spec = copy.deepcopy(self.spec)
        settings = find_context(self.backbone).config.to_dict()
        if spec["architecture"] == "spt_mask_rcnn":
            settings.pop("start_layer")
            spec["backbone"].setdefault("timm_kwargs", {})["spa"] = settings
        else:
            spec["backbone"]["spa"] = settings
        return spec


def _torchvision_target(target: Mapping[str, Any]) -> dict[str, Tensor]:
    """A spa-viz target (0-based labels) as torchvision wants it (class 0 = background, so labels + 1)."""
    if "boxes" not in target or "labels" not in target:
        raise ValueError("each target needs 'boxes' (xyxy) and 'labels' (0-based classes); 'masks' is optional")
    out = {"boxes": target["boxes"].float(), "labels": target["labels"].long() + 1}
    if target.get("masks") is not None:
        out["masks"] = target["masks"].to(torch.uint8)
    return out


def _check_boxes(targets: Sequence[Mapping[str, Tensor]]) -> None:
    """ValueError for a box without positive width and height (torchvision would assert)."""
    for index, target in enumerate(targets):
        boxes = target["boxes"]
        bad = (boxes[:, 2:] <= boxes[:, :2]).any(1)
        if bad.any():
            raise ValueError(f"target {index} has a box without positive width and height: {boxes[bad][0].tolist()}")


# ------------------------------------------------------------------------------------------ builders
@register_architecture("spt_mask_rcnn")
def build_spt_mask_rcnn(config: dict[str, Any]) -> SPAMaskRCNN:
    """SPT + FPN Mask R-CNN from its config (no hub weights are fetched)."""
    backbone_cfg = config["backbone"]
    body = timm.create_model(backbone_cfg["timm_name"], pretrained=False, **backbone_cfg.get("timm_kwargs", {}))
    head = head_config(config)
    return SPAMaskRCNN(SPTFeaturePyramid(body, head.fpn_channels), head, transform_config(config), spec=config)


@register_architecture("spa_vit_mask_rcnn")
def build_spa_vit_mask_rcnn(config: dict[str, Any]) -> SPAMaskRCNN:
    """SPA-ViT + simple feature pyramid Mask R-CNN from its config."""
    head = head_config(config)
    body = spa_vit_backbone(config["backbone"])
    return SPAMaskRCNN(SimpleFeaturePyramid(body, head.fpn_channels), head, transform_config(config), spec=config)


def _check_size(size: str) -> None:
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {list(SIZES)}")


def _sections(
    size: str, num_classes: int, head: Mapping[str, Any] | None, transform: Mapping[str, Any] | None
) -> dict[str, Any]:
    """``head`` and ``transform`` of a builder: the size's defaults (digits: small heads) with overrides."""
    base_head = DIGITS_HEAD if size == "digits" else {}
    base_transform = DIGITS_TRANSFORM if size == "digits" else {}
    return {
        "head": to_dict(
            from_dict(MaskRCNNHeadConfig, {**base_head, **(head or {}), "num_classes": num_classes}, where="head")
        ),
        "transform": to_dict(
            from_dict(RCNNTransformConfig, {**base_transform, **(transform or {})}, where="transform")
        ),
    }


def spt_mask_rcnn(
    size: str = "tiny",
    num_classes: int = 80,
    *,
    plus4: bool = False,
    spa_start_stage: int = 3,
    spa: Mapping[str, Any] | None = None,
    backbone_kwargs: Mapping[str, Any] | None = None,
    head: Mapping[str, Any] | None = None,
    transform: Mapping[str, Any] | None = None,
) -> SPAMaskRCNN:
    """An SPT Mask R-CNN (``size`` tiny/small/base: SPT-T/S/B; ``digits``: the CPU-sized model and heads).

    ``plus4`` deepens stage 3 by the paper's 4 blocks; ``spa`` holds SPA settings (default: the
    paper's containers of L = M^2); ``backbone_kwargs`` other SPTConfig fields; ``head`` /
    ``transform`` override :class:`MaskRCNNHeadConfig` / :class:`RCNNTransformConfig` fields.
    """
    _check_size(size)
    settings = {"policy": "container", **(spa or {})}
    kwargs = {**(backbone_kwargs or {}), "plus4": plus4, "spa_start_stage": spa_start_stage, "spa": settings}
    config = {
        "architecture": "spt_mask_rcnn",
        "backbone": {"timm_name": f"spt_{size}", "timm_kwargs": kwargs},
        **_sections(size, num_classes, head, transform),
    }
    return build_spt_mask_rcnn(config)


def swin_mask_rcnn(size: str = "tiny", num_classes: int = 80, **settings: Any) -> SPAMaskRCNN:
    """The dense Swin twin of :func:`spt_mask_rcnn`: the same network and heads with SPA disabled, so every
    SPT block computes Swin's (shifted) window attention on all tokens (= timm's Swin with these weights)."""
    spa = {**(settings.pop("spa", None) or {}), "enabled": False}
    return spt_mask_rcnn(size, num_classes, spa=spa, **settings)


def spa_vit_mask_rcnn(
    size: str = "small",
    num_classes: int = 80,
    *,
    start_layer: int | None = None,
    spa: Mapping[str, Any] | None = None,
    backbone_kwargs: Mapping[str, Any] | None = None,
    head: Mapping[str, Any] | None = None,
    transform: Mapping[str, Any] | None = None,
) -> SPAMaskRCNN:
    """An SPA-ViT Mask R-CNN through ViTDet's simple feature pyramid (``size`` tiny/small/base: ViT-Ti/S/B
    patch 16; ``digits``: ``spa_vit_digits``, patch 8). The ViT takes any padded size
    (``dynamic_img_size``); ``start_layer`` defaults to the preset's."""
    _check_size(size)
    kwargs = {"dynamic_img_size": True, **(backbone_kwargs or {})}
    settings = dict(spa or {})
    if start_layer is not None:
        settings["start_layer"] = start_layer
    settings.setdefault("start_layer", 2 if size == "digits" else 3)
    config = {
        "architecture": "spa_vit_mask_rcnn",
        "backbone": {"timm_name": _SPA_VIT_NAMES[size], "timm_kwargs": kwargs, "spa": settings},
        **_sections(size, num_classes, head, transform),
    }
    return build_spa_vit_mask_rcnn(config)
