"""Aggregation operators with ``by``/``without``: sum, avg, min, max, count, group, stddev,
stdvar, topk, bottomk, quantile, count_values.

Rows are sorted by group once; reductions are ``ufunc.reduceat`` down the rows of each group,
so every step of every group is reduced in one call per operator.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from m3shm.query.errors import QueryError
from m3shm.query.goformat import format_float
from m3shm.query.labels import METRIC_NAME, Labels, drop, is_valid_name, keep, with_label
from m3shm.query.values import String, Vector
from m3shm.query.vectors import group_ids, sorted_groups

if TYPE_CHECKING:
    from m3shm.query.engine import Evaluator


def grouping_key(labels: Labels, mod: Any) -> Labels:
    if mod is None:
        return ()
    names = frozenset(mod.labels)
    if str(mod.type).endswith("Without"):
        return drop(labels, names | {METRIC_NAME})
    return keep(labels, names)


def evaluate(ev: Evaluator, node: Any) -> Vector:
    op = str(node.op)
    vec = ev.eval_vector(node.expr)
    param = None
    if node.param is not None:
        p = ev.eval(node.param)
        param = p.value if isinstance(p, String) else ev.eval_scalar(node.param)
    steps = ev.nsteps
    if len(vec) == 0:
        return Vector.empty(steps)
    keys = [grouping_key(lb, node.modifier) for lb in vec.labels]
    gid, uniq = group_ids(keys)
    if op in ("topk", "bottomk"):
        return _topk(vec, gid, len(uniq), np.asarray(param), op == "topk")
    if op == "count_values":
        return _count_values(vec, gid, uniq, str(param))
    if op in ("sum", "avg", "count", "group"):  # one pass in C, no sorted copy
        total, cnt = group_sum(vec.values, vec.present, gid, len(uniq))
        if op == "sum":
            res = total
        elif op == "avg":
            with np.errstate(all="ignore"):
                res = total / cnt
        elif op == "count":
            res = cnt.astype(np.float64)
        else:
            res = np.ones(cnt.shape)
        return Vector(uniq, res, cnt > 0)
    order, starts, sizes = sorted_groups(gid, len(uniq))
    vals, present = vec.values[order], vec.present[order]
    cnt = np.add.reduceat(present.astype(np.int64), starts, axis=0)
    out_present = cnt > 0
    with np.errstate(all="ignore"):
        if op == "quantile":
            res = _quantile(vals, present, gid[order], starts, cnt, np.asarray(param))
        else:
            res = _reduce(op, vals, present, starts, sizes, cnt)
    return Vector(uniq, res, out_present)


def group_sum(values: np.ndarray, present: np.ndarray, gid: np.ndarray, ngroups: int
              ) -> tuple[np.ndarray, np.ndarray]:
    """(sum, count) per group and step (csrc/group_sum.c); the additions in the order of
    ``np.add.reduceat`` over the rows sorted stably by group (what ``_reduce`` does)."""
    from m3shm._native import ffi, lib
    from m3shm.errors import check

    n, s = values.shape
    vals = np.ascontiguousarray(values, dtype=np.float64)
    pres = np.ascontiguousarray(present, dtype=bool).view(np.uint8)
    g = np.ascontiguousarray(gid, dtype=np.int64)
    total = np.empty((ngroups, s), dtype=np.float64)
    cnt = np.empty((ngroups, s), dtype=np.int64)
    seen = np.empty(max(ngroups, 1), dtype=np.uint8)
    check(lib.m3_group_sum(ffi.from_buffer("double[]", vals), ffi.from_buffer("uint8_t[]", pres),
                           ffi.from_buffer("int64_t[]", g), n, s, ngroups,
                           ffi.from_buffer("double[]", total), ffi.from_buffer("int64_t[]", cnt),
                           ffi.from_buffer("uint8_t[]", seen)), "summing groups")
    return total, cnt


def _reduce(op: str, vals: np.ndarray, present: np.ndarray, starts: np.ndarray,
            sizes: np.ndarray, cnt: np.ndarray) -> np.ndarray:
    if op == "count":
        return cnt.astype(np.float64)
    if op == "group":
        return np.ones(cnt.shape)
    if op in ("min", "max"):
        ufunc = np.fmin if op == "min" else np.fmax
        return ufunc.reduceat(np.where(present, vals, np.nan), starts, axis=0)
    total = np.add.reduceat(np.where(present, vals, 0.0), starts, axis=0)
    if op == "sum":
        return total
    mean = total / cnt
    if op == "avg":
        return mean
    if op in ("stddev", "stdvar"):
        dev = np.where(present, vals - np.repeat(mean, sizes, axis=0), 0.0)
        var = np.add.reduceat(dev * dev, starts, axis=0) / cnt
        lo = np.fmin.reduceat(np.where(present, vals, np.nan), starts, axis=0)
        hi = np.fmax.reduceat(np.where(present, vals, np.nan), starts, axis=0)
        var = np.where(lo == hi, 0.0, var)  # equal values: exactly 0, as a running sum gives
        return np.sqrt(var) if op == "stddev" else var
    raise QueryError(f"unknown aggregation {op!r}")


def _rank_keys(vals: np.ndarray, present: np.ndarray, descending: bool,
               nan_first: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(category, value key): numbers, then NaN (or NaN first), then absent rows."""
    nan_cat, num_cat = (0, 1) if nan_first else (1, 0)
    cat = np.where(present, np.where(np.isnan(vals), nan_cat, num_cat), 2)
    key = np.where(cat == num_cat, -vals if descending else vals, 0.0)
    return cat, key


