"""The Python face of csrc/aggstore.c: downsampling cells and plans in shared memory.

An :class:`AggStore` belongs to one :class:`m3shm.shm.Segment`: a file next to it in
``/dev/shm`` (``<segment>.agg``), created by the supervisor with the segment and inherited by
the workers, so a worker killed by SIGKILL finds its cells again. Layout:
docs/formats/aggstore.md. Every call is one C call over a whole shard, batch or plan; nothing
here touches a sample. numpy is imported lazily: the supervisor creates stores before it forks.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from m3shm._native import ffi, lib
from m3shm.errors import check
from m3shm.shm import Segment
from m3shm.shmfile import create_mapped

# m3_aggst_row as a numpy dtype (built lazily)
ROW_FIELDS = [("stream", "<u4"), ("ns", "<u2"), ("kind", "u1"), ("agg", "u1"), ("ts", "<i8"),
              ("value", "<f8")]
STATS_FIELDS = ("plans", "cells", "cell_bytes", "arena_used", "arena_bytes", "applied", "late",
                "evicted", "ooo", "points", "refused", "spill_lost", "raw_dropped", "asked",
                "spill_n", "now_floor", "rules_version", "rollup_applied", "rollup_dup",
                "rollup_unmatched", "fwd_refused")
KIND_OUTPUT: int = lib.M3_AGGK_OUTPUT
KIND_ROLLUP: int = lib.M3_AGGK_ROLLUP
CELL_AGG_LABEL: int = lib.M3_AGGC_AGG_LABEL
PLAN_DROP_RAW: int = lib.M3_PLAN_DROP_RAW
NEED_CAP = 4096
SKIPPED = 0xFFFFFFFF  # Prepared.last when no cell of the shard was due


def _u32(a: Any) -> Any:
    return ffi.cast("uint32_t *", ffi.from_buffer(a))


def _plan_args(params: list[Any], meta: list[int], labels: list[bytes],
               rules: list[int] | None) -> tuple[Any, Any, bytes, Any, Any]:
    """The C arrays of a plan's cells (see :meth:`AggStore.install`)."""
    n = len(params)
    cp = ffi.new("m3_agg_params[]", max(n, 1))
    for i, p in enumerate(params):
        cp[i] = p[0]
    cm = ffi.new("uint32_t[]", meta or [0])
    blob = b"".join(labels)
    offs = [0]
    for lab in labels:
        offs.append(offs[-1] + len(lab))
    co = ffi.new("uint64_t[]", offs)
    # rules[k] != 0: cell k is a rollup group cell of that rule id (csrc/rollup.c)
    cr = ffi.new("uint32_t[]", rules) if rules and any(rules) else ffi.NULL
    return cp, cm, blob, co, cr


def store_path(seg_path: str) -> str:
    return seg_path + ".agg"


@dataclass
class Prepared:
    """Phase 1 of a shard's finalise: rows (ROW_DTYPE) and the labels of their streams
    (``labels[loffs[i]:loffs[i+1]]``), to be made durable before :meth:`AggStore.commit`."""

    shard: int
    now_ms: int
    first: int
    last: int
    spill_n: int
    labels: bytes
    loffs: Any       # numpy uint64, nstreams + 1
    rows: Any        # numpy ROW_FIELDS


