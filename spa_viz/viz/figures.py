"""Interactive plotly figures of a trace: the packed batch layout, MACs per layer, kept-token counts.

The app shows them live, ``spa-viz analyze`` writes them as HTML, the notebooks display them; all
three call these functions, so a figure looks the same everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go
from torch import Tensor

from spa_viz.analysis.trace import Trace
from spa_viz.layers.packing import PackPlan
from spa_viz.viz.overlays import as_numpy
from spa_viz.viz.style import OKABE_ITO, PADDING_COLOR, hex_color, image_color

__all__ = ["kept_histogram_figure", "macs_figure", "packed_layout_figure"]

_PLOTLY_FONT = dict(size=15)


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
    if plan.batch_size == 1:
        return _single_image_layout(plan, grid, num_prefix, scores, image_names)
    rows, length = plan.num_rows, plan.row_len
    slot_image = plan.slot_image.numpy()
    slot_token = plan.slot_token.numpy()
    batch = plan.batch_size
    names = list(image_names) if image_names is not None else [f"image {i}" for i in range(batch)]
    score_np = None if scores is None else as_numpy(scores)
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
    colors = [hex_color(PADDING_COLOR)] + [hex_color(image_color(i)) for i in range(batch)]
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
                marker=dict(symbol="square", size=14, color=hex_color(image_color(i))),
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


def _single_image_layout(
    plan: PackPlan,
    grid: tuple[int, int],
    num_prefix: int,
    scores: Tensor | None,
    image_names: Sequence[str] | None,
) -> go.Figure:
    """One image: its token grid, each kept token coloured by where it sits in the packed rows (row x L +
    slot), dropped tokens blank; hovering names the row and slot (a row-by-slot plot of one image is a
    single uniform bar)."""
    height, width = grid
    position = np.full(height * width, np.nan)
    hover = np.array(["dropped (not packed)"] * (height * width), dtype=object)
    slot_token = plan.slot_token.numpy()
    score_np = None if scores is None else as_numpy(scores)[0]
    for r in range(plan.num_rows):
        for c in range(plan.row_len):
            token = int(slot_token[r, c]) - num_prefix
            if token < 0:
                continue
            position[token] = r * plan.row_len + c
            text = f"token row {token // width}, col {token % width}<br>packed row {r}, slot {c}"
            if score_np is not None:
                text += f"<br>gate score {float(score_np[token]):.3f}"
            hover[token] = text
    fig = go.Figure(
        go.Heatmap(
            z=position.reshape(grid),
            colorscale="Viridis",
            colorbar=dict(title="packed position<br>(row × L + slot)"),
            text=hover.reshape(grid),
            hoverinfo="text",
            xgap=1,
            ygap=1,
        )
    )
    name = (list(image_names) if image_names else ["image 0"])[0]
    prefix = f" + {num_prefix} prefix token{'s' if num_prefix != 1 else ''} (always kept)" if num_prefix else ""
    title = _title(
        f"Packed tokens of one image · {plan.policy} policy",
        f"{name}: {plan.num_kept - num_prefix} of {height * width} patch tokens{prefix} in B′ = {plan.num_rows} "
        f"row{'s' if plan.num_rows != 1 else ''} × L = {plan.row_len} · fill {plan.fill_ratio:.1%} · blank = dropped",
    )
    _figure_layout(fig, title, height=min(760, 160 + 22 * height))
    fig.update_xaxes(title_text="token column", showgrid=False, zeroline=False)
    fig.update_yaxes(title_text="token row", autorange="reversed", showgrid=False, zeroline=False, scaleanchor="x")
    return fig


def macs_figure(trace: Trace) -> go.Figure:
    """Per-SPA-layer compute in GMACs (multiply-adds, the paper's "GFLOPs"), dense vs as run, with the
    whole backbone's saving in the title."""
    names = [f"L{t.layer}" for t in trace.layers]
    dense = [t.cost.macs_dense / 1e9 for t in trace.layers]
    run = [t.cost.macs_run / 1e9 for t in trace.layers]
    saving = [f"−{t.cost.saving:.0%}" if t.cost.saving >= 0 else f"+{-t.cost.saving:.0%}" for t in trace.layers]
    fig = go.Figure(
        [
            go.Bar(
                name="dense",
                x=names,
                y=dense,
                marker_color=hex_color(OKABE_ITO["orange"]),
                hovertemplate="%{x} dense: %{y:.4f} GMACs<extra></extra>",
            ),
            go.Bar(
                name="SPA (as run)",
                x=names,
                y=run,
                marker_color=hex_color(OKABE_ITO["blue"]),
                text=saving,
                textposition="outside",
                textfont=dict(size=13),
                customdata=[t.cost.padding_macs / 1e9 for t in trace.layers],
                hovertemplate="%{x} SPA: %{y:.4f} GMACs<br>padding: %{customdata:.4f} GMACs<extra></extra>",
            ),
        ]
    )
    title = _title(
        f"MACs per SPA layer · batch of {trace.batch_size}",
        f"backbone {trace.backbone_macs_dense / 1e9:.3f} → {trace.backbone_macs_run / 1e9:.3f} GMACs "
        f"(saving {trace.backbone_saving:.1%}; 1 MAC = 2 FLOPs)",
    )
    _figure_layout(fig, title, height=420)
    fig.update_layout(barmode="group", bargap=0.25)
    fig.update_yaxes(title_text="GMACs (multiply-adds)", rangemode="tozero")
    fig.update_xaxes(title_text="model layer")
    return fig


def _kept_per_layer_figure(trace: Trace, highlight: int) -> go.Figure:
    """Kept patch tokens of one image at every SPA layer, the shown layer highlighted."""
    names = [f"L{t.layer}" for t in trace.layers]
    counts = [int(t.kept_counts[0]) for t in trace.layers]
    total = trace.layers[0].keep.shape[1]
    colors = [hex_color(OKABE_ITO["vermillion"] if t.layer == highlight else OKABE_ITO["blue"]) for t in trace.layers]
    fig = go.Figure(
        go.Bar(
            x=names,
            y=counts,
            marker_color=colors,
            text=[f"{c / max(t.keep.shape[1], 1):.0%}" for c, t in zip(counts, trace.layers)],
            textposition="outside",
            hovertemplate="%{x}: %{y} tokens kept<extra></extra>",
        )
    )
    title = _title("Kept tokens per SPA layer · one image", f"of {total} patch tokens at the first SPA layer")
    _figure_layout(fig, title, height=360)
    fig.update_yaxes(title_text="kept patch tokens", rangemode="tozero")
    fig.update_xaxes(title_text="model layer")
    fig.update_layout(showlegend=False)
    return fig


def kept_histogram_figure(trace: Trace, layer: int | None = None) -> go.Figure:
    """Histogram of kept patch tokens per image at one SPA layer (default: the first); for a single
    image, its kept tokens at every SPA layer (a histogram of one count says nothing)."""
    record = trace.layer(layer) if layer is not None else trace.layers[0]
    if trace.batch_size == 1:
        return _kept_per_layer_figure(trace, record.layer)
    counts = record.kept_counts.numpy()
    total = record.keep.shape[1]
    mean = float(counts.mean()) if counts.size else 0.0
    fig = go.Figure(
        go.Histogram(
            x=counts,
            xbins=dict(start=-0.5, end=total + 0.5, size=max(1, total // 32)),
            marker_color=hex_color(OKABE_ITO["blue"]),
            marker_line=dict(color="white", width=1),
            hovertemplate="%{x} tokens: %{y} image(s)<extra></extra>",
            name="images",
        )
    )
    fig.add_vline(x=mean, line=dict(color=hex_color(OKABE_ITO["vermillion"]), dash="dash", width=3))
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
