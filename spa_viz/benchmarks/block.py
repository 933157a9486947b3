"""Per-block benchmark: dense ViT block vs masked selection vs pad-to-max vs SPA packing.

Run ``spa-viz bench block`` (``--quick`` for a short run, ``--json PATH``
to save results).
One transformer block of ViT-S width (dim 384, 6 heads, MLP 4x, 196 patch tokens + 1 class token)
runs in these ways on the same weights and the same inputs:

* ``dense``: timm's ``Block`` (fused SDPA), every token;
* ``masked``: DynamicViT-style training-time selection: every token computed, dropped tokens masked
  out as attention keys, and their input passed through as output (no saving);
* ``pad``: each image's kept tokens gathered into a ``(B, max_kept, C)`` batch with a key-padding
  mask, run through the block, and scattered back;
* ``spa-c<L>``: the library's SPA block (``convert_block`` + ``TokenGate``), container policy, length L;
* ``spa-image``: the library's SPA block, image policy (first-fit-decreasing rows).

The SPA blocks run exactly as the library runs them (gate, selection, plan, pack, attention, MLP,
unpack). Their keep mask is forced by the input: channel 0 of every patch token carries a logit of
``+-logit`` (kept / dropped) and the gate reads only that channel. In training the Gumbel noise of
``select_tokens`` is bounded by ``log(1e6) ~ 13.8`` (its uniform draw is clamped to
``[1e-6, 1 - 1e-6]``), so a logit magnitude of 16 makes the training-mode selection deterministic.

FLOPs are analytic forward FLOPs (``spa_viz.analysis.flops``); the realized fraction of a variant is
``(dense time / variant time) / (dense FLOPs / variant FLOPs)``, so 1.0 means the time saving equals
the FLOP saving. Training steps (forward + backward of the output sum) use the same forward-FLOP
ratio, since backward FLOPs scale with forward FLOPs for every matrix product here.

Timing: :func:`spa_viz.io.timer.time_paired`, the variants alternating in one loop after warm-up
(each round starting one variant later), median of the repeats, with all CPU cores by default
(``--threads``). On a shared machine each run first waits for other processes to go idle and
disturbed runs are repeated (:class:`~spa_viz.io.timer.QuietGuard`, ``--quiet-budget``); where the
machine stays busy,
``--threads 1 --clock cpu`` times this process's CPU time instead, which others cannot inflate.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import timm
import torch
from timm.models.vision_transformer import Block
from torch import Tensor, nn
from tqdm import tqdm

from spa_viz.analysis.flops import dense_block_macs, spa_block_macs
from spa_viz.benchmarks.backbone import SHIPPED, BackboneResult, bench_checkpoints, environment, format_backbone_table
from spa_viz.io.timer import CLOCKS, QuietGuard, stopwatch, time_paired
from spa_viz.layers.block import BlockCosts, SPAContext, convert_block
from spa_viz.layers.config import SPAConfig
from spa_viz.layers.gate import TokenGate
from spa_viz.viz.tables import markdown_table

__all__ = [
    "BenchConfig",
    "Measurement",
    "TargetCheck",
    "Variant",
    "make_block",
    "make_inputs",
    "build_variants",
    "masked_forward",
    "pad_forward",
    "run_cell",
    "run_benchmark",
    "check_targets",
    "format_table",
    "main",
]

_log = logging.getLogger(__name__)

MODES = ("inference", "training")
PRIMARY_SPA = "spa-c49"


@dataclass(frozen=True)
class BenchConfig:
    """What to benchmark: block shape, grid of (mode, batch, keep), variants and timing settings."""

    dim: int = 384
    heads: int = 6
    mlp_ratio: float = 4.0
    grid: tuple[int, int] = (14, 14)
    num_prefix: int = 1
    batches: tuple[int, ...] = (32, 1)
    keeps: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
    spread: float = 0.1
    modes: tuple[str, ...] = MODES
    container_lens: tuple[int, ...] = (49, 98)
    soft_gating: bool = True
    logit: float = 16.0
    warmup: int = 2
    repeats: int = 7
    quiet_budget: float = 0.0
    clock: str = "wall"
    seed: int = 0
    device: str = "cpu"

    @property
    def patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def tokens(self) -> int:
        return self.patches + self.num_prefix


@dataclass(frozen=True)
class Variant:
    """One way to run the block: its module, a forward on ``x`` (B, T, C), and its forward FLOPs."""

    name: str
    module: nn.Module
    forward: Callable[[Tensor], Tensor]
    flops: int
    layout: str = ""


@dataclass
class Measurement:
    """Timing and FLOPs of one variant in one (mode, batch, keep) cell."""

    mode: str
    batch: int
    keep: float
    keep_real: float
    variant: str
    time_ms: float
    times_ms: list[float]
    flops: int
    dense_time_ms: float
    dense_flops: int
    layout: str = ""
    disturbed_runs: int = 0  # timed runs of this cell (all variants) that other processes disturbed

    @property
    def speedup(self) -> float:
        """Dense time over this variant's time."""
        return self.dense_time_ms / self.time_ms

    @property
    def flop_ratio(self) -> float:
        """Dense FLOPs over this variant's FLOPs."""
        return self.dense_flops / self.flops

    @property
    def realized_fraction(self) -> float:
        """(dense time / time) / (dense FLOPs / FLOPs): share of the FLOP saving realized in time."""
        return self.speedup / self.flop_ratio

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(speedup=self.speedup, flop_ratio=self.flop_ratio, realized_fraction=self.realized_fraction)
        return data


