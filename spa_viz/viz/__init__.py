"""What people look at: overlays on the image (:mod:`.overlays`), plotly figures (:mod:`.figures`), the
titled panels the app and the CLI compose (:mod:`.panels`), task adapters (:mod:`.tasks`), the
palette (:mod:`.style`) and markdown tables (:mod:`.tables`)."""
