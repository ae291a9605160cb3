"""The values expressions evaluate to, over all evaluation steps at once.

An instant vector is a matrix: one row per series, one column per step, with a ``present``
mask (a value can be NaN, so NaN cannot mean "no sample"). A range vector is a
:class:`RangeData`: flat samples per series plus, per step, the end of the window to read.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from m3shm.query.blocks import FlatSeries
from m3shm.query.labels import Labels


@dataclass
class Scalar:
    values: np.ndarray  # (S,) float64


@dataclass
class String:
    value: str


@dataclass
class Vector:
    labels: list[Labels]
    values: np.ndarray  # (N, S) float64
    present: np.ndarray  # (N, S) bool
    times: np.ndarray | None = None  # (N, S) int64 sample timestamps (selectors only)

    @classmethod
    def empty(cls, steps: int) -> Vector:
        return cls([], np.zeros((0, steps)), np.zeros((0, steps), dtype=bool))

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, rows: np.ndarray | list[int]) -> Vector:
        rows = np.asarray(rows, dtype=np.int64)
        times = None if self.times is None else self.times[rows]
        return Vector([self.labels[i] for i in rows], self.values[rows], self.present[rows],
                      times)

    def nonempty(self) -> Vector:
        """Without the series that have no sample at any step."""
        rows = np.flatnonzero(self.present.any(axis=1))
        return self if len(rows) == len(self.labels) else self.take(rows)


@dataclass
class RangeData:
    """Samples of a range vector for every step: window s is [ends[s] - range_ms, ends[s]]."""

    flat: FlatSeries
    ends: np.ndarray  # (S,) int64
    range_ms: int
    from_selector: object | None = None  # the VectorSelector node (absent_over_time labels)

    @property
    def labels(self) -> list[Labels]:
        return self.flat.labels


Value = Scalar | String | Vector | RangeData
