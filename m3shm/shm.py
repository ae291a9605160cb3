"""The Python face of the shared-memory segment (csrc/segment.c, lane.c, series.c).

A :class:`Segment` is a named file in ``/dev/shm`` mapped with ``MAP_SHARED``: the supervisor
creates it before forking, workers inherit the mapping, and any process can re-open it by name.
``multiprocessing.shared_memory`` is deliberately not used (its resource tracker unlinks
segments on Python 3.11). Every call that can fail goes through :func:`m3shm.errors.check`.

Nothing here touches samples one by one: batches, lanes and series are handed to C whole.
numpy is imported lazily (only the readers of samples need it), so the supervisor can import
this module before it forks without loading numpy.

Readers and reclamation (csrc/epoch.c): every thread that reads shard memory claims a reader
slot in the segment once (per process: a forked child claims its own) and brackets its reads
with :meth:`Segment.reading`; the owner reuses released chunks and expired series only after
every reader has left the section it was in. The methods here that read shards open a section
themselves; code that keeps a pointer into the segment (labels from :meth:`series_info`) must
use it inside its own ``with seg.reading():``.

Block life cycle (csrc/block.c), driven by the owner's flush: :meth:`blocks` lists what a
shard holds, :meth:`seal` closes a block for appends, :meth:`encode_block` yields one merged
tsz stream per series, :meth:`release` frees the block once its fileset is durable.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

from m3shm._native import ffi, lib
from m3shm.errors import check
from m3shm.shmfile import create_mapped

REC_HEADER = struct.Struct("<IHHIIQQIIII")  # m3_rec, 48 bytes
assert REC_HEADER.size == 48
WARM, COLD = 0, 1  # enum m3_blk_kind
STATS_FIELDS = ("nseries", "arena_used", "arena_bytes", "samples", "ooo_samples", "dropped",
                "recovered", "slots", "arena_bump", "chunks_free", "chunks_limbo",
                "chunks_released", "series_removed", "slots_limbo", "warm_floor")
# m3_flush_entry as a numpy dtype (built lazily: numpy is not imported before fork)
FLUSH_ENTRY_FIELDS = [("slot", "<u4"), ("gen", "<u4"), ("hash", "<u8"), ("labels_off", "<u8"),
                      ("labels_len", "<u4"), ("count", "<u4"), ("data_off", "<u8"),
                      ("data_len", "<u8"), ("mint", "<i8"), ("maxt", "<i8")]


class SeriesInfo(NamedTuple):
    slot: int
    gen: int
    labels: bytes   # canonical label bytes (a copy)
    max_ts: int


class EncodedPart(NamedTuple):
    """A part of an encoded block: ``data`` holds labels and tsz streams; ``entries`` (numpy,
    FLUSH_ENTRY_FIELDS) says where each series' labels and stream are in it."""

    data: memoryview
    entries: Any


