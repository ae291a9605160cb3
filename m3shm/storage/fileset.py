"""Immutable filesets: one flushed block of one shard of one namespace (docs/formats/fileset.md).

Version 4 (written now) is one file in ``<root>/<namespace>/<shard>/``:
``fileset-<block start>-<volume>-sealed.db`` holds every section (info, summaries, bloom,
index, data, reverse index) behind a section table of offsets, lengths and CRCs and the CRC of
that table; it is written as ``….db.tmp``, fsync'd and renamed into place, so a fileset exists
once its name does, whole. Version 3 was the same sections in ``…-content.db`` plus a
``…-checkpoint.db`` written last (a fileset without a valid checkpoint does not exist: readers
skip it and :func:`remove_incomplete` deletes it). Versions 1-3 stay readable, and writable
for the fixtures.

Writing happens once per block at flush; nothing rewrites a fileset. Readers mmap the files; a
lookup of one series goes bloom filter -> summaries (in memory) -> index (one zstd frame of at
most ``summary_every`` entries in versions 3-4, decompressed) -> data (one zstd frame per
summary group in versions 2-4), and checks the series' own CRC before handing out its block. Blocks
stay compressed (TSZ, docs/formats/tsz.md); decoding is the caller's business.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import mmap
import os
import re
import struct
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any

import numpy as np
import zstandard

from m3shm import codec
from m3shm.errors import CorruptError

log = logging.getLogger("m3shm.fileset")

MAGIC = b"M3FS"
VERSION = 4  # written by default; every version in READABLE is read (and can be written)
READABLE = (1, 2, 3, 4)
ZSTD_LEVEL = 3  # docs/formats/fileset.md: the level sweep behind this choice
HEADER = struct.Struct("<4sBBH")  # magic, kind, version, reserved
INFO = struct.Struct("<qqIIQQQIIQ")
ENTRY_TAIL = struct.Struct("<QQIII")  # hash, data offset, data length, data crc32, samples
SECTION = struct.Struct("<BBHIQQ")  # v3 section table entry: kind, flags, 0, crc, off, len
U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")
CKPT3 = struct.Struct("<IQ")  # v3 checkpoint: crc32 of content header + table, content size
DEFAULT_SUMMARY_EVERY = 64
BLOOM_BITS_PER_SERIES = 10
BLOOM_K = 7
FLAG_ZSTD = 1  # v3 section flag: the section is one zstd frame (used for the reverse index)
REVINDEX_ZSTD_IF_BELOW = 0.9  # compress the reverse index when that saves 10 % or more
NAME = re.compile(r"^fileset-(-?\d+)-(\d+)-([a-z]+)\.db$")


class Kind(IntEnum):
    """File kinds (versions 1-2: one file each) and section kinds (version 3: sections of the
    content file); the values are persisted in every file header and section table."""

    INFO = 1
    INDEX = 2
    SUMMARIES = 3
    BLOOM = 4
    DATA = 5
    DIGESTS = 6  # versions 1-2 only
    CHECKPOINT = 7
    CONTENT = 8  # version 3: the one file holding every section
    REVINDEX = 9  # versions 3-4: a section; versions 1-2: the companion file (no M3FS header)
    SEALED = 10  # version 4: every section and the table's CRC, renamed into place whole


# the file kinds whose presence makes a fileset exist: version 4's only file, versions 1-3's
# checkpoint (written last)
COMPLETE_KINDS = ("sealed", "checkpoint")


DIGESTED = (Kind.INFO, Kind.INDEX, Kind.SUMMARIES, Kind.BLOOM, Kind.DATA)
SECTIONS = (Kind.INFO, Kind.SUMMARIES, Kind.BLOOM, Kind.INDEX, Kind.DATA, Kind.REVINDEX)
FILES = {1: (*DIGESTED, Kind.DIGESTS, Kind.CHECKPOINT, Kind.REVINDEX),
         2: (*DIGESTED, Kind.DIGESTS, Kind.CHECKPOINT, Kind.REVINDEX),
         3: (Kind.CONTENT, Kind.CHECKPOINT),
         4: (Kind.SEALED,)}


class CorruptFilesetError(CorruptError):
    """A fileset file that is not what its format says: names the file (and in version 3 the
    section), the offset in the file and what was expected there."""

    def __init__(self, path: Path, offset: int, expected: str, found: str = "",
                 section: str = "") -> None:
        self.path, self.offset, self.expected, self.section = path, offset, expected, section
        where = f" (section {section})" if section else ""
        msg = f"corrupt fileset file {path}{where} at offset {offset}: expected {expected}"
        super().__init__(msg + (f", found {found}" if found else ""))


@dataclass(frozen=True, order=True)
class FilesetId:
    namespace: str
    shard: int
    block_start: int  # ms since the epoch
    volume: int

    def path(self, root: Path, kind: Kind) -> Path:
        return (root / self.namespace / f"{self.shard:04d}" /
                f"fileset-{self.block_start}-{self.volume}-{kind.name.lower()}.db")


@dataclass(frozen=True)
class Info:
    block_start: int
    block_size: int
    volume: int
    summary_every: int
    num_series: int
    num_samples: int
    data_bytes: int
    codec_version: int
    bloom_k: int
    bloom_bits: int


_local = threading.local()


def _decompress(frame: bytes | memoryview) -> bytes:
    """One zstd frame, decompressed with this thread's decompressor (they are not safe to
    share between threads, and making one costs ~20 us, several times a small frame's
    decompression)."""
    dctx = getattr(_local, "dctx", None)
    if dctx is None:
        dctx = _local.dctx = zstandard.ZstdDecompressor()
    return dctx.decompress(frame)


def _bloom_positions(hashes: np.ndarray, k: int, bits: int) -> np.ndarray:
    """k probe positions per hash (double hashing), shape (len(hashes), k); bits is a power
    of two."""
    h = hashes.astype(np.uint64)
    step = (h >> np.uint64(33)) | np.uint64(1)
    i = np.arange(k, dtype=np.uint64)
    with np.errstate(over="ignore"):
        return (h[:, None] + i[None, :] * step[:, None]) & np.uint64(bits - 1)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, kind: Kind, parts: Iterable[bytes | memoryview],
                version: int) -> int:
    """Write header + parts, fsync, and return the CRC32 of the whole file."""
    crc = 0
    with open(path, "wb") as f:
        for part in (HEADER.pack(MAGIC, kind, version, 0), *parts):
            f.write(part)
            crc = zlib.crc32(part, crc)
        f.flush()
        os.fsync(f.fileno())
    return crc & 0xFFFFFFFF


def _write_renamed(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through ``path.tmp``, fsync'd, renamed into place."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)


def companion_path(root: Path, fid: FilesetId, kind: str) -> Path:
    """A file that belongs to a fileset without being one of its digested kinds (versions 1-2:
    the reverse index segment, ``kind="revindex"``): same name pattern, so it lives and dies
    with it."""
    return (root / fid.namespace / f"{fid.shard:04d}" /
            f"fileset-{fid.block_start}-{fid.volume}-{kind}.db")


def _bloom(entries: list[tuple[bytes, int, Any]]) -> tuple[int, bytes]:
    bloom_bits = 64
    while bloom_bits < len(entries) * BLOOM_BITS_PER_SERIES:
        bloom_bits *= 2
    bloom = np.zeros(bloom_bits // 8, dtype=np.uint8)
    if entries:
        hashes = np.array([e[1] & 0xFFFFFFFFFFFFFFFF for e in entries], dtype=np.uint64)
        pos = _bloom_positions(hashes, BLOOM_K, bloom_bits).ravel()
        np.bitwise_or.at(bloom, (pos >> np.uint64(3)).astype(np.intp),
                         (np.uint8(1) << (pos & np.uint64(7)).astype(np.uint8)))
    return bloom_bits, bloom.tobytes()


def write_fileset(root: Path, fid: FilesetId, block_size: int,
                  series: Iterable[tuple[bytes, int, bytes | memoryview]],
                  summary_every: int = DEFAULT_SUMMARY_EVERY,
                  revindex: Callable[[list[bytes]], bytes] | None = None,
                  version: int = VERSION) -> Info:
    """Write one fileset from (series id, series hash, TSZ block) triples, in any order.

    Series ids must be unique. ``revindex`` is called with the ids in index order and returns
    the block's reverse index segment (docs/formats/index.md), stored as a section (version 3)
    or as the companion file (versions 1-2, written before the digests). ``version`` exists so
    the fixtures of older versions can be rewritten; the daemon writes :data:`VERSION`.
    Returns the fileset's info once it is durable (the checkpoint last).
    """
    if version not in READABLE:
        raise ValueError(f"fileset version {version} is not one of {READABLE}")
    entries = sorted(series, key=lambda e: e[0])
    for a, b in zip(entries, entries[1:], strict=False):
        if a[0] == b[0]:
            raise ValueError(f"series id {a[0]!r} appears twice in fileset {fid}")
    directory = fid.path(root, Kind.INFO).parent
    directory.mkdir(parents=True, exist_ok=True)

    # index, summaries and data in index order; version 3 compresses each summary group's
    # index entries as one zstd frame, versions 2-3 each group's blocks
    index: list[bytes] = []
    summaries, group_index = bytearray(), bytearray()
    data: list[bytes | memoryview] = []
    group: list[bytes | memoryview] = []
    data_off = samples = frame_off = index_off = 0
    cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL)

    def close_group() -> None:
        nonlocal frame_off, index_off, group, group_index
        if version == 1:
            data.extend(group)
        elif group:
            data.append(cctx.compress(b"".join(group)))
            frame_off += len(data[-1])
        index.append(bytes(group_index) if version < 3 else cctx.compress(bytes(group_index)))
        index_off += len(index[-1])
        group, group_index = [], bytearray()

    for i, (sid, h, block) in enumerate(entries):
        n = codec.count(block)  # also checks the block header
        if i % summary_every == 0:
            if i:
                close_group()
            summaries += U32.pack(len(sid)) + sid + U64.pack(index_off)
            if version >= 2:
                summaries += U64.pack(frame_off)
        group_index += U32.pack(len(sid)) + sid + ENTRY_TAIL.pack(
            h & 0xFFFFFFFFFFFFFFFF, data_off, len(block), zlib.crc32(block), n)
        group.append(block)
        data_off += len(block)
        samples += n
    if entries:
        close_group()

    bloom_bits, bloom = _bloom(entries)
    info = Info(fid.block_start, block_size, fid.volume, summary_every, len(entries), samples,
                data_off, codec.VERSION, BLOOM_K, bloom_bits)
    sections: dict[Kind, list[bytes | memoryview]] = {
        Kind.INFO: [INFO.pack(*info.__dict__.values())], Kind.SUMMARIES: [bytes(summaries)],
        Kind.BLOOM: [bloom], Kind.INDEX: list(index), Kind.DATA: data}
    rev = revindex([e[0] for e in entries]) if revindex is not None else None
    if version == 4:
        # the file appears whole or not at all (fsync'd before the rename, the directory
        # after it): its name is its checkpoint
        path = fid.path(root, Kind.SEALED)
        tmp = path.with_name(path.name + ".tmp")
        _write_content(tmp, sections, rev, version)
        os.rename(tmp, path)
        _fsync_dir(directory)
        return info
    if version == 3:
        ckpt_body = _write_content(fid.path(root, Kind.CONTENT), sections, rev, version)
    else:
        crcs = {k: _write_file(fid.path(root, k), k, sections[k], version) for k in DIGESTED}
        if rev is not None:
            _write_renamed(companion_path(root, fid, "revindex"), rev)
        digests = b"".join(U32.pack(crcs[k]) for k in DIGESTED)
        ckpt_body = U32.pack(_write_file(fid.path(root, Kind.DIGESTS), Kind.DIGESTS,
                                         [digests], version))
    _fsync_dir(directory)  # every file above exists durably before the checkpoint does
    # the checkpoint appears whole or not at all: a writer killed while writing it must not
    # leave a short checkpoint that makes the fileset look complete
    ckpt = fid.path(root, Kind.CHECKPOINT)
    tmp = ckpt.with_name(ckpt.name + ".tmp")
    _write_file(tmp, Kind.CHECKPOINT, [ckpt_body], version)
    os.rename(tmp, ckpt)
    _fsync_dir(directory)
    return info


def _write_content(path: Path, sections: dict[Kind, list[bytes | memoryview]],
                   rev: bytes | None, version: int) -> bytes:
    """Write the version-3 content file (header, section table, sections) or the version-4
    sealed file (the same with the CRC32 of header + table after the table), fsync it, and
    return version 3's checkpoint body (CRC32 of header + table, file size)."""
    flags = {k: 0 for k in sections}
    if rev is not None:
        packed = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(rev)
        if len(packed) <= REVINDEX_ZSTD_IF_BELOW * len(rev):
            rev, flags[Kind.REVINDEX] = packed, FLAG_ZSTD
        else:
            flags[Kind.REVINDEX] = 0
        sections[Kind.REVINDEX] = [rev]
    kinds = [k for k in SECTIONS if k in sections]
    kind = Kind.SEALED if version == 4 else Kind.CONTENT
    head = HEADER.pack(MAGIC, kind, version, 0) + U32.pack(len(kinds))
    pos = len(head) + SECTION.size * len(kinds) + (U32.size if version == 4 else 0)
    table = bytearray()
    for k in kinds:
        crc = length = 0
        for part in sections[k]:
            crc = zlib.crc32(part, crc)
            length += len(part)
        table += SECTION.pack(k, flags[k], 0, crc, pos, length)
        pos += length
    head += table
    if version == 4:
        head += U32.pack(zlib.crc32(head))
    with open(path, "wb") as f:
        f.write(head)
        for k in kinds:
            for part in sections[k]:
                f.write(part)
        f.flush()
        os.fsync(f.fileno())
    return CKPT3.pack(zlib.crc32(head), pos)