@dataclass(frozen=True)
class TargetCheck:
    """One target, whether it was met, and the numbers behind it."""

    name: str
    passed: bool | None
    detail: str

    @property
    def verdict(self) -> str:
        return {True: "PASS", False: "MISS", None: "N/A"}[self.passed]


def make_block(config: BenchConfig) -> Block:
    """A timm ViT block of the configured width with ViT-style init (qkv bias), seeded."""
    torch.manual_seed(config.seed)
    block = Block(config.dim, config.heads, mlp_ratio=config.mlp_ratio, qkv_bias=True)
    for module in block.modules():
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)
    return block.to(config.device)


def _keep_counts(batch: int, patches: int, mean: float, spread: float, generator: torch.Generator) -> Tensor:
    """Kept patch tokens per image: ratios evenly spread over ``mean +- spread``, shuffled, clipped."""
    offsets = torch.linspace(-spread, spread, batch) if batch > 1 else torch.zeros(1)
    ratios = (mean + offsets)[torch.randperm(batch, generator=generator)]
    return (ratios * patches).round().long().clamp(1, patches)


def make_inputs(config: BenchConfig, batch: int, keep: float) -> tuple[Tensor, Tensor]:
    """Tokens ``x`` (B, T, C) and the keep mask (B, T) (prefix tokens always kept), seeded.

    Kept patch tokens sit at random positions; channel 0 of each patch token carries ``+-logit``
    so the SPA gate (which reads channel 0) keeps exactly the intended tokens.
    """
    generator = torch.Generator().manual_seed(config.seed + 1000 * batch + round(1000 * keep))
    counts = _keep_counts(batch, config.patches, keep, config.spread, generator)
    keep_patch = torch.zeros(batch, config.patches, dtype=torch.bool)
    for image, count in enumerate(counts.tolist()):
        keep_patch[image, torch.randperm(config.patches, generator=generator)[:count]] = True
    x = torch.randn(batch, config.tokens, config.dim, generator=generator)
    x[:, config.num_prefix :, 0] = torch.where(keep_patch, config.logit, -config.logit)
    keep_all = torch.cat([torch.ones(batch, config.num_prefix, dtype=torch.bool), keep_patch], dim=1)
    return x.to(config.device), keep_all.to(config.device)


