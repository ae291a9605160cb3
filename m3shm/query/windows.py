"""Locating windows in flat series and reducing over them, for every series and step at once.

Each sample gets a sort key ``series * span + (ts - base)``; the whole selection is then one
sorted array, and a single ``searchsorted`` finds the window bounds of all N x S windows.
Reductions over windows use ``ufunc.reduceat`` on interleaved (start, end) indices, which
reads each window in place: no window is copied out.
"""

from __future__ import annotations

import numpy as np

from m3shm.query.blocks import FlatSeries


def _keys(flat: FlatSeries, lo_q: int, hi_q: int) -> tuple[np.ndarray, int, int] | None:
    n = len(flat.labels)
    if len(flat.ts):
        base = min(int(flat.ts.min()), lo_q)
        top = max(int(flat.ts.max()), hi_q)
    else:
        base, top = lo_q, hi_q
    span = top - base + 2
    if n * span >= 2**62:
        return None
    sid = np.repeat(np.arange(n, dtype=np.int64) * span, flat.counts)
    return sid + (flat.ts - base), base, span


def locate(flat: FlatSeries, start: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi), each (N, S): samples of series n with start[s] <= ts <= end[s] are
    ``lo[n, s] <= i < hi[n, s]`` in the flat arrays."""
    n, s = len(flat.labels), len(start)
    if n == 0 or s == 0:
        z = np.zeros((n, s), dtype=np.int64)
        return z, z.copy()
    start = np.ascontiguousarray(start, dtype=np.int64)
    end = np.ascontiguousarray(end, dtype=np.int64)
    if s == 1 or ((start[1:] >= start[:-1]).all() and (end[1:] >= end[:-1]).all()):
        return _locate_c(flat, start, end)
    k = _keys(flat, int(start.min()), int(end.max()))
    if k is None:  # keys would overflow: one search per series instead
        lo = np.empty((n, s), dtype=np.int64)
        hi = np.empty((n, s), dtype=np.int64)
        for i in range(n):
            a, b = flat.offsets[i], flat.offsets[i + 1]
            lo[i] = a + np.searchsorted(flat.ts[a:b], start, side="left")
            hi[i] = a + np.searchsorted(flat.ts[a:b], end, side="right")
        return lo, hi
    keys, base, span = k
    rowbase = (np.arange(n, dtype=np.int64) * span)[:, None]
    qlo = rowbase + (start - base)[None, :]
    qhi = rowbase + (end - base)[None, :]
    lo = np.searchsorted(keys, qlo.ravel(), side="left").reshape(n, s)
    hi = np.searchsorted(keys, qhi.ravel(), side="right").reshape(n, s)
    return lo, hi


def _locate_c(flat: FlatSeries, start: np.ndarray, end: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray]:
    """csrc/windows.c: steps in time order, two cursors per series (no search)."""
    from m3shm._native import ffi, lib

    n, s = len(flat.labels), len(start)
    lo = np.empty((n, s), dtype=np.int64)
    hi = np.empty((n, s), dtype=np.int64)
    ts = np.ascontiguousarray(flat.ts, dtype=np.int64)
    offs = np.ascontiguousarray(flat.offsets, dtype=np.int64)
    i64 = "int64_t[]"
    rc = lib.m3_windows(ffi.from_buffer(i64, ts), ffi.from_buffer(i64, offs), n,
                        ffi.from_buffer(i64, start), ffi.from_buffer(i64, end), s,
                        ffi.from_buffer(i64, lo), ffi.from_buffer(i64, hi))
    if rc:
        raise ValueError("window bounds: series offsets or steps out of order")
    return lo, hi


def reduce_windows(ufunc: np.ufunc, a: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                   empty: float = np.nan) -> np.ndarray:
    """``ufunc.reduce(a[lo:hi])`` for every window; ``empty`` where lo >= hi."""
    shape = lo.shape
    lo1, hi1 = lo.ravel(), hi.ravel()
    if lo1.size == 0:
        return np.full(shape, empty, dtype=a.dtype if a.dtype != bool else np.float64)
    padded = np.concatenate((a, a[:1] if len(a) else np.zeros(1, dtype=a.dtype)))
    idx = np.empty(2 * lo1.size, dtype=np.int64)
    idx[0::2] = lo1
    idx[1::2] = hi1
    np.minimum(idx, len(a), out=idx)
    out = ufunc.reduceat(padded, idx)[0::2]
    res = out.astype(np.float64) if out.dtype != np.float64 else out
    res[lo1 >= hi1] = empty
    return res.reshape(shape)


def gather_windows(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sample indices of every non-empty window and the window each belongs to (flat index
    into lo.ravel()). Copies the windows out: for the few functions that need to sort them."""
    lo1, hi1 = lo.ravel(), hi.ravel()
    cnt = np.maximum(hi1 - lo1, 0)
    total = int(cnt.sum())
    win = np.repeat(np.arange(lo1.size, dtype=np.int64), cnt)
    starts = np.cumsum(cnt) - cnt
    idx = np.arange(total, dtype=np.int64) - np.repeat(starts, cnt) + np.repeat(lo1, cnt)
    return idx, win
