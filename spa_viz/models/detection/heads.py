"""Task heads for SPA backbones: a CenterNet-style detector head, a light FPN, a multi-label head.

Why these: a detection head that reads every token of a grid (CenterNet: one class heat-map peak
per object, plus its box size and sub-cell offset) is the simplest dense head that works on a plain
ViT's patch-token grid and on one level of a hierarchical backbone (SPT), with no anchors, RoI ops
or NMS kernels. The multi-label head is the paper's PASCAL VOC setting (pooled features -> K
logits, BCE).

Conventions: feature maps are NCHW; a head at output stride ``s`` maps cell ``(y, x)`` to input
pixels ``[x s, (x+1) s) x [y s, (y+1) s)``; boxes are xyxy in input pixels; the size branch
regresses (w, h) in cells and the offset branch the sub-cell position of the box centre.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CenterNetHead",
    "LightFPN",
    "MultiLabelHead",
    "Detections",
    "centernet_loss",
    "decode_centernet",
    "focal_loss",
    "gaussian_radius",
    "multi_hot",
    "render_heatmap",
]

#: (boxes float [n, 4] xyxy input pixels, scores float [n], labels int64 [n]) for one image.
Detections = tuple[Tensor, Tensor, Tensor]


def _branch(in_channels: int, hidden: int, out_channels: int, bias: float = 0.0) -> nn.Sequential:
    """3x3 conv -> ReLU -> 1x1 conv, CenterNet's per-output branch."""
    branch = nn.Sequential(
        nn.Conv2d(in_channels, hidden, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(hidden, out_channels, 1)
    )
    nn.init.constant_(branch[-1].bias, bias)
    return branch


class CenterNetHead(nn.Module):
    """Heat-map (K classes), size and offset branches on one NCHW feature map.

    ``upsample`` doubles the map resolution that many times first (bilinear + 3x3 conv), halving
    the output stride, for small objects on a coarse grid. ``stride`` is the input-pixel stride of
    the *incoming* map; :attr:`output_stride` the stride of the outputs.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        stride: int,
        hidden: int = 64,
        upsample: int = 0,
        prior: float = 0.1,
    ) -> None:
        super().__init__()
        if num_classes < 1 or stride < 1 or upsample < 0 or hidden < 1:
            raise ValueError("need num_classes >= 1, stride >= 1, hidden >= 1 and upsample >= 0")
        if stride % (2**upsample):
            raise ValueError(f"stride {stride} cannot be halved {upsample} times")
        self.num_classes = num_classes
        self.output_stride = stride // 2**upsample
        layers: list[nn.Module] = []
        channels = in_channels
        for _ in range(upsample):
            layers += [nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)]
            layers += [nn.Conv2d(channels, hidden, 3, padding=1), nn.ReLU(inplace=True)]
            channels = hidden
        self.neck = nn.Sequential(*layers)
        self.heatmap = _branch(channels, hidden, num_classes, bias=-math.log((1 - prior) / prior))
        self.size = _branch(channels, hidden, 2)
        self.offset = _branch(channels, hidden, 2)

    def forward(self, features: Tensor) -> dict[str, Tensor]:
        """``heatmap`` logits (B, K, h, w), ``size`` (B, 2, h, w) in cells, ``offset`` (B, 2, h, w)."""
        if features.dim() != 4:
            raise ValueError(f"CenterNetHead takes an NCHW map, got shape {tuple(features.shape)}")
        x = self.neck(features)
        return {"heatmap": self.heatmap(x), "size": self.size(x), "offset": self.offset(x)}


class LightFPN(nn.Module):
    """Top-down FPN to one output level: 1x1 laterals, nearest upsampling + sum, one 3x3 conv.

    Takes the maps of consecutive pyramid levels (finest first, each half the previous size or
    ceil of it) and returns one map at the finest level's resolution.
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int) -> None:
        super().__init__()
        if not in_channels:
            raise ValueError("LightFPN needs at least one input level")
        self.laterals = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels)
        self.smooth = nn.Conv2d(out_channels, out_channels, 3, padding=1)

    def forward(self, maps: Sequence[Tensor]) -> Tensor:
        if len(maps) != len(self.laterals):
            raise ValueError(f"LightFPN was built for {len(self.laterals)} levels, got {len(maps)} maps")
        x = self.laterals[-1](maps[-1])
        for lateral, fine in zip(reversed(self.laterals[:-1]), reversed(maps[:-1])):
            x = lateral(fine) + F.interpolate(x, size=fine.shape[-2:], mode="nearest")
        return self.smooth(x)


