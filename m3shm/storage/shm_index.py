"""A reverse index over every shard's series table in shared memory, and bulk chunk reads.

Any worker answers any query by reading all shards directly (no hop through their owners).
:class:`ShmIndex` keeps, per process, a :class:`~m3shm.storage.reverse_index.ReverseIndex` of
every series of every shard, under dense ids of its own; ``refresh()`` indexes only the slots
published since the last call (a shard's series table only grows: slots ``[seen, nseries)``
are new), copying their labels out of the segment in one C call per shard.

Reads go through C in whole selections: :meth:`extent` says what a selection would cost
(chunks, samples) before anything is copied, and :meth:`chunks` copies the compressed
streams of the chunks in a time range out of the segment (csrc/shard_read.c), so the
evaluation that follows touches no shared memory.

Thread safety: a lock serialises refresh and index queries (the index builds label columns
lazily); chunk reads need no lock (the segment is read lock-free by design).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from m3shm._native import ffi, lib
from m3shm.errors import check
from m3shm.shm import Segment
from m3shm.storage import index_postings as P
from m3shm.storage.reverse_index import ReverseIndex

Labels = tuple[tuple[str, str], ...]

REF_DTYPE = np.dtype([("series", "<u4"), ("count", "<u4"), ("block_start", "<i8"),
                      ("stream", "<u8"), ("off", "<u8"), ("len", "<u8")])
assert REF_DTYPE.itemsize == ffi.sizeof("m3_chunk_ref")


def parse_canonical(buf: bytes) -> Labels:
    """Canonical label bytes (u16 name_len, name, u16 value_len, value; sorted) -> pairs."""
    out = []
    i, n = 0, len(buf)
    while i < n:
        nl = buf[i] | buf[i + 1] << 8
        name = buf[i + 2:i + 2 + nl].decode()
        i += 2 + nl
        vl = buf[i] | buf[i + 1] << 8
        out.append((name, buf[i + 2:i + 2 + vl].decode()))
        i += 2 + vl
    return tuple(out)


@dataclass
class Chunks:
    """Chunks copied out of the segment for a selection.

    ``refs`` (REF_DTYPE) describe streams in ``data``; ``refs['series']`` indexes the
    ``ids`` the selection was made for. Every series' chunks are adjacent, sorted by
    (block_start, stream).
    """

    ids: np.ndarray  # uint32 index ids, in the order chunks refer to them
    data: np.ndarray  # uint8
    refs: np.ndarray  # REF_DTYPE


class ShmIndex:
    def __init__(self, seg: Segment) -> None:
        self.seg = seg
        self.nshards = seg.params.num_shards
        self.block_ms = seg.params.block_ms
        self.index = ReverseIndex()
        self.labels: list[Labels] = []
        self._shard = np.zeros(1024, dtype=np.uint32)
        self._slot = np.zeros(1024, dtype=np.uint32)
        self._seen = [0] * self.nshards
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.labels)

    # -- indexing ----------------------------------------------------------------------------
    def refresh(self) -> int:
        """Index every series published since the last call. Returns how many were new."""
        with self._lock:
            new = 0
            for shard in range(self.nshards):
                n = int(lib.m3_shard_nseries(self.seg.base, shard))
                if n > self._seen[shard]:
                    new += self._index_shard(shard, self._seen[shard], n)
            return new

    def _index_shard(self, shard: int, lo: int, hi: int) -> int:
        added = 0
        while lo < hi:
            cnt = hi - lo
            cap = max(1 << 16, cnt * 96)
            out = ffi.new("uint8_t[]", cap)
            offs = np.zeros(cnt + 1, dtype=np.uint64)
            done = ffi.new("uint32_t *")
            with self.seg.reading():  # csrc/epoch.c: no reuse of what we read meanwhile
                rc = lib.m3_shard_labels_many(self.seg.base, shard, lo, hi, out, cap,
                                              ffi.from_buffer("uint64_t[]", offs), done)
            if rc == lib.M3_ENOSPC:
                cap *= 4
                continue
            check(rc, f"reading labels of shard {shard} slots {lo}..{hi}")
            k = int(done[0])
            raw = ffi.buffer(out, int(offs[k]))[:]
            bounds = offs[:k + 1].tolist()
            first = len(self.labels)
            self._grow(first + k)
            self._shard[first:first + k] = shard
            self._slot[first:first + k] = np.arange(lo, lo + k, dtype=np.uint32)
            for j in range(k):
                lbl = parse_canonical(raw[bounds[j]:bounds[j + 1]])
                self.labels.append(lbl)
                self.index.add(first + j, lbl)
            lo += k
            self._seen[shard] = lo
            added += k
        return added

    def _grow(self, n: int) -> None:
        if n > len(self._shard):
            size = max(n, 2 * len(self._shard))
            self._shard = np.resize(self._shard, size)
            self._slot = np.resize(self._slot, size)

    # -- queries -----------------------------------------------------------------------------
    def select(self, matchers: list) -> P.Postings:
        """Sorted ids of the series every matcher selects (ValueError for a selector that
        would select everything, or a bad regex)."""
        with self._lock:
            return self.index.select(matchers)

    def label_names(self, ids: P.Postings | None = None) -> list[str]:
        with self._lock:
            return self.index.label_names(ids)

    def label_values(self, name: str, ids: P.Postings | None = None) -> list[str]:
        with self._lock:
            return self.index.label_values(name, ids)

    def all_ids(self) -> P.Postings:
        with self._lock:
            return self.index.all_postings()

    def by_shard(self, ids: np.ndarray) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """``ids`` grouped by shard: (shard, ids, slots) per shard that has any."""
        ids = np.asarray(ids, dtype=np.uint32)
        if not ids.size:
            return []
        shards = self._shard[ids]
        order = np.argsort(shards, kind="stable")
        ids, shards = ids[order], shards[order]
        cuts = np.flatnonzero(np.diff(shards)) + 1
        out = []
        for a, b in zip(np.r_[0, cuts], np.r_[cuts, len(ids)], strict=True):
            part = ids[a:b]
            out.append((int(shards[a]), part, np.ascontiguousarray(self._slot[part])))
        return out

    # -- reads -------------------------------------------------------------------------------
    def extent(self, shard: int, slots: np.ndarray, mint: int, maxt: int
               ) -> tuple[np.ndarray, np.ndarray]:
        """Per series: chunks overlapping [mint, maxt] and their published samples."""
        n = len(slots)
        chunks = np.zeros(n, dtype=np.uint32)
        samples = np.zeros(n, dtype=np.uint64)
        with self.seg.reading():  # csrc/epoch.c: no reuse of what we read meanwhile
            rc = lib.m3_series_extent(self.seg.base, shard, ffi.from_buffer("uint32_t[]", slots),
                                      n, mint, maxt, ffi.from_buffer("uint32_t[]", chunks),
                                      ffi.from_buffer("uint64_t[]", samples))
        check(rc, f"sizing a read of shard {shard}")
        return chunks, samples

    def chunks(self, shard: int, ids: np.ndarray, slots: np.ndarray, mint: int, maxt: int,
               nchunks_hint: int = 0) -> Chunks:
        """Copy the chunks of these series (one shard) overlapping [mint, maxt]."""
        n = len(slots)
        max_refs = max(64, nchunks_hint + nchunks_hint // 4 + 16)
        cap = max_refs * 448
        done = ffi.new("size_t *")
        nrefs = ffi.new("size_t *")
        datas, refss = [], []
        base_off = 0
        pos = 0
        while pos < n:
            data = np.empty(cap, dtype=np.uint8)
            refs = np.empty(max_refs, dtype=REF_DTYPE)
            sub = slots[pos:]
            with self.seg.reading():  # csrc/epoch.c: no reuse of what we copy meanwhile
                rc = lib.m3_series_chunks(self.seg.base, shard,
                                          ffi.from_buffer("uint32_t[]", sub), len(sub), mint,
                                          maxt, ffi.from_buffer("uint8_t[]", data), cap,
                                          ffi.cast("m3_chunk_ref *", ffi.from_buffer(refs)),
                                          max_refs, done, nrefs)
            if rc == lib.M3_ENOSPC:
                cap *= 2
                max_refs *= 2
                continue
            check(rc, f"copying chunks of shard {shard}")
            k, r = int(done[0]), int(nrefs[0])
            refs = refs[:r].copy()
            refs["series"] += pos
            used = int(refs["off"][-1] + refs["len"][-1]) if r else 0
            refs["off"] += base_off
            datas.append(data[:used])
            refss.append(refs)
            base_off += used
            pos += k
        data = datas[0] if len(datas) == 1 else np.concatenate(datas) if datas else \
            np.zeros(0, np.uint8)
        refs = refss[0] if len(refss) == 1 else np.concatenate(refss) if refss else \
            np.zeros(0, REF_DTYPE)
        return Chunks(np.asarray(ids, dtype=np.uint32), data, refs)
