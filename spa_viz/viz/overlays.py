"""Pictures of what SPA decided, drawn on the image: numpy/opencv/pillow, no plotting library.

Everything here takes plain arrays (or per-layer records of a :class:`~spa_viz.analysis.trace.Trace`)
and returns an ``(H, W, 3)`` uint8 RGB array, so the app, notebooks and ``spa-viz analyze`` draw
the same pictures. Colours: :mod:`spa_viz.viz.style`; continuous values use perceptually uniform
colour maps (viridis).

Token maps are ``(gh, gw)`` arrays in raster order; pixel row ``i`` of an ``H``-row image belongs to
token row ``floor(i * gh / H)`` (the convention of :mod:`spa_viz.selection.labels`).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from functools import lru_cache

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from spa_viz.analysis.trace import LayerTrace
from spa_viz.models.saliency.labels import SALIENT
from spa_viz.viz.style import (
    DROP_DIM,
    DROP_TINT,
    DROPPED_COLOR,
    FN_COLOR,
    FP_COLOR,
    KEPT_COLOR,
    OKABE_ITO,
    TP_COLOR,
    Color,
    image_color,
)

__all__ = [
    "add_title",
    "age_overlay",
    "as_numpy",
    "attribution_overlay",
    "colorbar",
    "colorize",
    "draw_boxes",
    "draw_detections",
    "draw_masks",
    "hstack",
    "keep_overlay",
    "layer_strip",
    "legend",
    "saliency_overlay",
    "score_overlay",
    "selection_overlay",
    "upsample_tokens",
    "vstack",
]

AGE_CMAP = "magma_r"
"""Token ages: light = one layer behind, dark = the oldest (the colour bar of the age panel uses it too)."""
_CMAPS = {"viridis": cv2.COLORMAP_VIRIDIS, "cividis": cv2.COLORMAP_CIVIDIS, "magma": cv2.COLORMAP_MAGMA}


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {image.dtype} {image.shape}")
    return image


def as_numpy(values: Tensor | np.ndarray) -> np.ndarray:
    """A tensor (any device, detached) or array-like as a numpy array."""
    if isinstance(values, Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)


def upsample_tokens(values: Tensor | np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Spread a ``(gh, gw)`` token map over an ``(H, W)`` image, one constant cell per token."""
    grid = as_numpy(values)
    if grid.ndim != 2:
        raise ValueError(f"token map must be (gh, gw), got shape {grid.shape}")
    height, width = size
    rows = np.arange(height) * grid.shape[0] // height
    cols = np.arange(width) * grid.shape[1] // width
    return grid[rows[:, None], cols[None, :]]


def colorize(values: np.ndarray, vmin: float = 0.0, vmax: float = 1.0, cmap: str = "viridis") -> np.ndarray:
    """Map a 2-D float array onto an RGB colour map (values clipped to ``[vmin, vmax]``); a ``_r`` suffix
    reverses the map."""
    span = max(vmax - vmin, 1e-12)
    scaled = np.clip((np.nan_to_num(np.asarray(values, dtype=np.float64)) - vmin) / span, 0.0, 1.0)
    if cmap.endswith("_r"):
        cmap, scaled = cmap[:-2], 1.0 - scaled
    bgr = cv2.applyColorMap(np.round(scaled * 255).astype(np.uint8), _CMAPS[cmap])
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _blend(base: np.ndarray, color: np.ndarray | Color, alpha: float | np.ndarray) -> np.ndarray:
    base = base.astype(np.float32)
    color = np.asarray(color, dtype=np.float32)
    return np.clip(base * (1.0 - alpha) + color * alpha, 0, 255).round().astype(np.uint8)


