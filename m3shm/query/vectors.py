"""Helpers that every operator needs: duplicate label sets and grouping of rows."""

from __future__ import annotations

import numpy as np

from m3shm.query.errors import QueryError
from m3shm.query.labels import Labels, format_labels
from m3shm.query.values import Vector

DUPLICATE_LABELSET = "vector cannot contain metrics with the same labelset"


def group_ids(keys: list[Labels]) -> tuple[np.ndarray, list[Labels]]:
    """Per row the index of its key among the distinct keys (first-seen order)."""
    index: dict[Labels, int] = {}
    gid = np.fromiter((index.setdefault(k, len(index)) for k in keys), dtype=np.int64,
                      count=len(keys))
    return gid, list(index)


def merge_same_labels(vec: Vector, message: str = DUPLICATE_LABELSET) -> Vector:
    """Rows with equal label sets become one row; two of them present at one step is an error
    (``message``), as a Prometheus vector never holds one label set twice."""
    gid, uniq = group_ids(vec.labels)
    if len(uniq) == len(vec.labels):
        return vec
    g, s = len(uniq), vec.values.shape[1]
    counts = np.zeros((g, s), dtype=np.int64)
    np.add.at(counts, gid, vec.present.astype(np.int64))
    if (counts > 1).any():
        bad = uniq[int(np.flatnonzero((counts > 1).any(axis=1))[0])]
        raise QueryError(f"{message}: {format_labels(bad)}")
    flat = (gid[:, None] * s + np.arange(s)[None, :])[vec.present]
    values = np.zeros((g, s))
    values.flat[flat] = vec.values[vec.present]
    times = None
    if vec.times is not None:
        times = np.zeros((g, s), dtype=np.int64)
        times.flat[flat] = vec.times[vec.present]
    return Vector(uniq, values, counts > 0, times)


def sorted_groups(gid: np.ndarray, ngroups: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(order, starts, sizes): rows ordered by group (stable), where each group starts, and
    its size. Every group must be non-empty."""
    order = np.argsort(gid, kind="stable")
    sizes = np.bincount(gid, minlength=ngroups)
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1])).astype(np.int64)
    return order, starts, sizes
