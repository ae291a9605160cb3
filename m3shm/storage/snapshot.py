"""Snapshots of open blocks: bound how much commit log a restart replays (docs/formats/snapshot.md).

Every ``flush.snapshot_interval`` (and at every admin flush) each owner copies its shards'
open blocks -- the chunks exactly as they are encoded in shared memory, copied in C
(csrc/snapshot.c), never decoded -- into one file per shard,
``<data>/snapshots/<namespace>/<shard>/snapshot-<seq>-content.db``, and then writes its
``...-checkpoint.db`` (the content's CRC and size) last: a snapshot without a valid checkpoint
does not exist. ``seq`` is the sequence number the snapshot covers: every batch below it is in
the copy.

Start-up loads, per shard, the newest snapshot that passes its checks and replays only batches
with ``seq`` >= its number (commit-log files closed below it are not even opened). A snapshot
that fails its checks is named in the log, set aside (``.corrupt``) and the next older one is
tried; with none, the whole commit log is replayed. So the commit log a snapshot covers is kept
until a *newer* snapshot (or a flush) covers it too: the two newest snapshots of a shard are
kept, and trimming (m3shm/storage/commitlog.py ``covered``) counts a file as covered by the
older one's number (``keep_seq``).

Blocks flushed after a snapshot was taken: the snapshot records, per block it holds, the
newest fileset volume at the time; a block whose newest volume differs at load time was
flushed since (its data is in the fileset) and is not loaded from the snapshot.

Everything here takes a namespace's (segment, directory), so it serves every namespace.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import re
import struct
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from m3shm._native import ffi, lib
from m3shm.errors import CorruptError, check
from m3shm.shm import Segment
from m3shm.storage import commitlog

log = logging.getLogger("m3shm.snapshot")

MAGIC = b"M3SN"
CKPT_MAGIC = b"M3SC"
VERSION = 1
HEADER = struct.Struct("<4sHHIIQqq24x")  # magic, version, flags, shard, ns_id, seq, created, block
TRAILER = struct.Struct("<QQQII")  # nseries, nchunks, body_len, nvolumes, 0 (file's last 32 b)
VOLUME = struct.Struct("<qq")  # block start, newest fileset volume then (-1: none)
CKPT = struct.Struct("<4sHHIIQ")  # magic, version, 0, crc32 of content, 0, content size
NAME = re.compile(r"^snapshot-(\d{20})-(content|checkpoint)\.db$")
KEEP = 2  # snapshots kept per shard: the newest, and the one to fall back to
BUF_BYTES = 4 << 20
assert HEADER.size == 64 and TRAILER.size == 32 and CKPT.size == 24


class CorruptSnapshotError(CorruptError):
    """A snapshot file that is not what its format says: names the file, the offset and what
    was expected there."""

    def __init__(self, path: Path, offset: int, expected: str) -> None:
        self.path, self.offset, self.expected = path, offset, expected
        super().__init__(f"corrupt snapshot file {path} at offset {offset}: expected {expected}")


@dataclass(frozen=True)
class SnapInfo:
    shard: int
    seq: int
    nseries: int
    nchunks: int
    nbytes: int


def shard_dir(root: Path, namespace: str, shard: int) -> Path:
    return Path(root) / namespace / f"{shard:04d}"


def content_path(d: Path, seq: int) -> Path:
    return d / f"snapshot-{seq:020d}-content.db"


def checkpoint_path(d: Path, seq: int) -> Path:
    return d / f"snapshot-{seq:020d}-checkpoint.db"


def complete(d: Path) -> list[int]:
    """Sequence numbers of the snapshots in ``d`` that have a checkpoint, newest first."""
    try:
        names = os.listdir(d)
    except FileNotFoundError:
        return []
    out = []
    for n in names:
        m = NAME.match(n)
        if m and m.group(2) == "checkpoint":
            out.append(int(m.group(1)))
    return sorted(out, reverse=True)


def _newest_volume(fileset_root: Path, namespace: str, shard: int, bs: int) -> int:
    from m3shm.storage.shard_flush import newest_volume

    v = newest_volume(Path(fileset_root), namespace, shard, bs)
    return -1 if v is None else v


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- writing ------------------------------------------------------------------------------------

def write_shard(seg: Segment, root: Path, namespace: str, shard: int, seq: int,
                fileset_root: Path) -> SnapInfo:
    """Copy one shard's open blocks into a snapshot covering ``seq`` (the owner, with every
    batch below ``seq`` applied to the shard; see :meth:`Snapshots.take`)."""
    d = shard_dir(root, namespace, shard)
    d.mkdir(parents=True, exist_ok=True)
    starts = sorted({b["block_start"] for b in seg.blocks(shard)})
    vols = [(bs, _newest_volume(fileset_root, namespace, shard, bs)) for bs in starts]
    path, ckpt = content_path(d, seq), checkpoint_path(d, seq)
    p = seg.params
    cap = BUF_BYTES
    out = ffi.new("uint8_t[]", cap)
    cursor = ffi.new("uint32_t *")
    used = ffi.new("size_t *")
    nseries = ffi.new("uint64_t *")
    nchunks = ffi.new("uint64_t *")
    try:
        with open(path, "wb") as f:
            head = HEADER.pack(MAGIC, VERSION, 0, shard, p.ns_id, seq, int(time.time() * 1000),
                               p.block_ms)
            f.write(head)
            crc = zlib.crc32(head)
            size, body = len(head), 0
            while True:
                rc = lib.m3_shard_snapshot(seg.base, shard, cursor, out, cap, used, nseries,
                                           nchunks)
                if rc == lib.M3_ENOSPC:  # one series needs more than the buffer
                    cap = max(cap * 2, int(used[0]))
                    out = ffi.new("uint8_t[]", cap)
                    continue
                check(rc, f"snapshot of shard {shard}")
                chunk = ffi.buffer(out, used[0])
                f.write(chunk)
                crc = zlib.crc32(chunk, crc)
                size += used[0]
                body += used[0]
                if rc == 0:
                    break
            tail = b"".join(VOLUME.pack(bs, v) for bs, v in vols) + TRAILER.pack(
                nseries[0], nchunks[0], body, len(vols), 0)
            f.write(tail)
            crc = zlib.crc32(tail, crc)
            size += len(tail)
            f.flush()
            os.fsync(f.fileno())
        tmp = ckpt.with_name(ckpt.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(CKPT.pack(CKPT_MAGIC, VERSION, 0, crc & 0xFFFFFFFF, 0, size))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, ckpt)
        _fsync_dir(d)
    except BaseException:
        for q in (ckpt, ckpt.with_name(ckpt.name + ".tmp"), path):
            with contextlib.suppress(OSError):
                q.unlink()
        raise
    return SnapInfo(shard, seq, int(nseries[0]), int(nchunks[0]), size)


def prune(d: Path, keep: int = KEEP) -> None:
    """Delete all but the ``keep`` newest complete snapshots of a shard, and the files of
    incomplete ones (call only while no snapshot of the shard is being written)."""
    try:
        names = sorted(os.listdir(d))
    except FileNotFoundError:
        return
    seqs = complete(d)
    kept = set(seqs[:keep])
    for n in names:
        if n.startswith("snapshot-") and n.endswith(".tmp"):
            (d / n).unlink(missing_ok=True)
    for seq in seqs[keep:]:  # checkpoint first: a crash leaves an incomplete snapshot
        checkpoint_path(d, seq).unlink(missing_ok=True)
    for n in names:
        m = NAME.match(n)
        if m and m.group(2) == "content" and int(m.group(1)) not in kept:
            if int(m.group(1)) not in seqs:
                log.warning("removing %s: its snapshot has no checkpoint (writing did not "
                            "finish)", d / n)
            (d / n).unlink(missing_ok=True)


# -- reading ------------------------------------------------------------------------------------

@dataclass
class Opened:
    path: Path
    mm: mmap.mmap
    seq: int
    body: tuple[int, int]  # offset, length
    nseries: int
    nchunks: int
    volumes: list[tuple[int, int]]

    def close(self) -> None:
        self.mm.close()


def open_snapshot(d: Path, seq: int, shard: int, ns_id: int, block_ms: int) -> Opened:
    """Map a complete snapshot and check it: checkpoint, size, CRC, header, trailer."""
    cp, path = checkpoint_path(d, seq), content_path(d, seq)
    raw = cp.read_bytes()
    if len(raw) != CKPT.size:
        raise CorruptSnapshotError(cp, 0, f"a {CKPT.size}-byte checkpoint, found {len(raw)}")
    magic, version, _, crc, _, size = CKPT.unpack(raw)
    if magic != CKPT_MAGIC or version != VERSION:
        raise CorruptSnapshotError(cp, 0, f"magic {CKPT_MAGIC!r} version {VERSION}")
    try:
        with open(path, "rb") as f:
            actual = os.fstat(f.fileno()).st_size
            if actual != size:
                raise CorruptSnapshotError(path, actual, f"{size} bytes (the checkpoint's)")
            mm = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    except FileNotFoundError:
        raise CorruptSnapshotError(path, 0, "the content file its checkpoint names") from None
    try:
        if zlib.crc32(mm) & 0xFFFFFFFF != crc:
            raise CorruptSnapshotError(path, 0, "the CRC-32 its checkpoint records")
        m, ver, _fl, sh, ns, sq, _created, bms = HEADER.unpack_from(mm, 0)
        if m != MAGIC or ver != VERSION:
            raise CorruptSnapshotError(path, 0, f"magic {MAGIC!r} version {VERSION}")
        if (sh, ns, sq, bms) != (shard, ns_id, seq, block_ms):
            raise CorruptSnapshotError(path, 8, f"shard {shard}, namespace id {ns_id}, seq "
                                       f"{seq}, block size {block_ms} ms; found {sh}, {ns}, "
                                       f"{sq}, {bms}")
        if size < HEADER.size + TRAILER.size:
            raise CorruptSnapshotError(path, size, "a header and a trailer")
        tail_off = size - TRAILER.size
        nseries, nchunks, body_len, nvol, _ = TRAILER.unpack_from(mm, tail_off)
        if HEADER.size + body_len + nvol * VOLUME.size != tail_off:
            raise CorruptSnapshotError(path, tail_off, f"a trailer whose body ({body_len} "
                                       f"bytes) and {nvol} volumes fill the file")
        vols = [VOLUME.unpack_from(mm, HEADER.size + body_len + i * VOLUME.size)
                for i in range(nvol)]
        off = HEADER.size
        return Opened(path, mm, seq, (off, body_len), nseries, nchunks, vols)
    except BaseException:
        mm.close()
        raise


# -- loading ------------------------------------------------------------------------------------

def load_shard(seg: Segment, root: Path, namespace: str, shard: int,
               fileset_root: Path) -> tuple[int, SnapInfo | None]:
    """Load the newest good snapshot of a shard into it (the owner, at start-up, before
    replay). Returns (the seq it covers, its info), or (0, None) when no snapshot loads."""
    d = shard_dir(root, namespace, shard)
    p = seg.params
    for seq in complete(d):
        try:
            snap = open_snapshot(d, seq, shard, p.ns_id, p.block_ms)
        except (CorruptError, OSError) as e:
            _set_aside(d, seq, e)
            continue
        try:
            skip = [bs for bs, vol in snap.volumes
                    if _newest_volume(fileset_root, namespace, shard, bs) != vol]
            sk = ffi.new("int64_t[]", skip or [0])
            ns_, nc_, smp, bad = (ffi.new("uint64_t *"), ffi.new("uint64_t *"),
                                  ffi.new("uint64_t *"), ffi.new("size_t *"))
            off, n = snap.body
            body = ffi.from_buffer(snap.mm)
            rc = lib.m3_shard_load_snapshot(seg.base, shard, body + off, n, sk, len(skip), ns_,
                                            nc_, smp, bad)
            if rc in (lib.M3_ECORRUPT, lib.M3_ETRUNC):
                _set_aside(d, seq, CorruptSnapshotError(snap.path, off + bad[0],
                                                        "a valid series or chunk"))
                continue
            check(rc, f"loading snapshot {snap.path} into shard {shard}")
            del body
            return seq, SnapInfo(shard, seq, int(ns_[0]), int(nc_[0]), n)
        finally:
            snap.close()
    return 0, None


def _set_aside(d: Path, seq: int, e: BaseException) -> None:
    log.error("%s; setting snapshot %d of %s aside (.corrupt) and falling back to an older "
              "snapshot or the commit log", e, seq, d)
    with contextlib.suppress(OSError):
        content_path(d, seq).rename(content_path(d, seq).with_suffix(".db.corrupt"))
    with contextlib.suppress(OSError):
        checkpoint_path(d, seq).unlink()


class Floors:
    """Per shard, the seq its loaded snapshot covers: replay applies a batch to a shard only
    from that seq on, and skips commit-log files closed below every floor. With a ``start``
    below the floors (aggregation: windows still open need raw samples a snapshot holds),
    batches from ``start`` up to a shard's floor are handed to ``cells`` instead (they feed
    the aggregation cells, not the open blocks)."""

    def __init__(self, floors: dict[int, int], lo: int, hi: int,
                 start: int | None = None) -> None:
        self.floors, self.lo, self.hi = floors, lo, hi
        vals = [floors.get(s, 0) for s in range(lo, hi)] or [0]
        self.min, self.max = min(vals), max(vals)
        self.start = None if start is None or start >= self.min else start

    def with_start(self, start: int | None) -> Floors:
        """These floors, with batches from ``start`` on also replayed into cells."""
        return Floors(self.floors, self.lo, self.hi, start)

    def skips_file(self, path: str) -> bool:
        """A closed file whose every batch is below every shard's floor (and the start)."""
        return self._below(path, self.min if self.start is None else self.start)

    def cells_only_file(self, path: str) -> bool:
        """A file read only for the aggregation cells (every batch below every floor)."""
        return self._below(path, self.min) and not self.skips_file(path)

    @staticmethod
    def _below(path: str, seq: int) -> bool:
        if seq == 0:
            return False
        idx = commitlog.read_index(path)
        return idx is not None and idx["close_seq"] <= seq

    def apply(self, apply_batch: Callable[[Any, int, int, int], int], payload: Any, seq: int,
              cells: Callable[[Any, int, int, int], int] | None = None) -> int:
        """Apply a batch with ``apply_batch(payload, seq, lo, hi)`` to the shards whose floor
        it reaches, and with ``cells`` (same arguments) to those it does not if it is at or
        above the start."""
        if seq >= self.max:
            return apply_batch(payload, seq, self.lo, self.hi)
        below = cells if cells is not None and self.start is not None and \
            seq >= self.start else None
        if seq < self.min and below is None:
            return 0
        n, s = 0, self.lo
        while s < self.hi:  # runs of consecutive shards that take the batch the same way
            fn = apply_batch if seq >= self.floors.get(s, 0) else below
            e = s + 1
            while e < self.hi and (apply_batch if seq >= self.floors.get(e, 0) else below) is fn:
                e += 1
            if fn is not None:
                n += fn(payload, seq, s, e)
            s = e
        return n


