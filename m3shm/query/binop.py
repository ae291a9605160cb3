"""Binary operators: arithmetic, comparisons (filtering or ``bool``), set operators, and
vector matching with ``on``/``ignoring`` and ``group_left``/``group_right``.

Matching pairs series once (a loop over series to compute signatures), then every operator is
one numpy expression over the paired (pairs x steps) matrices.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from m3shm.query.errors import QueryError
from m3shm.query.labels import METRIC_NAME, Labels, drop, drop_name, format_labels, keep
from m3shm.query.values import Scalar, Vector
from m3shm.query.vectors import group_ids, merge_same_labels

if TYPE_CHECKING:
    from m3shm.query.engine import Evaluator

ARITHMETIC = {"+": np.add, "-": np.subtract, "*": np.multiply, "/": np.divide,
              "%": np.fmod, "^": np.power, "atan2": np.arctan2}
COMPARISON = {"==": np.equal, "!=": np.not_equal, ">": np.greater, "<": np.less,
              ">=": np.greater_equal, "<=": np.less_equal}
SET_OPS = ("and", "or", "unless")
DROPS_NAME = frozenset(ARITHMETIC) - {"atan2"}  # Prometheus 2.x keeps the name for atan2


def apply(op: str, lv: np.ndarray, rv: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(values, keep): keep is None for arithmetic; for comparisons values are the lhs."""
    with np.errstate(all="ignore"):
        if op in ARITHMETIC:
            return ARITHMETIC[op](lv, rv), None
        if op in COMPARISON:
            return np.broadcast_to(lv, np.broadcast_shapes(np.shape(lv), np.shape(rv))), \
                COMPARISON[op](lv, rv)
    raise QueryError(f"operator {op!r} not allowed here")


class Matching:
    """The vector matching of one binary expression, read off the parser's modifier."""

    def __init__(self, op: str, mod: Any) -> None:
        self.on = False
        self.names: frozenset[str] = frozenset()
        self.include: list[str] = []
        self.card = "ManyToMany" if op in SET_OPS else "OneToOne"
        self.return_bool = False
        if mod is None:
            return
        self.return_bool = bool(mod.return_bool)
        if mod.matching is not None:
            self.on = str(mod.matching.type).endswith("Include")
            self.names = frozenset(mod.matching.labels)
        self.card = str(mod.card).rsplit(".", 1)[-1]
        self.include = list(mod.group_labels or [])

    def signature(self, labels: Labels) -> Labels:
        if self.on:
            return keep(labels, self.names)
        return drop(labels, self.names | {METRIC_NAME})


def evaluate(ev: Evaluator, node: Any) -> Scalar | Vector:
    op = str(node.op)
    lhs, rhs = ev.eval(node.lhs), ev.eval(node.rhs)
    m = Matching(op, node.modifier)
    if isinstance(lhs, Scalar) and isinstance(rhs, Scalar):
        vals, cond = apply(op, lhs.values, rhs.values)
        if cond is not None:
            if not m.return_bool:
                raise QueryError("comparisons between scalars must use BOOL modifier")
            vals = cond.astype(np.float64)
        return Scalar(np.asarray(vals, dtype=np.float64))
    if isinstance(lhs, Vector) and isinstance(rhs, Vector):
        if op in SET_OPS:
            return set_op(op, lhs, rhs, m)
        return vector_vector(op, lhs, rhs, m)
    if isinstance(lhs, Vector) and isinstance(rhs, Scalar):
        return vector_scalar(op, lhs, rhs.values, m, swap=False)
    if isinstance(lhs, Scalar) and isinstance(rhs, Vector):
        return vector_scalar(op, rhs, lhs.values, m, swap=True)
    raise QueryError(f"binary operator {op!r} between {type(lhs).__name__.lower()} and "
                     f"{type(rhs).__name__.lower()}")


def vector_scalar(op: str, vec: Vector, sv: np.ndarray, m: Matching, swap: bool) -> Vector:
    row = sv[None, :]
    lv, rv = (row, vec.values) if swap else (vec.values, row)
    vals, cond = apply(op, lv, rv)
    present = vec.present
    drop_names = op in DROPS_NAME
    if cond is not None:
        if m.return_bool:
            vals, drop_names = cond.astype(np.float64), True
        else:
            vals, present = vec.values, present & cond
    labels = [drop_name(lb) for lb in vec.labels] if drop_names else vec.labels
    out = Vector(labels, np.array(vals, dtype=np.float64), present)
    return merge_same_labels(out) if drop_names else out


