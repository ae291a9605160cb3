"""The query side's reads of shared memory: the shm index and ShmSource against a reference.

Series are written straight into a segment's shards (m3_shard_apply, as the owner does), with
out-of-order writes, overwrites, several blocks and multi-chunk streams; every selection must
decode to exactly what a dict model (last write wins) holds, and to what m3_series_read says.
"""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from m3shm._native import ffi, lib
from m3shm.query.blocks import decode_result
from m3shm.query.context import QueryContext, QueryLimits
from m3shm.query.errors import QueryCanceledError, QueryError, QueryLimitError
from m3shm.query.local import LocalStorage, ShmSource, merge
from m3shm.query.matchers import Matcher, matches_all
from m3shm.shm import Segment, SegParams, make_record
from m3shm.storage.shm_index import ShmIndex

pytestmark = pytest.mark.native

SHARDS = 4
BLOCK_MS = 10_000


@pytest.fixture
def seg():
    path = f"/dev/shm/m3shm-test-q-{os.getpid()}-{random.getrandbits(32):08x}"
    s = Segment.create(path, SegParams(num_shards=SHARDS, num_producers=1, lane_bytes=1 << 16,
                                       series_per_shard=512, arena_bytes=8 << 20,
                                       block_ms=BLOCK_MS))
    yield s
    s.unlink()


def write(seg: Segment, labels: dict[str, str], ts: list[int], vs: list[float]) -> None:
    for i in range(0, len(ts), 500):
        rec = make_record(labels, ts[i:i + 500], vs[i:i + 500], SHARDS)
        buf = ffi.from_buffer(rec)
        assert lib.m3_shard_apply(seg.base, ffi.cast("const m3_rec *", buf)) == 0