def _topk(vec: Vector, gid: np.ndarray, ngroups: int, k: np.ndarray, top: bool) -> Vector:
    n, s = vec.values.shape
    cat, key = _rank_keys(vec.values, vec.present, top)
    gidb = np.broadcast_to(gid[:, None], (n, s))
    order = np.lexsort((key, cat, gidb), axis=0)  # per step: by group, then rank
    sizes = np.bincount(gid, minlength=ngroups)
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    rank = np.empty((n, s), dtype=np.int64)
    pos = np.broadcast_to(np.arange(n)[:, None], (n, s))
    np.put_along_axis(rank, order, pos - starts[gidb[order, np.arange(s)]], axis=0)
    kk = np.where(np.isnan(k), 0, k).astype(np.int64)
    keep_ = vec.present & (rank < kk[None, :])
    return Vector(vec.labels, vec.values, keep_)


def _quantile(vals: np.ndarray, present: np.ndarray, gid_sorted: np.ndarray,
              starts: np.ndarray, cnt: np.ndarray, q: np.ndarray) -> np.ndarray:
    n, s = vals.shape
    cat, key = _rank_keys(vals, present, False, nan_first=True)  # Prometheus sorts NaN first
    gidb = np.broadcast_to(gid_sorted[:, None], (n, s))
    order = np.lexsort((key, cat, gidb), axis=0)
    sv = np.take_along_axis(vals, order, axis=0)
    c = cnt.astype(np.float64)
    rank = q[None, :] * (c - 1)
    lower = np.clip(np.floor(np.nan_to_num(rank)), 0, None)
    upper = np.minimum(c - 1, lower + 1)
    weight = rank - np.floor(rank)
    li = (starts[:, None] + np.nan_to_num(lower).astype(np.int64)).clip(0, n - 1)
    ui = (starts[:, None] + np.nan_to_num(upper).clip(0).astype(np.int64)).clip(0, n - 1)
    cols = np.arange(s)[None, :]
    res = sv[li, cols] * (1 - weight) + sv[ui, cols] * weight
    res = np.where(q[None, :] < 0, -np.inf, np.where(q[None, :] > 1, np.inf, res))
    return np.where(np.isnan(q)[None, :], np.nan, res)


def _count_values(vec: Vector, gid: np.ndarray, uniq: list[Labels], label: str) -> Vector:
    if not is_valid_name(label):
        raise QueryError(f"invalid label name {label!r}")
    n, s = vec.values.shape
    rows, cols = np.nonzero(vec.present)
    vals = vec.values[rows, cols]
    # Distinct values by bit pattern, every NaN one value (they all print as "NaN").
    bits = np.where(np.isnan(vals), np.nan, vals).view(np.uint64)
    pair = np.stack((gid[rows].astype(np.uint64), bits), axis=1)
    keys, inv = np.unique(pair, axis=0, return_inverse=True)
    inv = inv.ravel()
    counts = np.zeros((len(keys), s))
    np.add.at(counts, (inv, cols), 1.0)
    labels = [with_label(uniq[int(g)], label, format_float(float(np.uint64(b).view(np.float64))))
              for g, b in keys.tolist()]
    return Vector(labels, counts, counts > 0)
