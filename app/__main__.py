"""``python -m app``: serve the SPA microscope (127.0.0.1:7860 by default; ``--help`` for options)."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from app import launch
from app.settings import AppSettings, resolve_device


def parse_args(argv: Sequence[str] | None = None) -> AppSettings:
    """Command-line options -> :class:`AppSettings`."""
    defaults = AppSettings()
    parser = argparse.ArgumentParser(prog="python -m app", description=__doc__)
    parser.add_argument("--host", default=defaults.host, help="interface to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=defaults.port)
    parser.add_argument("--share", action="store_true", help="create a public gradio.live link (off by default)")
    parser.add_argument(
        "--device", default=defaults.device, help="auto (CUDA when available, else CPU), cpu, cuda, cuda:1, ..."
    )
    parser.add_argument(
        "--model", dest="default_model", default=None, help="model to open on (checkpoint name, folder or timm name)"
    )
    parser.add_argument(
        "--allow-dir",
        action="append",
        type=Path,
        default=[],
        metavar="DIR",
        help="a further folder users may load checkpoints from (repeatable; also $SPA_VIZ_APP_ALLOW)",
    )
    parser.add_argument("--max-file-size", default=defaults.max_file_size, help="upload limit per file, e.g. 25mb")
    parser.add_argument("--max-batch", type=int, default=defaults.max_batch, help="images per analysis")
    parser.add_argument("--model-cache", type=int, default=defaults.model_cache_size, help="models kept loaded")
    parser.add_argument("--concurrency", type=int, default=defaults.concurrency, help="requests processed at once")
    parser.add_argument(
        "--threads",
        type=int,
        default=defaults.threads,
        help="torch threads per request (1: fastest on a shared CPU; 0: torch's default)",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    try:
        resolve_device(args.device)
    except (ValueError, RuntimeError) as err:
        parser.error(str(err))
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    return AppSettings(
        host=args.host,
        port=args.port,
        share=args.share,
        device=args.device,
        default_model=args.default_model,
        allow_dirs=defaults.allow_dirs + tuple(args.allow_dir),
        max_file_size=args.max_file_size,
        max_batch=args.max_batch,
        model_cache_size=args.model_cache,
        concurrency=args.concurrency,
        threads=args.threads,
    )


def main(argv: Sequence[str] | None = None) -> None:
    launch(parse_args(argv))


if __name__ == "__main__":
    main()
