"""``python -m app`` (``spa-viz app`` once installed): serve the SPA microscope (127.0.0.1:7860 by
default; ``--help`` for options).

The process gives gradio a cache folder of its own (unless ``GRADIO_TEMP_DIR`` is set) and removes
it when the server stops, also on SIGTERM.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from spa_viz.io.paths import CHECKPOINTS_ENV_VAR, add_checkpoint_dirs

from . import launch
from .settings import AppSettings, resolve_device

GRADIO_CACHE_ENV = "GRADIO_TEMP_DIR"


def parse_args(argv: Sequence[str] | None = None, prog: str = "python -m app") -> AppSettings:
    """Command-line options -> :class:`AppSettings`; ``--checkpoints`` folders go first on the process's
    checkpoint search path (:func:`spa_viz.io.paths.add_checkpoint_dirs`)."""
    defaults = AppSettings()
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
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
        "--checkpoints",
        action="append",
        type=Path,
        default=[],
        metavar="DIR",
        help=f"a folder of named checkpoints, searched first (repeatable; also ${CHECKPOINTS_ENV_VAR}, then the "
        "checkout's or the installed checkpoints/); users may load from it",
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
    parser.add_argument(
        "--max-params",
        type=int,
        default=defaults.max_params,
        help="largest timm model (in parameters) the app builds when a user names one",
    )
    parser.add_argument("--concurrency", type=int, default=defaults.concurrency, help="requests processed at once")
    parser.add_argument(
        "--threads",
        type=int,
        default=defaults.threads,
        help="torch threads per request (1: fastest on a shared CPU; 0: torch's default)",
    )
    parser.add_argument(
        "--cache-age",
        type=int,
        default=defaults.cache_age_s,
        metavar="SECONDS",
        help="uploads older than this are removed from gradio's cache (checked every --cache-check seconds)",
    )
    parser.add_argument("--cache-check", type=int, default=defaults.cache_check_s, metavar="SECONDS")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    try:
        resolve_device(args.device)
    except (ValueError, RuntimeError) as err:
        parser.error(str(err))
    if args.cache_age < 1 or args.cache_check < 1:
        parser.error("--cache-age and --cache-check take a number of seconds >= 1")
    if missing := [str(p) for p in args.checkpoints if not p.is_dir()]:
        parser.error(f"--checkpoints: no such folder: {', '.join(missing)}")
    add_checkpoint_dirs(args.checkpoints)
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
        max_params=args.max_params,
        concurrency=args.concurrency,
        threads=args.threads,
        cache_age_s=args.cache_age,
        cache_check_s=args.cache_check,
    )


@contextmanager
def private_gradio_cache() -> Iterator[Path]:
    """Point gradio's cache (``GRADIO_TEMP_DIR``) at a fresh folder for this process and remove it at
    the end; a folder the user set is used as is and left in place."""
    given = os.environ.get(GRADIO_CACHE_ENV)
    if given:
        yield Path(given)
        return
    folder = Path(tempfile.mkdtemp(prefix="spa-viz-gradio-"))
    os.environ[GRADIO_CACHE_ENV] = str(folder)
    try:
        yield folder
    finally:
        os.environ.pop(GRADIO_CACHE_ENV, None)
        shutil.rmtree(folder, ignore_errors=True)


def _stop_on_sigterm(signum: int, frame: FrameType | None) -> None:
    """SIGTERM stops the server like Ctrl+C, so the cleanup runs."""
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None, prog: str = "python -m app") -> None:
    """Parse the options and serve until stopped (``prog`` names the command in ``--help``)."""
    settings = parse_args(argv, prog)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    with private_gradio_cache() as folder:
        logging.getLogger(__package__).info("gradio cache: %s", folder)
        launch(settings)


if __name__ == "__main__":
    main()
