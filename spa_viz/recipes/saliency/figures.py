"""The peer figure of the saliency model: saliency MAE vs backbone GMACs, one curve per method and check.

:func:`peer_figure` is the interactive plotly figure (notebook 01, ``peer_curve.html`` next to the
model card); :func:`save_peer_png` draws the same curves with matplotlib as a small static image
(the model card embeds it, and stored notebook outputs show it on a code host).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

__all__ = ["METHOD_STYLE", "peer_figure", "save_peer_png"]

#: Colour per method (Okabe-Ito); the imported-weights variant of a peer is dashed, the tuned one solid.
METHOD_STYLE: dict[str, str] = {
    "learned gate": "#000000",
    "cls_attention": "#0072B2",
    "feature_norm": "#009E73",
    "random": "#999999",
    "uniform_topk": "#CC79A7",
    "token_merging": "#D55E00",
}


def _style(curve: str) -> tuple[str, str]:
    method = curve.split(" (")[0]
    return METHOD_STYLE.get(method, "#E69F00"), "dash" if curve.endswith("(imported)") else "solid"


def peer_figure(checks: Mapping[str, Mapping[str, Any]], target_mae: float | None = None) -> go.Figure:
    """Saliency MAE vs backbone GMACs per check (one subplot each): every curve of ``check["peers"]``."""
    names = list(checks)
    fig = make_subplots(
        rows=1, cols=len(names), subplot_titles=[f"{n} ({checks[n]['peer_views']} views)" for n in names]
    )
    for col, name in enumerate(names, start=1):
        for curve, points in checks[name]["peers"].items():
            ordered = sorted(points, key=lambda p: p["gmacs"])
            color, dash = _style(curve)
            fig.add_trace(
                go.Scatter(
                    x=[p["gmacs"] for p in ordered],
                    y=[p["mae"] for p in ordered],
                    mode="lines+markers",
                    name=curve,
                    legendgroup=curve,
                    showlegend=col == 1,
                    line=dict(color=color, dash=dash, width=3 if curve == "learned gate" else 1.5),
                    customdata=[[p["amount"]] for p in ordered],
                    hovertemplate=f"{curve}<br>amount %{{customdata[0]}}<br>%{{x:.2f}} GMACs, MAE %{{y:.4f}}<extra></extra>",
                ),
                row=1,
                col=col,
            )
        if target_mae is not None:
            fig.add_hline(y=target_mae, line=dict(color="#444", dash="dot", width=1), row=1, col=col)
        fig.update_xaxes(title_text="backbone GMACs per image (multiply-adds)", row=1, col=col)
        fig.update_yaxes(title_text="saliency MAE vs the dense teacher", type="log", row=1, col=col)
    fig.update_layout(
        title="Peers at equal compute: saliency MAE vs backbone MACs (dashed: imported weights; solid: SPA-tuned)",
        height=460,
        margin=dict(l=60, r=20, t=70, b=50),
        legend=dict(font=dict(size=10)),
    )
    return fig


def save_peer_png(
    checks: Mapping[str, Mapping[str, Any]], path: Path, target_mae: float | None = None, dpi: int = 90
) -> Path:
    """The curves of :func:`peer_figure` as a static PNG (matplotlib), for the model card and notebooks."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    names: Sequence[str] = list(checks)
    fig, axes = plt.subplots(1, len(names), figsize=(6.2 * len(names), 4.4), squeeze=False)
    for ax, name in zip(axes[0], names):
        for curve, points in checks[name]["peers"].items():
            ordered = sorted(points, key=lambda p: p["gmacs"])
            color, dash = _style(curve)
            ax.plot(
                [p["gmacs"] for p in ordered],
                [p["mae"] for p in ordered],
                marker="o",
                markersize=3,
                color=color,
                linestyle="--" if dash == "dash" else "-",
                linewidth=2.5 if curve == "learned gate" else 1.2,
                label=curve,
            )
        if target_mae is not None:
            ax.axhline(target_mae, color="#444", linestyle=":", linewidth=1)
        ax.set_yscale("log")
        ax.set_xlabel("backbone GMACs per image (multiply-adds)")
        ax.set_ylabel("saliency MAE vs the dense teacher")
        ax.set_title(f"{name} ({checks[name]['peer_views']} views)", fontsize=10)
        ax.grid(alpha=0.3, which="both")
    axes[0][-1].legend(fontsize=7, loc="upper right")
    fig.suptitle(
        "Peers at equal compute (dashed: imported weights, solid: SPA-tuned adapters and decoder)", fontsize=10
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    plt.close(fig)
    return path
