"""The look shared by every picture and figure: the colour-blind-safe palette and what each colour means.

Colours come from the Okabe-Ito palette, which stays distinguishable for colour-blind viewers and on
projectors; images of a batch are told apart by :func:`image_color` everywhere (overlays, packed
layouts, detections).
"""

from __future__ import annotations

__all__ = [
    "DROPPED_COLOR",
    "DROP_DIM",
    "DROP_TINT",
    "FN_COLOR",
    "FP_COLOR",
    "KEPT_COLOR",
    "OKABE_ITO",
    "PADDING_COLOR",
    "TP_COLOR",
    "Color",
    "hex_color",
    "image_color",
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


def hex_color(color: Color) -> str:
    """``#rrggbb`` of an RGB colour (plotly's notation)."""
    return "#{:02x}{:02x}{:02x}".format(*color)


def image_color(index: int) -> Color:
    """The colour of batch image ``index`` in every figure (cycles after seven images)."""
    return OKABE_ITO[_IMAGE_PALETTE[index % len(_IMAGE_PALETTE)]]
