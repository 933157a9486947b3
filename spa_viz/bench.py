"""``python -m spa_viz.bench`` (= ``spa-viz bench block``): an alias of :mod:`spa_viz.benchmarks.block`."""

from spa_viz._alias import alias

alias(__name__, "spa_viz.benchmarks.block")
