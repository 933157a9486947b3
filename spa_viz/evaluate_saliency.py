"""``python -m spa_viz.evaluate_saliency`` (= ``spa-viz evaluate saliency``): an alias of :mod:`spa_viz.recipes.saliency.evaluate`."""

from spa_viz._alias import alias

alias(__name__, "spa_viz.recipes.saliency.evaluate")
