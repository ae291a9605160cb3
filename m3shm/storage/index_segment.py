"""The immutable on-disk reverse index segment: written once at flush, read through mmap.

Layout, limits and checksums: ``docs/formats/index.md`` (changing a struct here changes the
format). The reader checks the header, the series section and the table of contents when it
opens a file, and each label block's checksum the first time a query touches that label; every
byte of the file is covered by exactly one checksum. Any mismatch raises
:class:`CorruptIndexError` naming the file, the offset and what was expected there.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, overload

import numpy as np
import numpy.typing as npt

from m3shm.errors import CorruptError, VersionError
from m3shm.storage import index_postings as P
from m3shm.storage.index_column import LabelColumn
from m3shm.storage.index_select import IndexReader

MAGIC = b"M3RI"
VERSION = 1
# magic, version, flags, reserved, series count, label count, toc offset, toc length
HEADER = struct.Struct("<4sBBHIIQI")
HEADER_SIZE = HEADER.size + 4  # + header crc32
BLOCK_HEAD = struct.Struct("<III")  # value count, flags, value bytes length
TOC_ENTRY = struct.Struct("<QQI")  # block offset, block length, name length
U32 = struct.Struct("<I")
FLAG_NEWLINE = 1  # block flag: some value holds "\n"
_LE_U32 = np.dtype("<u4")


class CorruptIndexError(CorruptError):
    """A segment file that is not what its format says: names the file, offset and expectation."""

    def __init__(self, path: Path, offset: int, expected: str, found: str = "") -> None:
        self.path, self.offset, self.expected = path, offset, expected
        msg = f"corrupt index segment {path} at offset {offset}: expected {expected}"
        super().__init__(msg + (f", found {found}" if found else ""))


class IndexVersionError(CorruptIndexError, VersionError):
    """A segment version this build does not read."""


def _pad4(n: int) -> bytes:
    return bytes(-n % 4)


def _u32s(a: npt.ArrayLike) -> bytes:
    return np.asarray(a).astype(_LE_U32).tobytes()


def _block_bytes(col: LabelColumn) -> bytes:
    encoded = [v.encode("utf-8") for v in col.value_list()]
    blob = b"".join(encoded)
    if len(blob) > P.MAX_ID:
        raise ValueError(f"label {col.name!r}: values exceed 4 GiB, more than a segment holds")
    voffs = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)),
              out=voffs[1:])
    body = b"".join([
        BLOCK_HEAD.pack(len(encoded), FLAG_NEWLINE if col.has_newline else 0, len(blob)),
        _u32s(voffs), _u32s(col.offsets), _u32s(col.ids), blob, _pad4(len(blob)),
    ])
    return body + U32.pack(zlib.crc32(body))


def segment_bytes(index: IndexReader) -> bytes:
    """``index`` as the bytes of one segment (a file of its own, or a fileset section)."""
    series = index.all_postings()
    body = [_u32s(series), U32.pack(zlib.crc32(_u32s(series)))]
    pos = HEADER_SIZE + 4 * series.size + 4
    toc: list[bytes] = []
    names = sorted(index.names(), key=lambda n: n.encode("utf-8"))
    for name in names:
        col = index.column(name)
        assert col is not None
        block = _block_bytes(col)
        raw = name.encode("utf-8")
        toc += [TOC_ENTRY.pack(pos, len(block), len(raw)), raw, _pad4(len(raw))]
        body.append(block)
        pos += len(block)
    toc_bytes = b"".join(toc)
    head = HEADER.pack(MAGIC, VERSION, 0, 0, series.size, len(names), pos, len(toc_bytes))
    return b"".join([head, U32.pack(zlib.crc32(head)), *body, toc_bytes,
                     U32.pack(zlib.crc32(toc_bytes))])


def write_segment(path: str | os.PathLike[str], index: IndexReader) -> None:
    """Persist ``index`` as a segment at ``path`` (written to a temporary name, then renamed)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(segment_bytes(index))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class _Utf8Values(Sequence[str]):
    """The values of a block, decoded one at a time (enough for bisect)."""

    def __init__(self, blob: memoryview, offsets: npt.NDArray[Any]) -> None:
        self._blob, self._offs = blob, offsets.tolist()

    def __len__(self) -> int:
        return len(self._offs) - 1

    @overload
    def __getitem__(self, i: int) -> str: ...
    @overload
    def __getitem__(self, i: slice) -> list[str]: ...
    def __getitem__(self, i: int | slice) -> str | list[str]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return str(self._blob[self._offs[i]:self._offs[i + 1]], "utf-8")

    def __iter__(self) -> Any:
        blob, offs = bytes(self._blob), self._offs
        return (blob[a:b].decode("utf-8") for a, b in zip(offs, offs[1:], strict=False))


