"""Functions over range vectors: the rate family, ``*_over_time``, deriv, predict_linear,
holt_winters, changes, resets.

Every function starts from the (N, S) window bounds ``lo``/``hi`` of windows.locate and reads
the flat samples in place: the first and last sample of a window are gathers, sums are
``reduceat`` over the windows, counts of changes and resets are integer prefix sums.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from m3shm.query.blocks import FlatSeries
from m3shm.query.errors import QueryError
from m3shm.query.labels import drop_name
from m3shm.query.values import RangeData, Vector
from m3shm.query.vectors import merge_same_labels
from m3shm.query.windows import gather_windows, locate, reduce_windows

Windows = tuple[np.ndarray, np.ndarray]

# Series are processed in chunks of about this many samples: the temporaries of a chunk stay
# in cache and below glibc's mmap threshold, so they are reused instead of page-faulted anew.
CHUNK_SAMPLES = 1 << 18


def split(rd: RangeData, max_samples: int | None = None) -> list[RangeData]:
    """The range vector cut into runs of whole series of about ``max_samples`` samples."""
    max_samples = max_samples or CHUNK_SAMPLES
    off = rd.flat.offsets
    if off[-1] <= max_samples or len(off) <= 2:
        return [rd]
    cuts = [0]
    bounds = np.searchsorted(off, np.arange(max_samples, int(off[-1]), max_samples))
    for b in bounds.tolist():
        if b > cuts[-1] and b < len(off) - 1:
            cuts.append(b)
    cuts.append(len(off) - 1)
    out = []
    for a, b in zip(cuts[:-1], cuts[1:], strict=True):
        lo, hi = int(off[a]), int(off[b])
        flat = FlatSeries(rd.flat.labels[a:b], rd.flat.ts[lo:hi], rd.flat.vals[lo:hi],
                          off[a:b + 1] - lo)
        out.append(RangeData(flat, rd.ends, rd.range_ms, rd.from_selector))
    return out


def chunked(fn: Callable[..., Vector], rd: RangeData, *args: Any) -> Vector:
    """``fn(rd, *args)`` run chunk by chunk, the rows stacked in series order."""
    parts = [fn(part, *args) for part in split(rd)]
    if len(parts) == 1:
        return parts[0]
    labels = [lb for p in parts for lb in p.labels]
    vec = Vector(labels, np.concatenate([p.values for p in parts]),
                 np.concatenate([p.present for p in parts]))
    return merge_same_labels(vec)


def windows(rd: RangeData) -> Windows:
    return locate(rd.flat, rd.ends - rd.range_ms, rd.ends)


def _out(rd: RangeData, values: np.ndarray, present: np.ndarray, keep_name: bool = False
         ) -> Vector:
    labels = rd.labels if keep_name else [drop_name(lb) for lb in rd.labels]
    vec = Vector(labels, np.asarray(values, dtype=np.float64), present)
    return vec if keep_name else merge_same_labels(vec)


def _series_start(rd: RangeData) -> np.ndarray:
    """Per sample, a 0/1 flag: 1 where a series begins (pairs never cross series)."""
    starts = np.zeros(len(rd.flat.ts) + 1, dtype=bool)
    starts[rd.flat.offsets[:-1]] = True
    return starts[:-1]


def _pair_counts(rd: RangeData, flags: np.ndarray, lo: np.ndarray, hi: np.ndarray
                 ) -> np.ndarray:
    """How many i with lo < i < hi have flags[i] (flags[i] is about the pair i-1, i)."""
    f = flags & ~_series_start(rd)
    cf = np.concatenate(([0], np.cumsum(f, dtype=np.int64)))
    return np.where(hi > lo, cf[hi] - cf[np.minimum(lo + 1, hi)], 0)


def _prev(v: np.ndarray) -> np.ndarray:
    p = np.empty_like(v)
    p[1:] = v[:-1]
    if len(v):
        p[0] = v[0]
    return p


# ---- the rate family -------------------------------------------------------------------

def extrapolated_rate(rd: RangeData, counter: bool, rate: bool) -> Vector:
    lo, hi = windows(rd)
    n = hi - lo
    ok = n >= 2
    v, t = rd.flat.vals, rd.flat.ts
    if len(v) == 0:
        return _out(rd, np.zeros(lo.shape), ok)
    f, last = np.where(ok, lo, 0), np.where(ok, hi - 1, 0)
    fv, lv = v[f], v[last]
    result = lv - fv
    if counter:
        drops = np.empty(len(v), dtype=bool)
        drops[0] = False
        np.less(v[1:], v[:-1], out=drops[1:])
        starts = rd.flat.offsets[:-1]
        drops[starts[starts < len(v)]] = False
        if drops.any():
            corr = np.where(drops, _prev(v), 0.0)
            result = result + np.where(ok, reduce_windows(np.add, corr, lo + 1, hi, 0.0), 0.0)
    ends = rd.ends[None, :]
    with np.errstate(all="ignore"):
        dur_start = (t[f] - (ends - rd.range_ms)) / 1000.0
        dur_end = (ends - t[last]) / 1000.0
        sampled = (t[last] - t[f]) / 1000.0
        avg = sampled / np.maximum(n - 1, 1)
        if counter:
            to_zero = sampled * (fv / result)
            use = (result > 0) & (fv >= 0) & (to_zero < dur_start)
            dur_start = np.where(use, to_zero, dur_start)
        thr = avg * 1.1
        ext = sampled + np.where(dur_start < thr, dur_start, avg / 2) \
            + np.where(dur_end < thr, dur_end, avg / 2)
        result = result * (ext / sampled)
        if rate:
            result = result / (rd.range_ms / 1000.0)
    return _out(rd, result, ok)


def instant_delta(rd: RangeData, rate: bool) -> Vector:
    lo, hi = windows(rd)
    ok = (hi - lo) >= 2
    v, t = rd.flat.vals, rd.flat.ts
    if len(v) == 0:
        return _out(rd, np.zeros(lo.shape), ok)
    last, prev = np.where(ok, hi - 1, 0), np.where(ok, hi - 2, 0)
    lv, pv = v[last], v[prev]
    with np.errstate(all="ignore"):
        res = np.where(lv < pv, lv, lv - pv) / ((t[last] - t[prev]) / 1000.0) if rate else lv - pv
    return _out(rd, res, ok)


# ---- linear regression -----------------------------------------------------------------

def _regression(rd: RangeData, at_ms: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(slope, value at ``at_ms`` per step, ok) of the least-squares line of each window."""
    lo, hi = windows(rd)
    n = hi - lo
    ok = n >= 2
    flat = rd.flat
    if len(flat.vals) == 0:
        z = np.zeros(lo.shape)
        return z, z, ok
    sid = np.repeat(np.arange(len(flat.labels)), flat.counts)
    t0 = flat.ts[flat.offsets[:-1].clip(max=len(flat.ts) - 1)]
    y0 = flat.vals[flat.offsets[:-1].clip(max=len(flat.ts) - 1)]
    y0 = np.where(np.isfinite(y0), y0, 0.0)
    x = (flat.ts - t0[sid]) / 1000.0  # seconds since the series' first sample
    y = flat.vals - y0[sid]  # shifted: the slope is the same, the sums stay small
    with np.errstate(all="ignore"):
        cnt = n.astype(np.float64)
        sx = reduce_windows(np.add, x, lo, hi, 0.0)
        sy = reduce_windows(np.add, y, lo, hi, 0.0)
        sxy = reduce_windows(np.add, x * y, lo, hi, 0.0)
        sxx = reduce_windows(np.add, x * x, lo, hi, 0.0)
        cov = sxy - sx * sy / cnt
        varx = sxx - sx * sx / cnt
        slope = cov / varx
        mx, my = sx / cnt, sy / cnt
        xc = (at_ms[None, :] - t0[:, None]) / 1000.0
        value = my + slope * (xc - mx) + y0[:, None]
        first = flat.vals[np.where(ok, lo, 0)]
        const = _pair_counts(rd, flat.vals != _prev(flat.vals), lo, hi) == 0
        inf = np.isinf(first)
        slope = np.where(const, np.where(inf, np.nan, 0.0), slope)
        value = np.where(const, np.where(inf, np.nan, first), value)
    return slope, value, ok


