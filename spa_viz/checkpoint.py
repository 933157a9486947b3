"""The checkpoint format moved to :mod:`spa_viz.io.checkpoint`; ``spa_viz.checkpoint`` is the same module."""

from spa_viz._alias import alias

alias(__name__, "spa_viz.io.checkpoint")