class _ReaderSlot:
    """A claimed reader slot, released when the owning thread's locals are destroyed."""

    def __init__(self, buf: Any, slot: int) -> None:
        # buf (the cffi view of the mapping) keeps the mapping alive; no cycle with Segment
        self.buf, self.slot, self.pid = buf, slot, os.getpid()

    def __del__(self) -> None:
        if os.getpid() == self.pid:
            lib.m3_reader_release(ffi.cast("uint8_t *", self.buf), self.slot)


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
    buffer_past_ms: int = 10 * 60_000
    buffer_future_ms: int = 2 * 60_000
    retention_ms: int = 48 * 3600 * 1000
    cold_writes: bool = False
    ns_id: int = 0

    def to_c(self) -> Any:
        p = ffi.new("m3_seg_params *")
        p.num_shards = self.num_shards
        p.num_producers = self.num_producers
        p.lane_bytes = self.lane_bytes
        p.series_per_shard = self.series_per_shard
        p.arena_bytes = self.arena_bytes
        p.block_ms = self.block_ms
        p.seq_base = self.seq_base
        p.buffer_past_ms = self.buffer_past_ms
        p.buffer_future_ms = self.buffer_future_ms
        p.retention_ms = self.retention_ms
        p.flags = lib.M3_NS_COLD_WRITES if self.cold_writes else 0
        p.ns_id = self.ns_id
        return p

    @classmethod
    def from_c(cls, p: Any) -> SegParams:
        return cls(p.num_shards, p.num_producers, p.lane_bytes, p.series_per_shard,
                   p.arena_bytes, p.block_ms, p.seq_base, p.buffer_past_ms,
                   p.buffer_future_ms, p.retention_ms,
                   bool(p.flags & lib.M3_NS_COLD_WRITES), p.ns_id)

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
        self._local = threading.local()

    # -- life cycle -------------------------------------------------------------------------

    @classmethod
    def create(cls, path: str, params: SegParams) -> Segment:
        """Create (replacing any old one) and initialise a segment file at ``path``."""
        size = params.size()
        mm = create_mapped(path, size)
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
        params = SegParams.from_c(p)
        del buf
        return cls(path, mm, params)

    def close(self) -> None:
        """Release this thread's reader slot (other threads release theirs on exit)."""
        r = getattr(self._local, "reader", None)
        if r is not None and r.pid == os.getpid():
            lib.m3_reader_release(self.base, r.slot)
            r.pid = -1
        self._local = threading.local()

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

    def reserve_next(self, producer: int, batch: Any) -> int | None:
        """Copy a batch into ``producer``'s lanes (unpublished) and draw its global sequence
        number, which owners then wait for (lane.c). None if a lane is full: nothing reserved,
        no number drawn."""
        buf = ffi.from_buffer(batch)
        seq = ffi.new("uint64_t *")
        rc = lib.m3_lane_reserve_next(self.base, producer, buf, len(buf), seq)
        if rc == lib.M3_ENOSPC:
            return None
        check(rc, "reserving lane space for a batch")
        return int(seq[0])

    def publish(self, producer: int, bells: Segment | None = None) -> None:
        """Publish the producer's reserved batches and wake the owners they went to, whose
        doorbells are in ``bells`` (default: this segment; the daemon's owners sleep on the
        raw namespace's segment, csrc/bell.c)."""
        lib.m3_lane_publish_bells(self.base, producer, (bells or self).base)

    def wait_for_work(self, owner: int, segs: Any, nsegs: int, lo: int, hi: int,
                      timeout_ms: int) -> bool:
        """Owner: sleep on this segment's doorbell ``owner`` up to ``timeout_ms`` unless a
        lane of shards [lo, hi) in one of ``segs`` (a ``uint8_t *[]`` of segment bases:
        :meth:`bases`) holds published records; True = work waits (did not sleep)."""
        return bool(check(lib.m3_bell_wait(self.base, owner, segs, nsegs, lo, hi, timeout_ms),
                          "waiting on a doorbell"))

    def ring(self, owner: int) -> None:
        """Wake owner ``owner`` if it sleeps on this segment's doorbell."""
        lib.m3_bell_ring(self.base, owner)

    @staticmethod
    def bases(segs: list[Segment]) -> Any:
        """A C array of the segments' bases for :meth:`wait_for_work` (keep the segments)."""
        return ffi.new("uint8_t *[]", [s.base for s in segs])

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
        return {k: int(getattr(st, k)) for k in STATS_FIELDS}

    def all_recovered(self) -> bool:
        return all(self.shard_stats(s)["recovered"] for s in range(self.params.num_shards))

    def nseries(self, shard: int) -> int:
        return int(lib.m3_shard_nseries(self.base, shard))

    def series_labels(self, shard: int, slot: int) -> bytes:
        """Canonical labels of a live series (NoSuchSeriesError if the slot is free)."""
        p = ffi.new("uint8_t **")
        n = ffi.new("uint32_t *")
        with self.reading():
            check(lib.m3_series_labels(self.base, shard, slot,
                                       ffi.cast("const uint8_t **", p), n),
                  f"labels of series {shard}/{slot}")
            return ffi.buffer(p[0], n[0])[:]

    def read_series(self, shard: int, slot: int, mint: int, maxt: int) -> tuple[Any, Any]:
        """Samples of one series in [mint, maxt] as numpy arrays (int64 ms, float64).
        Empty arrays if the slot is free."""
        import numpy as np

        with self.reading():
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
                if rc == lib.M3_ENOENT:
                    return ts[:0], vs[:0]
                check(rc, f"reading series {shard}/{slot}")
                return ts[: n[0]], vs[: n[0]]

    # -- read sections (csrc/epoch.c) -------------------------------------------------------

    def _reader_slot(self) -> int:
        r = getattr(self._local, "reader", None)
        if r is None or r.pid != os.getpid():
            out = ffi.new("uint32_t *")
            check(lib.m3_reader_claim(self.base, out),
                  f"claiming a reader slot in {self.path} (all {lib.M3_MAX_READERS} are held "
                  "by live threads)")
            r = self._local.reader = _ReaderSlot(self._buf, int(out[0]))
        return r.slot

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """A read section: shard memory seen inside it is not reused until it ends."""
        slot = self._reader_slot()
        lib.m3_read_begin(self.base, slot)
        try:
            yield
        finally:
            lib.m3_read_end(self.base, slot)

    def reap_readers(self) -> int:
        """Clear the reader slots of processes that are gone."""
        return int(lib.m3_readers_reap(self.base))

    def epoch(self) -> int:
        return int(lib.m3_epoch_now(self.base))

    # -- series (any process) ---------------------------------------------------------------

    def series_info(self, shard: int, slot: int) -> SeriesInfo | None:
        """(slot, generation, labels, newest timestamp) of a live series, None if free."""
        info = ffi.new("m3_series_info *")
        with self.reading():
            rc = lib.m3_series_get(self.base, shard, slot, info)
            if rc == lib.M3_ENOENT:
                return None
            check(rc, f"series {shard}/{slot}")
            return SeriesInfo(slot, int(info.gen), ffi.buffer(info.labels, info.labels_len)[:],
                              int(info.max_ts))

    def live_slots(self, shard: int) -> Any:
        """[slot, gen] (a (k, 2) uint32 numpy array) of every live series of a shard, in slot
        order: one C call, no Python per series."""
        import numpy as np

        slots = np.arange(self.nseries(shard), dtype=np.uint32)
        gens = np.zeros(len(slots), dtype=np.uint32)
        if len(slots):
            check(lib.m3_series_gens(self.base, shard,
                                     ffi.cast("uint32_t *", ffi.from_buffer(slots)), len(slots),
                                     ffi.cast("uint32_t *", ffi.from_buffer(gens))),
                  f"listing the series of shard {shard}")
        live = gens != 0
        return np.stack([slots[live], gens[live]], axis=1)

    def live_series(self, shard: int) -> Iterator[SeriesInfo]:
        """Every live series of a shard, in slot order."""
        for slot in range(self.nseries(shard)):
            info = self.series_info(shard, slot)
            if info is not None:
                yield info

    # -- blocks (csrc/block.c) ---------------------------------------------------------------

    def blocks(self, shard: int) -> list[dict[str, int]]:
        """The (block start, kind) pairs shard holds chunks for, sorted, with counts."""
        cap = 64
        while True:
            out = ffi.new("m3_block_info[]", cap)
            n = ffi.new("size_t *")
            with self.reading():
                rc = lib.m3_shard_blocks(self.base, shard, out, cap, n)
            if rc == lib.M3_ENOSPC and n[0] > cap:
                cap = int(n[0]) + 16
                continue
            check(rc, f"listing the blocks of shard {shard}")
            return [{k: int(getattr(out[i], k)) for k in
                     ("block_start", "kind", "nseries", "chunks", "sealed", "samples")}
                    for i in range(n[0])]

    def seal(self, shard: int, block_start: int, kind: int = WARM) -> int:
        """Owner: close the block's chunks of this kind for appends. Returns chunks sealed."""
        return check(lib.m3_block_seal(self.base, shard, block_start, kind),
                     f"sealing block {block_start} of shard {shard}")

    def encode_block(self, shard: int, block_start: int, kind: int = WARM,
                     buf_bytes: int = 4 << 20, max_entries: int = 16384
                     ) -> Iterator[EncodedPart]:
        """Owner's flush: the sealed chunks of a block, one merged tsz stream per series, in
        parts of at most ``buf_bytes`` / ``max_entries`` (a series that alone needs more gets
        a bigger part). Run on a worker thread: the C call holds no lock and the GIL is
        released."""
        import numpy as np

        dtype = np.dtype(FLUSH_ENTRY_FIELDS)
        assert dtype.itemsize == ffi.sizeof("m3_flush_entry")
        cursor = ffi.new("uint32_t *", 0)
        used = ffi.new("size_t *")
        n = ffi.new("size_t *")
        idx = ffi.new("m3_flush_entry[]", max_entries)
        while True:
            out = bytearray(buf_bytes)
            with self.reading():
                rc = lib.m3_block_encode(self.base, shard, block_start, kind, cursor,
                                         ffi.from_buffer(out), buf_bytes, used, idx,
                                         max_entries, n)
            if rc == lib.M3_ENOSPC:
                buf_bytes *= 4
                continue
            check(rc, f"encoding block {block_start} of shard {shard}")
            if n[0]:
                raw = ffi.buffer(idx, n[0] * dtype.itemsize)
                entries = np.frombuffer(raw, dtype=dtype).copy()
                yield EncodedPart(memoryview(out)[: used[0]], entries)
            if rc == 0:
                return

    def release(self, shard: int, block_start: int, kind: int = WARM) -> int:
        """Owner: free the sealed chunks of a block (its fileset is durable)."""
        return check(lib.m3_block_release(self.base, shard, block_start, kind),
                     f"releasing block {block_start} of shard {shard}")

    def reclaim(self, shard: int) -> int:
        """Owner: move what no reader can see any more to the free lists."""
        return check(lib.m3_shard_reclaim(self.base, shard), f"reclaiming shard {shard}")

    def expire_series(self, shard: int, idle_before_ms: int) -> int:
        """Owner: remove series with nothing left in memory and no sample since the cut-off."""
        return check(lib.m3_shard_expire_series(self.base, shard, idle_before_ms),
                     f"expiring series of shard {shard}")

    def set_warm_floor(self, shard: int, floor_ms: int) -> None:
        """Owner: samples of blocks starting below floor_ms go to cold chunks from now on."""
        lib.m3_shard_set_warm_floor(self.base, shard, floor_ms)


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