def masked_forward(block: nn.Module, x: Tensor, keep: Tensor) -> Tensor:
    """DynamicViT-style masked block: all tokens computed, dropped keys masked, dropped tokens unchanged."""
    out = block(x, attn_mask=keep[:, None, None, :])
    return torch.where(keep.unsqueeze(-1), out, x)


def pad_forward(block: nn.Module, x: Tensor, keep: Tensor) -> Tensor:
    """Pad-to-max block: kept tokens gathered into (B, max_kept, C) with a key-padding mask, then scattered back."""
    batch, seq_len, dim = x.shape
    counts = keep.sum(1)
    width = int(counts.max())
    order = torch.argsort((~keep).to(torch.uint8), dim=1, stable=True)[:, :width]
    valid = torch.arange(width, device=x.device) < counts[:, None]
    gathered = x.gather(1, order.unsqueeze(-1).expand(batch, width, dim))
    out = block(gathered, attn_mask=valid[:, None, None, :])
    sources = (order + seq_len * torch.arange(batch, device=x.device)[:, None])[valid]
    return x.reshape(batch * seq_len, dim).index_copy(0, sources, out[valid]).view(batch, seq_len, dim)


def _spa_block(
    block: Block, config: BenchConfig, policy: str, container_len: int | None
) -> tuple[nn.Module, SPAContext]:
    """A copy of ``block`` converted to an SPA block whose gate reads channel 0 as the keep logit."""
    spa_config = SPAConfig(policy=policy, container_len=container_len, soft_gating=config.soft_gating)
    ctx = SPAContext(config=spa_config, num_prefix=config.num_prefix)
    gate = TokenGate(config.dim).to(config.device)
    with torch.no_grad():
        gate.proj.weight.zero_()
        gate.proj.weight[0, 0] = 1.0
        gate.proj.bias.zero_()
    return convert_block(copy.deepcopy(block), gate, ctx, layer=0), ctx


def _spa_variant(name: str, block: nn.Module, ctx: SPAContext, x: Tensor, grid: tuple[int, int]) -> Variant:
    """Wrap an SPA block; FLOPs come from its traced decision on ``x`` (eval, no grad)."""

    def forward(tokens: Tensor) -> Tensor:
        ctx.begin(grid)
        return block(tokens)

    training = block.training
    block.eval()
    ctx.records = []
    with torch.no_grad():
        forward(x)
    decision = ctx.records[0]
    ctx.records = None
    block.train(training)
    plan = decision.plan
    layout = f"{plan.num_rows}x{plan.row_len} fill {plan.fill_ratio:.2f}"
    return Variant(name, block, forward, 2 * spa_block_macs(decision), layout)


def build_variants(block: Block, x: Tensor, keep: Tensor, config: BenchConfig) -> dict[str, Variant]:
    """All variants for one input, sharing ``block``'s weights (SPA variants use converted copies)."""
    batch, seq_len, _ = x.shape
    costs = BlockCosts.of(block)
    dense_flops = 2 * dense_block_macs(costs, seq_len, batch)
    width = int(keep.sum(1).max())
    variants = {
        "dense": Variant("dense", block, block, dense_flops, f"{batch}x{seq_len}"),
        "masked": Variant("masked", block, lambda t: masked_forward(block, t, keep), dense_flops, f"{batch}x{seq_len}"),
        "pad": Variant(
            "pad",
            block,
            lambda t: pad_forward(block, t, keep),
            2 * dense_block_macs(costs, width, batch),
            f"{batch}x{width}",
        ),
    }
    for length in config.container_lens:
        spa, ctx = _spa_block(block, config, "container", length)
        variants[f"spa-c{length}"] = _spa_variant(f"spa-c{length}", spa, ctx, x, config.grid)
    spa, ctx = _spa_block(block, config, "image", None)
    variants["spa-image"] = _spa_variant("spa-image", spa, ctx, x, config.grid)
    return variants


