"""Flushed blocks as a query source: the filesets every worker wrote, read through mmap.

:class:`FilesetSource` implements the same four methods as the shared-memory source
(``select``, ``series``, ``label_names``, ``label_values``) over the newest checkpointed volume
of every block of every shard (:class:`~m3shm.storage.flushed.FlushedStore`): the block's
reverse index segment (series id = position in the fileset) resolves matchers, and the
selected series' compressed blocks go to the engine as one :class:`BlockBatch` per query, with
no per-sample work in Python.

Positions: a fileset is read in id order once, when a query first touches it, to note where
each series' block lies (a list of (labels, block) per fileset, cached until a newer volume of
the block replaces it or retention removes it).

Ordering against shared memory (see LocalStorage): a flush makes a fileset durable before it
releases the block's chunks from shared memory, so a query that reads shared memory first and
lists filesets after it finds every block in one or the other (possibly both: the merge keeps
one sample per timestamp, shared memory winning).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from m3shm.query.context import QueryContext
from m3shm.query.errors import QueryError
from m3shm.query.labels import Labels
from m3shm.query.matchers import Matcher
from m3shm.query.storage import BlockBatch, SelectResult
from m3shm.storage.fileset import Fileset, FilesetId
from m3shm.storage.flushed import FlushedStore
from m3shm.storage.shm_index import parse_canonical

FAR = 1 << 62
Want = Callable[[list[Labels]], np.ndarray]  # as m3shm.query.local.Want (no import cycle)


@dataclass
class _Entries:
    labels: list[Labels]
    blocks: list[memoryview]
    hashes: np.ndarray  # uint64: each series' m3_labels_hash


class FilesetSource:
    def __init__(self, store: FlushedStore, namespace: str, nshards: int) -> None:
        self.store = store
        self.namespace = namespace
        self.nshards = nshards
        self._cache: dict[FilesetId, _Entries] = {}
        self._lock = threading.Lock()

    # -- plumbing ------------------------------------------------------------------------------
    def _filesets(self, mint: int | None, maxt: int | None, ctx: QueryContext
                  ) -> list[Fileset]:
        lo = -FAR if mint is None else mint
        hi = FAR if maxt is None else maxt
        out = []
        for shard in range(self.nshards):
            ctx.check()
            listed = set()
            for fid in self.store.volumes(self.namespace, shard, lo, hi):
                fs = self.store.open_newest(fid)
                if fs is not None:
                    out.append(fs)
                    listed.add(fs.fid)
            with self._lock:  # forget blocks of this range that retention removed
                for k in [k for k in self._cache if k.shard == shard and lo <= k.block_start
                          <= hi and k not in listed]:
                    del self._cache[k]
        return out

    def _entries(self, fs: Fileset) -> _Entries:
        with self._lock:
            e = self._cache.get(fs.fid)
        if e is not None:
            return e
        labels, blocks, hashes = [], [], []
        for sid, h, block in fs:
            labels.append(parse_canonical(sid))
            blocks.append(block)
            hashes.append(h & 0xFFFFFFFFFFFFFFFF)
        e = _Entries(labels, blocks, np.array(hashes, dtype=np.uint64))
        with self._lock:
            f = fs.fid
            for old in [k for k in self._cache if (k.shard, k.block_start) ==
                        (f.shard, f.block_start) and k.volume != f.volume]:
                del self._cache[old]
            self._cache[f] = e
        return e

    def _select(self, fs: Fileset, matchers: list[Matcher]) -> np.ndarray:
        with self.store.reverse_index(fs.fid) as ri:
            try:
                return np.asarray(ri.select(matchers), dtype=np.int64)
            except ValueError as e:
                raise QueryError(str(e)) from None

    # -- the source interface ------------------------------------------------------------------
    def select(self, matchers: list[Matcher], mint: int, maxt: int,
               ctx: QueryContext, want: Want | None = None) -> SelectResult:
        parts = []  # (entries, positions, block start, block end)
        for fs in self._filesets(mint, maxt, ctx):
            pos = self._select(fs, matchers)
            if len(pos):
                ent = self._entries(fs)
                if want is not None:
                    by_hash = getattr(want, "by_hash", None)
                    pos = pos[by_hash(ent.hashes[pos]) if by_hash is not None else
                              want([ent.labels[p] for p in pos.tolist()])]
                    if not len(pos):
                        continue
                parts.append((ent, pos, fs.fid.block_start,
                              fs.fid.block_start + fs.info.block_size - 1))
        if not parts:
            return SelectResult([])
        labels: list[Labels] = []
        hashes: list[int] = []
        index: dict[Labels, int] = {}
        blocks, sers, starts, ends = [], [], [], []
        for ent, pos, bs, be in parts:
            for p in pos.tolist():
                lbl = ent.labels[p]
                j = index.get(lbl)
                if j is None:
                    j = index[lbl] = len(labels)
                    labels.append(lbl)
                    hashes.append(int(ent.hashes[p]))
                blocks.append(ent.blocks[p])
                sers.append(j)
                starts.append(bs)
                ends.append(be)
        counts = np.array([int.from_bytes(b[4:8], "little") for b in blocks], dtype=np.int64)
        lens = np.array([len(b) for b in blocks], dtype=np.uint64)
        ctx.admit(len(labels), int(counts.sum()), int(lens.sum()))
        offsets = np.zeros(len(blocks) + 1, dtype=np.uint64)
        np.cumsum(lens, out=offsets[1:])
        data = np.frombuffer(b"".join(blocks), dtype=np.uint8)
        ser = np.array(sers, dtype=np.int64)
        order = np.argsort(ser, kind="stable")  # a series' blocks adjacent, oldest block first
        if (order != np.arange(len(order))).any():
            starts_b, ends_b = offsets[:-1][order], offsets[1:][order]
            blens = (ends_b - starts_b).astype(np.int64)
            idx = np.repeat(starts_b.astype(np.int64) - (np.cumsum(blens) - blens), blens) + \
                np.arange(int(blens.sum()))
            data = data[idx]
            offsets = np.zeros(len(order) + 1, dtype=np.uint64)
            np.cumsum(blens, out=offsets[1:])
        st = np.array(starts, dtype=np.int64)[order]
        batch = BlockBatch(labels, data, offsets, ser[order], counts[order], st,
                           np.array(ends, dtype=np.int64)[order],
                           hashes=np.array(hashes, dtype=np.uint64))
        return SelectResult([], batches=[batch])

    def series(self, matchers: list[Matcher], mint: int | None, maxt: int | None,
               ctx: QueryContext) -> list[Labels]:
        seen: dict[Labels, None] = {}
        for fs in self._filesets(mint, maxt, ctx):
            pos = self._select(fs, matchers)
            if len(pos):
                ent = self._entries(fs)
                for p in pos.tolist():
                    seen.setdefault(ent.labels[p])
        ctx.admit(len(seen), 0, 0)
        return list(seen)

    def label_names(self, matchers: list[list[Matcher]] | None, mint: int | None,
                    maxt: int | None, ctx: QueryContext) -> set[str]:
        out: set[str] = set()
        for fs in self._filesets(mint, maxt, ctx):
            with self.store.reverse_index(fs.fid) as ri:
                out |= set(ri.label_names(self._union(ri, matchers)))
        return out

    def label_values(self, name: str, matchers: list[list[Matcher]] | None, mint: int | None,
                     maxt: int | None, ctx: QueryContext) -> set[str]:
        out: set[str] = set()
        for fs in self._filesets(mint, maxt, ctx):
            with self.store.reverse_index(fs.fid) as ri:
                out |= set(ri.label_values(name, self._union(ri, matchers)))
        return out

    @staticmethod
    def _union(ri: object, matchers: list[list[Matcher]] | None) -> np.ndarray | None:
        if not matchers:
            return None
        try:
            parts = [ri.select(m) for m in matchers]  # type: ignore[attr-defined]
        except ValueError as e:
            raise QueryError(str(e)) from None
        return np.unique(np.concatenate(parts)).astype(np.uint32)
