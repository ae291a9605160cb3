"""Queries across resolutions (m3shm/query/resolution.py) over real segments and filesets.

A raw namespace (a shared-memory segment, short retention) and downsampled namespaces (1m
points in a segment and in filesets, 1h points in filesets), the downsampled points computed
from the raw samples by the real aggregation cells (csrc/aggwin.c, Last): a query must read
each series raw where the raw retention covers the range and downsampled before it, find
series that exist only downsampled, never read an aggregated namespace for series the raw one
answers for, keep Prometheus' lookback on raw data while finding hour-old 1h points, and give
the raw data's rate()/increase() over the Last-downsampled counter at window boundaries.
"""

from __future__ import annotations

import os
import random

import numpy as np
import pytest

from m3shm import codec
from m3shm._native import ffi, lib
from m3shm.query.blocks import decode_batch, decode_result
from m3shm.query.context import QueryContext
from m3shm.query.engine import Engine
from m3shm.query.fileset_source import FilesetSource
from m3shm.query.local import ShmSource
from m3shm.query.matchers import Matcher
from m3shm.query.resolution import NamespaceView, ResolutionStorage
from m3shm.query.storage import BlockBatch
from m3shm.rules.aggwin import CellParams, Cells
from m3shm.shm import Segment, SegParams, canonical_labels, labels_hash, make_record
from m3shm.storage.fileset import FilesetId
from m3shm.storage.flushed import FlushedStore
from m3shm.storage.shard_flush import write_block
from m3shm.storage.shm_index import ShmIndex

pytestmark = pytest.mark.native

SHARDS = 2
MIN, HOUR = 60_000, 3_600_000
NOW = 1_800_000_000_000 // HOUR * HOUR + 7 * MIN + 5_000  # not on a window boundary
RAW_RET = 2 * HOUR
SCRAPE = 10_000


def _seg(block_ms: int) -> Segment:
    path = f"/dev/shm/m3shm-test-xres-{os.getpid()}-{random.getrandbits(32):08x}"
    return Segment.create(path, SegParams(num_shards=SHARDS, num_producers=1,
                                          lane_bytes=1 << 16, series_per_shard=256,
                                          arena_bytes=16 << 20, block_ms=block_ms))


def shm_write(seg: Segment, labels: dict[str, str], ts: np.ndarray, vs: np.ndarray) -> None:
    for i in range(0, len(ts), 500):
        rec = make_record(labels, ts[i:i + 500].tolist(), vs[i:i + 500].tolist(), SHARDS)
        assert lib.m3_shard_apply(seg.base, ffi.cast("const m3_rec *", ffi.from_buffer(rec))) \
            == 0


