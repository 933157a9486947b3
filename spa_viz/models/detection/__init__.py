"""Detection on SPA backbones: CenterNet-style heads (:mod:`.heads`) and the detector that wraps an
SPA-ViT or SPT backbone, with its checkpoint architectures (:mod:`.detector`)."""

from spa_viz.models.detection.detector import (
    ConvStemEmbed,
    Detector,
    build_spa_vit_detector,
    build_spt_detector,
    keep_ratios,
)

__all__ = ["ConvStemEmbed", "Detector", "build_spa_vit_detector", "build_spt_detector", "keep_ratios"]
