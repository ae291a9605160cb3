"""A reverse index over every shard's series table in shared memory, and bulk chunk reads.

Any worker answers any query by reading all shards directly (no hop through their owners).
:class:`ShmIndex` keeps, per process, a :class:`~m3shm.storage.compact_index.CompactIndex`
(interned label pairs, a few bytes per label; every worker holds one, so its size per series
counts twice or more) of every live series of every shard under dense ids of its own; each id
records where its series lives: (shard, slot, generation). A slot whose series expired is
reused for another series with generation + 1 (docs/formats/shm.md), so a slot number alone
names nothing.

``refresh()`` keeps the index true incrementally, from the shards' change counters
(``m3_shards_churn``, one C call): slots past a shard's last high-water mark are new; when a
shard's expiry count moved, the generation of every slot is re-read (one C call) and every
series whose slot is no longer live, or live with another generation, is dropped from the
index (its id is marked dead) and the slot's new series, if any, indexed under a new id;
slots last seen not live are re-checked at every refresh, since they can be reused without
the count moving. Dead ids are filtered out of every answer; when they outnumber the live
ones the index is rebuilt from the live series.

Reads go through C in whole selections, inside a read section (csrc/epoch.c) and by (slot,
generation): :meth:`extent` says what a selection would cost (chunks, samples) before
anything is copied, and :meth:`chunks` copies the compressed streams of the chunks in a time
range out of the segment (csrc/shard_read.c), so the evaluation that follows touches no shared
memory. A series that expired after it was selected reads as empty; its slot's new series is
never read under its labels.

Thread safety: a lock serialises refresh and index queries (the index builds label columns
lazily). :meth:`select` answers a :class:`Selection`, a snapshot of where each selected series
lives with its labels, so a later refresh (or rebuild) does not change what a running query
reads; chunk reads need no lock (the segment is read lock-free by design).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from m3shm._native import ffi, lib
from m3shm.errors import check
from m3shm.shm import Segment
from m3shm.storage.compact_index import CompactIndex

Labels = tuple[tuple[str, str], ...]

REF_DTYPE = np.dtype([("series", "<u4"), ("count", "<u4"), ("block_start", "<i8"),
                      ("stream", "<u8"), ("off", "<u8"), ("len", "<u8")])
assert REF_DTYPE.itemsize == ffi.sizeof("m3_chunk_ref")
NO_ID = -1
REBUILD_MIN_DEAD = 4096  # rebuild when dead ids exceed this and the live ones


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


def _u32(a: np.ndarray) -> object:
    return ffi.from_buffer("uint32_t[]", a)


class _State:
    """The index proper: ids -> labels (compactly, see compact_index.py) and location.
    Append-only; replaced whole by a rebuild."""

    def __init__(self) -> None:
        self.index = CompactIndex()
        self.shard = np.zeros(1024, dtype=np.uint32)
        self.slot = np.zeros(1024, dtype=np.uint32)
        self.gen = np.zeros(1024, dtype=np.uint32)
        self.live = np.zeros(1024, dtype=bool)
        self.hash = np.zeros(1024, dtype=np.uint64)  # m3_labels_hash of the canonical labels
        self.ndead = 0

    def add(self, shard: int, slot: int, gen: int, labels: bytes | Labels, h: int) -> int:
        """Index a series by its canonical label bytes (or its pairs, sorted by name) and
        their hash."""
        i = len(self.index)
        if i >= len(self.shard):
            size = 2 * len(self.shard)
            self.shard = np.resize(self.shard, size)
            self.slot = np.resize(self.slot, size)
            self.gen = np.resize(self.gen, size)
            self.live = np.resize(self.live, size)
            self.hash = np.resize(self.hash, size)
        self.shard[i], self.slot[i], self.gen[i], self.live[i] = shard, slot, gen, True
        self.hash[i] = h
        j = self.index.add_canonical(labels) if isinstance(labels, bytes) else \
            self.index.add_labels(labels)
        assert i == j
        return i

    def kill(self, i: int) -> None:
        if self.live[i]:
            self.live[i] = False
            self.ndead += 1

    def alive(self, ids: np.ndarray) -> np.ndarray:
        return ids[self.live[ids]] if self.ndead and ids.size else ids

    def selection(self, ids: np.ndarray) -> Selection:
        ids = np.asarray(ids, dtype=np.uint32)
        return Selection(ids, self.shard[ids], self.slot[ids], self.gen[ids], self)


@dataclass
class Selection:
    """Series selected from the index: entry ``i`` is series ``ids[i]``, which lives in
    (``shard[i]``, ``slot[i]``) with generation ``gen[i]``. A snapshot: later index changes do
    not alter it."""

    ids: np.ndarray  # uint32, sorted
    shard: np.ndarray  # uint32
    slot: np.ndarray  # uint32
    gen: np.ndarray  # uint32
    _state: _State

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def hashes(self) -> np.ndarray:
        """uint64 per entry: the m3_labels_hash of its canonical labels (equal label sets
        hash equally in every segment and fileset)."""
        return self._state.hash[self.ids]

    def labels(self, pos: np.ndarray | None = None) -> list[Labels]:
        """Labels of the entries at positions ``pos`` (all entries if None)."""
        lab = self._state.index.labels
        ids = self.ids if pos is None else self.ids[pos]
        return [lab(i) for i in ids.tolist()]

    def take(self, pos: np.ndarray) -> Selection:
        return Selection(self.ids[pos], self.shard[pos], self.slot[pos], self.gen[pos],
                         self._state)

    def by_shard(self) -> list[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
        """Entries grouped by shard: (shard, positions, slots, gens) per shard that has any."""
        if not len(self.ids):
            return []
        order = np.argsort(self.shard, kind="stable")
        shards = self.shard[order]
        cuts = np.flatnonzero(np.diff(shards)) + 1
        out = []
        for a, b in zip(np.r_[0, cuts], np.r_[cuts, len(order)], strict=True):
            pos = order[a:b]
            out.append((int(shards[a]), pos, np.ascontiguousarray(self.slot[pos]),
                        np.ascontiguousarray(self.gen[pos])))
        return out


@dataclass
class Chunks:
    """Chunks copied out of the segment for a selection.

    ``refs`` (REF_DTYPE) describe streams in ``data``; ``refs['series']`` indexes the
    entries the read was made for. Every series' chunks are adjacent, sorted by
    (block_start, stream).
    """

    data: np.ndarray  # uint8
    refs: np.ndarray  # REF_DTYPE


class ShmIndex:
    def __init__(self, seg: Segment) -> None:
        self.seg = seg
        self.nshards = seg.params.num_shards
        self.block_ms = seg.params.block_ms
        self._state = _State()
        self._seen = np.zeros(self.nshards, dtype=np.uint32)  # high-water marks indexed
        self._removed = np.zeros(self.nshards, dtype=np.uint64)  # expiry counts seen
        self._slot_id = [np.zeros(0, dtype=np.int64) for _ in range(self.nshards)]
        self._holes: list[np.ndarray] = [np.zeros(0, dtype=np.uint32)] * self.nshards
        self._lock = threading.Lock()

    def __len__(self) -> int:
        st = self._state
        return len(st.index) - st.ndead

    @property
    def dead(self) -> int:
        return self._state.ndead

    # -- indexing ----------------------------------------------------------------------------
    def refresh(self) -> int:
        """Index what changed since the last call. Returns how many series were indexed."""
        with self._lock:
            nser = np.zeros(self.nshards, dtype=np.uint32)
            removed = np.zeros(self.nshards, dtype=np.uint64)
            with self.seg.reading():
                lib.m3_shards_churn(self.seg.base, _u32(nser),
                                    ffi.from_buffer("uint64_t[]", removed))
            new = 0
            for shard in np.flatnonzero((nser > self._seen) | (removed != self._removed)
                                        | np.array([len(h) > 0 for h in self._holes])):
                new += self._refresh_shard(int(shard), int(nser[shard]),
                                           removed[shard] != self._removed[shard])
            self._removed = removed
            st = self._state
            if st.ndead > REBUILD_MIN_DEAD and st.ndead > len(st.index) - st.ndead:
                self._rebuild()
            return new

    def _refresh_shard(self, shard: int, n: int, churned: bool) -> int:
        st = self._state
        seen = int(self._seen[shard])
        ids = self._slot_id[shard]
        # after an expiry, every slot seen before (who is still there, with which
        # generation); otherwise only the slots last seen not live can have changed
        cand = np.arange(seen, dtype=np.uint32) if churned else self._holes[shard]
        if len(cand):
            gens = np.zeros(len(cand), dtype=np.uint32)
            with self.seg.reading():
                check(lib.m3_series_gens(self.seg.base, shard, _u32(cand), len(cand),
                                         _u32(gens)), f"reading generations of shard {shard}")
            old = ids[cand]
            want = np.where(old >= 0, st.gen[np.maximum(old, 0)], 0)
            changed = gens != want
            cand = cand[changed]
            for i in old[changed].tolist():
                if i >= 0:
                    st.kill(i)
            ids[cand] = NO_ID
        if n > seen:
            grown = np.full(n, NO_ID, dtype=np.int64)
            grown[:seen] = ids
            ids = self._slot_id[shard] = grown
            cand = np.concatenate([cand, np.arange(seen, n, dtype=np.uint32)])
            self._seen[shard] = n
        added = self._index_slots(shard, cand, ids) if len(cand) else 0
        self._holes[shard] = np.flatnonzero(ids < 0).astype(np.uint32)
        return added

    def _index_slots(self, shard: int, slots: np.ndarray, ids: np.ndarray) -> int:
        """Index the live series among ``slots`` (their labels and generations read in C)."""
        st = self._state
        added = 0
        cap = max(1 << 16, len(slots) * 96)
        pos = 0
        while pos < len(slots):
            sub = np.ascontiguousarray(slots[pos:])
            out = ffi.new("uint8_t[]", cap)
            offs = np.zeros(len(sub) + 1, dtype=np.uint64)
            gens = np.zeros(len(sub), dtype=np.uint32)
            done = ffi.new("size_t *")
            with self.seg.reading():  # csrc/epoch.c: no reuse of what we read meanwhile
                rc = lib.m3_series_labels_many(self.seg.base, shard, _u32(sub), len(sub), out,
                                               cap, ffi.from_buffer("uint64_t[]", offs),
                                               _u32(gens), done)
            if rc == lib.M3_ENOSPC:
                cap *= 4
                continue
            check(rc, f"reading labels of shard {shard}")
            k = int(done[0])
            raw = ffi.buffer(out, int(offs[k]))[:]
            bounds = offs[:k + 1].tolist()
            for j, (slot, gen) in enumerate(zip(sub[:k].tolist(), gens[:k].tolist(),
                                                strict=True)):
                if gen:
                    canon = raw[bounds[j]:bounds[j + 1]]
                    ids[slot] = st.add(shard, slot, gen, canon,
                                       lib.m3_labels_hash(canon, len(canon)))
                    added += 1
            pos += k
        return added

    def _rebuild(self) -> None:
        """A fresh index of the live series only (dead ids no longer cost anything)."""
        old, st = self._state, _State()
        for shard in range(self.nshards):
            ids = self._slot_id[shard]
            for slot in np.flatnonzero(ids >= 0).tolist():
                i = int(ids[slot])
                ids[slot] = st.add(shard, slot, int(old.gen[i]), old.index.labels(i),
                                   int(old.hash[i]))
        self._state = st

    # -- queries -----------------------------------------------------------------------------
    def select(self, matchers: list) -> Selection:
        """The live series every matcher selects (ValueError for a selector that would select
        everything, or a bad regex)."""
        with self._lock:
            st = self._state
            return st.selection(st.alive(st.index.select(matchers)))

    def select_union(self, selectors: list[list]) -> Selection:
        """The live series any of the selectors (each a list of matchers) selects."""
        with self._lock:
            st = self._state
            parts = [st.index.select(m) for m in selectors]
            ids = np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.uint32)
            return st.selection(st.alive(ids.astype(np.uint32)))

    def all(self) -> Selection:
        with self._lock:
            st = self._state
            return st.selection(st.alive(st.index.all_postings()))

    def label_names(self, sel: Selection | None = None) -> list[str]:
        with self._lock:
            st = self._state
            if sel is None and st.ndead:
                sel = st.selection(st.alive(st.index.all_postings()))
            if sel is None:
                return st.index.label_names(None)
            return sel._state.index.label_names(sel.ids)

    def label_values(self, name: str, sel: Selection | None = None) -> list[str]:
        with self._lock:
            st = self._state
            if sel is None and st.ndead:
                sel = st.selection(st.alive(st.index.all_postings()))
            if sel is None:
                return st.index.label_values(name, None)
            return sel._state.index.label_values(name, sel.ids)

    # -- reads -------------------------------------------------------------------------------
    def extent(self, shard: int, slots: np.ndarray, gens: np.ndarray, mint: int, maxt: int
               ) -> tuple[np.ndarray, np.ndarray]:
        """Per series: chunks overlapping [mint, maxt] and their published samples (0 and 0
        for a series that is gone)."""
        n = len(slots)
        chunks = np.zeros(n, dtype=np.uint32)
        samples = np.zeros(n, dtype=np.uint64)
        with self.seg.reading():  # csrc/epoch.c: no reuse of what we read meanwhile
            rc = lib.m3_series_extent(self.seg.base, shard, _u32(slots), _u32(gens), n, mint,
                                      maxt, _u32(chunks), ffi.from_buffer("uint64_t[]", samples))
        check(rc, f"sizing a read of shard {shard}")
        return chunks, samples

    def chunks(self, shard: int, slots: np.ndarray, gens: np.ndarray, mint: int, maxt: int,
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
            sub, subg = slots[pos:], gens[pos:]
            with self.seg.reading():  # csrc/epoch.c: no reuse of what we copy meanwhile
                rc = lib.m3_series_chunks(self.seg.base, shard, _u32(sub), _u32(subg),
                                          len(sub), mint, maxt,
                                          ffi.from_buffer("uint8_t[]", data), cap,
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
        return Chunks(data, refs)

