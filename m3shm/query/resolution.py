"""Queries across resolutions: every namespace's sources as one Storage, each series read from
the finest namespace that holds it, stitched where namespaces hand over.

A namespace (:class:`NamespaceView`) has a resolution (0 = raw), a retention and its sources
(filesets and shared memory, oldest data first, as :class:`~m3shm.query.local.LocalStorage`
takes them). Its *nominal span* for a query over ``[mint, maxt]`` starts at
``max(mint, now - retention)``: the part of the range its retention covers.

Selection (:meth:`ResolutionStorage.select`), namespaces from finest to coarsest:

1. the finest (raw) namespace is read over the whole range;
2. each coarser namespace is asked only for the series that no finer namespace covers back to
   this namespace's nominal span start (the ``want`` filter: a series the raw namespace holds
   over a range its retention covers never costs a read of the aggregated ones). Series that
   exist only in aggregated namespaces (rollups, series whose raw data is dropped) are found
   there whatever the range;
3. per series, its holders split the range: the finest takes ``[its span start, maxt]``, the
   next ``[its span start, finer start - 1]``, and so on; the coarsest holder reaches back to
   ``mint`` (it still answers for data its retention has not yet deleted). Each block gets its
   holder's span as clip bounds (BlockBatch.clip_lo/hi) and the C decoder drops samples outside
   them (csrc/flat_decode.c), so at every time a series has samples of one resolution only.

This is M3's fanout (src/query/storage/m3/cluster_resolver.go) refined per series and time:
M3 picks, per query, the unaggregated namespace when its retention covers the query's start,
else the finest aggregated namespace that covers it, and dedupes a series found in several
namespaces by keeping one namespace's data for the whole range; here a series whose range
crosses the raw retention boundary is read raw after the boundary and downsampled before it.

Lookback. A downsampled point stands for its whole window, so an instant selector must find a
point up to one resolution old. :meth:`ResolutionStorage.widest_lookback` tells the engine how
far back to read (the largest resolution of a namespace that can answer in the range, at least
the configured lookback), and :class:`Stitch` gives every decoded sample its own lookback: the
configured one for raw samples, ``max(lookback, resolution)`` for downsampled ones, so raw data
keeps Prometheus' staleness and 1h points are not lost between steps. (M3's query has one
configured lookback, ``lookbackDuration``, and a ``lookback=`` request parameter, nothing per
resolution: with 1m:30d data the default 5m is enough, which is why M3 users rarely meet this;
with 1h points it is not.)

What the query read is kept in :attr:`ResolutionStorage.used` (namespace -> resolution, and
the times each answered for) for the HTTP layer's header and warning.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from m3shm.query.context import QueryContext
from m3shm.query.labels import Labels
from m3shm.query.local import LocalStorage, Source, combine, merge
from m3shm.query.matchers import Matcher
from m3shm.query.storage import BlockBatch, SelectResult

FAR = 1 << 62


@dataclass
class NamespaceView:
    """One namespace as the query sees it."""

    name: str
    resolution_ms: int  # 0 = unaggregated (raw)
    retention_ms: int
    sources: list[Source]  # oldest data first (filesets, then shared memory)

    def span_start(self, now_ms: int, mint: int) -> int:
        return max(mint, now_ms - self.retention_ms)


@dataclass
class Stitch:
    """Which namespace answered for which times of each series: ``span_lo[s, k]`` is the first
    timestamp namespace ``k`` answers for series ``labels[s]`` (FAR: not at all); spans are
    contiguous, finer namespaces newer. ``res_ms[k]`` is namespace k's resolution."""

    labels: list[Labels]
    span_lo: np.ndarray  # int64 (nseries, nnamespaces)
    res_ms: np.ndarray  # int64 (nnamespaces,)

    def hold_ms(self, flat_labels: list[Labels], counts: np.ndarray, ts: np.ndarray,
                lookback_ms: int) -> np.ndarray:
        """Per sample of a flat selection (series ``flat_labels`` with ``counts`` samples
        each, timestamps ``ts``): how long after its timestamp it answers an instant selector,
        ``max(lookback, resolution of the namespace it came from)``."""
        row = {lb: i for i, lb in enumerate(self.labels)}
        rows = np.array([row.get(lb, -1) for lb in flat_labels], dtype=np.int64)
        srow = np.repeat(rows, counts)
        hold = np.full(len(ts), lookback_ms, dtype=np.int64)
        known = srow >= 0
        if not known.any():
            return hold
        todo = known.copy()
        for k in range(len(self.res_ms)):  # finest first: the finest span that starts <= ts
            start = np.where(known, self.span_lo[np.maximum(srow, 0), k], FAR)
            m = todo & (ts >= start)
            hold[m] = max(lookback_ms, int(self.res_ms[k]))
            todo &= ~m
        return hold


