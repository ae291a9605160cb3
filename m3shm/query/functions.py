"""Function calls: dispatch, and the functions over instant vectors and scalars.

Functions over range vectors live in rangefuncs.py, histogram_quantile in histogram.py.
Every function works on whole (N, S) matrices; ``label_*`` loop over series labels only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from m3shm.query import rangefuncs
from m3shm.query.errors import QueryError
from m3shm.query.goformat import expand
from m3shm.query.histogram import histogram_quantile
from m3shm.query.labels import METRIC_NAME, Labels, drop_name, get, is_valid_name, with_label
from m3shm.query.matchers import compile_anchored, from_selector
from m3shm.query.values import RangeData, Scalar, String, Value, Vector
from m3shm.query.vectors import merge_same_labels

if TYPE_CHECKING:
    from m3shm.query.engine import Evaluator, Sample

MATH: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "abs": np.abs, "ceil": np.ceil, "floor": np.floor, "exp": np.exp, "sqrt": np.sqrt,
    "ln": np.log, "log2": np.log2, "log10": np.log10, "sgn": np.sign,
    "acos": np.arccos, "acosh": np.arccosh, "asin": np.arcsin, "asinh": np.arcsinh,
    "atan": np.arctan, "atanh": np.arctanh, "cos": np.cos, "cosh": np.cosh, "sin": np.sin,
    "sinh": np.sinh, "tan": np.tan, "tanh": np.tanh, "deg": np.degrees, "rad": np.radians,
}

OVER_TIME = {f"{k}_over_time": k for k in
             ("avg", "min", "max", "sum", "count", "last", "present", "stddev", "stdvar")}

DATE_PARTS = ("day_of_month", "day_of_week", "day_of_year", "days_in_month", "hour", "minute",
              "month", "year")


def _map(vec: Vector, fn: Callable[[np.ndarray], np.ndarray]) -> Vector:
    with np.errstate(all="ignore"):
        vals = fn(vec.values)
    out = Vector([drop_name(lb) for lb in vec.labels], np.asarray(vals, dtype=np.float64),
                 vec.present)
    return merge_same_labels(out)


def _range_arg(v: Value, name: str) -> RangeData:
    if not isinstance(v, RangeData):
        raise QueryError(f"expected type range vector in call to function {name!r}")
    return v


def _vector_arg(v: Value, name: str) -> Vector:
    if not isinstance(v, Vector):
        raise QueryError(f"expected type instant vector in call to function {name!r}")
    return v


def _scalar_arg(v: Value, name: str) -> np.ndarray:
    if not isinstance(v, Scalar):
        raise QueryError(f"expected type scalar in call to function {name!r}")
    return v.values


def _string_arg(v: Value, name: str) -> str:
    if not isinstance(v, String):
        raise QueryError(f"expected type string in call to function {name!r}")
    return v.value


def call(ev: Evaluator, node: Any) -> Value:
    name = node.func.name
    args = [ev.eval(a) for a in node.args]
    chunked = rangefuncs.chunked
    if name in ("rate", "increase", "delta"):
        return chunked(rangefuncs.extrapolated_rate, _range_arg(args[0], name),
                       name != "delta", name == "rate")
    if name in ("irate", "idelta"):
        return chunked(rangefuncs.instant_delta, _range_arg(args[0], name), name == "irate")
    if name in OVER_TIME:
        return chunked(rangefuncs.over_time, _range_arg(args[0], name), OVER_TIME[name])
    if name == "quantile_over_time":
        return rangefuncs.quantile_over_time(_range_arg(args[1], name),
                                             _scalar_arg(args[0], name))
    if name == "deriv":
        return rangefuncs.deriv(_range_arg(args[0], name))
    if name == "predict_linear":
        rd = _range_arg(args[0], name)
        at = ev.steps if _at_of(node.args[0]) is None else np.full(ev.nsteps, ev.start_ms)
        return rangefuncs.predict_linear(rd, _scalar_arg(args[1], name), at)
    if name in ("holt_winters", "double_exponential_smoothing"):
        return rangefuncs.holt_winters(_range_arg(args[0], name), _scalar_arg(args[1], name),
                                       _scalar_arg(args[2], name))
    if name in ("changes", "resets"):
        return rangefuncs.changes(_range_arg(args[0], name), name == "resets")
    if name == "absent_over_time":
        rd = _range_arg(args[0], name)
        return _absent(ev, rangefuncs.any_in_window(rd), node.args[0])
    if name == "absent":
        vec = _vector_arg(args[0], name)
        return _absent(ev, vec.present.any(axis=0), node.args[0])
    if name in MATH:
        return _map(_vector_arg(args[0], name), MATH[name])
    if name in DATE_PARTS:
        vec = args[0] if args else Vector([()], (ev.steps / 1000.0)[None, :],
                                           np.ones((1, ev.nsteps), dtype=bool))
        return _map(_vector_arg(vec, name), _DATE_FUNCS[name])
    simple = _SIMPLE.get(name)
    if simple is not None:
        return simple(ev, args)
    raise QueryError(f"unknown or unsupported function {name!r}")


def _at_of(node: Any) -> Any:
    kind = type(node).__name__
    if kind == "MatrixSelector":
        return node.vector_selector.at
    if kind == "SubqueryExpr":
        return node.at
    return None


def _absent(ev: Evaluator, any_present: np.ndarray, arg: Any) -> Vector:
    kind = type(arg).__name__
    labels: Labels = ()
    vs = arg if kind == "VectorSelector" else \
        arg.vector_selector if kind == "MatrixSelector" else None
    if vs is not None:
        found: dict[str, str] = {}
        ambiguous: set[str] = set()
        for m in from_selector(vs):
            if m.name == METRIC_NAME:
                continue
            if m.op == "=" and m.name not in found:
                found[m.name] = m.value
            else:
                ambiguous.add(m.name)
        labels = tuple(sorted((k, v) for k, v in found.items()
                              if k not in ambiguous and v != ""))
    return Vector([labels], np.ones((1, ev.nsteps)), ~any_present[None, :])


# ---- simple functions: (evaluator, evaluated args) -> value ----------------------------

def _time(ev: Evaluator, args: list[Value]) -> Value:
    return Scalar(ev.steps / 1000.0)


def _pi(ev: Evaluator, args: list[Value]) -> Value:
    return Scalar(np.full(ev.nsteps, math.pi))


def _vector(ev: Evaluator, args: list[Value]) -> Value:
    s = _scalar_arg(args[0], "vector")
    return Vector([()], s[None, :].copy(), np.ones((1, ev.nsteps), dtype=bool))


def _scalar(ev: Evaluator, args: list[Value]) -> Value:
    vec = _vector_arg(args[0], "scalar")
    if len(vec) == 0:
        return Scalar(np.full(ev.nsteps, np.nan))
    one = vec.present.sum(axis=0) == 1
    first = vec.present.argmax(axis=0)
    return Scalar(np.where(one, vec.values[first, np.arange(ev.nsteps)], np.nan))


def _timestamp(ev: Evaluator, args: list[Value]) -> Value:
    vec = _vector_arg(args[0], "timestamp")
    t = vec.times if vec.times is not None else np.broadcast_to(ev.steps, vec.values.shape)
    out = Vector([drop_name(lb) for lb in vec.labels], t / 1000.0, vec.present)
    return merge_same_labels(out)


def _clamp(ev: Evaluator, args: list[Value]) -> Value:
    vec = _vector_arg(args[0], "clamp")
    lo, hi = _scalar_arg(args[1], "clamp"), _scalar_arg(args[2], "clamp")
    out = _map(vec, lambda v: np.maximum(lo[None, :], np.minimum(hi[None, :], v)))
    out.present = out.present & (hi >= lo)[None, :]
    return out


def _clamp_min(ev: Evaluator, args: list[Value]) -> Value:
    lo = _scalar_arg(args[1], "clamp_min")
    return _map(_vector_arg(args[0], "clamp_min"), lambda v: np.maximum(lo[None, :], v))


def _clamp_max(ev: Evaluator, args: list[Value]) -> Value:
    hi = _scalar_arg(args[1], "clamp_max")
    return _map(_vector_arg(args[0], "clamp_max"), lambda v: np.minimum(hi[None, :], v))


def _round(ev: Evaluator, args: list[Value]) -> Value:
    to = _scalar_arg(args[1], "round") if len(args) > 1 else np.ones(ev.nsteps)
    inv = (1.0 / to)[None, :]
    return _map(_vector_arg(args[0], "round"), lambda v: np.floor(v * inv + 0.5) / inv)


def _identity(ev: Evaluator, args: list[Value]) -> Value:
    return _vector_arg(args[0], "sort")


def _histogram_quantile(ev: Evaluator, args: list[Value]) -> Value:
    q = _scalar_arg(args[0], "histogram_quantile")
    return histogram_quantile(q, _vector_arg(args[1], "histogram_quantile"))


def _label_replace(ev: Evaluator, args: list[Value]) -> Value:
    vec = _vector_arg(args[0], "label_replace")
    dst, repl, src, regex = (_string_arg(a, "label_replace") for a in args[1:5])
    pattern = compile_anchored(regex)
    if not is_valid_name(dst):
        raise QueryError(f"invalid destination label name in label_replace(): {dst}")
    labels = []
    for lb in vec.labels:
        m = pattern.fullmatch(get(lb, src))
        labels.append(with_label(lb, dst, expand(repl, m)) if m else lb)
    return merge_same_labels(Vector(labels, vec.values, vec.present))


def _label_join(ev: Evaluator, args: list[Value]) -> Value:
    vec = _vector_arg(args[0], "label_join")
    dst, sep = _string_arg(args[1], "label_join"), _string_arg(args[2], "label_join")
    srcs = [_string_arg(a, "label_join") for a in args[3:]]
    if not is_valid_name(dst):
        raise QueryError(f"invalid destination label name in label_join(): {dst}")
    for s in srcs:
        if not is_valid_name(s):
            raise QueryError(f"invalid source label name in label_join(): {s}")
    labels = [with_label(lb, dst, sep.join(get(lb, s) for s in srcs)) for lb in vec.labels]
    return merge_same_labels(Vector(labels, vec.values, vec.present))


def _date(part: str) -> Callable[[np.ndarray], np.ndarray]:
    def fn(v: np.ndarray) -> np.ndarray:
        secs = np.trunc(np.nan_to_num(v, nan=0.0, posinf=0.0, neginf=0.0)).astype(np.int64)
        t = secs.astype("datetime64[s]")
        day = t.astype("datetime64[D]")
        month = t.astype("datetime64[M]")
        year = t.astype("datetime64[Y]")
        if part == "minute":
            r = (secs // 60) % 60
        elif part == "hour":
            r = (secs // 3600) % 24
        elif part == "day_of_month":
            r = (day - month.astype("datetime64[D]")).astype(np.int64) + 1
        elif part == "day_of_week":
            r = (day.astype(np.int64) + 4) % 7  # 1970-01-01 was a Thursday
        elif part == "day_of_year":
            r = (day - year.astype("datetime64[D]")).astype(np.int64) + 1
        elif part == "days_in_month":
            r = ((month + 1).astype("datetime64[D]") - month.astype("datetime64[D]")).astype(
                np.int64)
        elif part == "month":
            r = month.astype(np.int64) % 12 + 1
        else:
            r = year.astype(np.int64) + 1970
        return r.astype(np.float64)

    return fn


_DATE_FUNCS = {p: _date(p) for p in DATE_PARTS}

_SIMPLE: dict[str, Callable[[Evaluator, list[Value]], Value]] = {
    "time": _time, "pi": _pi, "vector": _vector, "scalar": _scalar,
    "timestamp": _timestamp, "clamp": _clamp, "clamp_min": _clamp_min,
    "clamp_max": _clamp_max, "round": _round, "sort": _identity, "sort_desc": _identity,
    "histogram_quantile": _histogram_quantile, "label_replace": _label_replace,
    "label_join": _label_join,
}


def order_instant(node: Any, samples: list[Sample]) -> list[Sample]:
    """The order Prometheus gives an instant vector: sort/sort_desc and topk/bottomk order
    by value; anything else by label set."""
    while type(node).__name__ == "ParenExpr":
        node = node.expr
    kind = type(node).__name__
    desc = None
    if kind == "Call" and node.func.name in ("sort", "sort_desc"):
        desc = node.func.name == "sort_desc"
    elif kind == "AggregateExpr" and str(node.op) in ("topk", "bottomk"):
        desc = str(node.op) == "topk"
    if desc is None:
        return sorted(samples, key=lambda s: s.labels)

    def key(s: Sample) -> tuple[bool, float]:
        if math.isnan(s.v):
            return (True, 0.0)
        return (False, -s.v if desc else s.v)

    return sorted(samples, key=key)
