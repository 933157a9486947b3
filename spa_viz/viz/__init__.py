"""What people look at: overlays on the image (:mod:`.overlays`), plotly figures (:mod:`.figures`), the
titled panels (:mod:`.panels`), every view of one image that the app, the CLI and the notebooks show
(:mod:`.views`), task adapters (:mod:`.tasks`), the palette (:mod:`.style`) and markdown tables
(:mod:`.tables`)."""
