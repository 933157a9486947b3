"""``python -m spa_viz.train_saliency`` (= ``spa-viz train saliency``): an alias of :mod:`spa_viz.recipes.saliency.train`."""

from spa_viz._alias import alias

alias(__name__, "spa_viz.recipes.saliency.train")
