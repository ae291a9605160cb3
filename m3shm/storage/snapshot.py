"""Snapshots of open blocks: bound how much commit log a restart replays (docs/formats/snapshot.md).

Every ``flush.snapshot_interval`` (and at every admin flush) each owner copies the open blocks
of the shards it owns -- the chunks exactly as they are encoded in shared memory, copied in C
(csrc/snapshot.c), never decoded -- into **one file per (worker, namespace)**:
``<data>/snapshots/<namespace>/snapshot-<seq>-<lo>-<hi>.db`` holds a body per shard of
[lo, hi), a shard table and a trailer with the CRC of everything before it. It is written as
``….db.tmp``, fsync'd and renamed into place: a snapshot exists once its name does, whole.
When none of the shards holds anything open, the snapshot is an empty file
``snapshot-<seq>-<lo>-<hi>-empty.db`` (it still moves the replay floor). ``seq`` is the
sequence number the snapshot covers: every batch below it is in the copy.

Start-up loads, per shard, the newest snapshot covering it that passes its checks (any worker
layout: a file of another shard range is used for the shards it holds) and replays only
batches with ``seq`` >= its number (commit-log files closed below it are not even opened). A
snapshot that fails its checks is named in the log, set aside (``.corrupt``) and the next
older one is tried; with none, the whole commit log is replayed. So the commit log a snapshot
covers is kept until a *newer* snapshot (or a flush) covers it too: every shard keeps its two
newest snapshots, and trimming (m3shm/storage/commitlog.py ``covered``) counts a file as
covered by the older one's number (``keep_seq``).

Blocks flushed after a snapshot was taken: the snapshot records, per shard and block it holds,
the newest fileset volume at the time; a block whose newest volume differs at load time was
flushed since (its data is in the fileset) and is not loaded from the snapshot.

Version 1 (one file and a checkpoint per shard, ``<namespace>/<shard>/``) is still read and
pruned like version 2; :func:`write_shard_v1` writes it for the tests.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from m3shm._native import ffi, lib
from m3shm.errors import CorruptError, check
from m3shm.shm import Segment
from m3shm.storage import commitlog

log = logging.getLogger("m3shm.snapshot")

MAGIC = b"M3SN"
END_MAGIC = b"M3SE"
CKPT_MAGIC = b"M3SC"
VERSION = 2
# version 2: one file per (worker, namespace)
HEADER2 = struct.Struct("<4sHHIIIIQqq16x")  # magic, version, 0, lo, hi, ns_id, 0, seq, created,
#                                             block ms
ENTRY = struct.Struct("<IIQQQQ")  # shard, nvolumes, body offset, body length, nseries, nchunks
TRAILER2 = struct.Struct("<QQII4sI")  # table offset, file size, nshards, 0, "M3SE", crc32
# version 1: one file per shard, and a checkpoint
HEADER = struct.Struct("<4sHHIIQqq24x")  # magic, version, flags, shard, ns_id, seq, created, block
TRAILER = struct.Struct("<QQQII")  # nseries, nchunks, body_len, nvolumes, 0 (file's last 32 b)
CKPT = struct.Struct("<4sHHIIQ")  # magic, version, 0, crc32 of content, 0, content size
VOLUME = struct.Struct("<qq")  # block start, newest fileset volume then (-1: none)
NAME = re.compile(r"^snapshot-(\d{20})-(\d{4,})-(\d{4,})(-empty)?\.db$")
NAME_V1 = re.compile(r"^snapshot-(\d{20})-(content|checkpoint)\.db$")
TMP = re.compile(r"^snapshot-\d{20}-(\d{4,})-(\d{4,})(?:-empty)?\.db\.tmp$")
KEEP = 2  # snapshots kept per shard: the newest, and the one to fall back to
BUF_BYTES = 4 << 20
assert HEADER2.size == 64 and ENTRY.size == 40 and TRAILER2.size == 32
assert HEADER.size == 64 and TRAILER.size == 32 and CKPT.size == 24


class CorruptSnapshotError(CorruptError):
    """A snapshot file that is not what its format says: names the file, the offset and what
    was expected there."""

    def __init__(self, path: Path, offset: int, expected: str) -> None:
        self.path, self.offset, self.expected = path, offset, expected
        super().__init__(f"corrupt snapshot file {path} at offset {offset}: expected {expected}")


@dataclass(frozen=True)
class SnapInfo:
    shards: range
    seq: int
    nseries: int
    nchunks: int
    nbytes: int


def ns_dir(root: Path, namespace: str) -> Path:
    return Path(root) / namespace


def file_path(root: Path, namespace: str, seq: int, shards: range, empty: bool = False) -> Path:
    """A version-2 snapshot of ``shards`` covering ``seq``."""
    return ns_dir(root, namespace) / (f"snapshot-{seq:020d}-{shards.start:04d}-"
                                      f"{shards.stop:04d}{'-empty' if empty else ''}.db")


def shard_dir(root: Path, namespace: str, shard: int) -> Path:
    """Where version 1 kept a shard's snapshots."""
    return Path(root) / namespace / f"{shard:04d}"


