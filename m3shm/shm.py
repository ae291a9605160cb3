"""The Python face of the shared-memory segment (csrc/segment.c, lane.c, series.c).

A :class:`Segment` is a named file in ``/dev/shm`` mapped with ``MAP_SHARED``: the supervisor
creates it before forking, workers inherit the mapping, and any process can re-open it by name.
``multiprocessing.shared_memory`` is deliberately not used (its resource tracker unlinks
segments on Python 3.11). Every call that can fail goes through :func:`m3shm.errors.check`.

Nothing here touches samples one by one: batches, lanes and series are handed to C whole.
numpy is imported lazily (only :meth:`Segment.read_series` needs it), so the supervisor can
import this module before it forks without loading numpy.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any

from m3shm._native import ffi, lib
from m3shm.errors import check

REC_HEADER = struct.Struct("<IHHIIQQIIII")  # m3_rec, 48 bytes
assert REC_HEADER.size == 48


@dataclass(frozen=True)
class SegParams:
    """Creation parameters of a segment (recorded in its header)."""

    num_shards: int
    num_producers: int
    lane_bytes: int = 1 << 20
    series_per_shard: int = 1 << 14
    arena_bytes: int = 16 << 20
    block_ms: int = 2 * 3600 * 1000
    seq_base: int = 0

    def to_c(self) -> Any:
        p = ffi.new("m3_seg_params *")
        p.num_shards = self.num_shards
        p.num_producers = self.num_producers
        p.lane_bytes = self.lane_bytes
        p.series_per_shard = self.series_per_shard
        p.arena_bytes = self.arena_bytes
        p.block_ms = self.block_ms
        p.seq_base = self.seq_base
        return p

    def size(self) -> int:
        n = lib.m3_seg_size(self.to_c())
        if not n:
            raise ValueError(f"invalid segment parameters: {self}")
        return int(n)


def seq_base_now() -> int:
    """A sequence base above every number a previous run could have taken: wall-clock
    microseconds times 1024 (a run would need more than 1024 batches per microsecond to
    overtake a later start)."""
    import time

    return int(time.time() * 1_000_000) << 10


class Segment:
    """A mapped segment. ``base`` is the ``uint8_t *`` the C functions take."""

    def __init__(self, path: str, mm: mmap.mmap, params: SegParams) -> None:
        self.path = path
        self._mm = mm
        self._buf = ffi.from_buffer("uint8_t[]", mm, require_writable=True)
        self.base = ffi.cast("uint8_t *", self._buf)
        self.params = params
        self.nlanes = params.num_shards * params.num_producers

    # -- life cycle -------------------------------------------------------------------------

    @classmethod
    def create(cls, path: str, params: SegParams) -> Segment:
        """Create (replacing any old one) and initialise a segment file at ``path``."""
        size = params.size()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        seg = cls(path, mm, params)
        check(lib.m3_seg_init(seg.base, size, params.to_c()), f"initialising segment {path}")
        return seg

    @classmethod
    def open(cls, path: str) -> Segment:
        """Map an existing segment and validate its header."""
        fd = os.open(path, os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        buf = ffi.from_buffer("uint8_t[]", mm, require_writable=True)
        p = ffi.new("m3_seg_params *")
        check(lib.m3_seg_check(ffi.cast("uint8_t *", buf), size, p), f"opening segment {path}")
        params = SegParams(p.num_shards, p.num_producers, p.lane_bytes, p.series_per_shard,
                           p.arena_bytes, p.block_ms, p.seq_base)
        del buf
        return cls(path, mm, params)

    def unlink(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    # -- producer side ----------------------------------------------------------------------

    def next_seq(self) -> int:
        return int(lib.m3_seg_next_seq(self.base))

    def reserve(self, producer: int, batch: Any, seq: int) -> bool:
        """Copy a batch of records into ``producer``'s lanes (unpublished). False if a lane
        is full (nothing reserved)."""
        buf = ffi.from_buffer(batch)
        rc = lib.m3_lane_reserve(self.base, producer, buf, len(buf), seq)
        if rc == lib.M3_ENOSPC:
            return False
        check(rc, "reserving lane space for a batch")
        return True

    def publish(self, producer: int) -> None:
        lib.m3_lane_publish(self.base, producer)

    def recover_producer(self, producer: int) -> None:
        lib.m3_lane_recover_producer(self.base, producer)

    def admit(self, batch: bytearray, length: int) -> tuple[int, int, int, str]:
        """Drop records a full shard cannot take. Returns (new length, rejected records,
        rejected samples, message naming the first)."""
        rej = ffi.new("uint32_t *")
        rej_s = ffi.new("uint32_t *")
        msg = ffi.new("char[512]")
        buf = ffi.from_buffer(batch, require_writable=True)
        n = lib.m3_batch_admit(self.base, buf, length, rej, rej_s, msg, 512)
        return int(n), int(rej[0]), int(rej_s[0]), ffi.string(msg).decode("utf-8", "replace")

    def set_producer_done(self, producer: int, done: bool) -> None:
        lib.m3_seg_set_producer_done(self.base, producer, 1 if done else 0)

    def all_producers_done(self) -> bool:
        return bool(lib.m3_seg_all_producers_done(self.base))

    # -- owner side -------------------------------------------------------------------------

    def drain(self, shard: int, max_records: int = 4096) -> int:
        return check(lib.m3_lane_drain(self.base, shard, max_records), f"draining shard {shard}")

    def drain_range(self, lo: int, hi: int, max_records: int = 4096) -> int:
        n = 0
        for s in range(lo, hi):
            n += self.drain(s, max_records)
        return n

    def recover_shard(self, shard: int) -> None:
        check(lib.m3_shard_recover(self.base, shard), f"recovering shard {shard}")

    def set_recovered(self, shard: int, value: bool = True) -> None:
        lib.m3_shard_set_recovered(self.base, shard, 1 if value else 0)

    def apply_batch(self, batch: Any, seq: int, lo: int, hi: int) -> int:
        buf = ffi.from_buffer(batch)
        return check(lib.m3_shard_apply_batch(self.base, buf, len(buf), seq, lo, hi),
                     f"applying batch {seq}")

    def backlog(self, shard: int) -> int:
        return int(lib.m3_lane_backlog(self.base, shard))

    def pop(self, shard: int, producer: int, cap: int = 1 << 16) -> bytes | None:
        """Test helper: pop one record of one lane (bypassing the series table)."""
        out = ffi.new("uint8_t[]", cap)
        n = ffi.new("size_t *")
        check(lib.m3_lane_pop_spsc(self.base, shard, producer, out, cap, n), "popping a record")
        return ffi.buffer(out, n[0])[:] if n[0] else None

    # -- readers (any process) --------------------------------------------------------------

    def tails(self) -> Any:
        t = ffi.new("uint64_t[]", self.nlanes)
        lib.m3_lane_tails(self.base, t)
        return t

    def caught_up(self, tails: Any) -> bool:
        return bool(lib.m3_lane_caught_up(self.base, tails))

    def lane_backlog(self, shard: int) -> int:
        """Bytes published to the shard's lanes and not yet consumed."""
        return int(lib.m3_lane_backlog(self.base, shard))

    def shard_stats(self, shard: int) -> dict[str, int]:
        st = ffi.new("m3_shard_stats *")
        lib.m3_shard_stats_get(self.base, shard, st)
        return {k: int(getattr(st, k)) for k in
                ("nseries", "arena_used", "arena_bytes", "samples", "ooo_samples", "dropped",
                 "recovered")}

    def all_recovered(self) -> bool:
        return all(self.shard_stats(s)["recovered"] for s in range(self.params.num_shards))

    def nseries(self, shard: int) -> int:
        return int(lib.m3_shard_nseries(self.base, shard))

    def series_labels(self, shard: int, slot: int) -> bytes:
        p = ffi.new("uint8_t **")
        n = ffi.new("uint32_t *")
        check(lib.m3_series_labels(self.base, shard, slot, ffi.cast("const uint8_t **", p), n),
              f"labels of series {shard}/{slot}")
        return ffi.buffer(p[0], n[0])[:]

    def read_series(self, shard: int, slot: int, mint: int, maxt: int) -> tuple[Any, Any]:
        """Samples of one series in [mint, maxt] as numpy arrays (int64 ms, float64)."""
        import numpy as np

        cap = int(lib.m3_series_count(self.base, shard, slot)) + 16
        while True:
            ts = np.empty(cap, dtype=np.int64)
            vs = np.empty(cap, dtype=np.float64)
            n = ffi.new("size_t *")
            rc = lib.m3_series_read(self.base, shard, slot, mint, maxt,
                                    ffi.cast("int64_t *", ffi.from_buffer(ts)),
                                    ffi.cast("double *", ffi.from_buffer(vs)), cap, n)
            if rc == lib.M3_ENOSPC:
                cap *= 2
                continue
            check(rc, f"reading series {shard}/{slot}")
            return ts[: n[0]], vs[: n[0]]


