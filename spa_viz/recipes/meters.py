"""The one running mean of logged training scalars."""

from __future__ import annotations

from collections import defaultdict

__all__ = ["RunningMeans"]


class RunningMeans:
    """Means of named scalars since the last :meth:`reset`; ``None`` values are skipped."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    def add(self, **values: float | None) -> None:
        for key, value in values.items():
            if value is not None:
                self.sums[key] += float(value)
                self.counts[key] += 1

    def means(self) -> dict[str, float]:
        return {key: self.sums[key] / self.counts[key] for key in self.sums}

    def reset(self) -> None:
        self.sums.clear()
        self.counts.clear()
