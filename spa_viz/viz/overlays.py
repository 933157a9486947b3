"""Pictures of what SPA decided: image overlays (opencv/pillow) and plotly figures.

Everything here takes plain arrays or a :class:`~spa_viz.analysis.trace.Trace` and returns an
``(H, W, 3)`` uint8 RGB array or a ``plotly`` figure, so the app, notebooks and the CLI draw the
same pictures. Colours come from the Okabe-Ito palette and perceptually uniform colour maps
(viridis), which stay distinguishable for colour-blind viewers and on projectors.

Token maps are ``(gh, gw)`` arrays in raster order; pixel row ``i`` of an ``H``-row image belongs to
token row ``floor(i * gh / H)`` (the convention of :mod:`spa_viz.selection.labels`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np
import plotly.graph_objects as go
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from spa_viz.analysis.trace import LayerTrace, Trace
from spa_viz.layers.packing import PackPlan

__all__ = [
    "DROPPED_COLOR",
    "FN_COLOR",
    "FP_COLOR",
    "KEPT_COLOR",
    "OKABE_ITO",
    "PADDING_COLOR",
    "TP_COLOR",
    "SelectionMetrics",
    "add_title",
    "attribution_overlay",
    "colorbar",
    "colorize",
    "draw_detections",
    "flops_figure",
    "hstack",
    "image_color",
    "keep_overlay",
    "kept_histogram_figure",
    "layer_strip",
    "legend",
    "packed_layout_figure",
    "saliency_overlay",
    "score_overlay",
    "selection_metrics",
    "selection_overlay",
    "upsample_tokens",
    "vstack",
]

Color = tuple[int, int, int]

#: Okabe & Ito (2008) colour-blind-safe palette.
OKABE_ITO: dict[str, Color] = {
    "blue": (0, 114, 178),
    "orange": (230, 159, 0),
    "bluish_green": (0, 158, 115),
    "reddish_purple": (204, 121, 167),
    "sky_blue": (86, 180, 233),
    "vermillion": (213, 94, 0),
    "yellow": (240, 228, 66),
    "black": (0, 0, 0),
}
KEPT_COLOR: Color = OKABE_ITO["sky_blue"]  # outline of kept regions
DROPPED_COLOR: Color = OKABE_ITO["orange"]  # tint of dropped tokens
TP_COLOR: Color = OKABE_ITO["blue"]  # kept and labelled positive
FP_COLOR: Color = OKABE_ITO["orange"]  # kept but labelled negative
FN_COLOR: Color = OKABE_ITO["reddish_purple"]  # dropped but labelled positive
PADDING_COLOR: Color = (200, 200, 200)
#: Dropped tokens: the image is dimmed to ``DROP_DIM`` and blended with the tint at ``DROP_TINT``.
DROP_DIM = 0.45
DROP_TINT = 0.35
_IMAGE_PALETTE = ("blue", "orange", "bluish_green", "reddish_purple", "sky_blue", "vermillion", "yellow")
_CMAPS = {"viridis": cv2.COLORMAP_VIRIDIS, "cividis": cv2.COLORMAP_CIVIDIS}
_PLOTLY_FONT = dict(size=15)


def _hex(color: Color) -> str:
    return "#{:02x}{:02x}{:02x}".format(*color)


def image_color(index: int) -> Color:
    """The colour of batch image ``index`` in every figure (cycles after seven images)."""
    return OKABE_ITO[_IMAGE_PALETTE[index % len(_IMAGE_PALETTE)]]


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {image.dtype} {image.shape}")
    return image


def _as_numpy(values: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(values, Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)


def upsample_tokens(values: Tensor | np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Spread a ``(gh, gw)`` token map over an ``(H, W)`` image, one constant cell per token."""
    grid = _as_numpy(values)
    if grid.ndim != 2:
        raise ValueError(f"token map must be (gh, gw), got shape {grid.shape}")
    height, width = size
    rows = np.arange(height) * grid.shape[0] // height
    cols = np.arange(width) * grid.shape[1] // width
    return grid[rows[:, None], cols[None, :]]


def colorize(values: np.ndarray, vmin: float = 0.0, vmax: float = 1.0, cmap: str = "viridis") -> np.ndarray:
    """Map a 2-D float array onto an RGB colour map (values clipped to ``[vmin, vmax]``)."""
    span = max(vmax - vmin, 1e-12)
    scaled = np.clip((np.nan_to_num(np.asarray(values, dtype=np.float64)) - vmin) / span, 0.0, 1.0)
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


def keep_overlay(image: np.ndarray, keep: Tensor | np.ndarray) -> np.ndarray:
    """Kept tokens as they are (outlined), dropped tokens dimmed and tinted orange."""
    image = _check_image(image)
    kept = upsample_tokens(_as_numpy(keep).astype(bool), image.shape[:2])
    dropped = _blend((image.astype(np.float32) * DROP_DIM).astype(np.uint8), DROPPED_COLOR, DROP_TINT)
    out = np.where(kept[..., None], image, dropped)
    return _outline(out, kept, KEPT_COLOR, _line_width(image))