def deriv(rd: RangeData) -> Vector:
    slope, _, ok = _regression(rd, rd.ends)
    return _out(rd, slope, ok)


def predict_linear(rd: RangeData, seconds: np.ndarray, at_ms: np.ndarray) -> Vector:
    slope, value, ok = _regression(rd, at_ms)
    return _out(rd, slope * seconds[None, :] + value, ok)


def holt_winters(rd: RangeData, sf: np.ndarray, tf: np.ndarray) -> Vector:
    """Double exponential smoothing, run position by position across all windows at once
    (the same float operations as Prometheus, so the same result)."""
    sf0, tf0 = float(sf[0]), float(tf[0])
    if not 0 < sf0 < 1:
        raise QueryError(f"invalid smoothing factor. Expected: 0 < sf < 1, got: {sf0}")
    if not 0 < tf0 < 1:
        raise QueryError(f"invalid trend factor. Expected: 0 < tf < 1, got: {tf0}")
    lo, hi = windows(rd)
    n = hi - lo
    ok = n >= 2
    v = rd.flat.vals
    if len(v) == 0 or not ok.any():
        return _out(rd, np.zeros(lo.shape), ok)
    idx = np.flatnonzero(ok.ravel())
    wlo, wn = lo.ravel()[idx], n.ravel()[idx]
    s1 = v[wlo].copy()
    b = v[wlo + 1] - v[wlo]
    s0 = np.zeros_like(s1)
    for i in range(1, int(wn.max())):  # positions within a window, vectorised over windows
        act = i < wn
        x = sf0 * v[np.where(act, wlo + i, wlo)]
        if i > 1:
            b = np.where(act, tf0 * (s1 - s0) + (1 - tf0) * b, b)
        y = (1 - sf0) * (s1 + b)
        s0, s1 = np.where(act, s1, s0), np.where(act, x + y, s1)
    out = np.zeros(lo.size)
    out[idx] = s1
    return _out(rd, out.reshape(lo.shape), ok)


