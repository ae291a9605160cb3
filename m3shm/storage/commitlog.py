"""The commit log: every accepted batch, durable before its 2xx (docs/formats/commitlog.md).

Each worker appends to its own files, named ``cl-<boot>-w<worker>-<incarnation>-<part>.log``
under ``<data>/commitlog/``: ``boot`` grows at every daemon start, ``incarnation`` at every
restart of the worker, ``part`` when a file reaches ``max_segment_bytes``. A file is only ever
appended to by the process that created it, so a restarted worker never writes after a torn
tail: it starts a new file.

Records are length-prefixed and CRC-checked; the payload is the batch of lane records exactly as
the workers published it, so replay (merge every older file by global sequence number, apply
each record to its shard) reproduces what the live path did. Writes of several batches are
grouped into one ``write`` + ``fsync`` (group commit); the fsync policy is ``every_batch``
(nothing acknowledged is lost to a power cut) or ``interval`` (a power cut may lose up to one
interval of acknowledged batches; a process crash loses nothing, the page cache survives it).

Trimming: a file is closed (rotated) by its writer, which then writes its index
``<file>.idx`` (JSON: ``close_seq``, the min and max sample timestamp of its batches). A closed
file is *covered* once every worker has completed a flush pass that drew a greater sequence
number (so it saw every batch of the file applied, csrc/flush.c m3_seq_sync) at a time when
every block its samples touch had closed (so the pass flushed them, or they expired); a
covered file is deleted, and replay skips it (:func:`covered`).
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import json
import logging
import os
import re
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger("m3shm.commitlog")

FILE_MAGIC = b"M3CL"
FILE_VERSION = 1
FILE_HEADER = struct.Struct("<4sIIIQQ")      # magic, version, worker, reserved, boot, created_ms
REC_HEADER = struct.Struct("<IIQqII")        # length, crc32, seq, arrival_ms, nrecords, flags
NAME = re.compile(r"^cl-(\d{10})-w(\d{3})-(\d{4})-(\d{4})\.log$")


@dataclass(frozen=True)
class Batch:
    seq: int
    arrival_ms: int
    nrecords: int
    payload: bytes | memoryview


def file_name(boot: int, worker: int, incarnation: int, part: int) -> str:
    return f"cl-{boot:010d}-w{worker:03d}-{incarnation:04d}-{part:04d}.log"


def _crc(header_tail: bytes, payload: bytes | memoryview) -> int:
    return zlib.crc32(payload, zlib.crc32(header_tail)) & 0xFFFFFFFF


def encode_record(b: Batch) -> bytes:
    tail = struct.pack("<QqII", b.seq, b.arrival_ms, b.nrecords, 0)
    pad = (-len(b.payload)) % 8
    return (struct.pack("<II", len(b.payload), _crc(tail, b.payload)) + tail +
            bytes(b.payload) + b"\0" * pad)


class Observer(Protocol):
    """Where a commit log reports what it wrote (m3shm.stats.WorkerStats); called with the
    log's lock held."""

    def wrote_commitlog(self, nbytes: int, nbatches: int) -> None: ...

    def observe_fsync(self, seconds: float) -> None: ...