@dataclass(frozen=True)
class SelectionMetrics:
    """How the kept tokens agree with the selection labels (positive = should be kept)."""

    tp: int
    fp: int
    fn: int
    tn: int

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 0.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 1.0

    @property
    def iou(self) -> float:
        union = self.tp + self.fp + self.fn
        return self.tp / union if union else 1.0

    def to_dict(self) -> dict[str, float]:
        return {
            "precision": round(self.precision, 4),
            "recall": round(self.recall, 4),
            "iou": round(self.iou, 4),
            "tp": self.tp,
            "fp": self.fp,
            "fn": self.fn,
            "tn": self.tn,
        }


def selection_metrics(keep: Tensor | np.ndarray, labels: Tensor | np.ndarray) -> SelectionMetrics:
    """Precision, recall and IoU of a keep mask against per-token selection labels."""
    keep, labels = _as_numpy(keep).astype(bool).ravel(), _as_numpy(labels).astype(bool).ravel()
    if keep.shape != labels.shape:
        raise ValueError(f"keep has {keep.size} tokens but labels have {labels.size}")
    return SelectionMetrics(
        tp=int((keep & labels).sum()),
        fp=int((keep & ~labels).sum()),
        fn=int((~keep & labels).sum()),
        tn=int((~keep & ~labels).sum()),
    )


def selection_overlay(image: np.ndarray, keep: Tensor | np.ndarray, labels: Tensor | np.ndarray) -> np.ndarray:
    """Kept tokens vs selection labels: true positives blue, false positives orange, misses purple."""
    image = _check_image(image)
    size = image.shape[:2]
    kept = upsample_tokens(_as_numpy(keep).astype(bool), size)
    pos = upsample_tokens(_as_numpy(labels).astype(bool), size)
    out = (image.astype(np.float32) * DROP_DIM).astype(np.uint8)
    for mask, color in ((kept & pos, TP_COLOR), (kept & ~pos, FP_COLOR), (~kept & pos, FN_COLOR)):
        out = np.where(mask[..., None], _blend(image, color, 0.55), out)
    return _outline(out, pos, (255, 255, 255), _line_width(image))