def content_path(d: Path, seq: int) -> Path:
    return d / f"snapshot-{seq:020d}-content.db"


def checkpoint_path(d: Path, seq: int) -> Path:
    return d / f"snapshot-{seq:020d}-checkpoint.db"


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


# -- finding snapshots ----------------------------------------------------------------------------

@dataclass
class SnapFile:
    """One complete snapshot: a version-2 file (``shards`` its range; ``empty``: a zero-length
    marker) or a version-1 shard's content and checkpoint (``version`` 1, one shard)."""

    path: Path
    seq: int
    shards: range
    version: int = 2
    empty: bool = False
    bad: bool = field(default=False, compare=False)

    def covers(self, shard: int) -> bool:
        return shard in self.shards


def listing(root: Path, namespace: str, shards: range | None = None) -> list[SnapFile]:
    """The complete snapshots of a namespace (version 2, and version 1 of ``shards``, every
    shard directory if None), newest first."""
    d = ns_dir(root, namespace)
    out: list[SnapFile] = []
    try:
        names = os.listdir(d)
    except FileNotFoundError:
        return out
    for n in names:
        m = NAME.match(n)
        if m:
            out.append(SnapFile(d / n, int(m.group(1)), range(int(m.group(2)), int(m.group(3))),
                                empty=m.group(4) is not None))
        elif n.isdigit() and (shards is None or int(n) in shards):
            s = int(n)
            for seq in complete_v1(d / n):
                out.append(SnapFile(content_path(d / n, seq), seq, range(s, s + 1), version=1))
    out.sort(key=lambda f: (f.seq, f.version), reverse=True)
    return out


def complete_v1(d: Path) -> list[int]:
    """Sequence numbers of the version-1 snapshots in shard directory ``d`` that have a
    checkpoint, newest first."""
    try:
        names = os.listdir(d)
    except FileNotFoundError:
        return []
    out = []
    for n in names:
        m = NAME_V1.match(n)
        if m and m.group(2) == "checkpoint":
            out.append(int(m.group(1)))
    return sorted(out, reverse=True)


def kept_seqs(files: list[SnapFile], shard: int) -> list[int]:
    """Seqs of the complete snapshots covering ``shard``, newest first."""
    return [f.seq for f in files if f.covers(shard)]


# -- writing --------------------------------------------------------------------------------------

def _copy_shard(seg: Segment, shard: int, f: Any, crc: int,
                state: dict) -> tuple[int, int, int, int]:
    """Append shard's body to ``f`` (``state``: the copy buffer, grown when one series needs
    more); returns (crc, body bytes, nseries, nchunks)."""
    cursor = ffi.new("uint32_t *")
    used = ffi.new("size_t *")
    nseries = ffi.new("uint64_t *")
    nchunks = ffi.new("uint64_t *")
    body = 0
    while True:
        rc = lib.m3_shard_snapshot(seg.base, shard, cursor, state["out"], state["cap"], used,
                                   nseries, nchunks)
        if rc == lib.M3_ENOSPC:  # one series needs more than the buffer
            state["cap"] = max(state["cap"] * 2, int(used[0]))
            state["out"] = ffi.new("uint8_t[]", state["cap"])
            continue
        check(rc, f"snapshot of shard {shard}")
        chunk = ffi.buffer(state["out"], used[0])
        f.write(chunk)
        crc = zlib.crc32(chunk, crc)
        body += used[0]
        if rc == 0:
            return crc, body, int(nseries[0]), int(nchunks[0])