def parse_labels(canon: bytes) -> dict[str, str]:
    """Canonical label bytes (repeated u16 name_len, name, u16 value_len, value) -> dict."""
    out: dict[str, str] = {}
    i, n = 0, len(canon)
    while i < n:
        (nl,) = struct.unpack_from("<H", canon, i)
        name = canon[i + 2 : i + 2 + nl].decode()
        i += 2 + nl
        (vl,) = struct.unpack_from("<H", canon, i)
        out[name] = canon[i + 2 : i + 2 + vl].decode()
        i += 2 + vl
    return out


def canonical_labels(labels: dict[str, str]) -> bytes:
    """The canonical bytes of a label set (sorted by name)."""
    parts = []
    for k in sorted(labels):
        kb, vb = k.encode(), labels[k].encode()
        parts.append(struct.pack("<H", len(kb)) + kb + struct.pack("<H", len(vb)) + vb)
    return b"".join(parts)


def labels_hash(canon: bytes) -> int:
    return int(lib.m3_labels_hash(canon, len(canon)))


def make_record(labels: dict[str, str], ts: list[int], vs: list[float], num_shards: int,
                shard: int | None = None) -> bytes:
    """Build one record in Python (tests and tools only; the hot path builds them in C)."""
    canon = canonical_labels(labels)
    h = labels_hash(canon)
    n = len(ts)
    pad = (-len(canon)) % 8
    body = canon + b"\0" * pad + struct.pack(f"<{n}q", *ts) + struct.pack(f"<{n}d", *vs)
    hdr = REC_HEADER.pack(48 + len(body), lib.M3_REC_SAMPLES, lib.M3_VT_FLOAT,
                          h % num_shards if shard is None else shard, 0, 0, h, n, len(canon),
                          len(labels), 0)
    return hdr + body
