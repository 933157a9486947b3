"""``python -m spa_viz.bench_spt`` (= ``spa-viz bench spt``): an alias of :mod:`spa_viz.benchmarks.spt`."""

from spa_viz._alias import alias

alias(__name__, "spa_viz.benchmarks.spt")
