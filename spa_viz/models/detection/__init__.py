"""Detection on SPA backbones: CenterNet-style heads (:mod:`.heads`) and the detector that wraps an
SPA-ViT or SPT backbone (:mod:`.detector`); torchvision's Mask R-CNN on SPT + FPN or SPA-ViT + a simple
feature pyramid (:mod:`.mask_rcnn`, :mod:`.pyramid`). Importing registers their checkpoint architectures."""

from spa_viz.models.detection.detector import (
    ConvStemEmbed,
    Detector,
    build_spa_vit_detector,
    build_spt_detector,
    keep_ratios,
)
from spa_viz.models.detection.mask_rcnn import (
    MASK_RCNN_ARCHITECTURES,
    SPAMaskRCNN,
    build_spa_vit_mask_rcnn,
    build_spt_mask_rcnn,
    spa_vit_mask_rcnn,
    spt_mask_rcnn,
    swin_mask_rcnn,
)

__all__ = [
    "MASK_RCNN_ARCHITECTURES",
    "ConvStemEmbed",
    "Detector",
    "SPAMaskRCNN",
    "build_spa_vit_detector",
    "build_spa_vit_mask_rcnn",
    "build_spt_detector",
    "build_spt_mask_rcnn",
    "keep_ratios",
    "spa_vit_mask_rcnn",
    "spt_mask_rcnn",
    "swin_mask_rcnn",
]