def gaussian_radius(height: Tensor, width: Tensor, min_overlap: float = 0.7) -> Tensor:
    """CenterNet's radius: the largest centre shift that keeps IoU >= ``min_overlap`` (any corner case)."""
    a1, b1 = 1.0, height + width
    c1 = width * height * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + torch.sqrt(b1**2 - 4 * a1 * c1)) / 2
    a2, b2 = 4.0, 2 * (height + width)
    c2 = (1 - min_overlap) * width * height
    r2 = (b2 + torch.sqrt(b2**2 - 4 * a2 * c2)) / 2
    a3, b3 = 4 * min_overlap, -2 * min_overlap * (height + width)
    c3 = (min_overlap - 1) * width * height
    r3 = (b3 + torch.sqrt(b3**2 - 4 * a3 * c3)) / 2
    return torch.minimum(torch.minimum(r1, r2), r3)


def _object_table(
    targets: Sequence[Mapping[str, Any]], stride: int, grid: tuple[int, int], device: torch.device
) -> dict[str, Tensor]:
    """All objects of a batch: image index, class, centre cell, sub-cell offset, size in cells."""
    images, labels, boxes = [], [], []
    for b, target in enumerate(targets):
        box = torch.as_tensor(target["boxes"], dtype=torch.float32).reshape(-1, 4)
        valid = (box[:, 2] > box[:, 0]) & (box[:, 3] > box[:, 1])
        boxes.append(box[valid])
        labels.append(torch.as_tensor(target["labels"], dtype=torch.long).reshape(-1)[valid])
        images.append(torch.full((int(valid.sum()),), b, dtype=torch.long))
    box = torch.cat(boxes).to(device) / stride
    centre = torch.stack([(box[:, 0] + box[:, 2]) / 2, (box[:, 1] + box[:, 3]) / 2], dim=1)
    cell = centre.floor().long()
    cell[:, 0].clamp_(0, grid[1] - 1)
    cell[:, 1].clamp_(0, grid[0] - 1)
    return {
        "image": torch.cat(images).to(device),
        "label": torch.cat(labels).to(device),
        "cell": cell,
        "offset": centre - cell,
        "size": torch.stack([box[:, 2] - box[:, 0], box[:, 3] - box[:, 1]], dim=1),
    }


def render_heatmap(
    objects: Mapping[str, Tensor], batch: int, num_classes: int, grid: tuple[int, int], min_overlap: float = 0.7
) -> Tensor:
    """(B, K, h, w) target: per class the max of one Gaussian per object, exactly 1 at its centre cell."""
    height, width = grid
    size = objects["size"]
    radius = gaussian_radius(size[:, 1], size[:, 0], min_overlap).floor().clamp(min=0)
    sigma = (2 * radius + 1) / 6
    ys = torch.arange(height, device=size.device, dtype=size.dtype)
    xs = torch.arange(width, device=size.device, dtype=size.dtype)
    cell = objects["cell"].to(size.dtype)
    dy2 = (ys[None, :] - cell[:, 1:2]) ** 2
    dx2 = (xs[None, :] - cell[:, 0:1]) ** 2
    gauss = torch.exp(-(dy2[:, :, None] + dx2[:, None, :]) / (2 * sigma[:, None, None] ** 2))
    flat = gauss.reshape(gauss.shape[0], -1)
    index = (objects["image"] * num_classes + objects["label"])[:, None].expand_as(flat)
    heat = torch.zeros(batch * num_classes, height * width, device=size.device, dtype=size.dtype)
    heat = heat.scatter_reduce(0, index, flat, reduce="amax")
    return heat.reshape(batch, num_classes, height, width)


def focal_loss(logits: Tensor, target: Tensor, alpha: float = 2.0, beta: float = 4.0) -> Tensor:
    """CenterNet's penalty-reduced focal loss, summed and divided by the number of centres (>= 1).

    Positives are the cells where ``target == 1``; negatives near a centre are down-weighted by
    ``(1 - target) ** beta``. Computed from logits with log-sigmoid for stability.
    """
    if logits.shape != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} differ in shape")
    logits, target = logits.float(), target.float()
    prob = torch.sigmoid(logits)
    pos = target.eq(1).float()
    pos_loss = -F.logsigmoid(logits) * (1 - prob) ** alpha * pos
    neg_loss = -F.logsigmoid(-logits) * prob**alpha * (1 - target) ** beta * (1 - pos)
    return (pos_loss.sum() + neg_loss.sum()) / pos.sum().clamp(min=1.0)