class Fileset:
    """A complete fileset opened for reading through mmap. Close it (or use ``with``)."""

    def __init__(self, root: Path, fid: FilesetId) -> None:
        self.fid = fid
        self._maps: dict[Kind, mmap.mmap | bytes] = {}
        try:
            self._open(root)
        except BaseException:
            self.close()
            raise

    def _fail(self, kind: Kind, off: int, expected: str, found: str = ""
              ) -> CorruptFilesetError:
        """An error at offset ``off`` of section/file ``kind``'s body (after a v1-2 file's
        header, from a v3 section's start)."""
        return CorruptFilesetError(self.paths[kind], self._base.get(kind, 0) + off, expected,
                                   found, kind.name.lower() if self.version >= 3 else "")

    def _map(self, root: Path, kind: Kind) -> memoryview:
        path = self.fid.path(root, kind)
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            m: mmap.mmap | bytes = (mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                                    if size else b"")
        self._maps[kind] = m
        if size < HEADER.size:
            raise CorruptFilesetError(path, 0, f"a {HEADER.size}-byte header", f"{size} bytes")
        magic, k, version, _ = HEADER.unpack_from(m, 0)
        if magic != MAGIC or k != kind:
            raise CorruptFilesetError(path, 0, f"magic {MAGIC!r} kind {int(kind)}",
                                      f"{magic!r} kind {k}")
        if version not in READABLE:
            raise CorruptFilesetError(path, 5, f"a version in {READABLE}", str(version))
        if kind in (Kind.CHECKPOINT, Kind.SEALED):
            self.version = version
        elif version != self.version:
            raise CorruptFilesetError(path, 5, f"version {self.version} (as its checkpoint)",
                                      str(version))
        return memoryview(m)

    def _open(self, root: Path) -> None:
        self._base: dict[Kind, int] = {}
        self.paths = {k: self.fid.path(root, k) for k in Kind}
        try:
            sealed = self._map(root, Kind.SEALED)
        except FileNotFoundError:
            ckpt = self._map(root, Kind.CHECKPOINT)
        else:
            if self.version != 4:
                raise CorruptFilesetError(self.paths[Kind.SEALED], 5, "version 4",
                                          str(self.version))
        self.paths[Kind.REVINDEX] = companion_path(root, self.fid, "revindex")
        if self.version == 4:
            self._rev: bytes | memoryview | None = None
            views = self._open_sealed(sealed)
        elif self.version == 3:
            self._rev = None
            views = self._open_content(root, ckpt)
        else:
            views = self._open_files(root, ckpt)
        # Everything but the data (and the reverse index) is checked whole on open; data is
        # checked per series on read (and whole by verify()).
        for k in (Kind.INFO, Kind.INDEX, Kind.SUMMARIES, Kind.BLOOM):
            self._check_crc(k, views[k])
        if len(views[Kind.INFO]) != INFO.size:
            raise self._fail(Kind.INFO, 0, f"{INFO.size} bytes of info")
        self.info = Info(*INFO.unpack_from(views[Kind.INFO], 0))
        self._index = views[Kind.INDEX]
        self._data = views[Kind.DATA]
        self._bloom = np.frombuffer(views[Kind.BLOOM], dtype=np.uint8)
        if self._bloom.size * 8 != self.info.bloom_bits:
            raise self._fail(Kind.BLOOM, 0, f"{self.info.bloom_bits} bits")
        self._sum_ids, self._sum_offs, self._frame_offs = self._read_summaries(
            views[Kind.SUMMARIES])
        # the last index group and data frame decompressed: (group, bytes[, data offset]);
        # replaced whole, so threads sharing the fileset never see a torn one
        self._igroup: tuple[int, bytes] | None = None
        self._frame: tuple[int, bytes, int] | None = None

    def _open_files(self, root: Path, ckpt: memoryview) -> dict[Kind, memoryview]:
        """Versions 1-2: seven files; the checkpoint holds the digests file's CRC."""
        digests = self._map(root, Kind.DIGESTS)
        if len(ckpt) != HEADER.size + 4:
            raise CorruptFilesetError(self.paths[Kind.CHECKPOINT], HEADER.size,
                                      "a 4-byte digest CRC", f"{len(ckpt) - HEADER.size} bytes")
        want = U32.unpack_from(ckpt, HEADER.size)[0]
        if zlib.crc32(digests) != want:  # one of the two is corrupt: name both
            raise CorruptFilesetError(
                self.paths[Kind.CHECKPOINT], HEADER.size,
                f"the CRC32 of {self.paths[Kind.DIGESTS]} (whole file), {want:#010x}",
                f"{zlib.crc32(digests):#010x} (one of the two files is corrupt)")
        if len(digests) != HEADER.size + 4 * len(DIGESTED):
            raise CorruptFilesetError(self.paths[Kind.DIGESTS], HEADER.size,
                                      f"{len(DIGESTED)} CRCs")
        self._digest = {k: U32.unpack_from(digests, HEADER.size + 4 * i)[0]
                        for i, k in enumerate(DIGESTED)}
        views, self._whole = {}, {}
        for k in DIGESTED:
            self._whole[k] = self._map(root, k)
            views[k], self._base[k] = self._whole[k][HEADER.size:], HEADER.size
        return views

    def _open_content(self, root: Path, ckpt: memoryview) -> dict[Kind, memoryview]:
        """Version 3: one content file; the checkpoint holds the CRC of its header and section
        table and its size; the table holds each section's offset, length and CRC."""
        cpath, kpath = self.paths[Kind.CONTENT], self.paths[Kind.CHECKPOINT]
        if len(ckpt) != HEADER.size + CKPT3.size:
            raise CorruptFilesetError(kpath, HEADER.size, f"{CKPT3.size} bytes",
                                      f"{len(ckpt) - HEADER.size} bytes")
        want_crc, want_size = CKPT3.unpack_from(ckpt, HEADER.size)
        content = self._map(root, Kind.CONTENT)
        if len(content) != want_size:
            raise CorruptFilesetError(cpath, len(content), f"{want_size} bytes (as checkpoint "
                                      f"{kpath} says; one of the two files is corrupt)",
                                      f"{len(content)} bytes")
        end = self._table_end(cpath, content, 0)
        got = zlib.crc32(content[:end])
        if got != want_crc:  # one of the two is corrupt: name both
            raise CorruptFilesetError(
                kpath, HEADER.size, f"the CRC32 of the header and section table of {cpath}, "
                f"{want_crc:#010x}", f"{got:#010x} (one of the two files is corrupt)")
        return self._sections(cpath, content, end)

    def _open_sealed(self, content: memoryview) -> dict[Kind, memoryview]:
        """Version 4: one file; the CRC of its header and section table follows the table."""
        cpath = self.paths[Kind.CONTENT] = self.paths[Kind.SEALED]
        end = self._table_end(cpath, content, U32.size)
        (want,) = U32.unpack_from(content, end)
        got = zlib.crc32(content[:end])
        if got != want:
            raise CorruptFilesetError(cpath, end, f"the CRC32 of the header and section table, "
                                      f"{want:#010x}", f"{got:#010x}")
        return self._sections(cpath, content, end + U32.size)

    @staticmethod
    def _table_end(cpath: Path, content: memoryview, extra: int) -> int:
        """Where the section table ends (checked to fit, with ``extra`` bytes after it)."""
        (n,) = U32.unpack_from(content, HEADER.size) if len(content) >= 12 else (-1,)
        end = HEADER.size + 4 + SECTION.size * n
        if not 0 <= n <= len(SECTIONS) or end + extra > len(content):
            raise CorruptFilesetError(cpath, HEADER.size, f"a section count <= {len(SECTIONS)}",
                                      str(n))
        return end

    def _sections(self, cpath: Path, content: memoryview, pos: int) -> dict[Kind, memoryview]:
        """Versions 3-4: the sections the table lists, the first at ``pos``, back to back to
        the end of the file."""
        for k in SECTIONS:
            self.paths[k] = cpath
        (n,) = U32.unpack_from(content, HEADER.size)
        views: dict[Kind, memoryview] = {}
        self._digest, self._flags = {}, {}
        for i in range(n):
            kind, flags, _r, crc, off, length = SECTION.unpack_from(content, HEADER.size + 4 +
                                                                   SECTION.size * i)
            if kind not in SECTIONS or Kind(kind) in views or off != pos or (
                    off + length > len(content)) or flags not in (
                    (0, FLAG_ZSTD) if kind == Kind.REVINDEX else (0,)):
                raise CorruptFilesetError(cpath, HEADER.size + 4 + SECTION.size * i,
                                          f"section {i} of a known kind with known flags at "
                                          f"offset {pos}",
                                          f"kind {kind}, flags {flags} at {off}+{length}")
            k = Kind(kind)
            views[k], self._base[k] = content[off:off + length], off
            self._digest[k], self._flags[k] = crc, flags
            pos = off + length
        missing = [k.name.lower() for k in SECTIONS if k not in views and k != Kind.REVINDEX]
        if missing or pos != len(content):
            raise CorruptFilesetError(cpath, HEADER.size, "sections covering the file",
                                      f"missing {missing}, ending at {pos}")
        self._views = views
        return views

    def _check_crc(self, kind: Kind, view: memoryview) -> None:
        """Versions 1-2: the whole file of ``kind`` (header included); 3: the section."""
        got = zlib.crc32(self._whole[kind] if self.version < 3 else view)
        if got != self._digest[kind]:
            what = "digests file" if self.version < 3 else "section table"
            raise CorruptFilesetError(self.paths[kind], 0 if self.version < 3 else
                                      self._base[kind], f"CRC32 {self._digest[kind]:#010x} "
                                      f"({what})", f"{got:#010x}",
                                      kind.name.lower() if self.version >= 3 else "")

    def _read_summaries(self, view: memoryview) -> tuple[list[bytes], list[int], list[int]]:
        ids, offs, frames, pos = [], [], [], 0
        tail = 8 if self.version == 1 else 16  # v2-3: + the group's data frame offset
        while pos < len(view):
            (n,) = U32.unpack_from(view, pos)
            if pos + 4 + n + tail > len(view):
                raise self._fail(Kind.SUMMARIES, pos, "a summary entry within the file")
            ids.append(bytes(view[pos + 4 : pos + 4 + n]))
            offs.append(U64.unpack_from(view, pos + 4 + n)[0])
            if tail == 16:
                frames.append(U64.unpack_from(view, pos + 12 + n)[0])
            pos += 4 + n + tail
        return ids, offs, frames

    def _span(self, kind: Kind, offs: list[int], g: int, size: int) -> tuple[int, int]:
        lo = offs[g]
        hi = offs[g + 1] if g + 1 < len(offs) else size
        if not lo <= hi <= size:
            raise self._fail(kind, lo, f"group {g} within the {kind.name.lower()}")
        return lo, hi

    def _index_group(self, g: int) -> bytes | memoryview:
        """The index entries of summary group g, back to back."""
        lo, hi = self._span(Kind.INDEX, self._sum_offs, g, len(self._index))
        if self.version < 3:
            return self._index[lo:hi]
        cached = self._igroup
        if cached is not None and cached[0] == g:
            return cached[1]
        try:
            raw = _decompress(self._index[lo:hi])
        except zstandard.ZstdError as e:
            raise self._fail(Kind.INDEX, lo, f"a zstd frame of summary group {g}",
                             str(e)) from e
        self._igroup = (g, raw)
        return raw

    def _group_data(self, g: int) -> tuple[bytes | memoryview, int]:
        """(bytes holding summary group g's blocks, data offset where they start)."""
        if self.version == 1:
            return self._data, 0
        cached = self._frame
        if cached is not None and cached[0] == g:
            return cached[1], cached[2]
        lo, hi = self._span(Kind.DATA, self._frame_offs, g, len(self._data))
        try:
            raw = _decompress(self._data[lo:hi])
        except zstandard.ZstdError as e:
            raise self._fail(Kind.DATA, lo, f"a zstd frame of summary group {g}",
                             str(e)) from e
        _sid, _h, start, *_ = self._entry(g, self._index_group(g), 0)
        self._frame = (g, raw, start)
        return raw, start

    def _entry(self, g: int, idx: bytes | memoryview, pos: int
               ) -> tuple[bytes, int, int, int, int, int, int]:
        """(id, hash, data offset, data length, crc, samples, next entry position) of the
        entry at ``pos`` of group g's index entries."""
        if pos + 4 > len(idx):
            raise self._fail(Kind.INDEX, self._sum_offs[g],
                             f"an entry at byte {pos} of group {g}'s index entries")
        (n,) = U32.unpack_from(idx, pos)
        end = pos + 4 + n + ENTRY_TAIL.size
        if end > len(idx):
            raise self._fail(Kind.INDEX, self._sum_offs[g],
                             f"an entry within group {g}'s index entries at byte {pos}")
        h, off, length, crc, samples = ENTRY_TAIL.unpack_from(idx, pos + 4 + n)
        return bytes(idx[pos + 4 : pos + 4 + n]), h, off, length, crc, samples, end

    def _block(self, g: int, sid: bytes, off: int, length: int, crc: int) -> memoryview:
        """The block of a series of summary group g at data offset ``off`` (uncompressed)."""
        data, start = self._group_data(g)
        where = "within the file" if self.version == 1 else f"within frame {g}"
        at = off if self.version == 1 else self._frame_offs[g]
        if not 0 <= off - start <= off - start + length <= len(data):
            raise self._fail(Kind.DATA, at, f"{length} bytes of series {sid!r} {where}")
        block = memoryview(data)[off - start : off - start + length]
        if zlib.crc32(block) != crc:
            raise self._fail(Kind.DATA, at, f"CRC32 {crc:#010x} of series {sid!r} "
                             f"(offset {off} of the uncompressed data)")
        return block

    def may_contain(self, series_hash: int) -> bool:
        """The bloom filter's answer: False means the series is certainly absent."""
        pos = _bloom_positions(np.array([series_hash & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64),
                               self.info.bloom_k, self.info.bloom_bits)[0]
        bits = self._bloom[(pos >> np.uint64(3)).astype(np.intp)]
        return bool(np.all(bits & (np.uint8(1) << (pos & np.uint64(7)).astype(np.uint8))))

    def get(self, sid: bytes, series_hash: int) -> memoryview | None:
        """The compressed block of one series, or None if the fileset does not hold it."""
        if not self._sum_ids or not self.may_contain(series_hash):
            return None
        g = bisect.bisect_right(self._sum_ids, sid) - 1
        if g < 0:
            return None
        idx, pos = self._index_group(g), 0
        for _ in range(self.info.summary_every):
            if pos >= len(idx):
                break
            eid, _h, off, length, crc, _n, pos = self._entry(g, idx, pos)
            if eid == sid:
                return self._block(g, sid, off, length, crc)
            if eid > sid:
                break
        return None

    def _walk(self) -> Iterator[tuple[int, bytes, int, int, int, int]]:
        """(group, id, hash, data offset, length, crc) of every entry, in id order."""
        for g in range(len(self._sum_ids)):
            idx, pos = self._index_group(g), 0
            while pos < len(idx):
                sid, h, off, length, crc, _n, pos = self._entry(g, idx, pos)
                yield g, sid, h, off, length, crc

    def __iter__(self) -> Iterator[tuple[bytes, int, memoryview]]:
        """Every (series id, hash, block) in id order."""
        for g, sid, h, off, length, crc in self._walk():
            yield sid, h, self._block(g, sid, off, length, crc)

    def entries(self) -> Iterator[tuple[bytes, int, memoryview | CorruptFilesetError]]:
        """Like iteration, but a series whose block fails its checks yields the error in place
        of its block, so one corrupt block (in versions 2-3: one corrupt frame, the series of
        one summary group) leaves the other series readable."""
        for g, sid, h, off, length, crc in self._walk():
            try:
                yield sid, h, self._block(g, sid, off, length, crc)
            except CorruptFilesetError as e:
                yield sid, h, e

    def __len__(self) -> int:
        return self.info.num_series

    def revindex(self) -> bytes | memoryview | None:
        """Version 3: the reverse index segment (checked against its section CRC and
        decompressed on first use, then kept), or None when the fileset has none. Versions
        1-2 keep it in the companion file (``paths[Kind.REVINDEX]``): None."""
        if self.version < 3 or Kind.REVINDEX not in self._views:
            return None
        rev = self._rev
        if rev is None:
            view = self._views[Kind.REVINDEX]
            self._check_crc(Kind.REVINDEX, view)
            if self._flags[Kind.REVINDEX] & FLAG_ZSTD:
                try:
                    rev = _decompress(view)
                except zstandard.ZstdError as e:
                    raise self._fail(Kind.REVINDEX, 0, "a zstd frame", str(e)) from e
            else:
                rev = view
            self._rev = rev
        return rev

    def verify(self) -> None:
        """Check the data (and reverse index) CRC as a whole too (open checks the rest)."""
        self._check_crc(Kind.DATA, self._data)
        self.revindex()

    def close(self) -> None:
        for attr in ("_index", "_data", "_bloom", "_frame", "_igroup", "_views", "_whole",
                     "_rev"):
            if hasattr(self, attr):
                delattr(self, attr)
        for m in self._maps.values():
            if isinstance(m, mmap.mmap):
                # a caller may still hold a block view; the map then closes when it is freed
                with contextlib.suppress(BufferError):
                    m.close()
        self._maps.clear()

    def __enter__(self) -> Fileset:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def complete_volumes(d: Path, block_start: int | None = None) -> list[tuple[int, int]]:
    """(block start, volume) of every complete fileset in shard directory ``d`` (of one block
    if given): those whose version-4 file or version 1-3 checkpoint exists, sorted."""
    try:
        names = os.listdir(d)
    except FileNotFoundError:
        return []
    out = set()
    for n in names:
        m = NAME.match(n)
        if m and m.group(3) in COMPLETE_KINDS and (block_start is None or
                                                   int(m.group(1)) == block_start):
            out.add((int(m.group(1)), int(m.group(2))))
    return sorted(out)


def is_complete(root: Path, fid: FilesetId) -> bool:
    return fid.path(root, Kind.SEALED).exists() or fid.path(root, Kind.CHECKPOINT).exists()


def list_filesets(root: Path) -> list[FilesetId]:
    """Every complete fileset under root (its version-4 file or its checkpoint exists),
    sorted."""
    out = set()
    for p in Path(root).glob("*/*/fileset-*.db"):
        m = NAME.match(p.name)
        if m and m.group(3) in COMPLETE_KINDS and p.parent.name.isdigit():
            out.add(FilesetId(p.parent.parent.name, int(p.parent.name), int(m.group(1)),
                              int(m.group(2))))
    return sorted(out)


def remove_incomplete(root: Path, shards: range | None = None) -> list[Path]:
    """Delete the files of filesets that have no checkpoint (versions 1-3: a flush that did not
    finish), and temporary files a killed writer left (version 4's ``….db.tmp`` among them), in
    the given shards (default: all).

    For start-up only, before any flush of those shards runs: a fileset being written has no
    checkpoint (version 4: no final name) yet.
    """
    complete = {(f.namespace, f.shard, f.block_start, f.volume) for f in list_filesets(root)}
    removed = []
    for p in Path(root).glob("*/*/fileset-*"):
        if not p.parent.name.isdigit() or (shards is not None and
                                           int(p.parent.name) not in shards):
            continue
        if p.name.endswith(".tmp"):
            log.warning("removing %s: a temporary file of a flush that did not finish", p)
            p.unlink()
            removed.append(p)
            continue
        m = NAME.match(p.name)
        if not m:
            continue
        key = (p.parent.parent.name, int(p.parent.name), int(m.group(1)), int(m.group(2)))
        if key not in complete:
            log.warning("removing %s: its fileset has no checkpoint (flush did not finish)", p)
            p.unlink()
            removed.append(p)
    return removed


def remove_superseded(root: Path, shards: range | None = None) -> list[FilesetId]:
    """Delete every checkpointed volume of a block below its newest one (a flush killed
    between volume N+1's checkpoint and volume N's deletion), checkpoint first. Start-up
    only, like :func:`remove_incomplete`."""
    newest: dict[tuple[str, int, int], int] = {}
    fids = [f for f in list_filesets(root) if shards is None or f.shard in shards]
    for f in fids:
        key = (f.namespace, f.shard, f.block_start)
        newest[key] = max(newest.get(key, -1), f.volume)
    gone = []
    for f in fids:
        if f.volume < newest[(f.namespace, f.shard, f.block_start)]:
            log.warning("removing volume %d of %s shard %d block %d: volume %d supersedes it",
                        f.volume, f.namespace, f.shard, f.block_start,
                        newest[(f.namespace, f.shard, f.block_start)])
            for k in (Kind.CHECKPOINT, *[k for k in Kind if k != Kind.CHECKPOINT]):
                f.path(root, k).unlink(missing_ok=True)
            companion_path(root, f, "revindex").unlink(missing_ok=True)
            gone.append(f)
    return gone
