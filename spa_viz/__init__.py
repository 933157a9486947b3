"""spa_viz: Select and Pack Attention (SPA) for vision transformers, and tools to look inside it.

Quick start::

    import timm, spa_viz
    model = spa_viz.patch(timm.create_model("vit_small_patch16_224"), start_layer=3)
    out, tr = spa_viz.trace(model.eval(), images)
"""

from spa_viz.analysis.trace import LayerTrace, Trace, trace
from spa_viz.layers.config import SPAConfig
from spa_viz.layers.packing import PackPlan, pack, plan_packing, unpack
from spa_viz.models import detection as _detection  # noqa: F401  (registers the detector architectures)
from spa_viz.models import saliency as _saliency  # noqa: F401  (registers the img_focus_spa architecture)
from spa_viz.models import spt as _spt  # noqa: F401  (registers the spt_* timm models)
from spa_viz.models.spa_vit import configure, is_spa_model, patch, spa_blocks, spa_context
from spa_viz.models.twin import dense_twin
from spa_viz.models.zoo import available, load
from spa_viz.selection.loss import model_selection_loss, selection_loss

__all__ = [
    "LayerTrace",
    "PackPlan",
    "SPAConfig",
    "available",
    "Trace",
    "configure",
    "dense_twin",
    "is_spa_model",
    "load",
    "model_selection_loss",
    "pack",
    "patch",
    "plan_packing",
    "selection_loss",
    "spa_blocks",
    "spa_context",
    "trace",
    "unpack",
]

__version__ = "0.1.0"
