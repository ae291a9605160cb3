"""Python face of csrc/aggwin.c: arrays of aggregation cells and whole-batch calls into C.

A :class:`Cells` holds ``n`` cells of one shape (the largest cell its parameters need) in one
numpy buffer, the same layout the shared-memory segment will hold (docs/formats/aggwin.md).
Samples go in per run (one series' samples for one cell) or as many runs in one C call;
finalised points come back as a structured numpy array of :data:`OUT_DTYPE` rows. Python never
touches a sample: it only loops when the output buffer fills and a call must resume.

This module imports numpy; the rule parser (m3shm.rules.ruleset) does not, so the supervisor
can validate rules before it forks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from m3shm._native import ffi, lib
from m3shm.errors import InvalidArgumentError, check

OUT_DTYPE = np.dtype([("cell", "<u4"), ("agg", "<u4"), ("ts", "<i8"), ("value", "<f8")])
assert OUT_DTYPE.itemsize == ffi.sizeof("m3_agg_out")

MAX_WINDOWS: int = lib.M3_AGG_MAX_WINDOWS
MAX_OPS: int = lib.M3_AGG_MAX_OPS
SKETCH_ALPHA: float = lib.m3_sketch_alpha()

# enum m3_agg_type, by M3's names (persisted values: the C enum is the reference)
AGG_TYPES: dict[str, int] = {
    "Last": lib.M3_AGG_LAST, "Min": lib.M3_AGG_MIN, "Max": lib.M3_AGG_MAX,
    "Mean": lib.M3_AGG_MEAN, "Median": lib.M3_AGG_MEDIAN, "Count": lib.M3_AGG_COUNT,
    "Sum": lib.M3_AGG_SUM, "SumSq": lib.M3_AGG_SUMSQ, "Stdev": lib.M3_AGG_STDEV,
    "P10": lib.M3_AGG_P10, "P20": lib.M3_AGG_P20, "P30": lib.M3_AGG_P30, "P40": lib.M3_AGG_P40,
    "P50": lib.M3_AGG_P50, "P60": lib.M3_AGG_P60, "P70": lib.M3_AGG_P70, "P80": lib.M3_AGG_P80,
    "P90": lib.M3_AGG_P90, "P95": lib.M3_AGG_P95, "P99": lib.M3_AGG_P99,
    "P999": lib.M3_AGG_P999, "P9999": lib.M3_AGG_P9999,
}
AGG_NAMES: dict[int, str] = {v: k for k, v in AGG_TYPES.items()}
# enum m3_xform
XFORMS: dict[str, int] = {
    "Increase": lib.M3_XF_INCREASE, "PerSecond": lib.M3_XF_PERSECOND, "Add": lib.M3_XF_ADD,
    "Absolute": lib.M3_XF_ABSOLUTE,
}


@dataclass(frozen=True)
class CellParams:
    """What one cell aggregates: window length, admission, aggregations and transforms."""

    res_ms: int
    admission_ms: int
    aggregations: tuple[str, ...] = ("Last",)
    nwin: int = 4
    pre: tuple[str, ...] = ()    # per-sample transforms before the window
    post: tuple[str, ...] = ()   # per-window transforms of the finalised value

    def to_c(self) -> Any:
        p = ffi.new("m3_agg_params *")
        p.res_ms = self.res_ms
        p.admission_ms = self.admission_ms
        mask = 0
        for a in self.aggregations:
            if a not in AGG_TYPES:
                raise InvalidArgumentError(f"unknown aggregation {a!r} (known: "
                                           f"{', '.join(AGG_TYPES)})")
            mask |= 1 << AGG_TYPES[a]
        p.aggmask = mask
        p.nwin = self.nwin
        for field_name, ops in (("pre", self.pre), ("post", self.post)):
            if len(ops) > MAX_OPS:
                raise InvalidArgumentError(f"{field_name}: at most {MAX_OPS} transforms")
            arr = getattr(p, field_name)
            for i, op in enumerate(ops):
                if op not in XFORMS:
                    raise InvalidArgumentError(f"unknown transform {op!r} (known: "
                                               f"{', '.join(XFORMS)})")
                arr[i] = XFORMS[op]
        why = lib.m3_agg_params_check(p)
        if why != ffi.NULL:
            raise InvalidArgumentError(f"aggregation cell {self}: {ffi.string(why).decode()}")
        return p

    def cell_bytes(self) -> int:
        return int(lib.m3_agg_cell_bytes(self.to_c()))

    def layout(self) -> tuple[int, int, int]:
        """Bytes before window 0 (header and transform state), of one window, of one sketch
        (0: none): a cell holds only what its aggregations and transforms need."""
        head, win, sketch = ffi.new("uint32_t *"), ffi.new("uint32_t *"), ffi.new("uint32_t *")
        check(lib.m3_agg_cell_layout(self.to_c(), head, win, sketch), f"layout of {self}")
        return int(head[0]), int(win[0]), int(sketch[0])


class Cells:
    """``n`` aggregation cells, ``stride`` bytes apart, in one 8-byte aligned buffer."""

    def __init__(self, n: int, stride: int) -> None:
        if n < 1 or stride < ffi.sizeof("m3_aggcell") or stride % 8:
            raise InvalidArgumentError(f"cells: need n >= 1 and a stride that is a multiple "
                                       f"of 8 and >= {ffi.sizeof('m3_aggcell')}, got {n}, "
                                       f"{stride}")
        self.n = n
        self.stride = stride
        self.buf = np.zeros(n * stride // 8, dtype=np.uint64)  # uint64: 8-byte alignment
        self._base = ffi.from_buffer("uint8_t[]", self.buf, require_writable=True)
        self._out = np.empty(4096, dtype=OUT_DTYPE)
        self._pout = ffi.cast("m3_agg_out *", ffi.from_buffer(self._out))

    @classmethod
    def of(cls, params: Sequence[CellParams]) -> Cells:
        """Cells initialised with ``params[i]`` each, sized for the largest."""
        stride = max(p.cell_bytes() for p in params)
        cells = cls(len(params), stride)
        for i, p in enumerate(params):
            cells.init(i, p)
        return cells

    def init(self, i: int, params: CellParams) -> None:
        check(lib.m3_agg_cell_init(self._base + i * self.stride, self.stride, params.to_c()),
              f"cell {i}: init with {params}")

    def check(self, i: int) -> None:
        check(lib.m3_agg_cell_check(self._base + i * self.stride, self.stride),
              f"cell {i}: header check")

    def cell(self, i: int) -> Any:
        """The C struct of cell ``i`` (read its counters: late, applied, ooo, ...)."""
        return ffi.cast("m3_aggcell *", self._base + i * self.stride)

    def _rows(self, chunks: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(chunks) if chunks else np.empty(0, dtype=OUT_DTYPE)

    def apply(self, cell: int, ts: Any, values: Any, now_ms: int, seq: int = 0) -> np.ndarray:
        """Apply one series' samples to one cell; rows of windows finalised early."""
        t = np.ascontiguousarray(ts, dtype=np.int64)
        v = np.ascontiguousarray(values, dtype=np.float64)
        if t.shape != v.shape or t.ndim != 1:
            raise ValueError(f"timestamps and values must be 1-d and of equal length, got "
                             f"{t.shape} and {v.shape}")
        pt, pv = ffi.from_buffer("int64_t[]", t), ffi.from_buffer("double[]", v)
        nout, done = ffi.new("size_t *"), ffi.new("size_t *")
        chunks: list[np.ndarray] = []
        start = 0
        while True:
            nout[0] = 0
            rc = lib.m3_agg_apply(self._base, self.stride, self.n, cell, seq, pt + start,
                                  pv + start, len(t) - start, now_ms, self._pout,
                                  len(self._out), nout, done)
            chunks.append(self._out[: nout[0]].copy())
            if rc != lib.M3_ENOSPC:
                check(rc, f"cell {cell}: applying {len(t)} samples")
                return self._rows(chunks)
            if nout[0] == 0:
                check(rc, f"cell {cell}: output buffer too small for one eviction")
            start += done[0]

    def apply_runs(self, run_cell: Any, run_start: Any, run_end: Any, ts: Any, values: Any,
                   now_ms: int, seq: int = 0) -> np.ndarray:
        """Run ``r`` applies samples ``[run_start[r], run_end[r])`` to cell ``run_cell[r]``;
        runs may share samples (one series' samples applied to each of its cells)."""
        cell_ids = np.ascontiguousarray(run_cell, dtype=np.uint32)
        start = np.array(run_start, dtype=np.uint64)  # a copy: resuming moves a start
        end = np.ascontiguousarray(run_end, dtype=np.uint64)
        t = np.ascontiguousarray(ts, dtype=np.int64)
        v = np.ascontiguousarray(values, dtype=np.float64)
        if not (len(cell_ids) == len(start) == len(end)) or len(t) != len(v) or (
                len(end) and (int(end.max()) > len(t) or bool((start > end).any()))):
            raise ValueError("runs need equal-length cell/start/end arrays with start <= end "
                             "<= the number of samples; timestamps and values of equal length")
        pt, pv = ffi.from_buffer("int64_t[]", t), ffi.from_buffer("double[]", v)
        pc = ffi.from_buffer("uint32_t[]", cell_ids)
        ps, pe = ffi.from_buffer("uint64_t[]", start), ffi.from_buffer("uint64_t[]", end)
        nout = ffi.new("size_t *")
        done_runs, done = ffi.new("size_t *"), ffi.new("size_t *")
        chunks: list[np.ndarray] = []
        r0 = 0
        while True:
            nout[0] = 0
            rc = lib.m3_agg_apply_runs(self._base, self.stride, self.n, pc + r0, ps + r0,
                                       pe + r0, len(cell_ids) - r0, seq, pt, pv, now_ms,
                                       self._pout, len(self._out), nout, done_runs, done)
            chunks.append(self._out[: nout[0]].copy())
            if rc != lib.M3_ENOSPC:
                check(rc, f"applying {len(cell_ids)} runs")
                return self._rows(chunks)
            if nout[0] == 0:
                check(rc, "output buffer too small for one eviction")
            r0 += done_runs[0]
            start[r0] += done[0]  # the interrupted run resumes after its applied samples

    def finalise(self, now_ms: int) -> np.ndarray:
        """Rows of every window whose end + admission <= now_ms, oldest first per cell."""
        nout, nxt = ffi.new("size_t *"), ffi.new("uint32_t *")
        chunks: list[np.ndarray] = []
        first = 0
        while True:
            nout[0] = 0
            rc = lib.m3_agg_finalise(self._base, self.stride, self.n, first, now_ms,
                                     self._pout, len(self._out), nout, nxt)
            chunks.append(self._out[: nout[0]].copy())
            if rc != lib.M3_ENOSPC:
                check(rc, f"finalising {self.n} cells")
                return self._rows(chunks)
            first = nxt[0]


def sketch_quantiles(values: Any, qs: Sequence[float]) -> list[float]:
    """Quantile estimates of a standalone sketch fed ``values`` (for tests and docs)."""
    s = ffi.new("m3_sketch *")
    lib.m3_sketch_init(s)
    v = np.ascontiguousarray(values, dtype=np.float64)
    for x in v:  # test helper only; cells feed their sketches from C
        lib.m3_sketch_add(s, float(x))
    lo, hi = (float(np.nanmin(v)), float(np.nanmax(v))) if len(v) else (0.0, 0.0)
    return [float(lib.m3_sketch_quantile(s, q, lo, hi)) for q in qs]