class SegmentReader(IndexReader):
    """Queries over a segment file through mmap; use as a context manager or call close()."""

    def __init__(self, path: str | os.PathLike[str],
                 buf: bytes | memoryview | None = None) -> None:
        """Open the segment file ``path``, or with ``buf`` the segment held there (a fileset
        section; ``path`` then only names it in errors)."""
        self.path = Path(path)
        self._mm: mmap.mmap | None = None
        if buf is not None:
            size = len(buf)
            if size < HEADER_SIZE:
                raise CorruptIndexError(self.path, 0, f"a {HEADER_SIZE}-byte header",
                                        f"{size} bytes")
            self._buf = memoryview(buf)
        else:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < HEADER_SIZE:
                    raise CorruptIndexError(self.path, 0, f"a {HEADER_SIZE}-byte header",
                                            f"{size} bytes")
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._buf = memoryview(self._mm)
        self._columns: dict[str, LabelColumn] = {}
        try:
            self._open(size)
        except BaseException:
            self.close()
            raise

    def _fail(self, offset: int, expected: str, found: str = "") -> CorruptIndexError:
        return CorruptIndexError(self.path, offset, expected, found)

    def _crc(self, start: int, end: int, what: str) -> None:
        want = U32.unpack_from(self._buf, end)[0]
        got = zlib.crc32(self._buf[start:end])
        if got != want:
            raise self._fail(end, f"crc32 {want:#010x} of {what} (bytes {start}..{end})",
                             f"{got:#010x}")

    def _open(self, size: int) -> None:
        magic, version, flags, reserved, n_series, n_labels, toc_off, toc_len = (
            HEADER.unpack_from(self._buf, 0))
        if magic != MAGIC:
            raise self._fail(0, f"magic {MAGIC!r}", repr(magic))
        self._crc(0, HEADER.size, "the header")
        if version != VERSION:
            raise IndexVersionError(self.path, 4, f"version {VERSION}", str(version))
        if flags or reserved:
            raise self._fail(5, "flags and reserved 0", f"{flags}, {reserved}")
        series_end = HEADER_SIZE + 4 * n_series
        if toc_off < series_end + 4 or toc_off + toc_len + 4 != size:
            raise self._fail(16, f"toc offset and length ending at file size {size}",
                             f"{toc_off} + {toc_len}")
        self._crc(HEADER_SIZE, series_end, "the series ids")
        self._series = np.frombuffer(self._buf, _LE_U32, n_series, HEADER_SIZE)
        self._crc(toc_off, toc_off + toc_len, "the table of contents")
        self._toc: dict[str, tuple[int, int]] = {}
        pos, expect_block = toc_off, series_end + 4
        for _ in range(n_labels):
            if pos + TOC_ENTRY.size > toc_off + toc_len:
                raise self._fail(pos, f"{n_labels} toc entries")
            b_off, b_len, n_len = TOC_ENTRY.unpack_from(self._buf, pos)
            if b_off != expect_block or b_len < BLOCK_HEAD.size + 12:
                raise self._fail(pos, f"a label block at {expect_block}", f"{b_off}+{b_len}")
            name = str(self._buf[pos + TOC_ENTRY.size:pos + TOC_ENTRY.size + n_len], "utf-8")
            self._toc[name] = (b_off, b_len)
            pos += TOC_ENTRY.size + n_len + (-n_len % 4)
            expect_block = b_off + b_len
        if pos != toc_off + toc_len or expect_block != toc_off:
            raise self._fail(pos, f"blocks ending at the toc ({toc_off})", str(expect_block))
        self._names = sorted(self._toc)

    def close(self) -> None:
        self._columns.clear()
        self._series = P.EMPTY
        # arrays handed out may still view the map; then it unmaps when they are gone
        with contextlib.suppress(BufferError):
            self._buf.release()
            if self._mm is not None:
                self._mm.close()

    def __enter__(self) -> SegmentReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def names(self) -> list[str]:
        return list(self._names)

    def all_postings(self) -> P.Postings:
        return self._series

    def column(self, name: str) -> LabelColumn | None:
        col = self._columns.get(name)
        if col is None:
            where = self._toc.get(name)
            if where is None:
                return None
            col = self._columns[name] = self._read_block(name, *where)
        return col

    def _read_block(self, name: str, off: int, length: int) -> LabelColumn:
        end = off + length - 4
        self._crc(off, end, f"label block {name!r}")
        n, flags, blob_len = BLOCK_HEAD.unpack_from(self._buf, off)
        p = off + BLOCK_HEAD.size
        if p + 8 * (n + 1) > end:
            raise self._fail(off, f"{n} values within the block of {length} bytes")
        voffs = np.frombuffer(self._buf, _LE_U32, n + 1, p)
        poffs = np.frombuffer(self._buf, _LE_U32, n + 1, p + 4 * (n + 1))
        p += 8 * (n + 1)
        n_ids = int(poffs[-1])
        blob_at = p + 4 * n_ids
        if (blob_at + blob_len + (-blob_len % 4) != end or int(voffs[-1]) != blob_len
                or voffs[0] or poffs[0] or (np.diff(voffs.astype(np.int64)) <= 0).any()
                or (np.diff(poffs.astype(np.int64)) <= 0).any()):
            raise self._fail(off, f"consistent offsets in label block {name!r}")
        ids = np.frombuffer(self._buf, _LE_U32, n_ids, p)
        values = _Utf8Values(self._buf[blob_at:blob_at + blob_len], voffs)
        return LabelColumn(name, values, poffs, ids, bool(flags & FLAG_NEWLINE))