def _sig_presence(sig_ids: np.ndarray, nsig: int, present: np.ndarray) -> np.ndarray:
    """(nsig, S): whether any row of each signature is present at each step."""
    out = np.zeros((nsig, present.shape[1]), dtype=np.int64)
    np.add.at(out, sig_ids, present.astype(np.int64))
    return out > 0


def set_op(op: str, lhs: Vector, rhs: Vector, m: Matching) -> Vector:
    lsig = [m.signature(lb) for lb in lhs.labels]
    rsig = [m.signature(lb) for lb in rhs.labels]
    ids, uniq = group_ids(lsig + rsig)
    lid, rid = ids[: len(lsig)], ids[len(lsig):]
    if op == "or":
        lpres = _sig_presence(lid, len(uniq), lhs.present)
        rpresent = rhs.present & ~lpres[rid]
        out = Vector(lhs.labels + rhs.labels, np.concatenate((lhs.values, rhs.values)),
                     np.concatenate((lhs.present, rpresent)))
        return merge_same_labels(out)
    rpres = _sig_presence(rid, len(uniq), rhs.present)
    hit = rpres[lid]
    present = lhs.present & (hit if op == "and" else ~hit)
    return Vector(lhs.labels, lhs.values, present)


def vector_vector(op: str, lhs: Vector, rhs: Vector, m: Matching) -> Vector:
    if m.card == "ManyToMany":
        raise QueryError("many-to-many matching is only allowed for set operators")
    swapped = m.card == "OneToMany"
    many, one = (rhs, lhs) if swapped else (lhs, rhs)
    one_side = "left" if swapped else "right"
    msig = [m.signature(lb) for lb in many.labels]
    osig = [m.signature(lb) for lb in one.labels]
    ids, uniq = group_ids(osig + msig)
    oid, mid = ids[: len(osig)], ids[len(osig):]
    # The 'one' side must hold each signature at most once per step.
    counts = np.zeros((len(uniq), one.present.shape[1]), dtype=np.int64)
    np.add.at(counts, oid, one.present.astype(np.int64))
    if (counts > 1).any():
        g = int(np.flatnonzero((counts > 1).any(axis=1))[0])
        raise QueryError(f"found duplicate series for the match group {format_labels(uniq[g])} "
                         f"on the {one_side} hand-side of the operation; many-to-many matching "
                         "not allowed: matching labels must be unique on one side")
    members: dict[int, list[int]] = {}
    for j, g in enumerate(oid.tolist()):
        members.setdefault(g, []).append(j)
    pm: list[int] = []
    po: list[int] = []
    for i, g in enumerate(mid.tolist()):
        for j in members.get(g, ()):
            pm.append(i)
            po.append(j)
    steps = many.values.shape[1]
    if not pm:
        return Vector.empty(steps)
    pmi, poi = np.array(pm), np.array(po)
    mv, ov = many.values[pmi], one.values[poi]
    lv, rv = (ov, mv) if swapped else (mv, ov)
    vals, cond = apply(op, lv, rv)
    present = many.present[pmi] & one.present[poi]
    if cond is not None:
        if m.return_bool:
            vals = cond.astype(np.float64)
        else:
            present = present & cond
    if m.card == "OneToOne":
        per_sig = np.zeros((len(uniq), steps), dtype=np.int64)
        np.add.at(per_sig, mid[pmi], present.astype(np.int64))
        if (per_sig > 1).any():
            raise QueryError("multiple matches for labels: many-to-one matching must be "
                             "explicit (group_left/group_right)")
    drop_names = op in DROPS_NAME or m.return_bool
    labels = [result_labels(many.labels[i], one.labels[j], drop_names, m)
              for i, j in zip(pm, po, strict=True)]
    out = Vector(labels, np.array(vals, dtype=np.float64), present)
    return merge_same_labels(out, "multiple matches for labels: grouping labels must ensure "
                                  "unique matches")


def result_labels(many: Labels, one: Labels, drop_names: bool, m: Matching) -> Labels:
    d = dict(many)
    if drop_names:
        d.pop(METRIC_NAME, None)
    if m.card == "OneToOne":
        if m.on:
            d = {k: v for k, v in d.items() if k in m.names}
        else:
            d = {k: v for k, v in d.items() if k not in m.names}
    if m.include:
        od = dict(one)
        for name in m.include:
            if od.get(name, ""):
                d[name] = od[name]
            else:
                d.pop(name, None)
    return tuple(sorted(d.items()))
