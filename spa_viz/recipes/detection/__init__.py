"""Detection recipes: typed training configs (:mod:`.config`), training (:mod:`.train`), evaluation
(:mod:`.evaluate`) and the model card (:mod:`.card`)."""