class CommitLog:
    """One worker's writer. ``append`` is called from a single thread at a time (the worker's
    ingest pipeline hands it to the thread pool and awaits it)."""

    def __init__(self, directory: str, boot: int, worker: int, incarnation: int,
                 fsync: str = "every_batch", fsync_interval_ms: int = 1000,
                 max_segment_bytes: int = 256 << 20, observer: Observer | None = None,
                 seq_sync: Callable[[], int] | None = None) -> None:
        self.dir = directory
        self.observer = observer
        self.boot, self.worker, self.incarnation = boot, worker, incarnation
        self.fsync_every = fsync == "every_batch"
        self.interval = fsync_interval_ms / 1000
        self.max_bytes = max_segment_bytes
        self.part = 0
        self.seq_sync = seq_sync
        self.min_ts, self.max_ts, self.nbatches = _EMPTY_MIN, _EMPTY_MAX, 0
        self.fd = -1
        self.size = 0
        self.fsync_seconds = 0.0
        self._dirty = False
        self.path = ""
        # closed files whose index is not written yet: (path, close_seq, min, max, batches)
        self._unindexed: list[tuple[str, int, int, int, int]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        os.makedirs(directory, exist_ok=True)
        self._open()
        self._syncer: threading.Thread | None = None
        if not self.fsync_every:
            self._syncer = threading.Thread(target=self._sync_loop, name="commitlog-fsync",
                                            daemon=True)
            self._syncer.start()

    def _open(self) -> None:
        """Start the file of the current part. A failure (disk full) removes what was made
        of the file, so the next attempt starts clean under the same name."""
        path = os.path.join(self.dir, file_name(self.boot, self.worker, self.incarnation,
                                                self.part))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        hdr = FILE_HEADER.pack(FILE_MAGIC, FILE_VERSION, self.worker, 0, self.boot,
                               int(time.time() * 1000))
        try:
            if os.write(fd, hdr) != len(hdr):
                raise OSError(errno.ENOSPC, "short write of the commit log file header")
            os.fsync(fd)
            dfd = os.open(self.dir, os.O_RDONLY)
            try:
                os.fsync(dfd)  # the new name is durable too
            finally:
                os.close(dfd)
        except OSError:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        self.fd, self.size, self.path = fd, len(hdr), path
        self.min_ts, self.max_ts, self.nbatches = _EMPTY_MIN, _EMPTY_MAX, 0

    def _close_locked(self) -> None:
        """Sync and close the current file and write its index (only after every batch in it
        was published: the pipeline calls append/rotate in order, publishing in between).
        The next part is opened lazily by the next append or rotate. An index that cannot be
        written (disk full) is retried at the next close."""
        try:
            self._sync_locked()
        finally:
            self._retire_locked()

    def _retire_locked(self) -> None:
        """Close the current file without syncing it and move on to the next part: after a
        failed fsync the file is never appended to again (its pages' state is unknown)."""
        with contextlib.suppress(OSError):
            os.close(self.fd)
        self.fd = -1
        self._dirty = False
        self.part += 1
        close_seq = self.seq_sync() if self.seq_sync is not None else 0
        self._unindexed.append((self.path, close_seq, self.min_ts, self.max_ts,
                                self.nbatches))
        self._write_indexes_locked()

    def _write_indexes_locked(self) -> None:
        while self._unindexed:
            try:
                write_index(*self._unindexed[0])
            except OSError as e:
                log.warning("commit log %s: cannot write its index yet (%s); will retry",
                            self._unindexed[0][0], e)
                return
            self._unindexed.pop(0)

    def rotate(self) -> bool:
        """Close the current file (if it holds batches) and start the next part. Call it only
        between groups (after the last group's publish), as the ingest pipeline does."""
        with self._lock:
            self._write_indexes_locked()
            if self.fd < 0:
                self._open()
                return False
            if not self.nbatches:
                return False
            self._close_locked()
            self._open()
            return True

    def append(self, batches: list[Batch]) -> None:
        """Write the batches with one write (group commit); fsync under every_batch. Raises
        OSError (ENOSPC when the disk is full) when they cannot be made durable; the file
        then holds none of them (a partial write is cut off again) or, if the fsync failed,
        it is closed and never appended to again."""
        blob = b"".join(encode_record(b) for b in batches)
        lo, hi = _EMPTY_MIN, _EMPTY_MAX
        for b in batches:
            a, z = batch_time_range(b.payload)
            lo, hi = min(lo, a), max(hi, z)
        with self._lock:
            if self.fd >= 0 and (self.size + len(blob) > self.max_bytes and
                                 self.size > FILE_HEADER.size):
                self._close_locked()
            if self.fd < 0:  # rotated, or an earlier open failed (disk full)
                self._open()
            view = memoryview(blob)
            try:
                while view:
                    n = os.write(self.fd, view)
                    view = view[n:]
            except OSError:
                self._cut_locked()
                raise
            self.min_ts, self.max_ts = min(self.min_ts, lo), max(self.max_ts, hi)
            self.nbatches += len(batches)
            self.size += len(blob)
            self._dirty = True
            if self.observer is not None:
                self.observer.wrote_commitlog(len(blob), len(batches))
            if self.fsync_every:
                try:
                    self._sync_locked()
                except OSError:
                    self._retire_locked()
                    raise

    def _cut_locked(self) -> None:
        """Cut a partly written group off the end of the file, so records appended later are
        not hidden behind a torn one (replay stops at the first bad record). If even that
        fails, the file is closed as it is and the next append starts a new one."""
        try:
            os.ftruncate(self.fd, self.size)
        except OSError:
            self._retire_locked()

    def _sync_locked(self) -> None:
        if self._dirty and self.fd >= 0:
            t = time.perf_counter()
            os.fdatasync(self.fd)
            dt = time.perf_counter() - t
            self.fsync_seconds += dt
            if self.observer is not None:
                self.observer.observe_fsync(dt)
            self._dirty = False

    def sync(self) -> None:
        with self._lock:
            try:
                self._sync_locked()
            except OSError:
                self._retire_locked()
                raise

    def _sync_loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sync()
            except OSError as e:  # the file is retired; the next append starts a new one
                log.error("commit log %s: fsync failed: %s", self.path, e)

    def close(self) -> None:
        """Sync and close; the file gets its index, so a later boot need not replay it once
        it is covered."""
        self._stop.set()
        with self._lock:
            if self.fd >= 0:
                if self.nbatches:
                    self._close_locked()
                else:
                    self._sync_locked()
                    os.close(self.fd)
                    self.fd = -1


_EMPTY_MIN, _EMPTY_MAX = (1 << 63) - 1, -(1 << 63)


def batch_time_range(payload: bytes | memoryview) -> tuple[int, int]:
    """Min and max sample timestamp of a batch of lane records (computed in C). A payload that
    is not lane records counts as touching all time, so its file is never trimmed."""
    from m3shm._native import ffi, lib

    lo = ffi.new("int64_t *")
    hi = ffi.new("int64_t *")
    buf = ffi.from_buffer(payload)
    if lib.m3_batch_time_range(buf, len(buf), lo, hi) != 0:
        return -(1 << 63), (1 << 63) - 1
    return int(lo[0]), int(hi[0])


# -- closed-file indexes and trimming ---------------------------------------------------------

def index_path(path: str) -> str:
    return path + ".idx"


def write_index(path: str, close_seq: int, min_ts: int, max_ts: int, nbatches: int) -> None:
    """Record a closed file's close sequence number and sample time range (atomic rename;
    not fsync'd: a lost index only means the file is replayed once more)."""
    tmp = index_path(path) + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"close_seq": close_seq, "min_ts": min_ts, "max_ts": max_ts,
                   "batches": nbatches}, f)
    os.replace(tmp, index_path(path))


