"""histogram_quantile over classic histograms (one series per ``le`` bucket).

Buckets are grouped by their labels without ``le`` and ``__name__`` (a loop over histograms);
within a histogram every step that has the same set of buckets present is computed at once.
"""

from __future__ import annotations

import math

import numpy as np

from m3shm.query.labels import METRIC_NAME, drop, get
from m3shm.query.values import Vector
from m3shm.query.vectors import group_ids

_DROP = frozenset({"le", METRIC_NAME})


def parse_le(value: str) -> float | None:
    """strconv.ParseFloat as far as bucket bounds go; None when it does not parse."""
    if not value or "_" in value:
        return None
    try:
        return float(value)
    except ValueError:
        return None


def bucket_quantile(q: np.ndarray, bounds: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Quantiles q (k,) of k histograms with the same sorted, distinct upper ``bounds`` (B,)
    and cumulative ``counts`` (B, k)."""
    k = counts.shape[1]
    nb = len(bounds)
    if nb < 2 or not (math.isinf(bounds[-1]) and bounds[-1] > 0):
        res = np.full(k, np.nan)
    else:
        c = np.fmax.accumulate(counts, axis=0)  # buckets must be monotonic
        c = np.where(np.isnan(counts), counts, c)
        obs = c[-1]
        rank = q * obs
        ge = c[:-1] >= rank[None, :]
        b = np.where(ge.any(axis=0), ge.argmax(axis=0), nb - 1)
        cols = np.arange(k)
        bp = np.maximum(b - 1, 0)
        start = np.where(b > 0, bounds[bp], 0.0)
        below = np.where(b > 0, c[bp, cols], 0.0)
        end = bounds[np.minimum(b, nb - 1)]
        count = c[np.minimum(b, nb - 1), cols] - below
        with np.errstate(all="ignore"):
            res = start + (end - start) * ((rank - below) / count)
        res = np.where(b == nb - 1, bounds[nb - 2], res)
        res = np.where((b == 0) & (bounds[0] <= 0), bounds[0], res)
        res = np.where(obs == 0, np.nan, res)
    res = np.where(q < 0, -np.inf, np.where(q > 1, np.inf, res))
    return np.where(np.isnan(q), np.nan, res)


def histogram_quantile(q: np.ndarray, vec: Vector) -> Vector:
    s = vec.values.shape[1]
    rows, les = [], []
    for i, lb in enumerate(vec.labels):
        le = parse_le(get(lb, "le"))
        if le is not None:
            rows.append(i)
            les.append(le)
    if not rows:
        return Vector.empty(s)
    keys = [drop(vec.labels[i], _DROP) for i in rows]
    gid, uniq = group_ids(keys)
    rows_a, les_a = np.array(rows), np.array(les)
    values = np.zeros((len(uniq), s))
    present = np.zeros((len(uniq), s), dtype=bool)
    for g in range(len(uniq)):  # one histogram at a time
        mine = rows_a[gid == g]
        bounds = les_a[gid == g]
        order = np.argsort(bounds, kind="stable")
        mine, bounds = mine[order], bounds[order]
        pres = vec.present[mine]
        present[g] = pres.any(axis=0)
        patterns, inverse = np.unique(pres.T, axis=0, return_inverse=True)
        for p, pattern in enumerate(patterns):
            if not pattern.any():
                continue
            cols = np.flatnonzero(inverse.ravel() == p)
            sel = np.flatnonzero(pattern)
            b = bounds[sel]
            counts = vec.values[mine[sel]][:, cols]
            ub, first = np.unique(b, return_index=True)
            if len(ub) != len(b):  # equal bounds: add their counts
                counts = np.add.reduceat(counts, first, axis=0)
            values[g, cols] = bucket_quantile(q[cols], ub, counts)
    return Vector(uniq, values, present)
