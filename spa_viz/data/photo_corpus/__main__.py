"""``python -m spa_viz.data.photo_corpus``: :func:`spa_viz.data.photo_corpus.command.main`."""

import sys

from spa_viz.data.photo_corpus.command import main

sys.exit(main())
