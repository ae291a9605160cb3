"""The evaluator: walks a promql_parser AST once, every node over all steps at once.

A range query with S steps evaluates each node to an (N, S) matrix (see values.py); an
instant query is the case S = 1. Selectors read the storage abstraction (storage.py), decode
blocks in C (blocks.py) and locate every window of every series with one search
(windows.py). Operators and functions are numpy over those matrices; Python loops run over
series groups and AST nodes, never over samples or series x steps.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import promql_parser

from m3shm.query import aggregate, binop, functions
from m3shm.query.blocks import FlatSeries, decode_result, is_stale
from m3shm.query.errors import QueryError, QueryLimitError
from m3shm.query.labels import drop_name
from m3shm.query.matchers import from_selector
from m3shm.query.storage import Storage
from m3shm.query.values import RangeData, Scalar, String, Value, Vector
from m3shm.query.vectors import merge_same_labels
from m3shm.query.windows import locate

DEFAULT_LOOKBACK_MS = 5 * 60 * 1000
DEFAULT_SUBQUERY_STEP_MS = 60 * 1000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)


def duration_ms(td: timedelta | None) -> int:
    return 0 if td is None else td // _MS


@dataclass
class Limits:
    """What one query may use; the query service maps its flags onto these."""

    max_samples: int = 50_000_000  # samples decoded plus points held by results
    max_series: int = 0  # 0: unlimited; series selected by any one selector


@dataclass
class Stats:
    samples_decoded: int = 0  # samples read from blocks by selectors
    points: int = 0  # points produced by subqueries and the result
    series_selected: int = 0
    partial: bool = False
    warnings: list[str] = field(default_factory=list)


@dataclass
class Evaluator:
    storage: Storage
    steps: np.ndarray  # (S,) int64 ms
    start_ms: int  # the query's start and end: what @ start() and @ end() mean
    end_ms: int
    lookback_ms: int = DEFAULT_LOOKBACK_MS
    subquery_step_ms: int = DEFAULT_SUBQUERY_STEP_MS
    limits: Limits = field(default_factory=Limits)
    stats: Stats = field(default_factory=Stats)
    checkpoint: Callable[[], None] | None = None  # raises to stop the query (cancel, timeout)

    @property
    def nsteps(self) -> int:
        return len(self.steps)

    # ---- dispatch ------------------------------------------------------------------------
    def eval(self, node: Any) -> Value:
        if self.checkpoint is not None:
            self.checkpoint()
        kind = type(node).__name__
        if kind == "ParenExpr":
            return self.eval(node.expr)
        if kind == "NumberLiteral":
            return Scalar(np.full(self.nsteps, float(node.val)))
        if kind == "StringLiteral":
            return String(node.val)
        if kind == "VectorSelector":
            return self.vector_selector(node)
        if kind == "MatrixSelector":
            return self.matrix_selector(node)
        if kind == "SubqueryExpr":
            return self.subquery(node)
        if kind == "UnaryExpr":
            return self.negate(self.eval(node.expr))
        if kind == "BinaryExpr":
            return binop.evaluate(self, node)
        if kind == "AggregateExpr":
            return aggregate.evaluate(self, node)
        if kind == "Call":
            return functions.call(self, node)
        raise QueryError(f"unsupported expression {kind}")

    def eval_vector(self, node: Any) -> Vector:
        v = self.eval(node)
        if not isinstance(v, Vector):
            raise QueryError(f"expected an instant vector, got {type(v).__name__.lower()}")
        return v

    def eval_scalar(self, node: Any) -> np.ndarray:
        v = self.eval(node)
        if not isinstance(v, Scalar):
            raise QueryError(f"expected a scalar, got {type(v).__name__.lower()}")
        return v.values

    def negate(self, v: Value) -> Value:
        if isinstance(v, Scalar):
            return Scalar(-v.values)
        if isinstance(v, Vector):
            out = Vector([drop_name(lb) for lb in v.labels], -v.values, v.present)
            return merge_same_labels(out)
        raise QueryError("unary minus takes a scalar or an instant vector")

    # ---- time ----------------------------------------------------------------------------
    def ref_times(self, at: Any, offset: timedelta | None) -> np.ndarray:
        """Per step, the time a selector reads at: the step (or its @ time) minus offset."""
        if at is None:
            base = self.steps
        else:
            kind = str(at.type)
            if kind.endswith("Start"):
                t = self.start_ms
            elif kind.endswith("End"):
                t = self.end_ms
            else:
                t = (at.at - _EPOCH) // _MS
            base = np.full(self.nsteps, t, dtype=np.int64)
        return base - duration_ms(offset)

    # ---- selectors -----------------------------------------------------------------------
    def select(self, vs: Any, mint: int, maxt: int,
               lookback: tuple[int, int] | None = None) -> FlatSeries:
        if lookback is None:
            res = self.storage.select(from_selector(vs), mint, maxt)
        else:  # a storage across resolutions (resolution.py): each namespace its own lookback
            res = self.storage.select(from_selector(vs), mint, maxt,  # type: ignore[call-arg]
                                      lookback=lookback)
        if res.partial:
            self.stats.partial = True
        self.stats.warnings.extend(res.warnings)
        nseries = res.nseries
        if self.limits.max_series and nseries > self.limits.max_series:
            raise QueryLimitError(f"query selects {nseries} series, more than the "
                                  f"limit of {self.limits.max_series}")
        if self.checkpoint is not None:
            self.checkpoint()
        flat = decode_result(res, mint, maxt)
        self.stats.series_selected += nseries
        self.account(len(flat.ts))
        return flat

    def account(self, samples: int, decoded: bool = True) -> None:
        if decoded:
            self.stats.samples_decoded += samples
        else:
            self.stats.points += samples
        if self.stats.samples_decoded + self.stats.points > self.limits.max_samples:
            raise QueryLimitError("query processing would load too many samples into memory "
                                  f"(query.max_samples={self.limits.max_samples})")

    def vector_selector(self, vs: Any) -> Vector:
        refs = self.ref_times(vs.at, vs.offset)
        lb = wide = self.lookback_ms
        lo_ref, hi_ref = int(refs.min()), int(refs.max())
        widest = getattr(self.storage, "widest_lookback", None)
        if widest is not None:  # downsampled points answer for up to their resolution
            wide = widest(lo_ref - lb, hi_ref, lb)
        flat = self.select(vs, lo_ref - wide, hi_ref, (lo_ref, lb) if wide > lb else None)
        lo, hi = locate(flat, refs - wide, refs)
        present = hi > lo
        if len(flat.ts) == 0:
            z = np.zeros(present.shape)
            return Vector(flat.labels, z, present, z.astype(np.int64))
        idx = np.where(present, hi - 1, 0)
        if wide > lb:  # the newest sample answers within its own lookback (resolution.py)
            hold = np.full(len(flat.ts), lb, dtype=np.int64) if flat.stitch is None else \
                flat.stitch.hold_ms(flat.labels, flat.counts, flat.ts, lb)
            present &= refs[None, :] - flat.ts[idx] <= hold[idx]
        vals = flat.vals[idx]
        present &= ~is_stale(vals)
        return Vector(flat.labels, vals, present, flat.ts[idx])

    def matrix_selector(self, ms: Any) -> RangeData:
        vs = ms.vector_selector
        rng = duration_ms(ms.range)
        ends = self.ref_times(vs.at, vs.offset)
        flat = self.select(vs, int(ends.min()) - rng, int(ends.max()))
        stale = is_stale(flat.vals)
        if stale.any():
            flat = flat.keep(~stale)
        return RangeData(flat, ends, rng, vs)

    def subquery(self, sq: Any) -> RangeData:
        rng = duration_ms(sq.range)
        step = duration_ms(sq.step) or self.subquery_step_ms
        ends = self.ref_times(sq.at, sq.offset)
        first = int(ends.min()) - rng
        inner_start = -((-first) // step) * step  # the first multiple of step >= first
        inner_steps = np.arange(inner_start, int(ends.max()) + 1, step, dtype=np.int64)
        inner = Evaluator(self.storage, inner_steps, self.start_ms, self.end_ms,
                          self.lookback_ms, self.subquery_step_ms, self.limits, self.stats,
                          self.checkpoint)
        v = inner.eval(sq.expr)
        if not isinstance(v, Vector):
            raise QueryError("subquery is only allowed on instant vector expressions")
        v = v.nonempty()
        counts = v.present.sum(axis=1)
        offsets = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
        ts = np.broadcast_to(inner_steps, v.present.shape)[v.present]
        flat = FlatSeries(v.labels, np.ascontiguousarray(ts), v.values[v.present], offsets)
        self.account(len(flat.ts), decoded=False)
        return RangeData(flat, ends, rng, None)


# ---- the public face ---------------------------------------------------------------------

@dataclass
class Sample:
    labels: tuple[tuple[str, str], ...]
    t: int  # ms
    v: float


@dataclass
class Series:
    labels: tuple[tuple[str, str], ...]
    ts: np.ndarray  # int64 ms
    values: np.ndarray  # float64


@dataclass
class Result:
    """``type`` is 'vector', 'scalar', 'matrix' or 'string', as in Prometheus' HTTP API."""

    type: str
    vector: list[Sample] = field(default_factory=list)
    matrix: list[Series] = field(default_factory=list)
    scalar: tuple[int, float] | None = None
    string: tuple[int, str] | None = None
    stats: Stats = field(default_factory=Stats)