@dataclass
class Used:
    """What one namespace answered for in a query."""

    resolution_ms: int
    series: int = 0
    first_ms: int = FAR  # earliest time it answered for (clip start)


@dataclass
class ResolutionStorage:
    """The Storage of one query over every namespace (see the module docstring)."""

    namespaces: list[NamespaceView]
    ctx: QueryContext
    now_ms: int = 0
    used: dict[str, Used] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # finest first; of equal resolutions the longer retention first
        self.namespaces = sorted(self.namespaces,
                                 key=lambda n: (n.resolution_ms, -n.retention_ms))
        if not self.now_ms:
            self.now_ms = int(time.time() * 1000)

    def _local(self, ns: NamespaceView) -> LocalStorage:
        return LocalStorage(ns.sources, self.ctx)

    def _live(self, mint: int | None, maxt: int | None) -> list[NamespaceView]:
        """The namespaces that may hold data in the range: the raw one always, an aggregated
        one unless the whole range is older than its retention."""
        lo = -FAR if mint is None else mint
        hi = FAR if maxt is None else maxt
        return [ns for i, ns in enumerate(self.namespaces)
                if i == 0 or ns.span_start(self.now_ms, lo) <= hi]

    def widest_lookback(self, mint: int, maxt: int, lookback_ms: int) -> int:
        """How far back an instant selector reading [mint, maxt] must look: the configured
        lookback, or the resolution of the coarsest namespace that may answer in the range."""
        return max([lookback_ms] + [ns.resolution_ms for ns in self._live(mint, maxt)])

    # -- select ----------------------------------------------------------------------------
    def select(self, matchers: list[Matcher], mint: int, maxt: int,
               lookback: tuple[int, int] | None = None) -> SelectResult:
        """Series matching ``matchers`` over [mint, maxt]. With ``lookback`` = (ref_lo,
        lookback_ms), an instant selector's read (mint = ref_lo - the widest lookback): each
        namespace's samples before ``ref_lo - max(lookback_ms, its resolution)`` are dropped
        by the decoder, so raw data does not fill memory further back than the lookback
        because a coarse namespace exists. Which namespace holds a series is still decided
        over the whole [mint, maxt] (a raw series that stopped within it stays raw: stale)."""
        nss = self._live(mint, maxt)
        if lookback is None:
            lows = np.full(len(nss), mint, dtype=np.int64)
        else:
            ref_lo, lb = lookback
            lows = np.array([max(mint, ref_lo - max(lb, ns.resolution_ms)) for ns in nss],
                            np.int64)
        starts = np.array([ns.span_start(self.now_ms, mint) for ns in nss], dtype=np.int64)
        # every series seen, numbered: the first answer's series are 0..n-1 (its labels are
        # unique), the label dict is built only once a second namespace answers
        seen: list[Labels] = []
        gids: list[dict[Labels, int]] = []

        def gid() -> dict[Labels, int]:
            if not gids:
                gids.append({lb: i for i, lb in enumerate(seen)})
            return gids[0]
        cover = np.zeros(0, dtype=np.int64)  # per series: earliest nominal start of a holder
        hcover: _HashCover | None = _HashCover()  # the same by label hash, while all known
        parts: list[tuple[int, SelectResult, np.ndarray]] = []  # (k, answer, its series ids)
        for k, ns in enumerate(nss):
            lo_k = int(starts[k])
            want = _Want(gid, cover, hcover, lo_k) if seen else None
            res = merge([s.select(matchers, mint, maxt, self.ctx, want)
                         for s in ns.sources[::-1]][::-1])
            if not res.nseries:
                continue
            labels = _labels(res)
            if not seen:
                seen = labels
                ids = np.arange(len(labels), dtype=np.int64)
            else:
                g = gid()
                ids = np.fromiter((g.setdefault(lb, len(g)) for lb in labels), np.int64,
                                  count=len(labels))
                seen = list(g)
            cover = np.concatenate([cover, np.full(len(seen) - len(cover), FAR, np.int64)])
            cover[ids] = np.minimum(cover[ids], lo_k)
            if hcover is not None:
                hcover = hcover.add(res, lo_k)
            parts.append((k, res, ids))
        out = self._stitch(nss, starts, lows, parts, seen, mint, maxt)
        if self.ctx.warnings:
            out.partial = True
            out.warnings.extend(w for w in self.ctx.warnings if w not in out.warnings)
        return out

    def _stitch(self, nss: list[NamespaceView], starts: np.ndarray, lows: np.ndarray,
                parts: list[tuple[int, SelectResult, np.ndarray]], labels: list[Labels],
                mint: int, maxt: int) -> SelectResult:
        """Clip every part's blocks to its namespace's span of each series (and to the
        namespace's floor ``lows[k]``); merge them."""
        n, nk = len(labels), len(nss)
        if not parts:
            return SelectResult([])
        if len(parts) == 1 and lows[parts[0][0]] <= mint:
            # one namespace answered for every series over the whole range (the common
            # case: raw data inside the raw retention): nothing to clip
            k, res, ids = parts[0]
            u = self.used.setdefault(nss[k].name, Used(nss[k].resolution_ms))
            u.series += len(ids)
            u.first_ms = min(u.first_ms, mint)
            if nss[k].resolution_ms:
                span_lo = np.full((n, nk), FAR, dtype=np.int64)
                span_lo[:, k] = mint
                res.stitch = Stitch(labels, span_lo, np.array([ns.resolution_ms for ns in nss],
                                                               dtype=np.int64))
            return res
        held = np.zeros((n, nk), dtype=bool)
        for k, _res, ids in parts:
            held[ids, k] = True
        # per series its holders split [mint, maxt]: finest newest; the coarsest reaches mint
        last = nk - 1 - np.argmax(held[:, ::-1], axis=1)
        span_lo = np.full((n, nk), FAR, dtype=np.int64)
        span_hi = np.full((n, nk), FAR, dtype=np.int64)
        upper = np.full(n, maxt, dtype=np.int64)
        for k in range(nk):
            h = held[:, k]
            lo = np.where(last == k, mint, starts[k])
            span_lo[h, k] = np.maximum(lo[h], lows[k])
            span_hi[h, k] = upper[h]
            upper[h] = lo[h] - 1
        remaps: list[list[np.ndarray]] = []  # per part, per batch: its blocks' series ids
        for k, res, ids in parts:
            ns = nss[k]
            u = self.used.setdefault(ns.name, Used(ns.resolution_ms))
            u.series += len(ids)
            u.first_ms = min(u.first_ms, int(span_lo[ids, k].min()))
            clipped, base = [], len(res.series)
            for b in res.batches:
                bid = ids[base:base + len(b.labels)]
                base += len(b.labels)
                lo, hi = span_lo[bid, k], span_hi[bid, k]
                if not ((lo <= mint).all() and (hi >= maxt).all()):  # else nothing to clip
                    b = BlockBatch(b.labels, b.data, b.offsets, b.series, b.counts,
                                   b.start_ms, b.end_ms, lo[b.series], hi[b.series])
                clipped.append((b, bid[b.series]))
            res.batches = [b for b, _ in clipped]
            remaps.append([m for _, m in clipped])
        # coarsest (oldest data) first: each series' samples then arrive in time order and
        # the decoder never has to sort them
        results = [res for _, res, _ in parts][::-1]
        if len(parts) <= 1 or any(r.series for r in results):
            out = merge(results)
        else:  # series already numbered (ids): no second pass over the labels
            out = SelectResult([], any(r.partial for r in results),
                               [w for r in results for w in r.warnings])
            out.batches = [combine(labels, [b for r in results for b in r.batches],
                                   [m for ms in remaps[::-1] for m in ms])]
        if len(parts) > 1 or any(ns.resolution_ms for ns in nss):
            out.stitch = Stitch(labels, span_lo,
                                np.array([ns.resolution_ms for ns in nss], dtype=np.int64))
        return out

    # -- listings ----------------------------------------------------------------------------
    def _union(self, mint: int | None, maxt: int | None,
               fn: Callable[[LocalStorage], list[Any]]) -> set[Any]:
        """The union of ``fn`` over every namespace that may hold data in the range (a listing
        counts a series or name once, whatever resolutions hold it)."""
        out: set[Any] = set()
        for ns in self._live(mint, maxt):
            got = fn(self._local(ns))
            if got:
                self.used.setdefault(ns.name, Used(ns.resolution_ms)).series += len(got)
                out.update(got)
        return out

    def series(self, matchers: list[list[Matcher]], mint: int | None,
               maxt: int | None) -> list[Labels]:
        return sorted(self._union(mint, maxt, lambda st: st.series(matchers, mint, maxt)))

    def label_names(self, matchers: list[list[Matcher]] | None, mint: int | None,
                    maxt: int | None) -> list[str]:
        return sorted(self._union(mint, maxt,
                                  lambda st: st.label_names(matchers, mint, maxt)))

    def label_values(self, name: str, matchers: list[list[Matcher]] | None, mint: int | None,
                     maxt: int | None) -> list[str]:
        return sorted(self._union(mint, maxt,
                                  lambda st: st.label_values(name, matchers, mint, maxt)))

    # -- reporting ---------------------------------------------------------------------------
    def header(self) -> str:
        """``name=resolution`` of every namespace that answered, finest first ("raw" for the
        unaggregated one): the X-M3shm-Namespaces response header."""
        return ",".join(f"{name}={fmt_resolution(u.resolution_ms)}"
                        for name, u in sorted(self.used.items(),
                                              key=lambda kv: kv[1].resolution_ms))

    def warning(self) -> str | None:
        """A warning naming the downsampled namespaces an answer used, None if none."""
        agg = sorted(((n, u) for n, u in self.used.items() if u.resolution_ms),
                     key=lambda kv: kv[1].resolution_ms)
        if not agg:
            return None
        parts = [f"{n} ({fmt_resolution(u.resolution_ms)} resolution, {u.series} series)"
                 for n, u in agg]
        return "the result includes downsampled data from " + ", ".join(parts)