def read_index(path: str) -> dict | None:
    try:
        with open(index_path(path)) as f:
            d = json.load(f)
        return d if {"close_seq", "min_ts", "max_ts"} <= d.keys() else None
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class PassState:
    """A worker's last completed flush pass: its sequence number, wall-clock time, and the
    (block size, buffer past) it judged closed blocks by; and ``snap_seq``, the seq the older
    of the snapshots it keeps of each of its shards covers (m3shm/storage/snapshot.py; 0 =
    none): every batch below it is in a snapshot that is not the only one left."""

    seq: int
    now_ms: int
    block_ms: int
    buffer_past_ms: int
    snap_seq: int = 0


def covered(idx: dict, passes: list[PassState | None]) -> bool:
    """Whether a closed file (its index) is covered, for every worker, by its last flush pass
    or by its kept snapshots."""
    for p in passes:
        if p is not None and p.snap_seq > idx["close_seq"]:
            continue  # every batch of the file is below what the snapshots cover
        if p is None or p.seq <= idx["close_seq"]:
            return False
        if idx["max_ts"] >= idx["min_ts"]:  # the file holds samples
            last_block = idx["max_ts"] - idx["max_ts"] % p.block_ms
            if last_block + p.block_ms + p.buffer_past_ms > p.now_ms:
                return False
    return True


def first_seq(path: str) -> int | None:
    """Sequence number of a file's first batch, from its record header (None if the file
    holds none yet). The file may be another worker's, being appended to: nothing is logged
    and no CRC is checked (a torn first header reads as no batch)."""
    try:
        with open(path, "rb") as f:
            head = f.read(FILE_HEADER.size + REC_HEADER.size)
    except FileNotFoundError:
        return None
    if len(head) < FILE_HEADER.size + REC_HEADER.size or head[:4] != FILE_MAGIC:
        return None
    seq = REC_HEADER.unpack_from(head, FILE_HEADER.size)[2]
    return seq or None


