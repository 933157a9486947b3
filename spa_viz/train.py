"""``python -m spa_viz.train`` (= ``spa-viz train detection``): an alias of :mod:`spa_viz.recipes.detection.train`."""

from spa_viz._alias import alias

alias(__name__, "spa_viz.recipes.detection.train")
