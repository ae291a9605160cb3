"""Metric metadata (type, help, unit per metric name), kept durably and readable from any worker
(format: docs/formats/metadata.md).

Remote write sends metadata per metric family (1.0: ``WriteRequest.metadata``, keyed by the
family name) or per series (2.0: ``TimeSeries.metadata``, keyed by the series' ``__name__``).
The C decoders hand over only entries whose hash is not in this store's :class:`MetaHashSet`,
so a request whose metadata is already stored costs no Python work at all.

Files: each worker appends to its own ``<data>/metadata/md-w<worker>.log`` (one writer per
file: a restarted worker truncates a torn tail of its own file, then appends). A record is
written only when an entry changes, and fsynced before the request that carried it is
acknowledged. Every worker reads every file (incrementally: it remembers how far it has read
each one) and merges them: for each name the record with the latest ``(updated_ms, worker)``
wins. A torn or corrupt record ends a file's readable part (for another worker's file it is
retried on the next refresh: the writer may still be writing it).
"""

from __future__ import annotations

import logging
import os
import re
import struct
import threading
import time
import zlib
from collections.abc import Iterable
from dataclasses import dataclass

from m3shm.storage.metadata_hashes import METRIC_TYPES, Meta, MetaHashSet, meta_hash

log = logging.getLogger("m3shm.metadata")

FILE_MAGIC = b"M3MD"
FILE_VERSION = 1
FILE_HEADER = struct.Struct("<4sIIIq")   # magic, version, worker, reserved, created_ms
REC_HEADER = struct.Struct("<II")        # body length, crc32 of the body
REC_BODY = struct.Struct("<qBBHHHI")     # updated_ms, type, source, name_len, unit_len, pad,
#                                          help_len; then name, unit, help (UTF-8)
NAME = re.compile(r"^md-w(\d{3})\.log$")
MAX_REC = 1 << 20


@dataclass(frozen=True)
class Entry:
    name: str
    type: int
    help: str
    unit: str
    updated_ms: int
    worker: int

    @property
    def type_name(self) -> str:
        return METRIC_TYPES[self.type] if 0 <= self.type < len(METRIC_TYPES) else "unknown"

    def key(self) -> tuple[int, int]:
        return self.updated_ms, self.worker


def file_name(worker: int) -> str:
    return f"md-w{worker:03d}.log"


def encode_record(e: Entry, source: int) -> bytes:
    n, u, h = e.name.encode(), e.unit.encode(), e.help.encode()
    body = REC_BODY.pack(e.updated_ms, e.type, source, len(n), len(u), 0, len(h)) + n + u + h
    return REC_HEADER.pack(len(body), zlib.crc32(body)) + body


def decode_records(buf: bytes, worker: int) -> tuple[list[Entry], int, str | None]:
    """Records of one file's bytes after its header: (entries, bytes consumed, why it stopped
    early or None)."""
    out: list[Entry] = []
    off = 0
    while off < len(buf):
        if len(buf) - off < REC_HEADER.size:
            return out, off, "a record header is cut short"
        ln, crc = REC_HEADER.unpack_from(buf, off)
        if ln < REC_BODY.size or ln > MAX_REC:
            return out, off, f"record length {ln} is impossible"
        if len(buf) - off - REC_HEADER.size < ln:
            return out, off, "a record is cut short"
        body = buf[off + REC_HEADER.size: off + REC_HEADER.size + ln]
        if zlib.crc32(body) != crc:
            return out, off, "CRC mismatch"
        ts, typ, _src, nl, ul, _pad, hl = REC_BODY.unpack_from(body)
        if REC_BODY.size + nl + ul + hl != ln:
            return out, off, "field lengths do not add up to the record length"
        p = REC_BODY.size
        try:
            name = body[p:p + nl].decode()
            unit = body[p + nl:p + nl + ul].decode()
            help_ = body[p + nl + ul:p + nl + ul + hl].decode()
        except UnicodeDecodeError:
            return out, off, "text is not UTF-8"
        out.append(Entry(name, typ, help_, unit, ts, worker))
        off += REC_HEADER.size + ln
    return out, off, None