def lbl(d: dict[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(d.items()))


def select(seg_index: ShmIndex, matchers, mint, maxt, ctx=None):
    st_ = LocalStorage([ShmSource(seg_index)], ctx or QueryContext())
    res = st_.select(matchers, mint, maxt)
    return decode_result(res, mint, maxt)


def as_dict(flat) -> dict:
    out = {}
    for i, lb in enumerate(flat.labels):
        a, b = flat.offsets[i], flat.offsets[i + 1]
        out[lb] = (flat.ts[a:b].tolist(), flat.vals[a:b].tolist())
    return out


@settings(max_examples=25)
@given(st.data())
def test_select_matches_model(data):
    path = f"/dev/shm/m3shm-test-qh-{os.getpid()}-{random.getrandbits(32):08x}"
    seg = Segment.create(path, SegParams(num_shards=SHARDS, num_producers=1,
                                         lane_bytes=1 << 16, series_per_shard=64,
                                         arena_bytes=4 << 20, block_ms=BLOCK_MS))
    try:
        rnd = random.Random(data.draw(st.integers(0, 1 << 30)))
        model: dict = {}
        index = ShmIndex(seg)
        for step in range(3):  # the index is refreshed between rounds of writes
            for _ in range(rnd.randint(1, 6)):
                labels = {"__name__": rnd.choice(["a", "b"]), "host": f"h{rnd.randint(0, 5)}"}
                if rnd.random() < 0.3:
                    labels["dc"] = rnd.choice(["x", "y"])
                n = rnd.choice([1, 5, 40, 700])
                t0 = rnd.randint(0, 4 * BLOCK_MS)
                ts = sorted(rnd.sample(range(t0, t0 + 3 * n + 10), n))
                if rnd.random() < 0.3:
                    rnd.shuffle(ts)
                vs = [float(rnd.randint(0, 9)) for _ in ts]
                write(seg, labels, ts, vs)
                m = model.setdefault(lbl(labels), {})
                for t, v in zip(ts, vs, strict=True):
                    m[t] = v
            mint = rnd.randint(-1000, 3 * BLOCK_MS)
            maxt = mint + rnd.randint(0, 4 * BLOCK_MS)
            matchers = rnd.choice([
                [Matcher("__name__", "=", "a")],
                [Matcher("__name__", "=~", "a|b"), Matcher("host", "!=", "h1")],
                [Matcher("host", "=~", "h[0-3]"), Matcher("dc", "!~", "x")],
                [Matcher("dc", "=", "y")],
                [Matcher("__name__", "=~", ".+")],
            ])
            got = as_dict(select(index, matchers, mint, maxt))
            want = {}
            for k, m in model.items():
                if not matches_all(matchers, k):
                    continue
                pts = sorted((t, v) for t, v in m.items() if mint <= t <= maxt)
                if pts:
                    want[k] = ([p[0] for p in pts], [p[1] for p in pts])
            got = {k: v for k, v in got.items() if v[0]}
            assert got == want, (step, matchers, mint, maxt)
    finally:
        seg.unlink()


def test_matches_series_read_and_multi_chunk(seg):
    rnd = random.Random(7)
    for h in range(20):
        ts = list(range(0, 30_000, 7))
        vs = [rnd.random() for _ in ts]
        write(seg, {"__name__": "m", "host": f"h{h}"}, ts, vs)
        write(seg, {"__name__": "m", "host": f"h{h}"}, ts[100:200:3], [9.5] * 34)  # overwrite
    index = ShmIndex(seg)
    assert index.refresh() == 20 and index.refresh() == 0
    flat = select(index, [Matcher("__name__", "=", "m")], 1000, 25_000)
    assert len(flat.labels) == 20
    for i, lb in enumerate(flat.labels):
        sel = index.select([Matcher("host", "=", dict(lb)["host"])])
        (shard, _, slots, _), = sel.by_shard()
        ts, vs = seg.read_series(shard, int(slots[0]), 1000, 25_000)
        a, b = flat.offsets[i], flat.offsets[i + 1]
        assert flat.ts[a:b].tolist() == ts.tolist()
        assert flat.vals[a:b].tobytes() == vs.tobytes()


def test_limits_refused_before_reading(seg):
    for h in range(10):
        write(seg, {"__name__": "m", "host": f"h{h}"}, list(range(0, 1000, 10)), [1.0] * 100)
    index = ShmIndex(seg)
    m = [Matcher("__name__", "=", "m")]
    with pytest.raises(QueryLimitError, match="query.max_series=5"):
        select(index, m, 0, 2000, QueryContext(limits=QueryLimits(max_series=5)))
    with pytest.raises(QueryLimitError, match="query.max_samples=999"):
        select(index, m, 0, 2000, QueryContext(limits=QueryLimits(max_samples=999)))
    with pytest.raises(QueryLimitError, match="query.max_bytes=1000"):
        select(index, m, 0, 2000, QueryContext(limits=QueryLimits(max_bytes=1000)))
    ctx = QueryContext(limits=QueryLimits(max_series=10, max_samples=1000))
    assert len(select(index, m, 0, 2000, ctx).labels) == 10
    assert (ctx.series, ctx.samples) == (10, 1000)
    ctx = QueryContext()
    ctx.cancel()
    with pytest.raises(QueryCanceledError):
        select(index, m, 0, 2000, ctx)
    with pytest.raises(QueryError, match="empty string"):
        select(index, [Matcher("x", "=", "")], 0, 2000)


def test_series_labels_and_values(seg):
    write(seg, {"__name__": "up", "job": "a", "instance": "i1"}, [1000], [1.0])
    write(seg, {"__name__": "up", "job": "b", "instance": "i2"}, [50_000], [1.0])
    write(seg, {"__name__": "other", "zone": "z"}, [1000], [1.0])
    st_ = LocalStorage([ShmSource(ShmIndex(seg))], QueryContext())
    up = [Matcher("__name__", "=", "up")]
    assert st_.series([up], None, None) == [lbl({"__name__": "up", "job": "a", "instance": "i1"}),
                                            lbl({"__name__": "up", "job": "b", "instance": "i2"})]
    assert st_.series([up], 40_000, 60_000) == [
        lbl({"__name__": "up", "job": "b", "instance": "i2"})]
    assert st_.label_names(None, None, None) == ["__name__", "instance", "job", "zone"]
    assert st_.label_names([up], None, None) == ["__name__", "instance", "job"]
    assert st_.label_values("job", None, None, None) == ["a", "b"]
    assert st_.label_values("job", [up], 0, 2000) == ["a"]
    assert st_.label_values("nope", None, None, None) == []


def test_merge_sources_by_labels(seg):
    write(seg, {"__name__": "m", "host": "a"}, [1000, 2000, 3000], [1.0, 2.0, 3.0])
    write(seg, {"__name__": "m", "host": "b"}, [1000], [5.0])
    src = ShmSource(ShmIndex(seg))
    ctx = QueryContext()
    r1 = src.select([Matcher("host", "=", "a")], 0, 10_000, ctx)
    r2 = src.select([Matcher("__name__", "=", "m")], 0, 10_000, ctx)
    flat = decode_result(merge([r1, r2]), 0, 10_000)
    got = as_dict(flat)
    assert got == {lbl({"__name__": "m", "host": "a"}): ([1000, 2000, 3000], [1.0, 2.0, 3.0]),
                   lbl({"__name__": "m", "host": "b"}): ([1000], [5.0])}
    assert np.all(np.diff(flat.offsets) > 0)