def deletable(directory: str, passes: list[PassState | None]) -> list[str]:
    """The closed files that may be deleted (and need no replay): those the passes cover and
    that hold no batch newer than a batch of a file that stays.

    Coverage alone is not enough: file A may stay (it also holds samples of a block that is
    still open) while a later file B, which overwrote one of A's samples in a flushed block,
    is covered. Replaying A without B would re-apply the older value on top of the fileset
    that holds the newer one. So a covered file goes only once its ``close_seq`` is below the
    first sequence number of every file that stays; replay then applies what stays in
    sequence order over filesets that hold only older writes."""
    files = list_files(directory)
    idx = {p: read_index(p) for p in files}
    gone = {p for p in files if idx[p] is not None and covered(idx[p], passes)}
    firsts = {p: first_seq(p) for p in files}
    while True:  # keeping a file can hold back others: shrink to the fixpoint
        floor = min((firsts[p] for p in files if p not in gone and firsts[p] is not None),
                    default=None)
        held = {p for p in gone if floor is not None and idx[p]["close_seq"] >= floor}
        if not held:
            return sorted(gone)
        gone -= held


def trim(directory: str, passes: list[PassState | None]) -> list[str]:
    """Delete every file :func:`deletable` allows; returns the deleted paths."""
    removed = []
    for path in deletable(directory, passes):
        for p in (path, index_path(path)):
            try:
                os.unlink(p)
            except FileNotFoundError:
                continue
        removed.append(path)
    if removed:
        log.info("commit log: deleted %d files covered by flushes", len(removed))
    return removed


def scan_file(path: str) -> tuple[int, int, int]:
    """(min ts, max ts, batches) of a file's valid batches, read record by record."""
    lo, hi, n = _EMPTY_MIN, _EMPTY_MAX, 0
    for b in read_file(path):
        a, z = batch_time_range(b.payload)
        lo, hi, n = min(lo, a), max(hi, z), n + 1
    return lo, hi, n


def read_file(path: str, repair: bool = False) -> Iterator[Batch]:
    """Yield the valid batches of one file in order, reading record by record (memory is
    bounded by the largest batch). A torn or corrupt tail ends the file with a warning naming
    the file and offset; with ``repair`` the file is truncated there."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(FILE_HEADER.size)
        if len(head) < FILE_HEADER.size:
            _cut(path, 0, "file header is incomplete", repair)
            return
        magic, version, *_ = FILE_HEADER.unpack_from(head)
        if magic != FILE_MAGIC:
            _cut(path, 0, f"bad magic {magic!r}", repair)
            return
        if version != FILE_VERSION:
            log.warning("commit log %s: version %d is not supported; skipping the file", path,
                        version)
            return
        off = FILE_HEADER.size
        while off < size:
            hdr = f.read(REC_HEADER.size)
            if len(hdr) < REC_HEADER.size:
                _cut(path, off, "record header is incomplete", repair)
                return
            length, crc, seq, arrival, nrec, _flags = REC_HEADER.unpack_from(hdr)
            end = off + REC_HEADER.size + length
            if end > size:
                _cut(path, off, f"record of {length} bytes runs past the end of the file",
                     repair)
                return
            padded = length + (-length) % 8
            body = f.read(min(padded, size - off - REC_HEADER.size))
            payload = memoryview(body)[:length]
            if len(payload) < length or _crc(hdr[8:], payload) != crc:
                _cut(path, off, "CRC mismatch", repair)
                return
            yield Batch(seq, arrival, nrec, payload)
            off = end + (-length) % 8


def _cut(path: str, off: int, why: str, repair: bool) -> None:
    log.warning("commit log %s: torn or corrupt tail at offset %d (%s); %s", path, off, why,
                "cutting it off" if repair else "ignoring the rest")
    if repair:
        os.truncate(path, off)


def list_files(directory: str, before_boot: int | None = None) -> list[str]:
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    out = []
    for n in sorted(names):
        m = NAME.match(n)
        if m and (before_boot is None or int(m.group(1)) < before_boot):
            out.append(os.path.join(directory, n))
    return out


def replay(directory: str, before_boot: int, repair: bool = False,
           skip: Callable[[str], bool] | None = None) -> Iterator[Batch]:
    """Every batch of the files of earlier boots (but those ``skip`` says are covered),
    merged in global sequence order; each file is streamed record by record."""
    files = [p for p in list_files(directory, before_boot) if skip is None or not skip(p)]
    return heapq.merge(*(read_file(p, repair) for p in files), key=lambda b: b.seq)


def next_boot(directory: str) -> int:
    """One more than the highest boot number of any file (1 for an empty directory)."""
    best = 0
    for p in list_files(directory):
        m = NAME.match(os.path.basename(p))
        if m:
            best = max(best, int(m.group(1)))
    return best + 1