def _step(variant: Variant, x: Tensor, training: bool) -> Callable[[], None]:
    """One timed unit: a no-grad forward (inference) or forward + backward of the output sum (training)."""
    if not training:

        def infer() -> None:
            with torch.no_grad():
                variant.forward(x)

        return infer

    def train() -> None:
        variant.forward(x).sum().backward()

    return train


def _reset_grads(variant: Variant, x: Tensor) -> None:
    variant.module.zero_grad(set_to_none=True)
    x.grad = None


def run_cell(
    config: BenchConfig, block: Block, mode: str, batch: int, keep: float, guard: QuietGuard | None = None
) -> list[Measurement]:
    """Time every variant on one (mode, batch, keep) input with :func:`~spa_viz.io.timer.time_paired`
    (alternating, each round starting one variant later), medians in ms."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
    training = mode == "training"
    x, keep_mask = make_inputs(config, batch, keep)
    variants = build_variants(block, x, keep_mask, config)
    for variant in variants.values():
        variant.module.train(training)
    x = x.requires_grad_(training)
    timing = time_paired(
        {name: _step(v, x, training) for name, v in variants.items()},
        config.repeats,
        config.warmup,
        config.device,
        clock=config.clock,
        rotate=True,
        before=lambda name: _reset_grads(variants[name], x),
        guard=guard,
    )
    block.train(False)
    keep_real = float(keep_mask[:, config.num_prefix :].float().mean())
    return [
        Measurement(
            mode=mode,
            batch=batch,
            keep=keep,
            keep_real=keep_real,
            variant=name,
            time_ms=1e3 * timing.median(name),
            times_ms=[1e3 * seconds for seconds in timing.runs[name]],
            flops=variant.flops,
            dense_time_ms=1e3 * timing.median("dense"),
            dense_flops=variants["dense"].flops,
            layout=variant.layout,
            disturbed_runs=timing.disturbed,
        )
        for name, variant in variants.items()
    ]


def run_benchmark(config: BenchConfig, progress: bool = True) -> list[Measurement]:
    """Every (mode, batch, keep) cell of ``config``; one shared block of weights."""
    block = make_block(config)
    guard = QuietGuard(config.quiet_budget) if torch.device(config.device).type == "cpu" else None
    cells = [(m, b, k) for m in config.modes for b in config.batches for k in config.keeps]
    results: list[Measurement] = []
    bar = tqdm(cells, disable=not progress, unit="cell")
    for mode, batch, keep in bar:
        bar.set_description(f"{mode} B={batch} keep={keep}")
        cell = run_cell(config, block, mode, batch, keep, guard)
        _log.debug("%s", [(m.variant, round(m.time_ms, 2)) for m in cell])
        results.extend(cell)
    if guard is not None and guard.active:
        disturbed = sum(m.disturbed_runs for m in results if m.variant == "dense")
        _log.info(
            "waited %.0f s for an idle CPU, re-ran %d disturbed runs; %d kept disturbed",
            guard.waited,
            guard.reruns,
            disturbed,
        )
    return results


def _find(results: Sequence[Measurement], mode: str, batch: int, keep: float, variant: str) -> Measurement | None:
    for m in results:
        if (m.mode, m.batch, m.variant) == (mode, batch, variant) and abs(m.keep - keep) < 1e-9:
            return m
    return None


def check_targets(results: Sequence[Measurement], spa: str = PRIMARY_SPA, batch: int = 32) -> list[TargetCheck]:
    """The issue's targets for SPA variant ``spa`` at ``batch`` (N/A where a cell was not measured)."""
    checks: list[TargetCheck] = []
    for mode, floor in (("inference", 0.75), ("training", 0.65)):
        m = _find(results, mode, batch, 0.3, spa)
        name = f"{spa} {mode} B={batch} keep=0.3: realized fraction >= {floor}"
        if m is None:
            checks.append(TargetCheck(name, None, "not measured"))
        else:
            detail = f"{m.realized_fraction:.2f} (speed-up {m.speedup:.2f}x, FLOP ratio {m.flop_ratio:.2f}x)"
            checks.append(TargetCheck(name, m.realized_fraction >= floor, detail))
    for mode in MODES:
        keeps = sorted({m.keep for m in results if m.mode == mode and m.batch == batch and m.keep <= 0.7 + 1e-9})
        for rival in ("masked", "pad"):
            name = f"{spa} {mode} B={batch}: faster than {rival} at every keep <= 0.7"
            pairs = [(k, _find(results, mode, batch, k, spa), _find(results, mode, batch, k, rival)) for k in keeps]
            pairs = [(k, s, r) for k, s, r in pairs if s is not None and r is not None]
            if not pairs:
                checks.append(TargetCheck(name, None, "not measured"))
                continue
            detail = ", ".join(f"{k}: {s.time_ms:.1f} vs {r.time_ms:.1f} ms" for k, s, r in pairs)
            checks.append(TargetCheck(name, all(s.time_ms < r.time_ms for _, s, r in pairs), detail))
        m = _find(results, mode, batch, 0.9, spa)
        name = f"{spa} {mode} B={batch} keep=0.9: time <= 1.15x dense"
        if m is None:
            checks.append(TargetCheck(name, None, "not measured"))
        else:
            ratio = m.time_ms / m.dense_time_ms
            detail = f"{ratio:.2f}x ({m.time_ms:.1f} vs {m.dense_time_ms:.1f} ms)"
            checks.append(TargetCheck(name, ratio <= 1.15, detail))
    return checks


