"""The query's C kernels against their numpy / Python references.

- csrc/json_points.c vs promjson's per-point Python formatter (Go's FormatFloat 'f' -1 and
  MarshalTimestamp), on arbitrary doubles and timestamps;
- csrc/flat_decode.c vs decoding block by block and normalising in numpy (range, sort, last
  write wins), with overlapping out-of-order blocks, and its refusals of bad input;
- csrc/windows.c vs one searchsorted per series;
- csrc/gather.c (blocks of several buffers in a new order) vs slicing in Python.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from m3shm import codec
from m3shm.errors import BufferFullError, CorruptError, InvalidArgumentError
from m3shm.net.promjson import fmt_value, points_json, points_json_py
from m3shm.query.blocks import FlatSeries, _decode_flat, _normalise
from m3shm.query.local import gather_blocks
from m3shm.query.windows import _locate_c

pytestmark = pytest.mark.native


@settings(max_examples=300)
@given(st.lists(st.tuples(st.integers(-(1 << 53), 1 << 53),
                          st.floats(allow_nan=True, allow_infinity=True)), max_size=40))
def test_json_points_match_python(points):
    ts = np.array([p[0] for p in points], dtype=np.int64)
    vs = np.array([p[1] for p in points], dtype=np.float64)
    assert points_json(ts, vs) == points_json_py(ts, vs)


@settings(max_examples=300)
@given(st.integers(0, (1 << 64) - 1))
def test_json_value_any_bit_pattern(bits):
    v = struct.unpack("<d", struct.pack("<Q", bits))[0]
    got = points_json(np.array([1500], dtype=np.int64), np.array([v]))
    assert got == f'[1.500,"{fmt_value(v)}"]'


def test_json_points_edges():
    vals = [0.0, -0.0, 1e21, 1e-7, 5e-324, 1.7976931348623157e308, 0.1, 123456789012345680.0,
            float("nan"), float("inf"), -float("inf"), 2.5e-5, 100.0, 1 / 3]
    ts = np.arange(len(vals), dtype=np.int64) * 1001 - 5000
    got = points_json(ts, np.array(vals))
    assert got == points_json_py(ts, np.array(vals))
    assert '"-0"' in got and '"1000000000000000000000"' in got and '"0.0000001"' in got
    assert got.startswith('[-5,"0"],[-3.999,"-0"]')


def _blocks(rnd: np.random.Generator, nseries: int):
    """Random series, each several TSZ blocks that may overlap in time."""
    datas, bser, counts = [], [], []
    for s in range(nseries):
        for _ in range(int(rnd.integers(0, 4))):
            n = int(rnd.integers(1, 60))
            t0 = int(rnd.integers(0, 2000))
            ts = np.sort(rnd.choice(np.arange(t0, t0 + 4 * n + 5), n, replace=False))
            vs = rnd.integers(0, 5, n).astype(np.float64) + s * 10
            datas.append(codec.encode(ts.astype(np.int64), vs))
            bser.append(s)
            counts.append(n)
    offs = np.zeros(len(datas) + 1, dtype=np.uint64)
    np.cumsum([len(d) for d in datas], out=offs[1:])
    data = np.frombuffer(b"".join(datas), dtype=np.uint8)
    return data, offs, np.array(bser, dtype=np.int64), np.array(counts, dtype=np.int64)


@settings(max_examples=60)
@given(st.integers(0, 1 << 30), st.integers(0, 12), st.integers(-100, 2500),
       st.integers(0, 2500))
def test_decode_flat_matches_numpy(seed, nseries, mint, width):
    rnd = np.random.default_rng(seed)
    data, offs, bser, counts = _blocks(rnd, nseries)
    labels = [(("s", str(i)),) for i in range(nseries)]
    maxt = mint + width
    got = _decode_flat(labels, data, offs, bser, int(counts.sum()), mint, maxt)
    if len(bser):
        ts, vs, soffs = codec.decode_many(data, offs)
        ser = np.repeat(bser, np.diff(soffs))
    else:
        ts, vs, ser = np.zeros(0, np.int64), np.zeros(0), np.zeros(0, np.int64)
    want = _normalise(labels, ts, vs, ser, mint, maxt)
    assert got.offsets.tolist() == want.offsets.tolist()
    assert got.ts.tolist() == want.ts.tolist()
    assert got.vals.tobytes() == want.vals.tobytes()


def test_decode_flat_refuses_bad_input():
    rnd = np.random.default_rng(3)
    data, offs, bser, counts = _blocks(rnd, 6)
    labels = [(("s", str(i)),) for i in range(6)]
    cap = int(counts.sum())
    with pytest.raises(BufferFullError, match="block"):
        _decode_flat(labels, data, offs, bser, 0, 0, 10_000)
    bad = data.copy()
    bad[int(offs[2]):int(offs[2]) + 2] = 0  # a block's magic
    with pytest.raises(CorruptError, match="block 2"):
        _decode_flat(labels, bad, offs, bser, cap, 0, 10_000)
    with pytest.raises(InvalidArgumentError, match="block"):
        _decode_flat(labels, data, offs, bser[::-1].copy(), cap, 0, 10_000)  # not adjacent
    with pytest.raises(InvalidArgumentError, match="block"):
        _decode_flat(labels[:2], data, offs, bser, cap, 0, 10_000)  # series beyond nseries
    short = offs.copy()
    short[-1] = len(data) + 8
    with pytest.raises(InvalidArgumentError, match="block"):
        _decode_flat(labels, data, short, bser, cap, 0, 10_000)


@settings(max_examples=60)
@given(st.integers(0, 1 << 30), st.integers(0, 20), st.integers(1, 30), st.integers(0, 300))
def test_windows_match_searchsorted(seed, nseries, nsteps, rng):
    rnd = np.random.default_rng(seed)
    counts = rnd.integers(0, 50, nseries)
    ts = np.concatenate([np.sort(rnd.choice(1000, c, replace=False)) for c in counts]
                        ) if nseries else np.zeros(0, np.int64)
    offs = np.zeros(nseries + 1, dtype=np.int64)
    np.cumsum(counts, out=offs[1:])
    flat = FlatSeries([(("s", str(i)),) for i in range(nseries)], ts.astype(np.int64),
                      np.zeros(len(ts)), offs)
    end = np.sort(rnd.integers(-50, 1100, nsteps)).astype(np.int64)
    start = end - rng
    lo, hi = _locate_c(flat, start, end)
    for i in range(nseries):
        a, b = offs[i], offs[i + 1]
        assert (lo[i] == a + np.searchsorted(ts[a:b], start, side="left")).all()
        assert (hi[i] == a + np.searchsorted(ts[a:b], end, side="right")).all()


def test_json_points_many_magnitudes():
    rng = np.random.default_rng(5)
    v = rng.uniform(0, 10, 20_000) * 10.0 ** rng.integers(-30, 30, 20_000)
    v[::5] = np.round(v[::5])
    v[::11] *= -1
    ts = np.cumsum(rng.integers(1, 30_000, len(v))).astype(np.int64)
    assert points_json(ts, v) == points_json_py(ts, v)


def test_json_points_shortest_digits_in_c():
    """The C shortest-digit formatter (m3_json_points_f) against CPython's repr (David Gay's
    algorithm, the digits Go picks) on the hard cases: random bit patterns, short decimals,
    ratios, neighbours of powers of ten and every power of two (some go the repr path)."""
    rng = np.random.default_rng(11)
    parts = [rng.integers(0, 1 << 64, 30_000, dtype=np.uint64).view(np.float64),
             rng.integers(-10**6, 10**6, 20_000) / 10.0 ** rng.integers(0, 12, 20_000),
             rng.uniform(0, 1e4, 20_000) / rng.integers(1, 97, 20_000),
             np.ldexp(1.0, np.arange(-1074, 1024)),
             np.ldexp(1.0, np.arange(-60, 60)) * 3,
             np.nextafter(10.0 ** np.arange(-20, 22), 0), np.nextafter(10.0 ** np.arange(-20, 22),
                                                                        np.inf),
             np.nextafter(np.float64(2.0 ** 52), 0) * np.array([1.0, 0.5, 2.0]),
             10.0 ** rng.uniform(-6, 16, 40_000),  # the exact path's range, log-uniform
             rng.integers(1 << 40, 1 << 53, 20_000) / 4.0]  # ties between two candidates
    v = np.concatenate(parts)
    ts = np.arange(len(v), dtype=np.int64) * 1001
    for a in range(0, len(v), 4096):
        assert points_json(ts[a:a + 4096], v[a:a + 4096]) == \
            points_json_py(ts[a:a + 4096], v[a:a + 4096])


def test_group_sum_adds_rows_in_order():
    """csrc/group_sum.c gives bit for bit a sequential sum per group, rows in input order (as
    Prometheus adds series), and the counts of present values; NaN, infinities, -0.0 and
    absent values among them; and what the sorted reduceat path gives within rounding."""
    from m3shm.query.aggregate import group_sum
    from m3shm.query.vectors import sorted_groups

    rng = np.random.default_rng(2)
    for n, steps, groups in ((1, 1, 1), (7, 3, 2), (500, 40, 37), (2000, 5, 1999)):
        vals = rng.normal(size=(n, steps)) * 10.0 ** rng.integers(-5, 15, (n, steps))
        vals[rng.random((n, steps)) < 0.05] = np.nan
        vals[rng.random((n, steps)) < 0.02] = np.inf
        vals[rng.random((n, steps)) < 0.05] = -0.0
        present = rng.random((n, steps)) < 0.8
        gid = np.concatenate([np.arange(groups), rng.integers(0, groups, n - groups)])
        rng.shuffle(gid)
        total, cnt = group_sum(vals, present, gid, groups)
        want = np.zeros((groups, steps))
        seen = np.zeros(groups, dtype=bool)
        for r in range(n):
            v = np.where(present[r], vals[r], 0.0)
            want[gid[r]] = want[gid[r]] + v if seen[gid[r]] else v
            seen[gid[r]] = True
        assert np.array_equal(total.view(np.uint64), want.view(np.uint64))
        order, starts, _ = sorted_groups(gid, groups)
        assert np.array_equal(cnt, np.add.reduceat(present[order].astype(np.int64), starts,
                                                   axis=0))
        ref = np.add.reduceat(np.where(present[order], vals[order], 0.0), starts, axis=0)
        assert np.allclose(total, ref, rtol=1e-12, atol=0, equal_nan=True)


@settings(max_examples=100)
@given(st.integers(0, 2**32 - 1), st.integers(1, 4), st.integers(0, 60))
def test_gather_blocks_matches_slicing(seed, nsrcs, nblocks):
    rng = np.random.default_rng(seed)
    datas = [rng.integers(0, 256, int(rng.integers(0, 300)), dtype=np.uint8)
             for _ in range(nsrcs)]
    src_of = rng.integers(0, nsrcs, nblocks).astype(np.uint32)
    starts = np.array([rng.integers(0, len(datas[s]) + 1) for s in src_of], np.uint64)
    lens = np.array([rng.integers(0, len(datas[s]) - int(a) + 1)
                     for s, a in zip(src_of, starts, strict=True)], np.uint64)
    want = b"".join(datas[s][int(a):int(a) + int(n)].tobytes()
                    for s, a, n in zip(src_of, starts, lens, strict=True))
    got = gather_blocks(datas, src_of, starts, lens, len(want))
    assert got.tobytes() == want


def test_gather_blocks_refuses_blocks_outside_their_source():
    datas = [np.arange(10, dtype=np.uint8)]
    one = np.zeros(1, np.uint32)
    with pytest.raises(InvalidArgumentError):
        gather_blocks(datas, one, np.array([8], np.uint64), np.array([3], np.uint64), 3)
    with pytest.raises(InvalidArgumentError):  # more than the output holds
        gather_blocks(datas, one, np.array([0], np.uint64), np.array([5], np.uint64), 4)
    with pytest.raises(InvalidArgumentError):  # no such source
        gather_blocks(datas, np.ones(1, np.uint32), np.zeros(1, np.uint64),
                      np.zeros(1, np.uint64), 0)