def saliency_overlay(image: np.ndarray, saliency: Tensor | np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """A [0, 1] saliency map (any size; resized to the image) over the image, 0.5 contour in white."""
    image = _check_image(image)
    sal = _as_numpy(saliency).astype(np.float32).squeeze()
    if sal.ndim != 2:
        raise ValueError(f"saliency must be a 2-D map, got shape {sal.shape}")
    sal = cv2.resize(sal, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_LINEAR)
    out = _blend(image, colorize(sal, 0.0, 1.0, "viridis"), alpha * np.clip(sal, 0.25, 1.0)[..., None])
    return _outline(out, sal > 0.5, (255, 255, 255), _line_width(image))


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
    grid = _as_numpy(values).astype(np.float64)
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
    """Boxes (xyxy, in the image's pixels before ``scale``) with class name and score tags."""
    image = _check_image(image)
    boxes = _as_numpy(boxes).reshape(-1, 4).astype(np.float64) * scale
    labels = _as_numpy(labels).astype(int).ravel()
    scores = None if scores is None else _as_numpy(scores).astype(float).ravel()
    pil = Image.fromarray(image.copy())
    draw = ImageDraw.Draw(pil)
    font = _font(max(12, round(max(image.shape[:2]) / 28)))
    width = _line_width(image) + 1
    for i, (box, label) in enumerate(zip(boxes, labels)):
        color = image_color(int(label))
        draw.rectangle([float(v) for v in box], outline=color, width=width)
        name = class_names[label] if class_names is not None and 0 <= label < len(class_names) else str(label)
        tag = name if scores is None else f"{name} {scores[i]:.2f}"
        x0, y0 = float(box[0]), float(box[1])
        left, top, right, bottom = draw.textbbox((x0, y0), tag, font=font)
        y_shift = (bottom - top) + 4 if y0 - (bottom - top) - 4 >= 0 else 0
        draw.rectangle([left - 2, top - y_shift - 2, right + 2, bottom - y_shift + 2], fill=color)
        draw.text((x0, y0 - y_shift), tag, fill=(0, 0, 0) if sum(color) > 380 else (255, 255, 255), font=font)
    return np.asarray(pil)


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
) -> np.ndarray:
    """Small kept/dropped panels for every SPA layer of one image, titled ``L<layer> · <kept %>``.

    ``highlight`` frames the panel of that model layer (the one shown large elsewhere).
    """
    image = _check_image(image)
    if not layers:
        raise ValueError("no SPA layers to draw")
    small = cv2.resize(image, (panel_size, panel_size), interpolation=cv2.INTER_AREA)
    panels = []
    for record in layers:
        panel = keep_overlay(small, record.keep_map(image_index))
        ratio = float(record.keep_ratio[image_index])
        panel = add_title(panel, f"L{record.layer} · {ratio:.0%}", size=max(12, panel_size // 9))
        if record.layer == highlight:
            panel = cv2.copyMakeBorder(panel, 3, 3, 3, 3, cv2.BORDER_CONSTANT, value=OKABE_ITO["vermillion"])
        else:
            panel = cv2.copyMakeBorder(panel, 3, 3, 3, 3, cv2.BORDER_CONSTANT, value=(255, 255, 255))
        panels.append(panel)
    rows = [hstack(panels[i : i + columns]) for i in range(0, len(panels), columns)]
    return vstack(rows)


# ------------------------------------------------------------------------------------------------
# plotly figures
# ------------------------------------------------------------------------------------------------


def _title(title: str, subtitle: str) -> str:
    """A figure title with a smaller second line."""
    return f"{title}<br><span style='font-size:14px'>{subtitle}</span>"


def _figure_layout(fig: go.Figure, title: str, height: int) -> go.Figure:
    fig.update_layout(
        title=dict(text=title, x=0.01, xanchor="left", font=dict(size=17)),
        font=_PLOTLY_FONT,
        height=height,
        margin=dict(l=60, r=20, t=80, b=100),
        plot_bgcolor="white",
        paper_bgcolor="white",
        legend=dict(orientation="h", yanchor="top", y=-0.22, xanchor="left", x=0.0),
    )
    # set by hand rather than with template="plotly_white", which costs a deep copy per figure
    fig.update_xaxes(gridcolor="#e5e5e5", linecolor="#444444", zerolinecolor="#cccccc")
    fig.update_yaxes(gridcolor="#e5e5e5", linecolor="#444444", zerolinecolor="#cccccc")
    return fig


def packed_layout_figure(
    plan: PackPlan,
    *,
    grid: tuple[int, int],
    num_prefix: int,
    scores: Tensor | None = None,
    image_names: Sequence[str] | None = None,
) -> go.Figure:
    """The packed batch: rows (containers) x slots, coloured by source image, padding crossed out.

    Hovering a slot shows its image, token row/column and gate score (``scores``: (B, N) soft gate
    of the patch tokens). Prefix tokens (class, registers) are marked with a star.
    """
    rows, length = plan.num_rows, plan.row_len
    slot_image = plan.slot_image.numpy()
    slot_token = plan.slot_token.numpy()
    batch = plan.batch_size
    names = list(image_names) if image_names is not None else [f"image {i}" for i in range(batch)]
    score_np = None if scores is None else _as_numpy(scores)
    patch = slot_token - num_prefix

    hover = np.empty((rows, length), dtype=object)
    for r in range(rows):
        for c in range(length):
            img, tok = int(slot_image[r, c]), int(slot_token[r, c])
            where = f"row {r}, slot {c}"
            if img < 0:
                hover[r, c] = f"padding<br>{where}"
            elif tok < num_prefix:
                hover[r, c] = f"{names[img]}<br>prefix token {tok} (always kept)<br>{where}"
            else:
                p = tok - num_prefix
                text = f"{names[img]}<br>token row {p // grid[1]}, col {p % grid[1]}"
                if score_np is not None:
                    text += f"<br>gate score {float(score_np[img, p]):.3f}"
                hover[r, c] = f"{text}<br>{where}"

    # A stepped colour scale: value -1 is padding, 0..B-1 the images.
    colors = [_hex(PADDING_COLOR)] + [_hex(image_color(i)) for i in range(batch)]
    steps = len(colors)
    scale = []
    for i, color in enumerate(colors):
        scale += [[i / steps, color], [(i + 1) / steps, color]]
    fig = go.Figure(
        go.Heatmap(
            z=slot_image.astype(float),
            zmin=-1.5,
            zmax=batch - 0.5,
            colorscale=scale,
            showscale=False,
            text=hover,
            hoverinfo="text",
            xgap=1,
            ygap=3,
        )
    )
    pad_r, pad_c = np.nonzero(slot_image < 0)
    pre_r, pre_c = np.nonzero((slot_image >= 0) & (patch < 0))
    marker = max(5, min(12, 600 // max(length, 1)))
    fig.add_trace(
        go.Scatter(
            x=pad_c,
            y=pad_r,
            mode="markers",
            name=f"padding ({len(pad_r)} slots)",
            hoverinfo="skip",
            marker=dict(symbol="x-thin", size=marker, line=dict(width=2, color="#444444"), color="#444444"),
        )
    )
    if len(pre_r):
        fig.add_trace(
            go.Scatter(
                x=pre_c,
                y=pre_r,
                mode="markers",
                name="prefix (class) token",
                hoverinfo="skip",
                marker=dict(symbol="star", size=marker + 2, color="white", line=dict(width=1, color="black")),
            )
        )
    kept = plan.kept_counts.tolist()
    for i in range(batch):
        fig.add_trace(
            go.Scatter(
                x=[None],
                y=[None],
                mode="markers",
                name=f"{names[i]} ({kept[i]} tokens)",
                marker=dict(symbol="square", size=14, color=_hex(image_color(i))),
            )
        )
    title = _title(
        f"Packed batch · {plan.policy} policy",
        f"B′ = {rows} row{'s' if rows != 1 else ''} × L = {length} slots · fill {plan.fill_ratio:.1%} · "
        f"{plan.num_slots - plan.num_kept} padding slots",
    )
    _figure_layout(fig, title, height=min(max(320, 170 + 30 * rows, 160 + 24 * batch), 760))
    # one legend entry per image: a column on the right keeps it clear of title and axis titles
    fig.update_layout(
        legend=dict(orientation="v", yanchor="top", y=1.0, xanchor="left", x=1.01), margin=dict(r=240, b=60)
    )
    fig.update_xaxes(title_text="slot in row", range=[-0.5, length - 0.5], showgrid=False, zeroline=False)
    fig.update_yaxes(title_text="row (container)", range=[rows - 0.5, -0.5], dtick=1, showgrid=False, zeroline=False)
    return fig


def flops_figure(trace: Trace) -> go.Figure:
    """Per-SPA-layer FLOPs, dense vs as run, with the whole backbone's saving in the title."""
    names = [f"L{t.layer}" for t in trace.layers]
    dense = [t.flops.dense / 1e9 for t in trace.layers]
    run = [t.flops.run / 1e9 for t in trace.layers]
    saving = [f"−{t.flops.saving:.0%}" if t.flops.saving >= 0 else f"+{-t.flops.saving:.0%}" for t in trace.layers]
    fig = go.Figure(
        [
            go.Bar(
                name="dense",
                x=names,
                y=dense,
                marker_color=_hex(OKABE_ITO["orange"]),
                hovertemplate="%{x} dense: %{y:.3f} GFLOPs<extra></extra>",
            ),
            go.Bar(
                name="SPA (as run)",
                x=names,
                y=run,
                marker_color=_hex(OKABE_ITO["blue"]),
                text=saving,
                textposition="outside",
                textfont=dict(size=13),
                customdata=[t.flops.padding / 1e9 for t in trace.layers],
                hovertemplate="%{x} SPA: %{y:.3f} GFLOPs<br>padding: %{customdata:.3f} GFLOPs<extra></extra>",
            ),
        ]
    )
    title = _title(
        f"FLOPs per SPA layer · batch of {trace.batch_size}",
        f"backbone {trace.backbone_flops_dense / 1e9:.2f} → {trace.backbone_flops_run / 1e9:.2f} GFLOPs "
        f"(saving {trace.backbone_saving:.1%})",
    )
    _figure_layout(fig, title, height=420)
    fig.update_layout(barmode="group", bargap=0.25)
    fig.update_yaxes(title_text="GFLOPs", rangemode="tozero")
    fig.update_xaxes(title_text="model layer")
    return fig


def kept_histogram_figure(trace: Trace, layer: int | None = None) -> go.Figure:
    """Histogram of kept patch tokens per image at one SPA layer (default: the first)."""
    record = trace.layer(layer) if layer is not None else trace.layers[0]
    counts = record.kept_counts.numpy()
    total = record.keep.shape[1]
    mean = float(counts.mean()) if counts.size else 0.0
    fig = go.Figure(
        go.Histogram(
            x=counts,
            xbins=dict(start=-0.5, end=total + 0.5, size=max(1, total // 32)),
            marker_color=_hex(OKABE_ITO["blue"]),
            marker_line=dict(color="white", width=1),
            hovertemplate="%{x} tokens: %{y} image(s)<extra></extra>",
            name="images",
        )
    )
    fig.add_vline(x=mean, line=dict(color=_hex(OKABE_ITO["vermillion"]), dash="dash", width=3))
    title = _title(
        f"Kept tokens per image · layer {record.layer}",
        f"{len(counts)} image{'s' if len(counts) != 1 else ''} · mean (dashed) {mean:.1f} of {total} "
        f"({mean / max(total, 1):.0%})",
    )
    _figure_layout(fig, title, height=360)
    fig.update_xaxes(title_text="kept patch tokens", range=[-0.5, total + 0.5])
    fig.update_yaxes(title_text="images", dtick=1 if len(counts) <= 10 else None, rangemode="tozero")
    fig.update_layout(showlegend=False)
    return fig