class AggStore:
    def __init__(self, seg: Segment, path: str, mm: mmap.mmap) -> None:
        self.seg = seg
        self.path = path
        self._mm = mm
        self._buf = ffi.from_buffer("uint8_t[]", mm, require_writable=True)
        self.base = ffi.cast("uint8_t *", self._buf)
        self.num_shards = seg.params.num_shards
        self._need = ffi.new("uint32_t[]", NEED_CAP)
        self._need_gen = ffi.new("uint32_t[]", NEED_CAP)
        self._need_shard = ffi.new("uint32_t[]", NEED_CAP)
        self._nneed = ffi.new("size_t *")
        self._scratch_cap = 1 << 17
        self._scratch = ffi.new("uint8_t[]", self._scratch_cap)
        self._out: tuple[Any, Any, bytearray] | None = None
        self._gscratch = bytearray()

    @classmethod
    def create(cls, seg: Segment, arena_bytes: int) -> AggStore:
        """Create (replacing any old one) the store of ``seg`` with ``arena_bytes`` of cells
        per shard (a sparse file: pages are touched as cells are made)."""
        path = store_path(seg.path)
        size = int(lib.m3_aggst_size(seg.base, arena_bytes))
        if not size:
            raise ValueError(f"aggregation store: invalid cell arena size {arena_bytes}")
        mm = create_mapped(path, size)
        st = cls(seg, path, mm)
        check(lib.m3_aggst_init(st.base, size, seg.base, arena_bytes),
              f"initialising aggregation store {path}")
        return st

    @classmethod
    def open(cls, seg: Segment) -> AggStore:
        path = store_path(seg.path)
        fd = os.open(path, os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        st = cls(seg, path, mm)
        check(lib.m3_aggst_check(st.base, size, seg.base),
              f"opening aggregation store {path}")
        return st

    def unlink(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    # -- owner ------------------------------------------------------------------------------

    def recover(self, shard: int) -> int:
        """After m3_shard_recover: check the shard's cells; returns plans dropped."""
        return check(lib.m3_aggst_recover(self.seg.base, self.base, shard),
                     f"recovering the aggregation cells of shard {shard}")

    def _needs(self, k: int, with_shard: bool = False) -> Any:
        """The first k entries of the need buffers as one (k, 2) or (k, 3) uint32 array:
        [slot, gen] or [shard, slot, gen] per row."""
        import numpy as np

        cols = [self._need_shard] if with_shard else []
        cols += [self._need, self._need_gen]
        out = np.empty((k, len(cols)), dtype=np.uint32)
        for j, c in enumerate(cols):
            out[:, j] = np.frombuffer(ffi.buffer(c, 4 * k), dtype=np.uint32)
        return out

    def drain(self, shard: int, max_records: int, now_ms: int) -> tuple[int, Any]:
        """Drain one shard with aggregation: (records applied, (k, 2) uint32 array of [slot,
        gen] of the series that need a plan before the drain can go on; k = 0 when none)."""
        n = check(lib.m3_lane_drain_agg(self.seg.base, self.base, shard, max_records, now_ms,
                                        self._need, self._need_gen, NEED_CAP, self._nneed),
                  f"draining shard {shard}")
        return n, self._needs(int(self._nneed[0]))

    def apply_batch(self, batch: Any, seq: int, lo: int, hi: int, now_ms: int, off: int,
                    cells_only: bool = False) -> tuple[int, int, Any]:
        """Replay: apply a commit-log batch from byte ``off``: (records applied, offset
        reached, (k, 3) uint32 array of [shard, slot, gen] needing a plan; k = 0 when the
        batch is done). With ``cells_only`` (a batch a loaded snapshot holds) nothing goes to
        the open blocks."""
        buf = ffi.from_buffer(batch)
        poff = ffi.new("size_t *", off)
        fn = lib.m3_shard_apply_batch_agg_cells if cells_only else lib.m3_shard_apply_batch_agg
        n = check(fn(self.seg.base, self.base, buf, len(buf), seq,
                                               lo, hi, now_ms, poff, self._need_shard,
                                               self._need, self._need_gen, NEED_CAP,
                                               self._nneed), f"replaying batch {seq}")
        return n, int(poff[0]), self._needs(int(self._nneed[0]), with_shard=True)

    def group(self, shards: Any, slots: Any, gens: Any, names: Iterable[str],
              others: int) -> tuple[Any, Any]:
        """Group series (uint32 arrays ``shards``, ``slots``, ``gens``) by their labels'
        projection (csrc/plangroup.c): (group per series, uint32 with 0xFFFFFFFF for a series
        gone; index of each group's first series). The caller holds a read section or owns the
        shards."""
        import numpy as np

        shards = np.ascontiguousarray(shards, dtype=np.uint32)
        slots = np.ascontiguousarray(slots, dtype=np.uint32)
        gens = np.ascontiguousarray(gens, dtype=np.uint32)
        n = len(slots)
        enc = [nm.encode() for nm in sorted(names)]
        blob = b"".join(enc) or b"\0"
        noffs = np.zeros(len(enc) + 1, dtype=np.uint64)
        noffs[1:] = np.cumsum([len(e) for e in enc], dtype=np.uint64)
        group = np.empty(n, dtype=np.uint32)
        reps = np.empty(max(n, 1), dtype=np.uint32)
        ng = ffi.new("size_t *")
        label_bytes = n * 256
        while True:
            need = int(lib.m3_series_group_scratch(n, label_bytes))
            if len(self._gscratch) < need:
                self._gscratch = bytearray(need)
            rc = lib.m3_series_group(self.seg.base, _u32(shards), _u32(slots), _u32(gens), n,
                                     blob,
                                     ffi.cast("uint64_t *", ffi.from_buffer(noffs)), len(enc),
                                     others, _u32(group), _u32(reps), ng,
                                     ffi.from_buffer(self._gscratch), len(self._gscratch))
            if rc != lib.M3_ENOSPC:
                break
            label_bytes *= 4
        check(rc, f"grouping {n} new series")
        return group, reps[: ng[0]].copy()

    def install_many(self, shards: Any, slots: Any, gens: Any, drop_raw: bool,
                     params: list[Any], meta: list[int], labels: list[bytes],
                     start_ms: int | None = None, rules: list[int] | None = None) -> int:
        """:meth:`install` of one plan for every series (uint32 arrays ``shards``, ``slots``,
        ``gens``) in one C call; returns the plans installed (a series gone or refused cells
        by a full arena is not counted, as :meth:`install` returns M3_ENOENT / M3_ENOSPC for
        it)."""
        import numpy as np

        shards = np.ascontiguousarray(shards, dtype=np.uint32)
        slots = np.ascontiguousarray(slots, dtype=np.uint32)
        gens = np.ascontiguousarray(gens, dtype=np.uint32)
        cp, cm, blob, co, cr = _plan_args(params, meta, labels, rules)
        done = ffi.new("size_t *")
        check(lib.m3_aggst_install_many(self.seg.base, self.base, _u32(shards), _u32(slots),
                                        _u32(gens), len(slots),
                                        PLAN_DROP_RAW if drop_raw else 0, cp, cm,
                                        blob or ffi.NULL, co, cr, len(params),
                                        -(2**63) if start_ms is None else start_ms, done),
              f"installing the plans of {len(slots)} series")
        return int(done[0])

    def install(self, shard: int, slot: int, gen: int, drop_raw: bool, params: list[Any],
                meta: list[int], labels: list[bytes], start_ms: int | None = None,
                rules: list[int] | None = None) -> int:
        """Install a plan (cells ``params``, m3_agg_params; ``meta`` ns | kind << 16 | flags
        << 24; ``labels`` fixed output labels per cell, b"" = the series' own; windows ending
        at or before ``start_ms`` are final in the new cells). Returns
        M3_OK, M3_ENOENT (series gone) or M3_ENOSPC (arena full: raw only)."""
        n = len(params)
        cp, cm, blob, co, cr = _plan_args(params, meta, labels, rules)
        rc = lib.m3_aggst_install_group(self.seg.base, self.base, shard, slot, gen,
                                        PLAN_DROP_RAW if drop_raw else 0, cp, cm,
                                        blob or ffi.NULL, co, cr, n,
                                        -(2**63) if start_ms is None else start_ms)
        if rc not in (lib.M3_OK, lib.M3_ENOENT, lib.M3_ENOSPC):
            check(rc, f"installing the plan of series {shard}/{slot}")
        return int(rc)

    def fwd_pending(self, shard: int) -> tuple[int, int, int] | None:
        """The shard's unfinished rollup forward: (fwd id, finalise now, first slot)."""
        f, n, first = ffi.new("uint64_t *"), ffi.new("int64_t *"), ffi.new("uint32_t *")
        lib.m3_aggst_fwd_pending(self.base, shard, f, n, first)
        return (int(f[0]), int(n[0]), int(first[0])) if f[0] else None

    def set_fwd_pending(self, shard: int, fwd: int, now_ms: int = 0, first: int = 0) -> None:
        lib.m3_aggst_set_fwd_pending(self.base, shard, fwd, now_ms, first)

    def count_refused(self, shard: int, refused: int) -> None:
        """Source shard: ROLLUP_IN records a group namespace's admission refused (docs/rules.md,
        "Refused forwards")."""
        lib.m3_aggst_count_refused(self.base, shard, refused)

    def set_rules_version(self, shard: int, version: int) -> None:
        lib.m3_aggst_set_rules_version(self.base, shard, version)

    def plan(self, shard: int, slot: int) -> tuple[int, int, int]:
        """(generation, flags, cells) of a slot's plan entry."""
        g, f, n = ffi.new("uint32_t *"), ffi.new("uint32_t *"), ffi.new("uint32_t *")
        check(lib.m3_aggst_plan(self.base, shard, slot, g, f, n), "reading a plan")
        return int(g[0]), int(f[0]), int(n[0])

    def prepare(self, shard: int, now_ms: int, first: int = 0, rows_cap: int = 1 << 15,
                labels_cap: int = 4 << 20) -> tuple[Prepared, bool]:
        """Phase 1 for slots from ``first``: (the rows, True if the shard is done)."""
        import numpy as np

        bufs = self._out
        if bufs is None or len(bufs[0]) < rows_cap or len(bufs[2]) < labels_cap:
            dtype = np.dtype(ROW_FIELDS)
            assert dtype.itemsize == ffi.sizeof("m3_aggst_row")
            bufs = self._out = (np.empty(rows_cap, dtype=dtype),
                                np.empty(rows_cap + 1, dtype=np.uint64), bytearray(labels_cap))
        rows, loffs, labels = bufs
        rows_cap, labels_cap = len(rows), len(labels)
        streams_cap = rows_cap
        nxt, spill = ffi.new("uint32_t *"), ffi.new("uint32_t *")
        nstreams, nrows = ffi.new("size_t *"), ffi.new("size_t *")
        rc = lib.m3_aggst_prepare(self.seg.base, self.base, shard, now_ms, first, nxt, spill,
                                  self._scratch, self._scratch_cap, ffi.from_buffer(labels),
                                  labels_cap, ffi.cast("uint64_t *", ffi.from_buffer(loffs)),
                                  streams_cap, nstreams,
                                  ffi.cast("m3_aggst_row *", ffi.from_buffer(rows)), rows_cap,
                                  nrows)
        if rc != lib.M3_ENOSPC:
            check(rc, f"finalising the windows of shard {shard}")
        ns, nr = int(nstreams[0]), int(nrows[0])
        end = int(loffs[ns]) if ns else 0
        p = Prepared(shard, now_ms, first, int(nxt[0]), int(spill[0]), bytes(labels[:end]),
                     loffs[: ns + 1].copy(), rows[:nr].copy())
        return p, rc == lib.M3_OK

    def commit(self, p: Prepared) -> None:
        """Phase 2: the rows of ``p`` are durable; finalise its windows for real."""
        if p.last == SKIPPED:
            return  # nothing was due
        check(lib.m3_aggst_commit(self.seg.base, self.base, p.shard, p.now_ms, p.first,
                                  p.last, p.spill_n), f"committing shard {p.shard}")

    # -- any process ------------------------------------------------------------------------

    def stats(self, shard: int) -> dict[str, int]:
        st = ffi.new("m3_aggst_stats *")
        lib.m3_aggst_stats_get(self.base, shard, st)
        return {k: int(getattr(st, k)) for k in STATS_FIELDS}

    def totals(self) -> dict[str, int]:
        out = dict.fromkeys(STATS_FIELDS, 0)
        for s in range(self.num_shards):
            for k, v in self.stats(s).items():
                out[k] += v
        return out
