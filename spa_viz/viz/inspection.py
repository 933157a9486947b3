"""Pictures for looking closer: one token's attention (packed vs dense), ToMe's merge groups, an output's
distance from the dense twin, the trade-off of output error against compute, and where a click on a
panel lands on the token grid.

Like :mod:`.panels`, every picture is an ``(H, W, 3)`` uint8 array drawn with numpy/opencv/pillow;
the trade-off is a plotly figure like those of :mod:`.figures`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
import torch
from PIL import Image
from torch import Tensor

from spa_viz.analysis.compare import TradeoffPoint
from spa_viz.analysis.token import TokenInspection
from spa_viz.analysis.trace import LayerTrace
from spa_viz.viz import overlays
from spa_viz.viz.figures import _figure_layout, _title
from spa_viz.viz.style import OKABE_ITO, hex_color, image_color

__all__ = [
    "container_map",
    "difference_panel",
    "merge_groups_panel",
    "title_height",
    "token_at",
    "token_attention_panel",
    "tradeoff_figure",
]

UNSEEN_GREY = (150, 150, 150)
"""Tokens a query could not see (another container, or not kept) are drawn flat in this grey."""
_MARK = OKABE_ITO["vermillion"]


def title_height(width: int, subtitle: bool = True) -> int:
    """Height of the header bar :func:`~spa_viz.viz.overlays.add_title` puts above a ``width``-wide panel."""
    blank = np.zeros((1, width, 3), dtype=np.uint8)
    return overlays.add_title(blank, "title", "subtitle" if subtitle else None).shape[0] - 1


def token_at(
    x: float, y: float, display_size: tuple[int, int], grid: tuple[int, int], top: int
) -> tuple[int, int] | None:
    """The (row, column) of the token under pixel (``x``, ``y``) of a panel whose picture of
    ``display_size`` (H, W) starts ``top`` pixels down (below its title), or None outside the picture."""
    height, width = display_size
    inside_y = y - top
    if not (0 <= x < width and 0 <= inside_y < height):
        return None
    return int(inside_y * grid[0] // height), int(x * grid[1] // width)


def container_map(record: LayerTrace, index: int) -> Tensor:
    """(gh, gw) long: for each patch token of image ``index`` at one layer, the number of the packed
    run (container part) it sat in, counted within the image from 0; -1 where it was not kept."""
    plan = record.plan
    prefix = record.num_prefix
    patches = record.grid[0] * record.grid[1]
    runs = torch.full((patches,), -1, dtype=torch.long)
    sources = plan.sources.cpu()
    ordinal = 0
    for flat_start, _row, _start, size, image in plan.runs:
        if image != index:
            continue
        tokens = sources[flat_start : flat_start + size] - index * plan.seq_len - prefix
        tokens = tokens[tokens >= 0]
        runs[tokens] = ordinal
        ordinal += 1
    return runs.reshape(record.grid)


def _boundaries(image: np.ndarray, labels: np.ndarray, color: tuple[int, int, int]) -> np.ndarray:
    """Draw a line wherever neighbouring pixels carry different ``labels`` (same shape as the image)."""
    edge = np.zeros(labels.shape, dtype=bool)
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    edge[1:, :] |= labels[1:, :] != labels[:-1, :]
    out = image.copy()
    out[edge] = color
    return out


def _mark_token(image: np.ndarray, grid: tuple[int, int], position: tuple[int, int]) -> np.ndarray:
    """A square frame around the token at ``position``."""
    height, width = image.shape[:2]
    row, column = position
    y0, y1 = row * height // grid[0], (row + 1) * height // grid[0] - 1
    x0, x1 = column * width // grid[1], (column + 1) * width // grid[1] - 1
    out = image.copy()
    thickness = max(1, height // 80)
    out[y0 : y0 + thickness, x0 : x1 + 1] = _MARK
    out[y1 - thickness + 1 : y1 + 1, x0 : x1 + 1] = _MARK
    out[y0 : y1 + 1, x0 : x0 + thickness] = _MARK
    out[y0 : y1 + 1, x1 - thickness + 1 : x1 + 1] = _MARK
    return out


def _attention_tile(
    small: np.ndarray,
    weights: Tensor,
    grid: tuple[int, int],
    limit: float,
    position: tuple[int, int],
    containers: Tensor | None,
) -> np.ndarray:
    """One head's weights (N,) over the grid (NaN: unseen, drawn grey), the query framed, container
    boundaries drawn when given."""
    values = weights.reshape(grid).float()
    seen = ~torch.isnan(values)
    heat = overlays.score_overlay(small, torch.nan_to_num(values), vmax=limit, alpha=0.75, cmap="magma")
    unseen = overlays.upsample_tokens(~seen, heat.shape[:2])
    heat[unseen] = (0.35 * heat[unseen] + 0.65 * np.array(UNSEEN_GREY)).astype(np.uint8)
    if containers is not None:
        heat = _boundaries(heat, overlays.upsample_tokens(containers, heat.shape[:2]), (255, 255, 255))
    return _mark_token(heat, grid, position)


def token_attention_panel(
    display: np.ndarray, view: TokenInspection, record: LayerTrace, panel_size: int = 150
) -> np.ndarray:
    """One token's attention at one layer: per head (columns; the first is the mean over heads), its
    weights in the SPA run over the tokens it could see (others grey, container boundaries in white)
    above the dense twin's weights of the same token. Each head's two tiles share one colour scale."""
    small = np.ascontiguousarray(
        np.asarray(Image.fromarray(display).resize((panel_size, panel_size), Image.Resampling.BILINEAR))
    )
    grid, position = view.grid, view.position
    containers = container_map(record, view.image)
    size = max(11, panel_size // 11)
    dense = view.dense_attention
    spa = view.spa_attention
    heads = [("mean of heads", None)] + [(f"head {h}", h) for h in range(dense.shape[0])]
    top, bottom = [], []
    for name, head in heads:
        dense_w = dense.nanmean(0) if head is None else dense[head]
        spa_w = None if spa is None else (spa.nanmean(0) if head is None else spa[head])
        limit = max(
            float(torch.nan_to_num(dense_w).max()), float(torch.nan_to_num(spa_w).max()) if spa_w is not None else 0.0
        )
        limit = max(limit, 1e-6)
        if spa_w is None:
            blank = (0.35 * small + 0.65 * np.array(UNSEEN_GREY)).astype(np.uint8)
            tile = overlays.add_title(
                _mark_token(blank, grid, position), f"SPA · {name}", "not kept: no query", size=size
            )
        else:
            seen = spa_w[~torch.isnan(spa_w)]
            tile = overlays.add_title(
                _attention_tile(small, spa_w, grid, limit, position, containers),
                f"SPA · {name}",
                f"max {float(seen.max()):.2f} over {seen.numel()} tokens",
                size=size,
            )
        top.append(tile)
        bottom.append(
            overlays.add_title(
                _attention_tile(small, dense_w, grid, limit, position, None),
                f"dense · {name}",
                f"max {float(torch.nan_to_num(dense_w).max()):.2f}",
                size=size,
            )
        )
    body = overlays.vstack([overlays.hstack(top), overlays.hstack(bottom)])
    where = (
        f"packed row {view.packed_row}, slot {view.slot}; saw {int(view.visible.sum())} of its image's tokens"
        if view.kept
        else "not kept at this layer (it did not attend)"
    )
    picture = overlays.add_title(
        body,
        f"Token ({position[0]}, {position[1]}) · image {view.image} · layer {view.layer}",
        f"{where} · grey: could not see · white lines: containers · red frame: the token",
    )
    bar = overlays.colorbar(
        picture.shape[1], 0.0, 1.0, "attention weight (scaled to each head's maximum)", cmap="magma"
    )
    return overlays.vstack([picture, bar], gap=0)


def _group_colours(groups: np.ndarray) -> np.ndarray:
    """(gh, gw, 3) colour per token: each group of several tokens its own colour, lone tokens none (0)."""
    ids, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    colours = np.zeros((*groups.shape, 3), dtype=np.uint8)
    shared = counts[inverse.reshape(groups.shape)] > 1
    rank = np.cumsum(counts > 1) - 1  # ordinal among the merged groups
    for i, gid in enumerate(ids):
        if counts[i] > 1:
            colours[groups == gid] = image_color(int(rank[i]))
    colours[~shared] = 0
    return colours


def merge_groups_panel(
    display: np.ndarray,
    groups: Tensor | np.ndarray,
    title: str,
    highlight: tuple[int, int] | None = None,
) -> np.ndarray:
    """ToMe's merge groups of one image: ``groups`` (gh, gw) the merged token each patch ended in. Groups
    of several patches are tinted, one colour each, with their boundaries drawn; with ``highlight``
    (row, column) only that patch's group is shown in colour and the rest dimmed."""
    grid = np.asarray(overlays.as_numpy(groups))
    size = display.shape[:2]
    pixels = overlays.upsample_tokens(grid, size)
    merged = int(grid.size - np.unique(grid).size)
    if highlight is None:
        colours = overlays.upsample_tokens(np.arange(grid.size).reshape(grid.shape), size)
        tint = _group_colours(grid).reshape(-1, 3)[colours]
        shared = tint.any(-1, keepdims=True)
        picture = np.where(shared, (0.45 * display + 0.55 * tint).astype(np.uint8), display)
        subtitle = f"{merged} of {grid.size} patches merged into others · one colour per group"
    else:
        member = pixels == grid[highlight]
        dim = (display * 0.35).astype(np.uint8)
        picture = np.where(member[..., None], display, dim)
        count = int((grid == grid[highlight]).sum())
        picture = _mark_token(picture, grid.shape, highlight)
        subtitle = (
            f"patch ({highlight[0]}, {highlight[1]}) ended in a token of {count} patch{'es' if count != 1 else ''}"
        )
    picture = _boundaries(np.ascontiguousarray(picture), pixels, (255, 255, 255))
    return overlays.add_title(picture, title, subtitle)


