"""Benchmarks that print measured ratios: one SPA block against its rivals (:mod:`.block`) and the
Swin-style SPT against a dense Swin (:mod:`.spt`). Speed claims live here, not in timed tests."""