def first_seq_since(files: list[str], min_ts: int) -> int | None:
    """The first sequence number of the earliest of ``files`` that may hold a sample at or
    after ``min_ts`` (a file without an index may hold anything); None if none does."""
    best = None
    for p in files:
        idx = commitlog.read_index(p)
        if idx is not None and idx["max_ts"] < min_ts:
            continue
        f = commitlog.first_seq(p)
        if f is not None and (best is None or f < best):
            best = f
    return best


# -- one worker's snapshots of one namespace ----------------------------------------------------

class Snapshots:
    """The snapshots of one namespace's shards [lo, hi) owned by one worker."""

    def __init__(self, seg: Segment, root: Path, namespace: str, fileset_root: Path,
                 shards: range) -> None:
        self.seg, self.root, self.ns = seg, Path(root), namespace
        self.fileset_root = Path(fileset_root)
        self.shards = shards

    def remove_incomplete(self) -> None:
        for s in self.shards:
            prune(shard_dir(self.root, self.ns, s), keep=1 << 30)

    def load(self) -> Floors:
        floors = {}
        for s in self.shards:
            t0 = time.monotonic()
            seq, info = load_shard(self.seg, self.root, self.ns, s, self.fileset_root)
            floors[s] = seq
            if info is not None:
                log.info("loaded snapshot %d of %s shard %d: %d series, %d chunks in %.3fs",
                         seq, self.ns, s, info.nseries, info.nchunks, time.monotonic() - t0)
        return Floors(floors, self.shards.start, self.shards.stop)

    def take(self, stopped: Callable[[], bool], timeout: float = 60.0) -> tuple[int, int]:
        """Snapshot every shard; returns (the seq the new snapshots cover, the seq the older
        kept snapshot of every shard covers: what commit-log trimming may count on)."""
        seg = self.seg
        seq = int(lib.m3_seq_sync(seg.base))
        deadline = time.monotonic() + timeout
        while not lib.m3_seq_settled(seg.base, seq):
            if stopped() or time.monotonic() > deadline:
                raise RuntimeError(f"snapshot of {self.ns}: batches below {seq} stayed "
                                   "unpublished")
            time.sleep(0.001)
        tails = seg.tails()
        per = seg.params.num_producers
        for s in range(seg.params.num_shards):
            if s not in self.shards:
                for p in range(per):
                    tails[s * per + p] = 0
        while not seg.caught_up(tails):
            if stopped() or time.monotonic() > deadline:
                raise RuntimeError(f"snapshot of {self.ns}: shards did not catch up")
            time.sleep(0.001)
        t0 = time.monotonic()
        nseries = nbytes = 0
        for s in self.shards:
            info = write_shard(seg, self.root, self.ns, s, seq, self.fileset_root)
            nseries += info.nseries
            nbytes += info.nbytes
        keep = []
        for s in self.shards:
            d = shard_dir(self.root, self.ns, s)
            prune(d)
            seqs = complete(d)
            keep.append(seqs[1] if len(seqs) > 1 else 0)
        log.info("snapshot %d of %s shards [%d, %d): %d series, %d bytes in %.3fs", seq, self.ns,
                 self.shards.start, self.shards.stop, nseries, nbytes, time.monotonic() - t0)
        return seq, min(keep, default=0)