class MetadataStore:
    """The merged view of every worker's metadata log. ``worker=None`` opens it read-only."""

    def __init__(self, data_dir: str, worker: int | None = None) -> None:
        self.dir = os.path.join(data_dir, "metadata")
        self.worker = worker
        self.entries: dict[str, Entry] = {}
        self.known = MetaHashSet()
        self._read: dict[str, int] = {}   # file name -> bytes read (past the header)
        self._lock = threading.Lock()
        self._fd: int | None = None
        self.writes = 0
        if worker is not None:
            os.makedirs(self.dir, exist_ok=True)
            self._open_own()
        self.refresh()

    # -- files -------------------------------------------------------------------------------
    def _open_own(self) -> None:
        assert self.worker is not None
        path = os.path.join(self.dir, file_name(self.worker))
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        size = os.fstat(fd).st_size
        if size < FILE_HEADER.size:
            if size:
                log.warning("metadata: %s: header cut short (%d bytes); rewriting it", path,
                            size)
            os.ftruncate(fd, 0)
            os.pwrite(fd, FILE_HEADER.pack(FILE_MAGIC, FILE_VERSION, self.worker, 0,
                                           int(time.time() * 1000)), 0)
            os.fsync(fd)
            _fsync_dir(self.dir)
        else:
            hdr = os.pread(fd, FILE_HEADER.size, 0)
            magic, ver, _, _, _ = FILE_HEADER.unpack(hdr)
            if magic != FILE_MAGIC or ver != FILE_VERSION:
                os.close(fd)
                raise ValueError(f"metadata: {path}: not a version-{FILE_VERSION} metadata "
                                 f"log (magic {magic!r}, version {ver})")
            body = os.pread(fd, size - FILE_HEADER.size, FILE_HEADER.size)
            _, good, why = decode_records(body, self.worker)
            if why is not None:
                log.warning("metadata: %s: %s at offset %d; cutting the file there", path, why,
                            FILE_HEADER.size + good)
                os.ftruncate(fd, FILE_HEADER.size + good)
                os.fsync(fd)
        os.lseek(fd, 0, os.SEEK_END)
        self._fd = fd

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def refresh(self) -> int:
        """Read what every worker appended since the last refresh; returns entries merged."""
        try:
            names = sorted(n for n in os.listdir(self.dir) if NAME.match(n))
        except FileNotFoundError:
            return 0
        n = 0
        with self._lock:
            for fn in names:
                path = os.path.join(self.dir, fn)
                done = self._read.get(fn, 0)
                try:
                    with open(path, "rb") as f:
                        f.seek(0, os.SEEK_END)
                        size = f.tell()
                        if size <= FILE_HEADER.size + done:
                            continue
                        f.seek(0)
                        magic, ver, worker, _, _ = FILE_HEADER.unpack(f.read(FILE_HEADER.size))
                        if magic != FILE_MAGIC or ver != FILE_VERSION:
                            log.warning("metadata: %s is not a metadata log; ignored", path)
                            self._read[fn] = size
                            continue
                        f.seek(FILE_HEADER.size + done)
                        buf = f.read(size - FILE_HEADER.size - done)
                except FileNotFoundError:
                    continue
                entries, used, _ = decode_records(buf, worker)
                self._read[fn] = done + used
                for e in entries:
                    n += self._merge(e)
        return n

    def _merge(self, e: Entry) -> int:
        cur = self.entries.get(e.name)
        if cur is not None and cur.key() >= e.key():
            return 0
        if cur is not None:
            self.known.discard(meta_hash(cur.name, cur.type, cur.help, cur.unit))
        self.entries[e.name] = e
        self.known.add(meta_hash(e.name, e.type, e.help, e.unit))
        return 1

    # -- writing -----------------------------------------------------------------------------
    def update(self, metas: Iterable[Meta], source: int) -> int:
        """Store the entries that differ from what is stored (fsynced before returning);
        returns how many were written. Runs on the worker's thread pool."""
        if self._fd is None:
            raise RuntimeError("metadata store opened read-only")
        metas = list(metas)
        if not metas:
            return 0
        self.refresh()
        now = int(time.time() * 1000)
        recs: list[bytes] = []
        with self._lock:
            for m in metas:
                cur = self.entries.get(m.name)
                if cur is not None and (cur.type, cur.help, cur.unit) == (m.type, m.help,
                                                                           m.unit):
                    self.known.add(m.hash)
                    continue
                assert self.worker is not None
                ts = max(now, cur.updated_ms + 1) if cur is not None else now
                e = Entry(m.name, m.type, m.help, m.unit, ts, self.worker)
                recs.append(encode_record(e, source))
                self._merge(e)
            if recs:
                data = b"".join(recs)
                os.write(self._fd, data)
                os.fsync(self._fd)
                self._read[file_name(self.worker)] = self._read.get(
                    file_name(self.worker), 0) + len(data)
                self.writes += len(recs)
        return len(recs)

    # -- reading -----------------------------------------------------------------------------
    def get(self, name: str) -> Entry | None:
        return self.entries.get(name)

    def all(self) -> dict[str, Entry]:
        return dict(self.entries)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
