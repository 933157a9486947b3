"""``python -m spa_viz.evaluate`` (= ``spa-viz evaluate detection``): an alias of :mod:`spa_viz.recipes.detection.evaluate`."""

from spa_viz._alias import alias

alias(__name__, "spa_viz.recipes.detection.evaluate")
