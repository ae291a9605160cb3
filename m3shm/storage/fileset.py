"""Immutable filesets: one flushed block of one shard of one namespace (docs/formats/fileset.md).

A fileset is seven files ``fileset-<block start>-<volume>-<kind>.db`` in
``<root>/<namespace>/<shard>/``: info, index, summaries, bloom, data, digests and checkpoint.
The checkpoint is written last (after every other file is fsync'd) and a fileset without a valid
one does not exist: readers skip it and :func:`remove_incomplete` deletes it.

Writing happens once per block at flush; nothing rewrites a fileset. Readers mmap the files; a
lookup of one series goes bloom filter -> summaries (in memory) -> index (a short scan) -> data,
and checks the series' own CRC before handing out its block. Blocks stay compressed (TSZ,
docs/formats/tsz.md); decoding is the caller's business.

Version 2 (written now) stores the data file as zstd frames, one per summary group (the
``summary_every`` series a summary entry starts), so a lookup decompresses one small frame and a
scan each frame once; version 1 filesets (raw TSZ blocks back to back) stay readable.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import mmap
import os
import re
import struct
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

import numpy as np
import zstandard

from m3shm import codec
from m3shm.errors import CorruptError

log = logging.getLogger("m3shm.fileset")

MAGIC = b"M3FS"
VERSION = 2  # written; every version in READABLE is read
READABLE = (1, 2)
ZSTD_LEVEL = 3  # docs/formats/fileset.md: the level sweep behind this choice
HEADER = struct.Struct("<4sBBH")  # magic, kind, version, reserved
INFO = struct.Struct("<qqIIQQQIIQ")
ENTRY_TAIL = struct.Struct("<QQIII")  # hash, data offset, data length, data crc32, samples
U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")
DEFAULT_SUMMARY_EVERY = 64
BLOOM_BITS_PER_SERIES = 10
BLOOM_K = 7
NAME = re.compile(r"^fileset-(-?\d+)-(\d+)-([a-z]+)\.db$")


class Kind(IntEnum):
    """File kinds; the values are persisted in every file header."""

    INFO = 1
    INDEX = 2
    SUMMARIES = 3
    BLOOM = 4
    DATA = 5
    DIGESTS = 6
    CHECKPOINT = 7


DIGESTED = (Kind.INFO, Kind.INDEX, Kind.SUMMARIES, Kind.BLOOM, Kind.DATA)


class CorruptFilesetError(CorruptError):
    """A fileset file that is not what its format says: names the file, offset and expectation."""

    def __init__(self, path: Path, offset: int, expected: str, found: str = "") -> None:
        self.path, self.offset, self.expected = path, offset, expected
        msg = f"corrupt fileset file {path} at offset {offset}: expected {expected}"
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


def _write_file(path: Path, kind: Kind, parts: Iterable[bytes | memoryview]) -> int:
    """Write header + parts, fsync, and return the CRC32 of the whole file."""
    crc = 0
    with open(path, "wb") as f:
        for part in (HEADER.pack(MAGIC, kind, VERSION, 0), *parts):
            f.write(part)
            crc = zlib.crc32(part, crc)
        f.flush()
        os.fsync(f.fileno())
    return crc & 0xFFFFFFFF


def companion_path(root: Path, fid: FilesetId, kind: str) -> Path:
    """A file that belongs to a fileset without being one of its digested kinds (the reverse
    index segment, ``kind="revindex"``): same name pattern, so it lives and dies with it."""
    return (root / fid.namespace / f"{fid.shard:04d}" /
            f"fileset-{fid.block_start}-{fid.volume}-{kind}.db")


def write_fileset(root: Path, fid: FilesetId, block_size: int,
                  series: Iterable[tuple[bytes, int, bytes | memoryview]],
                  summary_every: int = DEFAULT_SUMMARY_EVERY,
                  before_checkpoint: Callable[[list[bytes]], None] | None = None) -> Info:
    """Write one fileset from (series id, series hash, TSZ block) triples, in any order.

    Series ids must be unique. ``before_checkpoint`` is called with the ids in index order
    after the content files are durable and before the checkpoint, to write companion files
    (they must be durable when it returns). Returns the fileset's info once it is durable
    (every file and the directory fsync'd, the checkpoint last).
    """
    entries = sorted(series, key=lambda e: e[0])
    for a, b in zip(entries, entries[1:], strict=False):
        if a[0] == b[0]:
            raise ValueError(f"series id {a[0]!r} appears twice in fileset {fid}")
    directory = fid.path(root, Kind.INFO).parent
    directory.mkdir(parents=True, exist_ok=True)

    index, summaries, data = bytearray(), bytearray(), []
    data_off = samples = frame_off = 0
    group: list[bytes | memoryview] = []
    cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    for i, (sid, h, block) in enumerate(entries):
        n = codec.count(block)  # also checks the block header
        if i % summary_every == 0:
            if group:
                data.append(cctx.compress(b"".join(group)))
                frame_off += len(data[-1])
                group = []
            summaries += U32.pack(len(sid)) + sid + U64.pack(len(index)) + U64.pack(frame_off)
        index += U32.pack(len(sid)) + sid + ENTRY_TAIL.pack(
            h & 0xFFFFFFFFFFFFFFFF, data_off, len(block), zlib.crc32(block), n)
        group.append(block)
        data_off += len(block)
        samples += n
    if group:
        data.append(cctx.compress(b"".join(group)))

    nseries = len(entries)
    bloom_bits = 64
    while bloom_bits < nseries * BLOOM_BITS_PER_SERIES:
        bloom_bits *= 2
    bloom = np.zeros(bloom_bits // 8, dtype=np.uint8)
    if nseries:
        hashes = np.array([e[1] & 0xFFFFFFFFFFFFFFFF for e in entries], dtype=np.uint64)
        pos = _bloom_positions(hashes, BLOOM_K, bloom_bits).ravel()
        np.bitwise_or.at(bloom, (pos >> np.uint64(3)).astype(np.intp),
                         (np.uint8(1) << (pos & np.uint64(7)).astype(np.uint8)))

    info = Info(fid.block_start, block_size, fid.volume, summary_every, nseries, samples,
                data_off, codec.VERSION, BLOOM_K, bloom_bits)
    crcs = {
        Kind.INFO: _write_file(fid.path(root, Kind.INFO), Kind.INFO,
                               [INFO.pack(*info.__dict__.values())]),
        Kind.INDEX: _write_file(fid.path(root, Kind.INDEX), Kind.INDEX, [index]),
        Kind.SUMMARIES: _write_file(fid.path(root, Kind.SUMMARIES), Kind.SUMMARIES,
                                    [summaries]),
        Kind.BLOOM: _write_file(fid.path(root, Kind.BLOOM), Kind.BLOOM, [bloom.tobytes()]),
        Kind.DATA: _write_file(fid.path(root, Kind.DATA), Kind.DATA, data),
    }
    if before_checkpoint is not None:
        before_checkpoint([e[0] for e in entries])
    digests = b"".join(U32.pack(crcs[k]) for k in DIGESTED)
    dcrc = _write_file(fid.path(root, Kind.DIGESTS), Kind.DIGESTS, [digests])
    _fsync_dir(directory)  # every file above exists durably before the checkpoint does
    # the checkpoint appears whole or not at all: a writer killed while writing it must not
    # leave a short checkpoint that makes the fileset look complete
    ckpt = fid.path(root, Kind.CHECKPOINT)
    tmp = ckpt.with_name(ckpt.name + ".tmp")
    _write_file(tmp, Kind.CHECKPOINT, [U32.pack(dcrc)])
    os.rename(tmp, ckpt)
    _fsync_dir(directory)
    return info


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
        if kind == Kind.CHECKPOINT:
            self.version = version
        elif version != self.version:
            raise CorruptFilesetError(path, 5, f"version {self.version} (as its checkpoint)",
                                      str(version))
        return memoryview(m)

    def _open(self, root: Path) -> None:
        self.paths = {k: self.fid.path(root, k) for k in Kind}
        ckpt = self._map(root, Kind.CHECKPOINT)
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
        views = {k: self._map(root, k) for k in DIGESTED}
        # Everything but the data is checked whole on open; data is checked per series on
        # read (and whole by verify()).
        for k in (Kind.INFO, Kind.INDEX, Kind.SUMMARIES, Kind.BLOOM):
            self._check_crc(k, views[k])
        if len(views[Kind.INFO]) != HEADER.size + INFO.size:
            raise CorruptFilesetError(self.paths[Kind.INFO], HEADER.size,
                                      f"{INFO.size} bytes of info")
        self.info = Info(*INFO.unpack_from(views[Kind.INFO], HEADER.size))
        self._index = views[Kind.INDEX][HEADER.size:]
        self._data = views[Kind.DATA][HEADER.size:]
        self._bloom = np.frombuffer(views[Kind.BLOOM], dtype=np.uint8, offset=HEADER.size)
        if self._bloom.size * 8 != self.info.bloom_bits:
            raise CorruptFilesetError(self.paths[Kind.BLOOM], HEADER.size,
                                      f"{self.info.bloom_bits} bits")
        self._sum_ids, self._sum_offs, self._frame_offs = self._read_summaries(
            views[Kind.SUMMARIES])
        # the last frame decompressed (v2): (group, bytes, data offset where they start);
        # replaced whole, so threads sharing the fileset never see a torn one
        self._frame: tuple[int, bytes, int] | None = None

    def _check_crc(self, kind: Kind, view: memoryview) -> None:
        got = zlib.crc32(view)
        if got != self._digest[kind]:
            raise CorruptFilesetError(self.paths[kind], 0,
                                      f"CRC32 {self._digest[kind]:#010x} (digests file)",
                                      f"{got:#010x}")

    def _read_summaries(self, view: memoryview) -> tuple[list[bytes], list[int], list[int]]:
        ids, offs, frames, pos = [], [], [], HEADER.size
        tail = 8 if self.version == 1 else 16  # v2: + the group's frame offset
        while pos < len(view):
            (n,) = U32.unpack_from(view, pos)
            if pos + 4 + n + tail > len(view):
                raise CorruptFilesetError(self.paths[Kind.SUMMARIES], pos,
                                          "a summary entry within the file")
            ids.append(bytes(view[pos + 4 : pos + 4 + n]))
            offs.append(U64.unpack_from(view, pos + 4 + n)[0])
            if tail == 16:
                frames.append(U64.unpack_from(view, pos + 12 + n)[0])
            pos += 4 + n + tail
        return ids, offs, frames

    def _group_data(self, g: int) -> tuple[bytes | memoryview, int]:
        """(bytes holding summary group g's blocks, data offset where they start)."""
        if self.version == 1:
            return self._data, 0
        cached = self._frame
        if cached is not None and cached[0] == g:
            return cached[1], cached[2]
        lo = self._frame_offs[g]
        hi = self._frame_offs[g + 1] if g + 1 < len(self._frame_offs) else len(self._data)
        path = self.paths[Kind.DATA]
        if not lo <= hi <= len(self._data):
            raise CorruptFilesetError(path, HEADER.size + lo, f"frame {g} within the file")
        try:
            # a decompressor per frame: they are not safe to share between threads
            raw = zstandard.ZstdDecompressor().decompress(self._data[lo:hi])
        except zstandard.ZstdError as e:
            raise CorruptFilesetError(path, HEADER.size + lo,
                                      f"a zstd frame of summary group {g}", str(e)) from e
        _sid, _h, start, *_ = self._entry(self._sum_offs[g])
        self._frame = (g, raw, start)
        return raw, start

    def _entry(self, pos: int) -> tuple[bytes, int, int, int, int, int, int]:
        """(id, hash, data offset, data length, crc, samples, next entry position)"""
        idx = self._index
        if pos + 4 > len(idx):
            raise CorruptFilesetError(self.paths[Kind.INDEX], HEADER.size + pos, "an entry")
        (n,) = U32.unpack_from(idx, pos)
        end = pos + 4 + n + ENTRY_TAIL.size
        if end > len(idx):
            raise CorruptFilesetError(self.paths[Kind.INDEX], HEADER.size + pos,
                                      "an entry within the file")
        h, off, length, crc, samples = ENTRY_TAIL.unpack_from(idx, pos + 4 + n)
        return bytes(idx[pos + 4 : pos + 4 + n]), h, off, length, crc, samples, end

    def _block(self, g: int, sid: bytes, off: int, length: int, crc: int) -> memoryview:
        """The block of a series of summary group g at data offset ``off`` (uncompressed)."""
        data, start = self._group_data(g)
        where = "within the file" if self.version == 1 else f"within frame {g}"
        if not 0 <= off - start <= off - start + length <= len(data):
            raise CorruptFilesetError(self.paths[Kind.DATA], HEADER.size + off,
                                      f"{length} bytes of series {sid!r} {where}")
        block = memoryview(data)[off - start : off - start + length]
        if zlib.crc32(block) != crc:
            raise CorruptFilesetError(self.paths[Kind.DATA], HEADER.size + off,
                                      f"CRC32 {crc:#010x} of series {sid!r} "
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
        i = bisect.bisect_right(self._sum_ids, sid) - 1
        if i < 0:
            return None
        pos = self._sum_offs[i]
        for _ in range(self.info.summary_every):
            if pos >= len(self._index):
                break
            eid, _h, off, length, crc, _n, pos = self._entry(pos)
            if eid == sid:
                return self._block(i, sid, off, length, crc)
            if eid > sid:
                break
        return None

    def __iter__(self) -> Iterator[tuple[bytes, int, memoryview]]:
        """Every (series id, hash, block) in id order."""
        pos = i = 0
        every = self.info.summary_every
        while pos < len(self._index):
            sid, h, off, length, crc, _n, pos = self._entry(pos)
            yield sid, h, self._block(i // every, sid, off, length, crc)
            i += 1

    def entries(self) -> Iterator[tuple[bytes, int, memoryview | CorruptFilesetError]]:
        """Like iteration, but a series whose block fails its checks yields the error in place
        of its block, so one corrupt block (in version 2: one corrupt frame, the series of one
        summary group) leaves the other series readable."""
        pos = i = 0
        every = self.info.summary_every
        while pos < len(self._index):
            sid, h, off, length, crc, _n, pos = self._entry(pos)
            try:
                yield sid, h, self._block(i // every, sid, off, length, crc)
            except CorruptFilesetError as e:
                yield sid, h, e
            i += 1

    def __len__(self) -> int:
        return self.info.num_series

    def verify(self) -> None:
        """Check the data file's CRC as a whole too (open checks everything else)."""
        self._check_crc(Kind.DATA, memoryview(self._maps[Kind.DATA]))

    def close(self) -> None:
        for attr in ("_index", "_data", "_bloom", "_frame"):
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


def list_filesets(root: Path) -> list[FilesetId]:
    """Every fileset under root whose checkpoint file exists, sorted."""
    out = []
    for ckpt in Path(root).glob("*/*/fileset-*-checkpoint.db"):
        m = NAME.match(ckpt.name)
        if m and ckpt.parent.name.isdigit():
            out.append(FilesetId(ckpt.parent.parent.name, int(ckpt.parent.name),
                                 int(m.group(1)), int(m.group(2))))
    return sorted(out)


def remove_incomplete(root: Path, shards: range | None = None) -> list[Path]:
    """Delete the files of filesets that have no checkpoint (a flush that did not finish),
    and temporary files a killed writer left, in the given shards (default: all).

    For start-up only, before any flush of those shards runs: a fileset being written has no
    checkpoint yet.
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