def format_table(results: Sequence[Measurement]) -> str:
    """A markdown table per (mode, batch)."""
    parts: list[str] = []
    groups = sorted({(m.mode, m.batch) for m in results}, key=lambda g: (MODES.index(g[0]), -g[1]))
    header = ["keep", "kept", "variant", "time ms", "GFLOPs", "speed-up", "FLOP ratio", "realized", "layout"]
    align = ["right", "right", "left", "right", "right", "right", "right", "right", "left"]
    for mode, batch in groups:
        busy = sum(m.disturbed_runs for m in results if (m.mode, m.batch, m.variant) == (mode, batch, "dense"))
        parts.append(f"\n### {mode}, batch {batch} (timed runs disturbed by other processes: {busy})\n")
        rows = [
            [
                f"{m.keep:.1f}",
                f"{m.keep_real:.3f}",
                m.variant,
                f"{m.time_ms:.2f}",
                f"{m.flops / 1e9:.3f}",
                f"{m.speedup:.2f}",
                f"{m.flop_ratio:.2f}",
                f"{m.realized_fraction:.2f}",
                m.layout,
            ]
            for m in results
            if (m.mode, m.batch) == (mode, batch)
        ]
        parts.append(markdown_table(header, rows, align))
    return "\n".join(parts)


def _environment(config: BenchConfig) -> dict[str, Any]:
    env: dict[str, Any] = {
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": config.device,
    }
    if hasattr(os, "getloadavg"):
        env["load_average"] = os.getloadavg()
    if config.device.startswith("cuda"):
        env["cuda_device"] = torch.cuda.get_device_name(torch.device(config.device))
    return env


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="spa-viz bench block", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short run: keeps 0.3/0.7/0.9, warm-up 1, 3 repeats")
    parser.add_argument("--json", metavar="PATH", help="write config, environment, results and targets here")
    parser.add_argument("--batch", type=int, nargs="+", help="batch sizes (default 32 1)")
    parser.add_argument("--keep", type=float, nargs="+", help="mean keep ratios (default 0.1 0.3 0.5 0.7 0.9)")
    parser.add_argument("--mode", choices=MODES, nargs="+", help="inference and/or training (default both)")
    parser.add_argument("--container-len", type=int, nargs="+", help="SPA container lengths L (default 49 98)")
    parser.add_argument("--repeats", type=int, help="timed repeats per variant (default 7)")
    parser.add_argument("--warmup", type=int, help="warm-up runs per variant (default 2)")
    parser.add_argument(
        "--quiet-budget",
        type=float,
        help="on CPU, seconds in all to spend waiting for other processes to go idle and re-running runs "
        "they disturbed (at most 10 s of waiting per run; default 900, 60 with --quick; 0: off)",
    )
    parser.add_argument(
        "--clock",
        choices=CLOCKS,
        default="wall",
        help="wall: perf_counter (default); cpu: process CPU time, robust to other processes on a shared "
        "machine, use with --threads 1",
    )
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads (default: all cores)")
    parser.add_argument("--no-soft-gating", action="store_true", help="SPA blocks without soft gating")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--backbones",
        nargs="*",
        default=list(SHIPPED),
        metavar="CHECKPOINT",
        help="shipped SPA checkpoints whose whole backbones to time against their dense twins at batch 1, 4 "
        f"and 32, 1 thread (default: {' '.join(SHIPPED)}; none: skip)",
    )
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser.parse_args(argv)