# ---- *_over_time -----------------------------------------------------------------------

def over_time(rd: RangeData, kind: str) -> Vector:
    lo, hi = windows(rd)
    n = hi - lo
    ok = n >= 1
    v = rd.flat.vals
    if len(v) == 0 and kind != "count":
        return _out(rd, np.zeros(lo.shape), ok)
    with np.errstate(all="ignore"):
        if kind == "count":
            res = n.astype(np.float64)
        elif kind == "present":
            res = np.ones(lo.shape)
        elif kind == "last":
            return _out(rd, v[np.where(ok, hi - 1, 0)], ok, keep_name=True)
        elif kind == "sum":
            res = reduce_windows(np.add, v, lo, hi)
        elif kind == "avg":
            res = reduce_windows(np.add, v, lo, hi) / n
        elif kind == "min":
            res = reduce_windows(np.fmin, v, lo, hi)
        elif kind == "max":
            res = reduce_windows(np.fmax, v, lo, hi)
        elif kind in ("stddev", "stdvar"):
            res = _stdvar(v, lo, hi)
            if kind == "stddev":
                res = np.sqrt(res)
        else:
            raise QueryError(f"unknown function {kind}_over_time")
    return _out(rd, res, ok)


def _stdvar(v: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    n = (hi - lo).astype(np.float64)
    mean = reduce_windows(np.add, v, lo, hi) / n
    idx, win = gather_windows(lo, hi)
    dev = v[idx] - mean.ravel()[win]
    ssq = np.zeros(lo.size)
    np.add.at(ssq, win, dev * dev)
    var = ssq.reshape(lo.shape) / n
    same = reduce_windows(np.fmin, v, lo, hi) == reduce_windows(np.fmax, v, lo, hi)
    return np.where(same, 0.0, var)


def quantile_over_time(rd: RangeData, q: np.ndarray) -> Vector:
    lo, hi = windows(rd)
    n = hi - lo
    ok = n >= 1
    if len(rd.flat.vals) == 0:
        return _out(rd, np.zeros(lo.shape), ok)
    idx, win = gather_windows(lo, hi)
    vals = rd.flat.vals[idx]
    order = np.lexsort((vals, ~np.isnan(vals), win))  # NaN first, as Prometheus sorts
    sv = vals[order]
    starts = np.cumsum(n.ravel()) - n.ravel()
    qq = np.broadcast_to(q[None, :], lo.shape).ravel()
    c = n.ravel().astype(np.float64)
    with np.errstate(all="ignore"):
        rank = qq * (c - 1)
        lower = np.clip(np.nan_to_num(np.floor(rank)), 0, None)
        upper = np.minimum(c - 1, lower + 1)
        w = rank - np.floor(rank)
        top = max(len(sv) - 1, 0)
        li = np.clip(starts + lower.astype(np.int64), 0, top)
        ui = np.clip(starts + np.clip(upper, 0, None).astype(np.int64), 0, top)
        res = sv[li] * (1 - w) + sv[ui] * w if len(sv) else np.zeros(lo.size)
        res = np.where(qq < 0, -np.inf, np.where(qq > 1, np.inf, res))
        res = np.where(np.isnan(qq), np.nan, res)
    return _out(rd, res.reshape(lo.shape), ok)


def changes(rd: RangeData, resets: bool) -> Vector:
    lo, hi = windows(rd)
    v = rd.flat.vals
    ok = hi > lo
    p = _prev(v)
    flags = v < p if resets else (v != p) & ~(np.isnan(v) & np.isnan(p))
    return _out(rd, _pair_counts(rd, flags, lo, hi).astype(np.float64), ok)


def any_in_window(rd: RangeData) -> np.ndarray:
    """(S,): whether any series has a sample in the window of each step."""
    lo, hi = windows(rd)
    return (hi > lo).any(axis=0) if lo.size else np.zeros(len(rd.ends), dtype=bool)