def _outline(image: np.ndarray, mask: np.ndarray, color: Color, thickness: int) -> np.ndarray:
    """Draw the boundary of a binary pixel mask."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
    out = np.ascontiguousarray(image)
    cv2.drawContours(out, contours, -1, color, thickness, lineType=cv2.LINE_8)
    return out


def _line_width(image: np.ndarray) -> int:
    return max(1, round(max(image.shape[:2]) / 220))


def score_overlay(
    image: np.ndarray,
    scores: Tensor | np.ndarray,
    *,
    vmin: float = 0.0,
    vmax: float = 1.0,
    threshold: float | None = None,
    alpha: float = 0.6,
    cmap: str = "viridis",
) -> np.ndarray:
    """Gate-score heat-map over the image; tokens above ``threshold`` are outlined in white."""
    image = _check_image(image)
    values = upsample_tokens(scores, image.shape[:2])
    out = _blend(image, colorize(values, vmin, vmax, cmap), alpha)
    if threshold is not None:
        out = _outline(out, values > threshold, (255, 255, 255), _line_width(image))
    return out


def age_overlay(image: np.ndarray, ages: Tensor | np.ndarray, max_age: int, alpha: float = 0.7) -> np.ndarray:
    """Token ages over the image: current tokens (age 0) as they are, older ones tinted on the reversed
    magma map (light for 1 layer behind, dark for ``max_age``) and dimmed."""
    image = _check_image(image)
    values = upsample_tokens(as_numpy(ages).astype(np.float32), image.shape[:2])
    stale = values > 0
    tint = colorize(values, 0.0, max(max_age, 1), AGE_CMAP)
    return np.where(stale[..., None], _blend(image, tint, alpha), image)


def keep_overlay(image: np.ndarray, keep: Tensor | np.ndarray) -> np.ndarray:
    """Kept tokens as they are (outlined), dropped tokens dimmed and tinted orange."""
    image = _check_image(image)
    kept = upsample_tokens(as_numpy(keep).astype(bool), image.shape[:2])
    dropped = _blend((image.astype(np.float32) * DROP_DIM).astype(np.uint8), DROPPED_COLOR, DROP_TINT)
    out = np.where(kept[..., None], image, dropped)
    return _outline(out, kept, KEPT_COLOR, _line_width(image))


def selection_overlay(image: np.ndarray, keep: Tensor | np.ndarray, labels: Tensor | np.ndarray) -> np.ndarray:
    """Kept tokens vs selection labels: true positives blue, false positives orange, misses purple."""
    image = _check_image(image)
    size = image.shape[:2]
    kept = upsample_tokens(as_numpy(keep).astype(bool), size)
    pos = upsample_tokens(as_numpy(labels).astype(bool), size)
    out = (image.astype(np.float32) * DROP_DIM).astype(np.uint8)
    for mask, color in ((kept & pos, TP_COLOR), (kept & ~pos, FP_COLOR), (~kept & pos, FN_COLOR)):
        out = np.where(mask[..., None], _blend(image, color, 0.55), out)
    return _outline(out, pos, (255, 255, 255), _line_width(image))


def saliency_overlay(image: np.ndarray, saliency: Tensor | np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """A [0, 1] saliency map (any size; resized to the image) over the image, salient region outlined in white."""
    image = _check_image(image)
    sal = as_numpy(saliency).astype(np.float32).squeeze()
    if sal.ndim != 2:
        raise ValueError(f"saliency must be a 2-D map, got shape {sal.shape}")
    sal = cv2.resize(sal, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_LINEAR)
    out = _blend(image, colorize(sal, 0.0, 1.0, "viridis"), alpha * np.clip(sal, 0.25, 1.0)[..., None])
    return _outline(out, sal > SALIENT, (255, 255, 255), _line_width(image))


def _diverging(values: np.ndarray, limit: float) -> np.ndarray:
    """Blue (negative) - white - orange (positive), colour-blind-safe."""
    t = np.clip(values / max(limit, 1e-12), -1.0, 1.0)[..., None]
    white = np.array([255.0, 255.0, 255.0])
    neg, pos = np.array(OKABE_ITO["blue"], np.float64), np.array(OKABE_ITO["vermillion"], np.float64)
    return np.where(t < 0, white + (neg - white) * -t, white + (pos - white) * t).astype(np.uint8)


def attribution_overlay(image: np.ndarray, values: Tensor | np.ndarray, alpha: float = 0.65) -> np.ndarray:
    """A signed per-token attribution map over the image (vermillion raises the output, blue lowers it).

    Colours saturate at the 98th percentile of the absolute values.
    """
    image = _check_image(image)
    grid = as_numpy(values).astype(np.float64)
    # a robust scale: one extreme token (e.g. a rollout sink) must not wash out every other token
    limit = float(np.quantile(np.abs(grid), 0.98)) if grid.size else 0.0
    colors = _diverging(upsample_tokens(grid, image.shape[:2]), limit)
    gray = cv2.cvtColor(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
    return _blend(gray, colors, alpha)


def draw_detections(
    image: np.ndarray,
    boxes: Tensor | np.ndarray,
    labels: Sequence[int] | Tensor | np.ndarray,
    scores: Sequence[float] | Tensor | np.ndarray | None = None,
    class_names: Sequence[str] | None = None,
    scale: float = 1.0,
) -> np.ndarray:
    """Boxes (xyxy, in the image's pixels before ``scale``) with class name and score tags.

    Drawn from the least to the most confident, so the most confident box and tag end on top; a tag
    that would cover an earlier tag moves down (inside its box) until it is clear.
    """
    image = _check_image(image)
    boxes = as_numpy(boxes).reshape(-1, 4).astype(np.float64) * scale
    labels = as_numpy(labels).astype(int).ravel()
    scores = None if scores is None else as_numpy(scores).astype(float).ravel()
    pil = Image.fromarray(image.copy())
    draw = ImageDraw.Draw(pil)
    font = _font(max(12, round(max(image.shape[:2]) / 28)))
    width = _line_width(image) + 1
    order = range(len(boxes)) if scores is None else np.argsort(scores, kind="stable")
    for i in order:
        box, label = boxes[i], int(labels[i])
        draw.rectangle([float(v) for v in box], outline=image_color(label), width=width)
    placed: list[tuple[float, float, float, float]] = []
    tags = []
    for i in reversed(list(order)):  # tags of the most confident first: they keep their place
        label = int(labels[i])
        name = class_names[label] if class_names is not None and 0 <= label < len(class_names) else str(label)
        tag = name if scores is None else f"{name} {scores[i]:.2f}"
        x0, y0 = float(boxes[i][0]), float(boxes[i][1])
        left, top, right, bottom = draw.textbbox((x0, 0), tag, font=font)
        height = bottom - top + 4
        y = y0 - height if y0 - height >= 0 else y0  # above the box, or inside it at the image's top
        while any(_overlaps((left - 2, y, right + 2, y + height), other) for other in placed):
            y += height
        placed.append((left - 2, y, right + 2, y + height))
        tags.append((label, tag, x0, y + 2 - top))
    for (label, tag, x, y), rect in zip(tags, placed):
        color = image_color(label)
        draw.rectangle(rect, fill=color)
        draw.text((x, y), tag, fill=(0, 0, 0) if sum(color) > 380 else (255, 255, 255), font=font)
    return np.asarray(pil)


def draw_boxes(
    image: np.ndarray, boxes: Tensor | np.ndarray, color: Color = (255, 255, 255), scale: float = 1.0
) -> np.ndarray:
    """Plain box outlines (xyxy, in the image's pixels before ``scale``), e.g. the ground truth, with a
    dark rim so white stays visible on light images."""
    image = _check_image(image)
    boxes = as_numpy(boxes).reshape(-1, 4).astype(np.float64) * scale
    pil = Image.fromarray(image.copy())
    draw = ImageDraw.Draw(pil)
    width = _line_width(image)
    for box in boxes:
        draw.rectangle([float(v) for v in box], outline=(0, 0, 0), width=width + 2)
        draw.rectangle([float(v) for v in box], outline=color, width=width)
    return np.asarray(pil)


def _overlaps(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def draw_masks(
    image: np.ndarray,
    masks: Tensor | np.ndarray,
    labels: Sequence[int] | Tensor | np.ndarray,
    alpha: float = 0.45,
) -> np.ndarray:
    """Instance masks (N, h, w) of any resolution, tinted and outlined in their class colour.

    Masks are bool or probabilities (> 0.5 is inside) and are stretched to the image's size, so
    masks predicted in the model's input frame can be drawn on a larger display picture.
    """
    out = _check_image(image).copy()
    masks = as_numpy(masks)
    if masks.ndim != 3:
        raise ValueError(f"masks must be (N, h, w), got shape {masks.shape}")
    labels = as_numpy(labels).astype(int).ravel()
    height, width = out.shape[:2]
    for mask, label in zip(masks, labels):
        binary = cv2.resize((mask > 0.5).astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST) > 0
        color = image_color(int(label))
        out[binary] = _blend(out[binary], color, alpha)
        out = _outline(out, binary, color, _line_width(out))
    return out


@lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def add_title(panel: np.ndarray, title: str, subtitle: str | None = None, size: int | None = None) -> np.ndarray:
    """A dark header bar with a title (and a smaller subtitle) above ``panel``."""
    panel = _check_image(panel)
    width = panel.shape[1]
    size = size or max(12, min(24, width // 16))
    lines = [(title, _font(size))] + ([(subtitle, _font(max(10, size * 3 // 4)))] if subtitle else [])
    height = sum(round(f.size * 1.35) for _, f in lines) + 8
    bar = Image.new("RGB", (width, height), (30, 30, 30))
    draw = ImageDraw.Draw(bar)
    y = 4
    for text, font in lines:
        draw.text((6, y), _fit(draw, text, font, width - 12), fill=(255, 255, 255), font=font)
        y += round(font.size * 1.35)
    return np.concatenate([np.asarray(bar), panel], axis=0)


def _fit(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, width: int) -> str:
    """``text`` shortened with an ellipsis to fit ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def legend(width: int, entries: Sequence[tuple[Color, str]], size: int | None = None) -> np.ndarray:
    """A strip of colour swatches with labels, wrapped to ``width``."""
    size = size or max(11, min(18, width // 24))
    font = _font(size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    items = [(c, t, size + 10 + probe.textlength(t, font=font) + 14) for c, t in entries]
    rows: list[list[tuple[Color, str, float]]] = [[]]
    used = 0.0
    for item in items:
        if rows[-1] and used + item[2] > width - 8:
            rows.append([])
            used = 0.0
        rows[-1].append(item)
        used += item[2]
    line = size + 10
    strip = Image.new("RGB", (width, line * len(rows) + 6), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    for r, row in enumerate(rows):
        x, y = 6.0, 4 + r * line
        for color, text, span in row:
            draw.rectangle([x, y + 2, x + size, y + size + 2], fill=color, outline=(0, 0, 0))
            draw.text((x + size + 6, y), text, fill=(0, 0, 0), font=font)
            x += span
    return np.asarray(strip)


def colorbar(
    width: int,
    vmin: float,
    vmax: float,
    label: str,
    *,
    marker: float | None = None,
    cmap: str = "viridis",
) -> np.ndarray:
    """A horizontal colour bar with end values, a label and an optional marker (e.g. the threshold)."""
    size = max(11, min(18, width // 24))
    font = _font(size)
    bar_h, pad = size, 6
    ramp = colorize(np.tile(np.linspace(vmin, vmax, width - 2 * pad), (bar_h, 1)), vmin, vmax, cmap)
    strip = Image.new("RGB", (width, bar_h + size * 2 + 3 * pad), (255, 255, 255))
    strip.paste(Image.fromarray(ramp), (pad, pad))
    draw = ImageDraw.Draw(strip)
    y = bar_h + 2 * pad
    draw.text((pad, y), f"{vmin:g}", fill=(0, 0, 0), font=font)
    end = f"{vmax:g}"
    draw.text((width - pad - draw.textlength(end, font=font), y), end, fill=(0, 0, 0), font=font)
    draw.text(((width - draw.textlength(label, font=font)) / 2, y), label, fill=(0, 0, 0), font=font)
    if marker is not None and vmax > vmin:
        x = pad + (np.clip(marker, vmin, vmax) - vmin) / (vmax - vmin) * (width - 2 * pad - 1)
        draw.line([x, pad - 3, x, pad + bar_h + 3], fill=(0, 0, 0), width=3)
        draw.line([x, pad - 3, x, pad + bar_h + 3], fill=(255, 255, 255), width=1)
    return np.asarray(strip)


def _stack(panels: Sequence[np.ndarray], axis: int, gap: int, fill: int) -> np.ndarray:
    """Panels joined along ``axis`` (1: side by side, 0: stacked), padded at the end of the other axis."""
    across = 1 - axis
    size = max(p.shape[across] for p in panels)
    parts = []
    for i, p in enumerate(panels):
        if i:
            gap_shape = [0, 0, 3]
            gap_shape[axis], gap_shape[across] = gap, size
            parts.append(np.full(gap_shape, fill, np.uint8))
        padding = [(0, 0), (0, 0), (0, 0)]
        padding[across] = (0, size - p.shape[across])
        parts.append(np.pad(p, padding, constant_values=fill))
    return np.concatenate(parts, axis=axis)


def hstack(panels: Sequence[np.ndarray], gap: int = 6, fill: int = 255) -> np.ndarray:
    """Panels side by side, top-aligned, padded to a common height."""
    return _stack(panels, 1, gap, fill)


def vstack(panels: Sequence[np.ndarray], gap: int = 6, fill: int = 255) -> np.ndarray:
    """Panels one above the other, left-aligned, padded to a common width."""
    return _stack(panels, 0, gap, fill)


def layer_strip(
    image: np.ndarray,
    layers: Sequence[LayerTrace],
    image_index: int = 0,
    *,
    panel_size: int = 160,
    columns: int = 6,
    highlight: int | None = None,
    captions: Sequence[str] | None = None,
) -> np.ndarray:
    """Small kept/dropped panels for every SPA layer of one image, titled ``L<layer> · <kept %>``.

    ``highlight`` frames the panel of that model layer (the one shown large elsewhere);
    ``captions`` (one per layer) go under each title.
    """
    image = _check_image(image)
    if not layers:
        raise ValueError("no SPA layers to draw")
    if captions is not None and len(captions) != len(layers):
        raise ValueError(f"got {len(captions)} captions for {len(layers)} layers")
    small = cv2.resize(image, (panel_size, panel_size), interpolation=cv2.INTER_AREA)
    panels = []
    for i, record in enumerate(layers):
        panel = keep_overlay(small, record.keep_map(image_index))
        ratio = float(record.keep_ratio[image_index])
        caption = captions[i] if captions is not None else None
        panel = add_title(panel, f"L{record.layer} · {ratio:.0%}", caption, size=max(12, panel_size // 9))
        if record.layer == highlight:
            panel = cv2.copyMakeBorder(panel, 3, 3, 3, 3, cv2.BORDER_CONSTANT, value=OKABE_ITO["vermillion"])
        else:
            panel = cv2.copyMakeBorder(panel, 3, 3, 3, 3, cv2.BORDER_CONSTANT, value=(255, 255, 255))
        panels.append(panel)
    rows = [hstack(panels[i : i + columns]) for i in range(0, len(panels), columns)]
    return vstack(rows)


def to_jpeg(panel: np.ndarray, quality: int = 85) -> bytes:
    """``panel`` as JPEG bytes: stored notebook outputs stay small (a PNG of a photo panel is ~10x larger)."""
    buffer = io.BytesIO()
    Image.fromarray(_check_image(panel)).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()
