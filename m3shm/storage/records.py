"""Lane records built from rows in C (csrc/rec_build.c): how m3shm writes points it computed
itself (finalised aggregation windows, rollup forwarding) into a namespace.

A :class:`LabelTable` holds canonical label sets back to back with their offsets; rows are
(series index, timestamp, value) in three numpy arrays. :func:`build_records` turns them into a
batch of records exactly like the remote-write decoders' (same hash, same shard), ready for
``await worker.ns[name].pipeline.submit(batch, length, nrecords)``. Consecutive rows of one
series become one record, so sort rows by series when they come from many series.

No Python work per row: the table is built once per set of series (a join), the rows are
handed to C whole.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from m3shm._native import ffi, lib
from m3shm.errors import check

SAMPLES = lib.M3_REC_SAMPLES


class LabelTable:
    """Canonical label sets (``m3shm.shm.canonical_labels`` bytes) indexed 0..n-1."""

    def __init__(self, label_sets: Iterable[bytes]) -> None:
        import numpy as np

        sets = list(label_sets)
        self.blob = b"".join(sets)
        offs = np.zeros(len(sets) + 1, dtype=np.uint64)
        if sets:
            np.cumsum([len(s) for s in sets], out=offs[1:])
        self.offs = offs

    @classmethod
    def from_blob(cls, blob: bytes, offs: Any) -> LabelTable:
        """A table over label sets already back to back (``offs``: n + 1 uint64 offsets)."""
        import numpy as np

        t = cls(())
        t.blob = blob
        t.offs = np.ascontiguousarray(offs, dtype=np.uint64)
        return t

    def __len__(self) -> int:
        return len(self.offs) - 1

    def labels(self, i: int) -> bytes:
        return self.blob[int(self.offs[i]):int(self.offs[i + 1])]


def build_records(table: LabelTable, series: Any, ts: Any, vs: Any, num_shards: int,
                  rec_type: int = SAMPLES) -> tuple[bytearray, int, int]:
    """Records for rows ``(series[i], ts[i], vs[i])`` (array-likes of equal length: uint32,
    int64 ms, float64). Returns ``(batch, length, nrecords)``. Raises InvalidArgumentError for
    an index out of range or a label set that is not canonical."""
    import numpy as np

    s = np.ascontiguousarray(series, dtype=np.uint32)
    t = np.ascontiguousarray(ts, dtype=np.int64)
    v = np.ascontiguousarray(vs, dtype=np.float64)
    n = len(s)
    if len(t) != n or len(v) != n:
        raise ValueError(f"rows: {n} series indexes, {len(t)} timestamps, {len(v)} values")
    if n == 0:
        return bytearray(), 0, 0
    labels = ffi.from_buffer("uint8_t[]", table.blob) if table.blob else ffi.NULL
    offs = ffi.cast("uint64_t *", ffi.from_buffer(table.offs))
    sp = ffi.cast("uint32_t *", ffi.from_buffer(s))
    tp = ffi.cast("int64_t *", ffi.from_buffer(t))
    vp = ffi.cast("double *", ffi.from_buffer(v))
    used = ffi.new("size_t *")
    nrec = ffi.new("uint32_t *")
    what = f"building lane records from {n} rows"
    rc = lib.m3_rec_build(rec_type, num_shards, labels, len(table.blob), offs, len(table), sp,
                          tp, vp, n, ffi.NULL, 0, used, nrec)
    if rc != lib.M3_ENOSPC:
        check(rc, what)
    out = bytearray(int(used[0]))
    check(lib.m3_rec_build(rec_type, num_shards, labels, len(table.blob), offs, len(table),
                           sp, tp, vp, n, ffi.from_buffer(out), len(out), used, nrec), what)
    return out, int(used[0]), int(nrec[0])