def _config_from_args(args: argparse.Namespace) -> BenchConfig:
    config = BenchConfig(device=args.device, seed=args.seed, soft_gating=not args.no_soft_gating, quiet_budget=900.0)
    if args.quick:
        config = replace(config, keeps=(0.3, 0.7, 0.9), warmup=1, repeats=3, quiet_budget=60.0)
    overrides: dict[str, Any] = {}
    if args.batch:
        overrides["batches"] = tuple(args.batch)
    if args.keep:
        overrides["keeps"] = tuple(args.keep)
    if args.mode:
        overrides["modes"] = tuple(args.mode)
    if args.container_len:
        overrides["container_lens"] = tuple(args.container_len)
    if args.repeats is not None:
        overrides["repeats"] = args.repeats
    if args.warmup is not None:
        overrides["warmup"] = args.warmup
    if args.clock != "wall":
        overrides["clock"] = args.clock
    if args.quiet_budget is not None:
        overrides["quiet_budget"] = args.quiet_budget
    config = replace(config, **overrides)
    if config.repeats < 1 or config.warmup < 0:
        raise SystemExit("--repeats must be >= 1 and --warmup >= 0")
    if any(not 0.0 < k <= 1.0 for k in config.keeps):
        raise SystemExit("--keep ratios must lie in (0, 1]")
    return config


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: run the grid, print the markdown table and the target checks."""
    args = _parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    config = _config_from_args(args)
    env = _environment(config)
    if config.clock == "cpu" and torch.get_num_threads() > 1:
        _log.warning("--clock cpu sums the CPU time of %d threads; use --threads 1", torch.get_num_threads())
    _log.info("config %s", config)
    _log.info("environment %s", env)
    with stopwatch() as timing:
        results = run_benchmark(config, progress=not args.no_progress)
        checks = check_targets(results)
    print(
        f"\n## SPA per-block benchmark (dim {config.dim}, {config.heads} heads, {config.tokens} tokens, "
        f"device {config.device}, {env['torch_threads']} threads, {config.clock} clock, torch {env['torch']})"
    )
    print(format_table(results))
    print("\n## Targets (batch 32)\n")
    for check in checks:
        print(f"- {check.verdict}: {check.name}: {check.detail}")
    backbones: list[BackboneResult] = []
    if args.backbones:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            backbones = bench_checkpoints(args.backbones, repeats=15 if args.quick else 40)
        finally:
            torch.set_num_threads(threads)
        print("\n## Whole backbones of the shipped checkpoints vs their dense twins (real test images, 1 thread)\n")
        print(format_backbone_table(backbones))
    elapsed = timing.wall
    _log.info("benchmark took %.1f s", elapsed)
    if args.json:
        payload = {
            "config": asdict(config),
            "environment": env,
            "elapsed_s": elapsed,
            "results": [m.to_dict() for m in results],
            "targets": [dict(asdict(c), verdict=c.verdict) for c in checks],
            "backbones": {"environment": environment(1), "results": [r.to_dict() for r in backbones]},
        }
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=2)
        _log.info("wrote %s", args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
