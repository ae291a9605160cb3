"""Python face of csrc/rollup.c: ROLLUP_IN records (build, check) and the forward table.

The source side turns a finalise pass's series-stage rows into records in one C call
(:func:`build_records`): rows are (group index, window end, value), grouped by group with a
stable numpy sort, never looped over in Python. The group owner applies a record to its group
cell exactly once through a :class:`ForwardTable` (one per shard of an aggregated segment; the
drain calls the C function directly, this class serves tests and tools).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from m3shm._native import ffi, lib
from m3shm.errors import check
from m3shm.rules.aggwin import OUT_DTYPE, Cells

TAIL = struct.Struct("<QIIIIq")  # m3_rollup_tail
assert TAIL.size == lib.M3_ROLLUP_TAIL_BYTES


@dataclass(frozen=True)
class Tail:
    fwd: int
    ordinal: int
    rule: int
    source: int
    res_ms: int


def tail_of(rec: bytes | bytearray | memoryview) -> Tail:
    """The tail of one ROLLUP_IN record (its last 32 bytes)."""
    fwd, ordinal, rule, source, _pad, res = TAIL.unpack_from(rec, len(rec) - TAIL.size)
    return Tail(fwd, ordinal, rule, source, res)


def build_records(canon: Sequence[bytes], rules: Sequence[int], row_group: Any, ts: Any,
                  values: Any, num_shards: int, fwd: int, source: int,
                  res_ms: int) -> tuple[bytearray, int]:
    """ROLLUP_IN records for rows (``row_group[i]``, ``ts[i]``, ``values[i]``): group ``g`` has
    canonical labels ``canon[g]`` and rule id ``rules[g]``. Rows are grouped by group first
    (stable: each group's rows keep their order). Returns (batch bytes, number of records)."""
    g = np.ascontiguousarray(row_group, dtype=np.uint32)
    order = np.argsort(g, kind="stable")
    g = np.ascontiguousarray(g[order])
    t = np.ascontiguousarray(np.asarray(ts, dtype=np.int64)[order])
    v = np.ascontiguousarray(np.asarray(values, dtype=np.float64)[order])
    blob = b"".join(canon)
    offs = np.zeros(len(canon) + 1, dtype=np.uint64)
    np.cumsum([len(c) for c in canon], out=offs[1:])
    rl = np.ascontiguousarray(rules, dtype=np.uint32)
    n = len(g)
    if len(t) != n or len(v) != n or len(rl) != len(canon):
        raise ValueError("rows need equal-length group, ts and value arrays; one rule per group")
    args = (ffi.from_buffer("uint8_t[]", blob) if blob else ffi.NULL,
            ffi.from_buffer("uint64_t[]", offs), len(canon),
            ffi.from_buffer("uint32_t[]", rl) if len(rl) else ffi.NULL,
            ffi.from_buffer("uint32_t[]", g) if n else ffi.NULL,
            ffi.from_buffer("int64_t[]", t) if n else ffi.NULL,
            ffi.from_buffer("double[]", v) if n else ffi.NULL, n, num_shards, fwd, source,
            res_ms)
    length, nrec = ffi.new("size_t *"), ffi.new("uint32_t *")
    rc = lib.m3_rollup_build(*args, ffi.NULL, 0, length, nrec)
    if rc != lib.M3_ENOSPC or length[0] == 0:
        check(rc, f"building rollup records for {n} rows")
        return bytearray(), 0
    out = bytearray(length[0])
    check(lib.m3_rollup_build(*args, ffi.from_buffer("uint8_t[]", out), len(out), length, nrec),
          f"building rollup records for {n} rows")
    return out, int(nrec[0])


def check_record(rec: bytes | bytearray, num_shards: int, num_sources: int) -> None:
    """Raise CorruptError unless ``rec`` is one well-formed ROLLUP_IN record."""
    check(lib.m3_rollup_check(ffi.cast("m3_rec *", ffi.from_buffer(rec)), len(rec), num_shards,
                              num_sources), "rollup record")


def split_records(batch: bytes | bytearray | memoryview) -> list[memoryview]:
    """The records of a batch (their own length words; no validation)."""
    view = memoryview(batch)
    out, off = [], 0
    while off < len(view):
        (n,) = struct.unpack_from("<I", view, off)
        out.append(view[off:off + n])
        off += n
    return out


class ForwardTable:
    """A forward table in caller memory (``mem``: a writable buffer, e.g. a shared mmap)."""

    def __init__(self, mem: Any, num_sources: int | None = None, scratch_cap: int = 0,
                 offset: int = 0) -> None:
        """Attach to the table at ``mem[offset:]``; with ``num_sources``, initialise it first
        with a scratch cell of ``scratch_cap`` bytes (the largest group cell stride)."""
        self._keep = mem
        self.size = len(mem) - offset
        self._p = ffi.from_buffer("uint8_t[]", mem, require_writable=True) + offset
        if num_sources is not None:
            check(lib.m3_fwd_table_init(self._p, self.size, num_sources, scratch_cap),
                  "forward table init")
        check(lib.m3_fwd_table_check(self._p, self.size), "forward table")
        self._out = np.empty(4096 * 4, dtype=OUT_DTYPE)

    @staticmethod
    def bytes_for(num_sources: int, scratch_cap: int) -> int:
        return int(lib.m3_fwd_table_bytes(num_sources, scratch_cap))

    @property
    def header(self) -> Any:
        return ffi.cast("m3_fwd_table *", self._p)

    def apply(self, rec: bytes | bytearray | memoryview, cells: Cells, cell: int,
              now_ms: int) -> tuple[int, np.ndarray]:
        """(1 applied / 0 duplicate, rows the apply finalised early)."""
        buf = bytes(rec)
        nout = ffi.new("size_t *")
        rc = lib.m3_rollup_apply(self._p, ffi.cast("m3_rec *", ffi.from_buffer(buf)),
                                 cells._base, cells.stride, cells.n, cell, now_ms,
                                 ffi.cast("m3_agg_out *", ffi.from_buffer(self._out)),
                                 len(self._out), nout)
        if rc < 0:
            check(rc, f"applying a rollup record to cell {cell}")
        return rc, self._out[:nout[0]].copy()