def write_snapshot(seg: Segment, root: Path, namespace: str, shards: range, seq: int,
                   fileset_root: Path) -> SnapInfo:
    """Copy the open blocks of ``shards`` into one snapshot covering ``seq`` (the owner, with
    every batch below ``seq`` applied to them; see :meth:`Snapshots.take`)."""
    d = ns_dir(root, namespace)
    d.mkdir(parents=True, exist_ok=True)
    p = seg.params
    path = file_path(root, namespace, seq, shards)
    tmp = path.with_name(path.name + ".tmp")
    state = {"cap": BUF_BYTES, "out": ffi.new("uint8_t[]", BUF_BYTES)}
    entries: list[bytes] = []
    total_series = total_chunks = 0
    try:
        with open(tmp, "wb") as f:
            head = HEADER2.pack(MAGIC, VERSION, 0, shards.start, shards.stop, p.ns_id, 0, seq,
                                int(time.time() * 1000), p.block_ms)
            f.write(head)
            crc = zlib.crc32(head)
            size = len(head)
            for s in shards:
                starts = sorted({b["block_start"] for b in seg.blocks(s)})
                vols = [(bs, _newest_volume(fileset_root, namespace, s, bs)) for bs in starts]
                crc, body, nser, nch = _copy_shard(seg, s, f, crc, state)
                entries.append(ENTRY.pack(s, len(vols), size, body, nser, nch) +
                               b"".join(VOLUME.pack(bs, v) for bs, v in vols))
                size += body
                total_series += nser
                total_chunks += nch
            if total_series:
                table = b"".join(entries)
                tail = table + TRAILER2.pack(size, size + len(table) + TRAILER2.size,
                                             len(shards), 0, END_MAGIC, 0)[:-4]
                crc = zlib.crc32(tail, crc)
                f.write(tail + struct.pack("<I", crc & 0xFFFFFFFF))
                size += len(tail) + 4
                f.flush()
                os.fsync(f.fileno())
        if not total_series:  # nothing open: an empty marker carries the seq
            tmp.unlink()
            path = file_path(root, namespace, seq, shards, empty=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.touch()
            size = 0
        os.replace(tmp, path)
        _fsync_dir(d)
    except BaseException:
        for q in (tmp, path):
            with contextlib.suppress(OSError):
                q.unlink()
        raise
    return SnapInfo(shards, seq, total_series, total_chunks, size)


def write_shard_v1(seg: Segment, root: Path, namespace: str, shard: int, seq: int,
                   fileset_root: Path) -> None:
    """A version-1 snapshot of one shard (content file, then its checkpoint): what the daemon
    wrote before version 2; kept to test that it is still read."""
    d = shard_dir(root, namespace, shard)
    d.mkdir(parents=True, exist_ok=True)
    starts = sorted({b["block_start"] for b in seg.blocks(shard)})
    vols = [(bs, _newest_volume(fileset_root, namespace, shard, bs)) for bs in starts]
    p = seg.params
    state = {"cap": BUF_BYTES, "out": ffi.new("uint8_t[]", BUF_BYTES)}
    with open(content_path(d, seq), "wb") as f:
        head = HEADER.pack(MAGIC, 1, 0, shard, p.ns_id, seq, int(time.time() * 1000),
                           p.block_ms)
        f.write(head)
        crc, body, nser, nch = _copy_shard(seg, shard, f, zlib.crc32(head), state)
        tail = b"".join(VOLUME.pack(bs, v) for bs, v in vols) + TRAILER.pack(
            nser, nch, body, len(vols), 0)
        f.write(tail)
        crc = zlib.crc32(tail, crc)
        size = len(head) + body + len(tail)
    checkpoint_path(d, seq).write_bytes(CKPT.pack(CKPT_MAGIC, 1, 0, crc & 0xFFFFFFFF, 0, size))


def prune(root: Path, namespace: str, mine: range, ranges: list[range],
          keep: int = KEEP) -> None:
    """Delete the snapshots every shard of which has ``keep`` newer complete snapshots (any
    worker may do it: nothing deleted is the newest ``keep`` of any shard), and unfinished
    ``.tmp`` files of this worker's shard range ``mine`` or of a range no current worker has
    (``ranges``: the current workers' ranges; never another running worker's .tmp)."""
    d = ns_dir(root, namespace)
    try:
        names = os.listdir(d)
    except FileNotFoundError:
        return
    for n in names:
        m = TMP.match(n)
        if m:
            r = range(int(m.group(1)), int(m.group(2)))
            if r == mine or r not in ranges:
                log.warning("removing %s: writing that snapshot did not finish", d / n)
                (d / n).unlink(missing_ok=True)
    files = listing(root, namespace)
    for f in files:
        if all(sum(1 for g in files if g.seq > f.seq and g.covers(s)) >= keep
               for s in f.shards):
            _delete(f)
    for n in names:  # version 1: files of an incomplete snapshot
        if n.isdigit():
            _prune_v1_incomplete(d / n)


def _delete(f: SnapFile) -> None:
    if f.version == 1:  # checkpoint first: a crash leaves an incomplete snapshot
        checkpoint_path(f.path.parent, f.seq).unlink(missing_ok=True)
    f.path.unlink(missing_ok=True)
    if f.version == 1:
        with contextlib.suppress(OSError):
            f.path.parent.rmdir()  # the shard directory, once empty


def _prune_v1_incomplete(d: Path) -> None:
    try:
        names = os.listdir(d)
    except FileNotFoundError:
        return
    seqs = set(complete_v1(d))
    for n in names:
        m = NAME_V1.match(n)
        if (n.startswith("snapshot-") and n.endswith(".tmp")) or (
                m and m.group(2) == "content" and int(m.group(1)) not in seqs):
            log.warning("removing %s: its snapshot has no checkpoint (writing did not finish)",
                        d / n)
            (d / n).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        d.rmdir()


# -- reading ------------------------------------------------------------------------------------

@dataclass
class Part:
    """One shard's part of an opened snapshot."""

    body: tuple[int, int]  # offset, length in the file
    nseries: int
    nchunks: int
    volumes: list[tuple[int, int]]


@dataclass
class Opened:
    path: Path
    mm: mmap.mmap | None
    seq: int
    parts: dict[int, Part]

    def close(self) -> None:
        if self.mm is not None:
            self.mm.close()


def _map(path: Path, size: int | None) -> mmap.mmap:
    try:
        with open(path, "rb") as f:
            actual = os.fstat(f.fileno()).st_size
            if size is not None and actual != size:
                raise CorruptSnapshotError(path, actual, f"{size} bytes (the checkpoint's)")
            if actual == 0:
                raise CorruptSnapshotError(path, 0, "a header (the file is empty)")
            return mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    except FileNotFoundError:
        raise CorruptSnapshotError(path, 0, "the snapshot file its name (or checkpoint) "
                                   "names") from None


def open_file(f: SnapFile, ns_id: int, block_ms: int) -> Opened:
    """Map a complete snapshot and check it (CRC, header, table, trailer; version 1: its
    checkpoint, size, CRC, header and trailer)."""
    if f.version == 1:
        return open_snapshot_v1(f.path.parent, f.seq, f.shards.start, ns_id, block_ms)
    if f.empty:
        size = f.path.stat().st_size
        if size:
            raise CorruptSnapshotError(f.path, 0, f"an empty file (its name says so), found "
                                       f"{size} bytes")
        return Opened(f.path, None, f.seq, {s: Part((0, 0), 0, 0, []) for s in f.shards})
    mm = _map(f.path, None)
    try:
        size = len(mm)
        if size < HEADER2.size + TRAILER2.size:
            raise CorruptSnapshotError(f.path, size, "a header and a trailer")
        tail_off = size - TRAILER2.size
        table_off, fsize, nshards, _, end, crc = TRAILER2.unpack_from(mm, tail_off)
        if end != END_MAGIC or fsize != size:
            raise CorruptSnapshotError(f.path, tail_off, f"a trailer ending in {END_MAGIC!r} "
                                       f"that gives the file's size {size}")
        if zlib.crc32(memoryview(mm)[:size - 4]) & 0xFFFFFFFF != crc:
            raise CorruptSnapshotError(f.path, size - 4, "the CRC-32 of the bytes before it")
        m, ver, _fl, lo, hi, ns, _, sq, _created, bms = HEADER2.unpack_from(mm, 0)
        if m != MAGIC or ver != VERSION:
            raise CorruptSnapshotError(f.path, 0, f"magic {MAGIC!r} version {VERSION}")
        if (lo, hi, ns, sq, bms) != (f.shards.start, f.shards.stop, ns_id, f.seq, block_ms):
            raise CorruptSnapshotError(f.path, 8, f"shards [{f.shards.start}, "
                                       f"{f.shards.stop}), namespace id {ns_id}, seq {f.seq}, "
                                       f"block size {block_ms} ms; found [{lo}, {hi}), {ns}, "
                                       f"{sq}, {bms}")
        parts: dict[int, Part] = {}
        o = table_off
        expect_body = HEADER2.size
        for i in range(nshards):
            if o + ENTRY.size > tail_off:
                raise CorruptSnapshotError(f.path, o, f"{nshards} shard table entries")
            s, nvol, boff, blen, nser, nch = ENTRY.unpack_from(mm, o)
            if s != lo + i or boff != expect_body or boff + blen > table_off:
                raise CorruptSnapshotError(f.path, o, f"the entry of shard {lo + i} with its "
                                           f"body at {expect_body} before the table")
            o += ENTRY.size
            if o + nvol * VOLUME.size > tail_off:
                raise CorruptSnapshotError(f.path, o, f"{nvol} volumes")
            vols = [VOLUME.unpack_from(mm, o + k * VOLUME.size) for k in range(nvol)]
            o += nvol * VOLUME.size
            parts[s] = Part((boff, blen), nser, nch, vols)
            expect_body = boff + blen
        if nshards != hi - lo or expect_body != table_off or o != tail_off:
            raise CorruptSnapshotError(f.path, o, f"a table of {hi - lo} shards whose bodies "
                                       "and entries fill the file")
        return Opened(f.path, mm, f.seq, parts)
    except BaseException:
        mm.close()
        raise


def open_snapshot_v1(d: Path, seq: int, shard: int, ns_id: int, block_ms: int) -> Opened:
    """Map a complete version-1 snapshot and check it: checkpoint, size, CRC, header, trailer."""
    cp, path = checkpoint_path(d, seq), content_path(d, seq)
    raw = cp.read_bytes()
    if len(raw) != CKPT.size:
        raise CorruptSnapshotError(cp, 0, f"a {CKPT.size}-byte checkpoint, found {len(raw)}")
    magic, version, _, crc, _, size = CKPT.unpack(raw)
    if magic != CKPT_MAGIC or version != 1:
        raise CorruptSnapshotError(cp, 0, f"magic {CKPT_MAGIC!r} version 1")
    mm = _map(path, size)
    try:
        if zlib.crc32(mm) & 0xFFFFFFFF != crc:
            raise CorruptSnapshotError(path, 0, "the CRC-32 its checkpoint records")
        m, ver, _fl, sh, ns, sq, _created, bms = HEADER.unpack_from(mm, 0)
        if m != MAGIC or ver != 1:
            raise CorruptSnapshotError(path, 0, f"magic {MAGIC!r} version 1")
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
        part = Part((HEADER.size, body_len), nseries, nchunks, vols)
        return Opened(path, mm, seq, {shard: part})
    except BaseException:
        mm.close()
        raise


# -- loading ------------------------------------------------------------------------------------

def _load_part(seg: Segment, snap: Opened, shard: int, namespace: str,
               fileset_root: Path) -> tuple[int, int]:
    """Load shard's part of an opened snapshot; returns (series, chunks)."""
    part = snap.parts[shard]
    off, n = part.body
    if n == 0:
        return 0, 0
    skip = [bs for bs, vol in part.volumes
            if _newest_volume(fileset_root, namespace, shard, bs) != vol]
    sk = ffi.new("int64_t[]", skip or [0])
    ns_, nc_, smp, bad = (ffi.new("uint64_t *"), ffi.new("uint64_t *"),
                          ffi.new("uint64_t *"), ffi.new("size_t *"))
    assert snap.mm is not None
    body = ffi.from_buffer(snap.mm)
    try:
        rc = lib.m3_shard_load_snapshot(seg.base, shard, body + off, n, sk, len(skip), ns_,
                                        nc_, smp, bad)
    finally:
        ffi.release(body)
    if rc in (lib.M3_ECORRUPT, lib.M3_ETRUNC):
        raise CorruptSnapshotError(snap.path, off + int(bad[0]), "a valid series or chunk "
                                   f"(shard {shard})")
    check(rc, f"loading snapshot {snap.path} into shard {shard}")
    return int(ns_[0]), int(nc_[0])


def load_shards(seg: Segment, root: Path, namespace: str, shards: range,
                fileset_root: Path) -> dict[int, tuple[int, SnapInfo | None]]:
    """Load, for each of ``shards``, the newest good snapshot covering it (the owner, at
    start-up, before replay). Returns per shard (the seq it covers, its info), or (0, None)
    when no snapshot loads."""
    p = seg.params
    files = listing(root, namespace, shards)
    opened: dict[Path, Opened] = {}
    out: dict[int, tuple[int, SnapInfo | None]] = {}
    try:
        for s in shards:
            out[s] = (0, None)
            for f in files:
                if f.bad or not f.covers(s):
                    continue
                try:
                    snap = opened.get(f.path)
                    if snap is None:
                        snap = opened[f.path] = open_file(f, p.ns_id, p.block_ms)
                    nser, nch = _load_part(seg, snap, s, namespace, fileset_root)
                except (CorruptError, OSError) as e:
                    f.bad = True
                    _set_aside(f, e)
                    continue
                part = snap.parts[s]
                out[s] = (f.seq, SnapInfo(range(s, s + 1), f.seq, nser, nch, part.body[1]))
                break
    finally:
        for snap in opened.values():
            snap.close()
    return out


def load_shard(seg: Segment, root: Path, namespace: str, shard: int,
               fileset_root: Path) -> tuple[int, SnapInfo | None]:
    """:func:`load_shards` of one shard."""
    return load_shards(seg, root, namespace, range(shard, shard + 1), fileset_root)[shard]


def _set_aside(f: SnapFile, e: BaseException) -> None:
    log.error("%s; setting snapshot %d (%s) aside (.corrupt) and falling back to an older "
              "snapshot or the commit log", e, f.seq, f.path)
    with contextlib.suppress(OSError):
        f.path.rename(f.path.with_name(f.path.name + ".corrupt"))
    if f.version == 1:
        with contextlib.suppress(OSError):
            checkpoint_path(f.path.parent, f.seq).unlink()


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
    """The snapshots of one namespace's shards [lo, hi) owned by one worker; ``ranges`` are
    every current worker's shard ranges (whose unfinished files this one leaves alone)."""

    def __init__(self, seg: Segment, root: Path, namespace: str, fileset_root: Path,
                 shards: range, ranges: list[range] | None = None) -> None:
        self.seg, self.root, self.ns = seg, Path(root), namespace
        self.fileset_root = Path(fileset_root)
        self.shards = shards
        self.ranges = ranges if ranges is not None else [shards]

    def remove_incomplete(self) -> None:
        """Unfinished files of this worker's range (a snapshot killed midway), and of ranges no
        current worker has; version 1: every incomplete snapshot of our shards."""
        prune(self.root, self.ns, self.shards, self.ranges, keep=1 << 30)

    def load(self) -> Floors:
        floors = {}
        t0 = time.monotonic()
        for s, (seq, info) in load_shards(self.seg, self.root, self.ns, self.shards,
                                          self.fileset_root).items():
            floors[s] = seq
            if info is not None:
                log.info("loaded snapshot %d of %s shard %d: %d series, %d chunks", seq,
                         self.ns, s, info.nseries, info.nchunks)
        log.info("loaded the snapshots of %s shards [%d, %d) in %.3fs", self.ns,
                 self.shards.start, self.shards.stop, time.monotonic() - t0)
        return Floors(floors, self.shards.start, self.shards.stop)

    def take(self, stopped: Callable[[], bool], timeout: float = 60.0) -> tuple[int, int]:
        """Snapshot every shard; returns (the seq the new snapshot covers, the seq the older
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
        info = write_snapshot(seg, self.root, self.ns, self.shards, seq, self.fileset_root)
        prune(self.root, self.ns, self.shards, self.ranges)
        files = listing(self.root, self.ns, self.shards)
        keep = []
        for s in self.shards:
            seqs = kept_seqs(files, s)
            keep.append(seqs[1] if len(seqs) > 1 else 0)
        log.info("snapshot %d of %s shards [%d, %d): %d series, %d bytes in %.3fs", seq, self.ns,
                 self.shards.start, self.shards.stop, info.nseries, info.nbytes,
                 time.monotonic() - t0)
        return seq, min(keep, default=0)