def centernet_loss(
    outputs: Mapping[str, Tensor],
    targets: Sequence[Mapping[str, Any]],
    stride: int,
    *,
    size_weight: float = 1.0,
    offset_weight: float = 1.0,
) -> dict[str, Tensor]:
    """CenterNet's losses: focal heat-map loss + L1 on size and offset at the object centres.

    ``targets`` hold ``boxes`` (xyxy input pixels) and ``labels`` (0..K-1). Returns ``heatmap``,
    ``size``, ``offset`` and their weighted sum ``task``.
    """
    heat = outputs["heatmap"]
    batch, num_classes, height, width = heat.shape
    if len(targets) != batch:
        raise ValueError(f"{len(targets)} targets for a batch of {batch} images")
    objects = _object_table(targets, stride, (height, width), heat.device)
    if objects["label"].numel() and int(objects["label"].max()) >= num_classes:
        raise ValueError(f"a target label is >= the head's {num_classes} classes")
    hm_loss = focal_loss(heat, render_heatmap(objects, batch, num_classes, (height, width)))
    count = max(int(objects["label"].numel()), 1)
    b, x, y = objects["image"], objects["cell"][:, 0], objects["cell"][:, 1]
    size_pred = outputs["size"].float()[b, :, y, x]
    offset_pred = outputs["offset"].float()[b, :, y, x]
    size_loss = F.l1_loss(size_pred, objects["size"], reduction="sum") / count
    offset_loss = F.l1_loss(offset_pred, objects["offset"], reduction="sum") / count
    task = hm_loss + size_weight * size_loss + offset_weight * offset_loss
    return {"task": task, "heatmap": hm_loss, "size": size_loss, "offset": offset_loss}


@torch.no_grad()
def decode_centernet(
    outputs: Mapping[str, Tensor], stride: int, *, top_k: int = 100, threshold: float = 0.0
) -> list[Detections]:
    """Peaks of the heat-map (3x3 max-pool NMS, top-k over classes and cells) -> boxes per image.

    Boxes are xyxy in input pixels, clipped to the input (the map's extent times ``stride``);
    detections with score <= ``threshold`` are dropped.
    """
    heat = torch.sigmoid(outputs["heatmap"].float())
    batch, num_classes, height, width = heat.shape
    peaks = heat * (F.max_pool2d(heat, 3, stride=1, padding=1) == heat)
    scores, index = peaks.reshape(batch, -1).topk(min(top_k, peaks[0].numel()), dim=1)
    labels = index // (height * width)
    cell = index % (height * width)
    ys, xs = (cell // width).float(), (cell % width).float()
    size = outputs["size"].float().reshape(batch, 2, -1).gather(2, cell[:, None].expand(-1, 2, -1)).clamp(min=0)
    offset = outputs["offset"].float().reshape(batch, 2, -1).gather(2, cell[:, None].expand(-1, 2, -1))
    cx, cy = xs + offset[:, 0], ys + offset[:, 1]
    half_w, half_h = size[:, 0] / 2, size[:, 1] / 2
    boxes = torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], dim=2) * stride
    limit = torch.tensor([width, height, width, height], device=boxes.device, dtype=boxes.dtype) * stride
    boxes = torch.minimum(boxes.clamp(min=0), limit)
    out: list[Detections] = []
    for b in range(batch):
        keep = scores[b] > threshold
        out.append((boxes[b][keep], scores[b][keep], labels[b][keep]))
    return out


def multi_hot(targets: Sequence[Mapping[str, Any]], num_classes: int, device: torch.device | None = None) -> Tensor:
    """(B, K) float 0/1: which classes occur in each image's ``labels``."""
    out = torch.zeros(len(targets), num_classes, device=device)
    for b, target in enumerate(targets):
        labels = torch.as_tensor(target["labels"], dtype=torch.long).reshape(-1)
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise ValueError(f"image {b} has a label outside 0..{num_classes - 1}")
        out[b, labels.to(out.device)] = 1.0
    return out


class MultiLabelHead(nn.Module):
    """Pooled features -> K logits (the paper's PASCAL VOC multi-label setting), trained with BCE.

    Accepts an NCHW map (average-pooled), tokens (B, N, C) (mean over tokens) or pooled (B, C).
    """

    def __init__(self, in_features: int, num_classes: int, drop: float = 0.0) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.norm = nn.LayerNorm(in_features)
        self.drop = nn.Dropout(drop)
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, features: Tensor) -> Tensor:
        if features.dim() == 4:
            pooled = features.mean(dim=(2, 3))
        elif features.dim() == 3:
            pooled = features.mean(dim=1)
        elif features.dim() == 2:
            pooled = features
        else:
            raise ValueError(f"expected (B, C, H, W), (B, N, C) or (B, C) features, got {tuple(features.shape)}")
        return self.fc(self.drop(self.norm(pooled)))

    def loss(self, logits: Tensor, targets: Sequence[Mapping[str, Any]]) -> Tensor:
        """Mean BCE-with-logits against the multi-hot labels of ``targets``."""
        return F.binary_cross_entropy_with_logits(logits.float(), multi_hot(targets, self.num_classes, logits.device))