def fileset_write(root, ns: str, block_ms: int,
                  series: list[tuple[dict[str, str], np.ndarray, np.ndarray]],
                  shards: int = SHARDS) -> None:
    """Flushed blocks of ``ns`` as the daemon writes them (one fileset per shard and block)."""
    blocks: dict[tuple[int, int], list] = {}
    for labels, ts, vs in series:
        canon = canonical_labels(labels)
        h = labels_hash(canon)
        for bs in np.unique(ts // block_ms * block_ms).tolist():
            m = (ts >= bs) & (ts < bs + block_ms)
            blocks.setdefault((h % shards, bs), []).append(
                (canon, h, codec.encode(ts[m], vs[m])))
    for (shard, bs), entries in blocks.items():
        write_block(root, FilesetId(ns, shard, bs, 0), block_ms, entries)


def downsample(ts: np.ndarray, vs: np.ndarray, res_ms: int) -> tuple[np.ndarray, np.ndarray]:
    """Last per window (k*res, (k+1)*res], stamped at the window end, by csrc/aggwin.c."""
    cells = Cells.of([CellParams(res_ms, admission_ms=res_ms, aggregations=("Last",))])
    rows = np.concatenate([cells.apply(0, ts, vs, int(ts[0])), cells.finalise(1 << 62)])
    rows.sort(order="ts")
    return rows["ts"].copy(), rows["value"].copy()


def counter(start: int, end: int, resets: tuple[int, ...] = (), seed: int = 1
            ) -> tuple[np.ndarray, np.ndarray]:
    """A counter scraped every 10 s in (start, end], restarting from 0 at ``resets``."""
    rng = np.random.default_rng(seed)
    ts = np.arange(start // SCRAPE * SCRAPE + SCRAPE, end + 1, SCRAPE, dtype=np.int64)
    inc = rng.integers(1, 50, len(ts)).astype(np.float64)
    vs = np.empty(len(ts))
    acc = 1000.0
    for i, t in enumerate(ts.tolist()):  # test data only
        acc = inc[i] if t in resets else acc + inc[i]
        vs[i] = acc
    return ts, vs


class LabelsOnly:
    """A source as one that knows no label hashes (a remote node, an older reader): its
    answers carry none and it filters by labels, so selection falls back to labels."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def select(self, matchers, mint, maxt, ctx, want=None):
        res = self.inner.select(matchers, mint, maxt, ctx,
                                None if want is None else (lambda labels: want(labels)))
        for b in res.batches:
            b.hashes = None
        return res

    def __getattr__(self, name):
        return getattr(self.inner, name)


class World:
    """raw (segment, RAW_RET), agg_1m (segment for the last 6h + filesets before, 1d) and
    agg_1h (filesets, 30d); ``write`` puts a series into the namespaces named."""

    def __init__(self, tmp_path) -> None:
        self.raw = _seg(HOUR)
        self.m1 = _seg(HOUR)
        self.root = tmp_path / "filesets"
        self.store = FlushedStore(self.root)
        self.m1_disk: list = []
        self.h1_disk: list = []
        self.raw_index, self.m1_index = ShmIndex(self.raw), ShmIndex(self.m1)

    def write(self, labels: dict[str, str], ts: np.ndarray, vs: np.ndarray,
              raw: bool = True, raw_from: int = NOW - RAW_RET - HOUR) -> None:
        """Raw samples after ``raw_from`` (by default what a raw namespace holds: its
        retention and a block more, not yet expired), and the downsampled points."""
        if raw:
            m = ts > raw_from
            shm_write(self.raw, labels, ts[m], vs[m])
        t1, v1 = downsample(ts, vs, MIN)
        recent = t1 > NOW - 6 * HOUR
        shm_write(self.m1, labels, t1[recent], v1[recent])
        old = ~recent & (t1 > NOW - 30 * HOUR)
        self.m1_disk.append((labels, t1[old], v1[old]))
        th, vh = downsample(ts, vs, HOUR)
        self.h1_disk.append((labels, th, vh))

    def flush(self) -> None:
        fileset_write(self.root, "agg_1m", 12 * HOUR, [s for s in self.m1_disk if len(s[1])])
        fileset_write(self.root, "agg_1h", 24 * HOUR, self.h1_disk)
        self.m1_disk, self.h1_disk = [], []

    def views(self, which: str = "raw,agg_1m,agg_1h") -> list[NamespaceView]:
        all_ = {
            "raw": NamespaceView("default", 0, RAW_RET, [ShmSource(self.raw_index)]),
            "agg_1m": NamespaceView("agg_1m", MIN, 24 * HOUR, [
                FilesetSource(self.store, "agg_1m", SHARDS), ShmSource(self.m1_index)]),
            "agg_1h": NamespaceView("agg_1h", HOUR, 30 * 24 * HOUR, [
                FilesetSource(self.store, "agg_1h", SHARDS)]),
        }
        return [all_[n] for n in which.split(",")]

    def storage(self, which: str = "raw,agg_1m,agg_1h") -> ResolutionStorage:
        views = self.views(which)
        if self.labels_only:
            for v in views:
                v.sources = [LabelsOnly(s) for s in v.sources]
        return ResolutionStorage(views, QueryContext(), NOW)

    def close(self) -> None:
        self.store.close()
        self.raw.unlink()
        self.m1.unlink()


@pytest.fixture(params=["hashes", "labels"])
def world(tmp_path, request):
    w = World(tmp_path)
    w.labels_only = request.param == "labels"
    yield w
    w.close()


def samples(st: ResolutionStorage, name: str, mint: int, maxt: int) -> dict:
    flat = decode_result(st.select([Matcher("__name__", "=", name)], mint, maxt), mint, maxt)
    return {dict(lb).get("i", ""): (flat.ts[a:b], flat.vals[a:b]) for lb, a, b in
            zip(flat.labels, flat.offsets[:-1], flat.offsets[1:], strict=True)}


def test_stitched_at_the_raw_retention_boundary(world):
    ts, vs = counter(NOW - 30 * HOUR, NOW)
    world.write({"__name__": "c", "i": "0"}, ts, vs)
    world.flush()
    st = world.storage()
    got = samples(st, "c", NOW - 28 * HOUR, NOW)
    gts, gvs = got["0"]
    raw_from = NOW - RAW_RET
    m1_from = NOW - 24 * HOUR
    # raw after the boundary, 1m points between 24h and 2h ago, 1h points before
    want_raw = ts[(ts >= raw_from) & (ts <= NOW)]
    t1, v1 = downsample(ts, vs, MIN)
    th, vh = downsample(ts, vs, HOUR)
    want_1m = t1[(t1 >= m1_from) & (t1 < raw_from)]
    want_1h = th[(th >= NOW - 28 * HOUR) & (th < m1_from)]
    want = np.concatenate([want_1h, want_1m, want_raw])
    assert gts.tolist() == want.tolist()
    value = dict(zip(ts.tolist(), vs.tolist(), strict=True))
    assert gvs.tolist() == [value[t] for t in want.tolist()]  # Last points are raw values
    assert st.header() == "default=raw,agg_1m=1m,agg_1h=1h"
    assert "agg_1m (1m resolution, 1 series)" in st.warning()


def test_raw_range_reads_no_aggregated_namespace(world):
    ts, vs = counter(NOW - 4 * HOUR, NOW)
    world.write({"__name__": "c", "i": "0"}, ts, vs)
    world.flush()
    st = world.storage()
    got = samples(st, "c", NOW - HOUR, NOW)
    assert got["0"][0].tolist() == ts[ts >= NOW - HOUR].tolist()
    assert st.header() == "default=raw" and st.warning() is None


def test_series_only_downsampled_are_found_over_the_whole_range(world):
    """A rollup (or a series whose raw data is dropped) exists only in aggregated namespaces:
    found there also inside the raw retention, beside raw series of the same name."""
    ts, vs = counter(NOW - 30 * HOUR, NOW, seed=2)
    world.write({"__name__": "c", "i": "rollup"}, ts, vs, raw=False)
    world.write({"__name__": "c", "i": "0"}, ts, vs)
    world.flush()
    st = world.storage()
    got = samples(st, "c", NOW - HOUR, NOW)
    assert set(got) == {"0", "rollup"}
    t1, _ = downsample(ts, vs, MIN)
    assert got["rollup"][0].tolist() == t1[(t1 >= NOW - HOUR) & (t1 <= NOW)].tolist()
    assert got["0"][0].tolist() == ts[ts >= NOW - HOUR].tolist()
    assert st.used["agg_1m"].series == 1  # only the rollup was read downsampled
    # listings see it too
    assert {dict(lb)["i"] for lb in st.series([[Matcher("__name__", "=", "c")]],
                                              NOW - HOUR, NOW)} == {"0", "rollup"}
    assert "rollup" in st.label_values("i", None, NOW - HOUR, NOW)


def test_lookback_at_least_the_resolution(world):
    """1h points answer an instant query up to an hour after their window ends; raw data
    keeps the 5m lookback (a raw series that stopped 10 min ago is gone)."""
    ts, vs = counter(NOW - 30 * 24 * HOUR + HOUR, NOW - 10 * MIN, seed=3)
    world.write({"__name__": "c", "i": "0"}, ts, vs)
    world.flush()
    eng = Engine(world.storage())
    assert eng.instant("c", NOW).vector == []  # stopped 10 min ago: stale on raw data
    at = NOW - 10 * 24 * HOUR + 40 * MIN  # only 1h points there, the last one 47 min old
    r = eng.instant("c", at)
    th, vh = downsample(ts, vs, HOUR)
    k = np.searchsorted(th, at, side="right") - 1
    assert [s.v for s in r.vector] == [vh[k]]
    # an instant read looks an hour back for 1h points, but keeps raw samples of the last 5m
    # only (the decoder drops the rest)
    st = world.storage()
    ts2, vs2 = counter(NOW - 3 * HOUR, NOW, seed=6)
    world.write({"__name__": "c", "i": "1"}, ts2, vs2)
    res = st.select([Matcher("__name__", "=", "c")], NOW - HOUR, NOW, lookback=(NOW, 5 * MIN))
    flat = decode_result(res, NOW - HOUR, NOW)
    (i1,) = [i for i, lb in enumerate(flat.labels) if dict(lb)["i"] == "1"]
    kept = flat.ts[flat.offsets[i1]:flat.offsets[i1 + 1]]
    assert kept.tolist() == ts2[ts2 >= NOW - 5 * MIN].tolist()
    # a range query over the 1h span has a point at every step, not one per hour
    rr = Engine(world.storage()).range("c", at - 3 * HOUR, at, MIN)
    assert len(rr.matrix) == 1 and len(rr.matrix[0].ts) == 3 * 60 + 1


@pytest.mark.parametrize("fn", ["increase", "rate"])
def test_rate_over_last_downsampled_counter_matches_raw(world, fn):
    """At window boundaries rate()/increase() over 1m Last points equal the raw data's,
    counter resets included when the counter restarts in a window's first scrape; a restart
    later in a window loses the increase from the window's start to the restart (as in M3)."""
    start, end = NOW - 20 * HOUR, NOW - 3 * HOUR
    w0 = (end - 8 * HOUR) // MIN * MIN
    aligned = (w0 + 30 * MIN + SCRAPE, w0 + 200 * MIN + SCRAPE)
    ts, vs = counter(start, end, resets=aligned, seed=4)
    world.write({"__name__": "c"}, ts, vs, raw_from=0)
    world.flush()
    q = f"{fn}(c[5m])"
    raw = Engine(world.storage("raw")).range  # the raw segment keeps everything written
    down = Engine(world.storage("agg_1m")).range
    a, b = w0 + 5 * MIN, w0 + 300 * MIN
    want = raw(q, a, b, MIN).matrix[0].values
    got = down(q, a, b, MIN).matrix[0].values
    np.testing.assert_allclose(got, want, rtol=1e-9)
    # a restart in the middle of a window
    mid = w0 + 400 * MIN + 30_000
    ts2, vs2 = counter(start, end, resets=(mid,), seed=5)
    world.write({"__name__": "d"}, ts2, vs2, raw_from=0)
    world.flush()
    t = w0 + 402 * MIN
    rw = Engine(world.storage("raw")).instant("increase(d[5m])", t).vector[0].v
    dw = Engine(world.storage("agg_1m")).instant("increase(d[5m])", t).vector[0].v
    at = dict(zip(ts2.tolist(), vs2.tolist(), strict=True))
    lost = at[mid - SCRAPE] - at[mid - 3 * SCRAPE]  # window start -> last scrape before reset
    assert lost > 0 and rw - dw == pytest.approx(lost, rel=1e-9)


def test_clip_bounds_in_the_decoder():
    rng = np.random.default_rng(7)
    blocks, sers, lo, hi, want = [], [], [], [], {}
    for s in range(5):
        for _ in range(3):
            ts = np.sort(rng.choice(np.arange(0, 10_000), 50, replace=False)).astype(np.int64)
            vs = rng.random(50)
            a = int(rng.integers(0, 10_000))
            b = a + int(rng.integers(0, 5_000))
            blocks.append(codec.encode(ts, vs))
            sers.append(s)
            lo.append(a)
            hi.append(b)
            m = (ts >= max(a, 100)) & (ts <= min(b, 9_000))
            for t, v in zip(ts[m].tolist(), vs[m].tolist(), strict=True):
                want.setdefault(s, {})[t] = v  # later block wins a timestamp
    offs = np.zeros(len(blocks) + 1, np.uint64)
    np.cumsum([len(x) for x in blocks], out=offs[1:])
    labels = [(("i", str(s)),) for s in range(5)]
    batch = BlockBatch(labels, np.frombuffer(b"".join(blocks), np.uint8), offs,
                       np.array(sers, np.int64), np.full(len(blocks), 50, np.int64),
                       np.zeros(len(blocks), np.int64), np.full(len(blocks), 10_000, np.int64),
                       np.array(lo, np.int64), np.array(hi, np.int64))
    flat = decode_batch(batch, 100, 9_000)
    for s in range(5):
        a, b = flat.offsets[s], flat.offsets[s + 1]
        got = dict(zip(flat.ts[a:b].tolist(), flat.vals[a:b].tolist(), strict=True))
        assert got == dict(sorted(want.get(s, {}).items()))
    # per-series consumers (remote read, the block stream) get the clipped samples re-encoded
    for s, sb in enumerate(batch.to_series()):
        got = {}
        for blk in sb.blocks:
            t, v = codec.decode(blk.data)
            got.update(zip(t.tolist(), v.tolist(), strict=True))
        full = {t: v for t, v in got.items() if 100 <= t <= 9_000}
        assert full == want.get(s, {})