class _HashCover:
    """Series held so far by their 64-bit label hash (sorted) and earliest nominal start:
    lets a source that knows its series' hashes skip the covered ones without reading their
    labels. Equal hashes of different label sets (odds ~n^2 / 2^64) would hide one series."""

    def __init__(self, keys: np.ndarray | None = None, lo: np.ndarray | None = None) -> None:
        self.keys = np.zeros(0, np.uint64) if keys is None else keys
        self.lo = np.zeros(0, np.int64) if lo is None else lo

    def add(self, res: SelectResult, lo_k: int) -> _HashCover | None:
        """With the series of ``res`` (held from ``lo_k``); None when some have no hash."""
        if res.series or any(b.hashes is None for b in res.batches):
            return None
        h = np.concatenate([self.keys] + [b.hashes for b in res.batches])
        lo = np.concatenate([self.lo, np.full(len(h) - len(self.lo), lo_k, np.int64)])
        order = np.lexsort((lo, h))  # by hash, the earliest start first
        h, lo = h[order], lo[order]
        first = np.r_[True, h[1:] != h[:-1]]
        return _HashCover(h[first], lo[first])

    def wanted(self, hashes: np.ndarray, lo_k: int) -> np.ndarray:
        if not len(self.keys):
            return np.ones(len(hashes), dtype=bool)
        i = np.minimum(np.searchsorted(self.keys, hashes), len(self.keys) - 1)
        return (self.keys[i] != hashes) | (self.lo[i] > lo_k)


class _Want:
    """The series a coarser namespace (nominal start ``lo_k``) should read: those no finer
    namespace holds from ``lo_k`` on (m3shm.query.local.Want), by labels or by hash."""

    def __init__(self, gid: Callable[[], dict[Labels, int]], cover: np.ndarray,
                 hcover: _HashCover | None, lo_k: int) -> None:
        self.gid, self.cover, self.lo_k = gid, cover, lo_k
        if hcover is not None:
            self.by_hash = lambda hashes: hcover.wanted(np.asarray(hashes, np.uint64), lo_k)

    def __call__(self, labels: list[Labels]) -> np.ndarray:
        g = self.gid()
        ids = np.fromiter((g.get(lb, -1) for lb in labels), dtype=np.int64, count=len(labels))
        return (ids < 0) | (self.cover[ids] > self.lo_k)


def _labels(res: SelectResult) -> list[Labels]:
    out = [s.labels for s in res.series]
    for b in res.batches:
        out.extend(b.labels)
    return out


def fmt_resolution(ms: int) -> str:
    if not ms:
        return "raw"
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"