@functools.lru_cache(maxsize=256)
def _parse(query: str) -> Any:
    """The AST of a query (cached: the HTTP layer parses to validate, then evaluates; the
    parser's nodes are never modified)."""
    try:
        return promql_parser.parse(_rename_functions(query))
    except Exception as e:  # the parser raises plain exceptions without a type of its own
        raise QueryError(f"parse error: {e}") from None


@dataclass
class Engine:
    storage: Storage
    lookback_ms: int = DEFAULT_LOOKBACK_MS
    subquery_step_ms: int = DEFAULT_SUBQUERY_STEP_MS
    limits: Limits = field(default_factory=Limits)
    checkpoint: Callable[[], None] | None = None

    def _evaluator(self, steps: np.ndarray, start: int, end: int) -> Evaluator:
        return Evaluator(self.storage, steps, start, end, self.lookback_ms,
                         self.subquery_step_ms, self.limits, Stats(), self.checkpoint)

    @staticmethod
    def parse(query: str) -> Any:
        return _parse(query)

    def instant(self, query: str, t_ms: int) -> Result:
        node = self.parse(query)
        ev = self._evaluator(np.array([t_ms], dtype=np.int64), t_ms, t_ms)
        val = ev.eval(node)
        if isinstance(val, Scalar):
            return Result("scalar", scalar=(t_ms, float(val.values[0])), stats=ev.stats)
        if isinstance(val, String):
            return Result("string", string=(t_ms, val.value), stats=ev.stats)
        if isinstance(val, RangeData):
            return Result("matrix", matrix=_range_series(val), stats=ev.stats)
        rows = np.flatnonzero(val.present[:, 0])
        samples = [Sample(val.labels[i], t_ms, float(val.values[i, 0])) for i in rows]
        samples = functions.order_instant(node, samples)
        return Result("vector", vector=samples, stats=ev.stats)

    def range(self, query: str, start_ms: int, end_ms: int, step_ms: int) -> Result:
        if step_ms <= 0:
            raise QueryError("zero or negative query resolution step widths are not accepted")
        if end_ms < start_ms:
            raise QueryError("end timestamp must not be before start time")
        node = self.parse(query)
        steps = np.arange(start_ms, end_ms + 1, step_ms, dtype=np.int64)
        ev = self._evaluator(steps, start_ms, end_ms)
        val = ev.eval(node)
        if isinstance(val, Scalar):
            val = Vector([()], val.values[None, :], np.ones((1, len(steps)), dtype=bool))
        if not isinstance(val, Vector):
            raise QueryError(f'invalid expression type "{type(val).__name__.lower()}" for '
                             "range query, must be Scalar or instant Vector")
        val = val.nonempty()
        ev.account(int(val.present.sum()), decoded=False)
        out = [Series(val.labels[i], steps[val.present[i]], val.values[i][val.present[i]])
               for i in range(len(val.labels))]
        out.sort(key=lambda s: s.labels)
        return Result("matrix", matrix=out, stats=ev.stats)


# promql-parser follows Prometheus 3, which renamed holt_winters; 2.x queries still use it.
_RENAMED = re.compile(r"""("(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)|\bholt_winters(?=\s*\()""")


def _rename_functions(query: str) -> str:
    return _RENAMED.sub(lambda m: m.group(1) or "double_exponential_smoothing", query)


def _range_series(rd: RangeData) -> list[Series]:
    flat = rd.flat
    ends = int(rd.ends[0])
    out = []
    for i, lbl in enumerate(flat.labels):
        a, b = flat.offsets[i], flat.offsets[i + 1]
        ts, vs = flat.ts[a:b], flat.vals[a:b]
        m = (ts >= ends - rd.range_ms) & (ts <= ends)
        if m.any():
            out.append(Series(lbl, ts[m], vs[m]))
    return out
