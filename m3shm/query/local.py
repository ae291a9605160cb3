"""The daemon's own data as the engine's Storage: the shards in shared memory and the flushed
filesets.

:class:`LocalStorage` is the seam where sources plug in: it asks each of its sources
(:class:`ShmSource`, the open blocks of every shard, and
:class:`~m3shm.query.fileset_source.FilesetSource`, the flushed blocks) and merges their
answers by label set, so a series whose older blocks are on disk and newer ones
in memory comes out as one series. Sources answer in :class:`BlockBatch` form (one buffer of
compressed blocks per source, no Python object per block); the engine decodes each batch in
one C call.

Every source charges its selection to the query's :class:`QueryContext` before copying
anything (limits are refused before memory is spent) and checks the stop flag between
shards.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from m3shm.query.context import QueryContext
from m3shm.query.errors import QueryError
from m3shm.query.labels import Labels
from m3shm.query.matchers import Matcher
from m3shm.query.storage import BlockBatch, SelectResult
from m3shm.storage.shm_index import Selection, ShmIndex

FAR = 1 << 62


# Which of these series (label sets) a select should read: a mask, one entry per series. A
# query across resolutions passes one so a coarser namespace reads only the series that a
# finer one does not already answer for (m3shm/query/resolution.py).
# A want may also have ``by_hash(hashes) -> mask`` (uint64 m3_labels_hash per series): a
# source that knows its series' hashes asks that instead and reads no labels it does not keep.
Want = Callable[[list[Labels]], np.ndarray]


def _wanted(want: Want, hashes: np.ndarray | None, labels: Callable[[], list[Labels]]
            ) -> np.ndarray:
    by_hash = getattr(want, "by_hash", None)
    if by_hash is not None and hashes is not None:
        return np.asarray(by_hash(hashes), dtype=bool)
    return np.asarray(want(labels()), dtype=bool)


class Source(Protocol):
    def select(self, matchers: list[Matcher], mint: int, maxt: int,
               ctx: QueryContext, want: Want | None = None) -> SelectResult: ...

    def series(self, matchers: list[Matcher], mint: int | None, maxt: int | None,
               ctx: QueryContext) -> list[Labels]: ...

    def label_names(self, matchers: list[list[Matcher]] | None, mint: int | None,
                    maxt: int | None, ctx: QueryContext) -> set[str]: ...

    def label_values(self, name: str, matchers: list[list[Matcher]] | None, mint: int | None,
                     maxt: int | None, ctx: QueryContext) -> set[str]: ...


def _select(index: ShmIndex, matchers: list[Matcher]) -> Selection:
    try:
        return index.select(matchers)
    except ValueError as e:
        raise QueryError(str(e)) from None


class ShmSource:
    """Open blocks of every shard, read straight from the shared segment."""

    def __init__(self, index: ShmIndex) -> None:
        self.index = index

    def _in_range(self, sel: Selection, mint: int | None, maxt: int | None,
                  ctx: QueryContext) -> Selection:
        """The entries of ``sel`` with a sample in [mint, maxt] (all of them without a
        range, unless they have expired since they were indexed)."""
        lo = -(1 << 62) if mint is None else mint
        hi = (1 << 62) if maxt is None else maxt
        if mint is None and maxt is None:
            return sel
        keep = []
        for shard, pos, slots, gens in sel.by_shard():
            ctx.check()
            chunks, _ = self.index.extent(shard, slots, gens, lo, hi)
            keep.append(pos[chunks > 0])
        return sel.take(np.sort(np.concatenate(keep)) if keep else np.zeros(0, np.int64))

    def select(self, matchers: list[Matcher], mint: int, maxt: int,
               ctx: QueryContext, want: Want | None = None) -> SelectResult:
        idx = self.index
        idx.refresh()
        sel = _select(idx, matchers)
        known: list[Labels] | None = None  # labels of sel's entries, if already read
        if want is not None and len(sel):
            every: list[Labels] = []

            def read() -> list[Labels]:
                every.extend(sel.labels())
                return every
            keep = np.flatnonzero(_wanted(want, sel.hashes, read))
            sel = sel.take(keep)
            if every:
                known = [every[i] for i in keep.tolist()]
        groups = []
        nseries = nsamples = nchunks = 0
        for shard, pos, slots, gens in sel.by_shard():
            ctx.check()
            chunks, samples = idx.extent(shard, slots, gens, mint, maxt)
            has = chunks > 0
            if has.any():
                groups.append((shard, pos[has], slots[has], gens[has], int(chunks[has].sum())))
                nseries += int(has.sum())
                nsamples += int(samples.sum())
                nchunks += int(chunks.sum())
        # charge before copying: ~1.3 bytes per sample compressed plus the chunk headers
        ctx.admit(nseries, nsamples, nsamples * 2 + nchunks * 64)
        datas, offs, sers, counts, starts, hashes = [], [], [], [], [], []
        labels: list[Labels] = []
        base = 0
        allh = sel.hashes
        for shard, pos, slots, gens, nch in groups:
            ctx.check()
            ch = idx.chunks(shard, slots, gens, mint, maxt, nch)
            refs = ch.refs
            datas.append(ch.data)
            offs.append(refs["off"].astype(np.uint64) + np.uint64(base))
            sers.append(refs["series"].astype(np.int64) + len(labels))
            counts.append(refs["count"].astype(np.int64))
            starts.append(refs["block_start"])
            labels.extend(sel.labels(pos) if known is None else [known[i] for i in pos.tolist()])
            hashes.append(allh[pos])
            base += len(ch.data)
        if not datas:
            return SelectResult([])
        data = np.concatenate(datas)
        offsets = np.concatenate(offs + [np.array([base], dtype=np.uint64)])
        start = np.concatenate(starts).astype(np.int64)
        batch = BlockBatch(labels, data, offsets, np.concatenate(sers), np.concatenate(counts),
                           start, start + idx.block_ms - 1, hashes=np.concatenate(hashes))
        return SelectResult([], batches=[batch])

    def series(self, matchers: list[Matcher], mint: int | None, maxt: int | None,
               ctx: QueryContext) -> list[Labels]:
        self.index.refresh()
        sel = self._in_range(_select(self.index, matchers), mint, maxt, ctx)
        ctx.admit(len(sel), 0, 0)
        return sel.labels()

    def _sel(self, matchers: list[list[Matcher]] | None, mint: int | None, maxt: int | None,
             ctx: QueryContext) -> Selection | None:
        self.index.refresh()
        if not matchers:
            if mint is None and maxt is None:
                return None
            return self._in_range(self.index.all(), mint, maxt, ctx)
        try:
            sel = self.index.select_union(matchers)
        except ValueError as e:
            raise QueryError(str(e)) from None
        return self._in_range(sel, mint, maxt, ctx)

    def label_names(self, matchers: list[list[Matcher]] | None, mint: int | None,
                    maxt: int | None, ctx: QueryContext) -> set[str]:
        return set(self.index.label_names(self._sel(matchers, mint, maxt, ctx)))

    def label_values(self, name: str, matchers: list[list[Matcher]] | None, mint: int | None,
                     maxt: int | None, ctx: QueryContext) -> set[str]:
        return set(self.index.label_values(name, self._sel(matchers, mint, maxt, ctx)))


def merge(results: list[SelectResult]) -> SelectResult:
    """Answers of several sources as one: series with equal label sets become one series
    (blocks of earlier sources first, so at equal timestamps the later source wins)."""
    results = [r for r in results if r.nseries]
    if len(results) <= 1:
        return results[0] if results else SelectResult([])
    out = SelectResult([], any(r.partial for r in results),
                       [w for r in results for w in r.warnings])
    batches = [b for r in results for b in r.batches]
    series = [s for r in results for s in r.series]
    if series:  # per-series answers (remote sources): merge by labels in Python (per series)
        by: dict[Labels, Any] = {}
        for s in series + [s for b in batches for s in b.to_series()]:
            if s.labels in by:
                by[s.labels].blocks.extend(s.blocks)
            else:
                by[s.labels] = s
        out.series = list(by.values())
        return out
    index: dict[Labels, int] = {}
    labels: list[Labels] = []
    remapped = []
    firsts = []  # per batch: its series that were new (their positions), for the hashes
    for b in batches:
        m = np.empty(len(b.labels), dtype=np.int64)
        new = []
        for i, lbl in enumerate(b.labels):
            j = index.get(lbl)
            if j is None:
                j = index[lbl] = len(labels)
                labels.append(lbl)
                new.append(i)
            m[i] = j
        remapped.append(m[b.series])
        firsts.append(new)
    out.batches = [combine(labels, batches, remapped)]
    if all(b.hashes is not None for b in batches):
        out.batches[0].hashes = np.concatenate(
            [b.hashes[np.array(f, dtype=np.int64)] for b, f in zip(batches, firsts,
                                                                   strict=True)])
    return out


def gather_blocks(datas: list[np.ndarray], src_of: np.ndarray, starts: np.ndarray,
                  lens: np.ndarray, total: int) -> np.ndarray:
    """Block i = datas[src_of[i]][starts[i]:starts[i] + lens[i]], back to back (uint8)."""
    from m3shm._native import ffi, lib
    from m3shm.errors import check

    out = np.empty(total, dtype=np.uint8)
    bufs = [ffi.from_buffer("uint8_t[]", np.ascontiguousarray(d, dtype=np.uint8))
            for d in datas]
    srcs = ffi.new("const uint8_t *[]", bufs)
    src_lens = np.array([len(b) for b in bufs], dtype=np.uint64)
    check(int(lib.m3_gather_blocks(srcs, ffi.from_buffer("uint64_t[]", src_lens), len(bufs),
                                   ffi.from_buffer("uint32_t[]", src_of),
                                   ffi.from_buffer("uint64_t[]", starts),
                                   ffi.from_buffer("uint64_t[]", lens), len(lens),
                                   ffi.from_buffer("uint8_t[]", out), total)),
          "gathering blocks")
    return out


def combine(labels: list[Labels], batches: list[BlockBatch], remapped: list[np.ndarray]
            ) -> BlockBatch:
    """Batches as one over ``labels``: block i of batch j belongs to series
    ``remapped[j][i]``. Each series' blocks end up adjacent, in batch order (the order is
    computed here over whole arrays; csrc/gather.c copies the blocks, one memcpy each)."""
    sers = np.concatenate(remapped)
    order = np.argsort(sers, kind="stable")  # a series' blocks adjacent, source order kept
    src_of = np.concatenate([np.full(len(b.offsets) - 1, j, np.uint32)
                             for j, b in enumerate(batches)])[order]
    starts = np.concatenate([b.offsets[:-1] for b in batches]).astype(np.uint64)[order]
    lens = np.concatenate([np.diff(b.offsets) for b in batches]).astype(np.uint64)[order]
    new_offs = np.zeros(len(lens) + 1, dtype=np.uint64)
    np.cumsum(lens, out=new_offs[1:])
    data = gather_blocks([b.data for b in batches], src_of, starts, lens, int(new_offs[-1]))
    clip_lo = clip_hi = None
    if any(b.clip_lo is not None or b.clip_hi is not None for b in batches):
        n = [len(b.counts) for b in batches]
        clip_lo = np.concatenate([np.full(k, -FAR, np.int64) if b.clip_lo is None else
                                  b.clip_lo for k, b in zip(n, batches, strict=True)])[order]
        clip_hi = np.concatenate([np.full(k, FAR, np.int64) if b.clip_hi is None else
                                  b.clip_hi for k, b in zip(n, batches, strict=True)])[order]
    return BlockBatch(labels, data, new_offs, sers[order],
                      np.concatenate([b.counts for b in batches])[order],
                      np.concatenate([b.start_ms for b in batches])[order],
                      np.concatenate([b.end_ms for b in batches])[order], clip_lo, clip_hi)


class LocalStorage:
    """The Storage one query evaluates over: every local source, bound to its context.

    ``sources`` are ordered oldest data first (filesets, then shared memory): at one timestamp
    a later source's sample wins. They are read in the opposite order."""

    def __init__(self, sources: list[Source], ctx: QueryContext) -> None:
        self.sources = sources
        self.ctx = ctx

    def select(self, matchers: list[Matcher], mint: int, maxt: int) -> SelectResult:
        # read newest first (shared memory before filesets: a block released from memory
        # after we read it is durable on disk before that), merge oldest first (later wins)
        res = merge([s.select(matchers, mint, maxt, self.ctx) for s in self.sources[::-1]
                     ][::-1])
        if self.ctx.warnings:
            res.partial = True
            res.warnings.extend(w for w in self.ctx.warnings if w not in res.warnings)
        return res

    def series(self, matchers: list[list[Matcher]], mint: int | None,
               maxt: int | None) -> list[Labels]:
        seen: set[Labels] = set()
        out: list[Labels] = []
        for src in self.sources[::-1]:
            for m in matchers:
                for lbl in src.series(m, mint, maxt, self.ctx):
                    if lbl not in seen:
                        seen.add(lbl)
                        out.append(lbl)
        out.sort()
        return out

    def label_names(self, matchers: list[list[Matcher]] | None, mint: int | None,
                    maxt: int | None) -> list[str]:
        names: set[str] = set()
        for src in self.sources[::-1]:
            names |= src.label_names(matchers, mint, maxt, self.ctx)
        return sorted(names)

    def label_values(self, name: str, matchers: list[list[Matcher]] | None, mint: int | None,
                     maxt: int | None) -> list[str]:
        vals: set[str] = set()
        for src in self.sources[::-1]:
            vals |= src.label_values(name, matchers, mint, maxt, self.ctx)
        return sorted(vals)