def difference_panel(display: np.ndarray, difference: tuple[Tensor, str] | None, title: str) -> np.ndarray:
    """|output - dense twin| of one image as a heat-map over it (with its mean), or a note where the
    task's output is not a map (class scores)."""
    if difference is None:
        blank = (0.3 * display + 0.7 * 255).astype(np.uint8)
        return overlays.add_title(blank, title, "no output map for this task (the table has the error)")
    values, what = difference
    limit = max(float(values.max()), 1e-6)
    heat = overlays.score_overlay(display, values.float(), vmax=limit, alpha=0.75, cmap="magma")
    picture = overlays.add_title(heat, title, f"{what}: mean {float(values.mean()):.4f}, max {limit:.3f}")
    bar = overlays.colorbar(display.shape[1], 0.0, limit, f"|output - dense| ({what})", cmap="magma")
    return overlays.vstack([picture, bar], gap=0)


def tradeoff_figure(
    curves: Mapping[str, Sequence[TradeoffPoint]], error_name: str, dense_macs: float | None = None
) -> go.Figure:
    """Output error vs backbone GMACs per image, one line per method (hover: the setting and kept share);
    the dense twin at zero error where ``dense_macs`` is given."""
    fig = go.Figure()
    for i, (method, points) in enumerate(curves.items()):
        ordered = sorted(points, key=lambda p: p.macs)
        fig.add_trace(
            go.Scatter(
                x=[p.macs / 1e9 for p in ordered],
                y=[p.error for p in ordered],
                mode="lines+markers",
                name=method,
                marker={"color": hex_color(image_color(i)), "size": 9},
                line={"color": hex_color(image_color(i))},
                text=[f"{p.setting.label()}<br>kept {p.kept:.0%}" for p in ordered],
                hovertemplate="%{text}<br>%{x:.3f} GMACs<br>error %{y:.4f}<extra></extra>",
            )
        )
    if dense_macs is not None:
        fig.add_trace(
            go.Scatter(
                x=[dense_macs / 1e9],
                y=[0.0],
                mode="markers",
                name="dense twin",
                marker={"color": "black", "symbol": "star", "size": 13},
                hovertemplate="dense twin<br>%{x:.3f} GMACs<extra></extra>",
            )
        )
    fig.update_xaxes(title_text="backbone GMACs per image")
    fig.update_yaxes(title_text=error_name)
    return _figure_layout(fig, _title("Output error vs compute", "lower left is better"), 420)
