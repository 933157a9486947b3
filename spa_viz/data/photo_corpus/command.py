"""``python -m spa_viz.data.photo_corpus prepare | summary``: build the corpus once, or show what a
built one holds."""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path

from spa_viz.data.photo_corpus.preparation import default_root, dir_bytes, prepare
from spa_viz.data.photo_corpus.provenance_tables import provenance_markdown
from spa_viz.data.photo_corpus.reader import load_index

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """``prepare`` builds the corpus (or finds it built), ``summary`` reads it; both print its tables."""
    parser = argparse.ArgumentParser(
        prog="python -m spa_viz.data.photo_corpus",
        description="The real-photo corpus of the saliency model: build it once, or show what a built one holds.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("prepare", "fetch the packages, select the photos, cut the views, run the teacher (once)"),
        ("summary", "print what a built corpus holds (packages, photos per split, views, second check)"),
    ):
        command = sub.add_parser(name, help=text)
        command.add_argument("--seed", type=int, default=0)
        command.add_argument("--root", type=Path, default=None, help=f"cache folder (default {default_root()})")
    sub.choices["prepare"].add_argument("--force", action="store_true", help="re-select photos and rewrite the index")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "prepare":
        directory = prepare(seed=args.seed, root=args.root, force=args.force)
        print(directory)
    print(provenance_markdown(seed=args.seed, root=args.root))
    directory, index = load_index(args.seed, None, args.root)
    print(json.dumps({"cache_bytes": dir_bytes(directory), "seconds": index["seconds"]}, indent=1))
    return 0
