"""Aggregation windows in C (csrc/aggwin.c) against numpy references: every aggregation,
lateness and the admission window, ring eviction, transforms, the counter rollup."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from m3shm._native import ffi
from m3shm.errors import CorruptError, InvalidArgumentError
from m3shm.rules.aggwin import (
    AGG_NAMES,
    AGG_TYPES,
    SKETCH_ALPHA,
    CellParams,
    Cells,
    sketch_quantiles,
)

pytestmark = pytest.mark.native

RES = 10_000
SCALARS = ("Last", "Min", "Max", "Mean", "Count", "Sum", "SumSq", "Stdev")
QUANTILES = {"Median": "0.5", "P10": "0.1", "P20": "0.2", "P30": "0.3", "P40": "0.4",
             "P50": "0.5", "P60": "0.6", "P70": "0.7", "P80": "0.8", "P90": "0.9",
             "P95": "0.95", "P99": "0.99", "P999": "0.999", "P9999": "0.9999"}


def by_window(rows: np.ndarray) -> dict[tuple[int, str], float]:
    return {(int(r["ts"]), AGG_NAMES[int(r["agg"])]): float(r["value"]) for r in rows}


def reference(ts: np.ndarray, vs: np.ndarray, agg: str) -> float:
    """numpy reference of one aggregation over one window's samples (in applied order)."""
    if agg == "Last":
        return float(vs[np.flatnonzero(ts == ts.max())[-1]])
    if agg in QUANTILES:
        rank = max(1, math.ceil(Fraction(QUANTILES[agg]) * len(vs)))
        return float(np.sort(vs)[rank - 1])
    return float({
        "Min": np.min, "Max": np.max, "Mean": np.mean, "Count": len, "Sum": np.sum,
        "SumSq": lambda x: np.sum(x * x),
        "Stdev": lambda x: np.std(x, ddof=1) if len(x) > 1 else 0.0,
    }[agg](vs))


samples = st.lists(
    st.tuples(st.integers(1, 5 * RES),
              st.one_of(st.floats(-1e6, 1e6, allow_nan=False), st.integers(-50, 50).map(float))),
    min_size=1, max_size=300)


@given(samples, st.sets(st.sampled_from(SCALARS), min_size=1))
def test_scalar_aggregations_match_numpy(batch, aggs) -> None:
    ts = np.array([t for t, _ in batch], dtype=np.int64)
    vs = np.array([v for _, v in batch], dtype=np.float64)
    cells = Cells.of([CellParams(RES, 0, tuple(sorted(aggs)), nwin=8)])
    assert len(cells.apply(0, ts, vs, now_ms=0)) == 0
    got = by_window(cells.finalise(10 * RES))
    widx = (ts - 1) // RES
    expect_keys = set()
    for w in np.unique(widx):
        sel = widx == w
        end = int(w + 1) * RES
        scale = float(np.sum(np.abs(vs[sel]))) + 1.0
        for agg in aggs:
            expect_keys.add((end, agg))
            want = reference(ts[sel], vs[sel], agg)
            tol = 1e-9 * (scale * scale if agg in ("SumSq", "Stdev") else scale)
            if agg == "Stdev":
                tol = 1e-6 * (float(np.max(np.abs(vs[sel]))) + 1.0)
            assert got[(end, agg)] == pytest.approx(want, rel=1e-9, abs=tol), (agg, end)
    assert set(got) == expect_keys
    assert cells.cell(0).applied == len(ts)


@given(st.lists(st.one_of(st.floats(1.0, 10.0), st.floats(-10.0, -1.0), st.just(0.0)),
                min_size=1, max_size=400),
       st.sets(st.sampled_from(sorted(QUANTILES)), min_size=1))
def test_quantiles_within_the_documented_relative_error(values, aggs) -> None:
    vs = np.array(values)
    ts = np.arange(1, len(vs) + 1, dtype=np.int64)
    cells = Cells.of([CellParams(1000, 0, tuple(sorted(aggs)), nwin=1)])
    cells.apply(0, ts, vs, now_ms=0)
    got = by_window(cells.finalise(10**6))
    for agg in aggs:
        want = reference(ts, vs, agg)
        assert abs(got[(1000, agg)] - want) <= SKETCH_ALPHA * abs(want) * (1 + 1e-9), agg


def test_quantile_sketch_keeps_upper_quantiles_over_a_wide_range() -> None:
    # values over 12 decades: the smallest buckets merge, upper quantiles stay within alpha
    rng = np.random.default_rng(7)
    vs = 10 ** rng.uniform(-6, 6, 20_000)
    qs = [0.9, 0.95, 0.99, 0.999]
    for q, est in zip(qs, sketch_quantiles(vs, qs), strict=True):
        want = float(np.sort(vs)[math.ceil(q * len(vs)) - 1])
        assert abs(est - want) <= SKETCH_ALPHA * want * (1 + 1e-9), q


def test_late_samples_are_counted_not_applied() -> None:
    adm = 5_000
    cells = Cells.of([CellParams(RES, adm, ("Sum", "Count"), nwin=4)])
    cells.apply(0, [1_000, 12_000], [1.0, 10.0], now_ms=12_000)
    # window (0, 10s] is final at 15s; (10s, 20s] at 25s
    rows = by_window(cells.finalise(15_000))
    assert rows == {(RES, "Sum"): 1.0, (RES, "Count"): 1.0}
    cells.apply(0, [9_000, 19_000], [100.0, 20.0], now_ms=16_000)
    assert cells.cell(0).late == 1
    # a sample past its window's admission is late even before finalise runs
    cells.apply(0, [20_000], [1000.0], now_ms=25_000)
    assert cells.cell(0).late == 2
    assert by_window(cells.finalise(25_000)) == {(2 * RES, "Sum"): 30.0,
                                                  (2 * RES, "Count"): 2.0}
    assert cells.finalise(10**9).size == 0


def test_a_full_ring_finalises_its_oldest_windows_early() -> None:
    cells = Cells.of([CellParams(RES, 10**9, ("Last",), nwin=2)])
    assert cells.apply(0, [5_000, 15_000], [1.0, 2.0], now_ms=0).size == 0
    early = cells.apply(0, [55_000], [6.0], now_ms=0)  # window 5 evicts windows 0 and 1
    assert [(int(r["ts"]), r["value"]) for r in early] == [(10_000, 1.0), (20_000, 2.0)]
    assert cells.cell(0).evicted == 2
    cells.apply(0, [35_000], [4.0], now_ms=0)  # window 3 <= 5 - 2: final already
    assert cells.cell(0).late == 1
    cells.apply(0, [45_000], [5.0], now_ms=0)  # window 4 is still open
    assert by_window(cells.finalise(2 * 10**9)) == {(50_000, "Last"): 5.0, (60_000, "Last"): 6.0}


def test_a_window_far_ahead_finalises_windows_it_leaves_behind() -> None:
    # window 5 lands in an empty slot of a 4-slot ring while window 0 is open: window 0 must
    # go (final), and window 1 (<= 5 - 4) is late from then on (found by fuzz_aggwin_cell)
    cells = Cells.of([CellParams(RES, 10**9, ("Count",), nwin=4)])
    cells.apply(0, [5_000], [1.0], now_ms=0)
    early = cells.apply(0, [55_000, 15_000, 25_000], [1.0, 1.0, 1.0], now_ms=0)
    assert [(int(r["ts"]), r["value"]) for r in early] == [(10_000, 1.0)]
    assert cells.cell(0).late == 1  # window 1 (15 s); window 2 (25 s) is still open
    assert by_window(cells.finalise(2 * 10**9)) == {(30_000, "Count"): 1.0,
                                                     (60_000, "Count"): 1.0}


def test_finalise_resumes_when_its_output_fills() -> None:
    n = 3000  # 3000 cells x 2 windows = 6000 rows > the 4096-row output buffer
    cells = Cells.of([CellParams(RES, 0, ("Sum",), nwin=2)] * n)
    for i in range(n):
        cells.apply(i, [5_000, 15_000], [float(i), 1.0], now_ms=0)
    rows = cells.finalise(10**6)
    assert len(rows) == 2 * n
    assert sorted(zip(rows["cell"].tolist(), rows["ts"].tolist(), strict=True)) == [
        (i, t) for i in range(n) for t in (10_000, 20_000)]


def test_apply_runs_matches_apply() -> None:
    rng = np.random.default_rng(3)
    ts = np.sort(rng.integers(1, 40 * RES, 5000))
    vs = rng.normal(size=5000)
    params = [CellParams(RES, 0, ("Sum", "Max", "P90"), nwin=2)] * 3
    a, b = Cells.of(params), Cells.of(params)
    bounds = np.array([0, 1000, 2500, 5000], dtype=np.uint64)
    rows_a = [a.apply(i, ts[bounds[i]:bounds[i + 1]], vs[bounds[i]:bounds[i + 1]], 0)
              for i in range(3)]
    rows_b = b.apply_runs([0, 1, 2], bounds[:-1], bounds[1:], ts, vs, now_ms=0)
    assert np.array_equal(np.concatenate(rows_a), rows_b)
    assert np.array_equal(a.finalise(10**9), b.finalise(10**9))


def test_batches_already_applied_are_skipped_by_seq() -> None:
    cells = Cells.of([CellParams(RES, 0, ("Sum",), nwin=2)])
    cells.apply(0, [1_000], [1.0], now_ms=0, seq=7)
    cells.apply(0, [2_000], [1.0], now_ms=0, seq=7)  # replayed batch
    cells.apply(0, [3_000], [1.0], now_ms=0, seq=8)
    assert cells.cell(0).dup == 1
    assert by_window(cells.finalise(10**6)) == {(RES, "Sum"): 2.0}


def test_nan_and_stale_markers_are_skipped() -> None:
    stale = np.array([0x7FF0000000000002], dtype=np.uint64).view(np.float64)[0]
    cells = Cells.of([CellParams(RES, 0, ("Sum", "Count"), nwin=2)])
    cells.apply(0, [1_000, 2_000, 3_000], [1.0, float("nan"), stale], now_ms=0)
    assert cells.cell(0).invalid == 2
    assert by_window(cells.finalise(10**6)) == {(RES, "Sum"): 1.0, (RES, "Count"): 1.0}


def raw_increase(ts: np.ndarray, vs: np.ndarray, lo: int, hi: int) -> float:
    """Reset-adjusted increase of one counter over samples with lo < ts <= hi, each sample
    measured against the previous one (the first sample of a series has no previous)."""
    d = np.diff(vs)
    d = np.where(d < 0, vs[1:], d)
    sel = (ts[1:] > lo) & (ts[1:] <= hi)
    return float(np.sum(d[sel]))


def counter(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """A scraped counter with jittered 1-3 s intervals and a reset every ~40 samples."""
    ts = np.cumsum(rng.integers(1_000, 3_000, n)) + int(rng.integers(0, 5_000))
    inc = rng.exponential(5.0, n)
    vs = np.cumsum(inc)
    for r in np.flatnonzero(rng.random(n) < 0.025):
        vs[r:] -= vs[r] - inc[r] * rng.random()  # restart near 0
    return ts.astype(np.int64), vs


def test_counter_rollup_increase_equals_sum_of_raw_increases() -> None:
    # Increase -> Sum over 50 instances -> Add: the rolled-up counter's increase between any
    # two window boundaries equals the sum of the instances' raw increases (relative 1e-9).
    rng = np.random.default_rng(11)
    ninst, res, adm = 50, 10_000, 3_000
    inst = [counter(rng, 400) for _ in range(ninst)]
    series = Cells.of([CellParams(res, adm, ("Sum",), nwin=4, pre=("Increase",))] * ninst)
    group = Cells.of([CellParams(res, 2 * adm, ("Sum",), nwin=4, post=("Add",))])
    points: list[tuple[int, float]] = []
    end = max(int(t[-1]) for t, _ in inst) + 3 * res
    # feed in 5 s slices of wall time, each instance's new samples as one run, forwarding
    # finalised series windows to the group cell as the wiring will (window end -> value)
    for now in range(5_000, end, 5_000):
        for i, (ts, vs) in enumerate(inst):
            sel = (ts > now - 5_000) & (ts <= now)
            series.apply(i, ts[sel], vs[sel], now_ms=now)
        fwd = series.finalise(now)
        for r in fwd:
            group.apply(0, [int(r["ts"])], [float(r["value"])], now_ms=now)
        points += [(int(r["ts"]), float(r["value"])) for r in group.finalise(now)]
    assert series.cell(0).late == 0 and group.cell(0).late == 0
    assert len(points) > 60
    ptimes = [t for t, _ in points]
    assert ptimes == sorted(ptimes)
    for j in range(0, len(points), 7):
        for k in range(j + 1, len(points), 5):
            (tj, cj), (tk, ck) = points[j], points[k]
            want = sum(raw_increase(ts, vs, tj, tk) for ts, vs in inst)
            assert ck - cj == pytest.approx(want, rel=1e-9), (tj, tk)


def test_increase_and_persecond_before_the_window() -> None:
    ts = np.array([1_000, 3_000, 5_000, 7_000, 9_000, 11_000], dtype=np.int64)
    vs = np.array([10.0, 14.0, 20.0, 3.0, 5.0, 9.0])  # restart at 7s
    cells = Cells.of([CellParams(RES, 0, ("Sum",), nwin=2, pre=("Increase",)),
                      CellParams(RES, 0, ("Sum",), nwin=2, pre=("PerSecond",))])
    for i in range(2):
        cells.apply(i, ts, vs, now_ms=0)
    rows = cells.finalise(10**6)
    inc = {int(r["ts"]): r["value"] for r in rows if r["cell"] == 0}
    rate = {int(r["ts"]): r["value"] for r in rows if r["cell"] == 1}
    assert inc == {10_000: 4 + 6 + 3 + 2, 20_000: 4.0}
    # increments 4, 6, 3, 2 over (1s, 9s]; 4 over (9s, 11s]
    assert rate == {10_000: pytest.approx(15 / 8), 20_000: pytest.approx(4 / 2)}
    cells.init(0, CellParams(RES, 0, ("Sum",), nwin=2, pre=("Increase",)))
    cells.apply(0, [11_000, 10_500, 12_000], [1.0, 50.0, 2.0], now_ms=0)
    assert cells.cell(0).ooo == 1  # 10.5s is not after 11s: skipped by the transform
    assert by_window(cells.finalise(10**6)) == {(20_000, "Sum"): 1.0}


def test_transforms_after_the_window() -> None:
    params = [CellParams(RES, 0, ("Last",), nwin=8, post=(op,))
              for op in ("Add", "Increase", "PerSecond", "Absolute")]
    cells = Cells.of(params)
    vals = [5.0, 7.0, 2.0, -4.0]  # one per window; 7 -> 2 is a reset
    for i in range(4):
        cells.apply(i, [5_000, 15_000, 25_000, 35_000], vals, now_ms=0)
    rows = cells.finalise(10**6)
    got = {(int(r["cell"]), int(r["ts"])): r["value"] for r in rows}
    assert [got[(0, t)] for t in (10_000, 20_000, 30_000, 40_000)] == [5, 12, 14, 10]
    assert (1, 10_000) not in got
    # Increase between windows: 7 - 5, then drops (2 < 7, -4 < 2) read as restarts
    assert [got[(1, t)] for t in (20_000, 30_000, 40_000)] == [2, 2, -4]
    assert [got[(2, t)] for t in (20_000, 30_000)] == [0.2, 0.2]
    assert [got[(3, t)] for t in (10_000, 20_000, 30_000, 40_000)] == [5, 7, 2, 4]


def test_bad_parameters_are_refused_with_the_reason() -> None:
    with pytest.raises(InvalidArgumentError, match="exactly one aggregation"):
        CellParams(RES, 0, ("Sum", "Max"), post=("Add",)).to_c()
    with pytest.raises(InvalidArgumentError, match="nwin"):
        CellParams(RES, 0, ("Sum",), nwin=65).to_c()
    with pytest.raises(InvalidArgumentError, match="resolution"):
        CellParams(0, 0, ("Sum",)).to_c()
    with pytest.raises(InvalidArgumentError, match="PerSecond cell aggregates Sum"):
        CellParams(RES, 0, ("Max",), pre=("PerSecond",)).to_c()
    with pytest.raises(InvalidArgumentError, match="unknown aggregation"):
        CellParams(RES, 0, ("P42",)).to_c()
    assert set(AGG_TYPES) >= set(SCALARS) | set(QUANTILES)


def test_cell_check_repairs_torn_slots_and_refuses_garbage() -> None:
    params = CellParams(RES, 0, ("Sum",), nwin=4)
    cells = Cells.of([params])
    cells.apply(0, [5_000, 15_000], [1.0, 2.0], now_ms=0)
    raw = cells.buf.view(np.uint8)
    head, win, _ = params.layout()
    # slot 1's last_ts (which names its window) moved into window 6
    raw[head + win: head + win + 8] = np.frombuffer(np.int64(6 * RES + 1).tobytes(),
                                                    dtype=np.uint8)
    cells.check(0)  # widx 6 cannot sit in slot 1 of a 4-slot ring: dropped
    assert by_window(cells.finalise(10**6)) == {(RES, "Sum"): 1.0}
    raw[0] ^= 0xFF
    with pytest.raises(CorruptError):
        cells.check(0)


# Every window field (the sketch too): a cell that keeps all of them is the "full" layout a
# compact cell (only the fields its aggregations need) must agree with.
FULL = SCALARS + ("Median",)
COUNTERS = ("applied", "late", "ooo", "dup", "invalid", "evicted", "emitted")


def test_compact_cells_hold_only_what_their_aggregations_need() -> None:
    head = ffi.sizeof("m3_aggcell")
    last = CellParams(60_000, 600_000, ("Last",), nwin=13)
    assert last.layout() == (head, 16, 0)  # (ts, value) per window
    assert last.cell_bytes() == head + 13 * 16
    assert CellParams(RES, 0, ("Sum",), nwin=4).layout() == (head, 24, 0)
    # transform state only for the ops a cell has: 16 + 32 per pre op, 32 per post op
    assert CellParams(RES, 0, ("Sum",), nwin=4, pre=("Increase",)).layout()[0] == head + 48
    assert CellParams(RES, 0, ("Sum",), nwin=4, pre=("PerSecond",)).layout()[1] == 32
    assert CellParams(RES, 0, ("Last",), nwin=4, post=("Add",)).layout()[0] == head + 32
    assert CellParams(RES, 0, ("P99",), nwin=4).layout() == (head, 24, 1296)


def random_batches(seed: int, nwin: int) -> list[tuple[int, np.ndarray, np.ndarray, int]]:
    """(wall time, timestamps, values, batch seq) batches: samples around the wall time (some
    late, some ahead by more than the ring), repeated values (ties), NaNs, replayed seqs."""
    rng = np.random.default_rng(seed)
    now, seq, out = 10 * RES, 1, []
    for _ in range(int(rng.integers(1, 30))):
        now += int(rng.integers(0, 3)) * RES + int(rng.integers(0, RES))
        n = int(rng.integers(0, 40))
        ts = now + rng.integers(-2 * RES, (nwin + 1) * RES, n) * rng.integers(1, 3, n) // 2
        vs = np.where(rng.random(n) < 0.5, rng.integers(-5, 5, n), rng.normal(0, 1e3, n))
        vs[rng.random(n) < 0.05] = np.nan
        mode = int(rng.integers(0, 3))  # 0: no seq, 1: the previous batch's seq again, 2: new
        seq += mode == 2
        out.append((now, ts.astype(np.int64), vs.astype(np.float64), seq if mode else 0))
    return out


@given(st.integers(0, 2**32), st.sets(st.sampled_from(SCALARS), min_size=1),
       st.sampled_from([(), ("Increase",), ("Absolute",), ("Add", "Absolute")]),
       st.integers(1, 5), st.integers(0, 2 * RES))
def test_compact_and_full_cells_give_identical_rows(seed, aggs, pre, nwin, adm) -> None:
    """Same samples, same wall clock, same batch sequence numbers: a cell keeping only the
    fields of `aggs` and a cell keeping every field (and a sketch) emit the same rows for
    `aggs`, bit for bit, at the same moments, and count the same late / ooo / dup / invalid /
    evicted samples (small rings and admissions make eviction and lateness common)."""
    aggs_t = tuple(sorted(aggs))
    compact = CellParams(RES, adm, aggs_t, nwin=nwin, pre=pre)
    full = CellParams(RES, adm, FULL, nwin=nwin, pre=pre)
    assert compact.cell_bytes() < full.cell_bytes()
    cells = Cells.of([compact, full])
    want = {AGG_TYPES[a] for a in aggs_t}

    def rows_of(rows: np.ndarray, cell: int) -> list[tuple[int, int, str]]:
        return [(a, t, v.hex()) for c, a, t, v in rows.tolist() if c == cell and a in want]

    for now, ts, vs, seq in random_batches(seed, nwin):
        early = [rows_of(cells.apply(i, ts, vs, now_ms=now, seq=seq), i) for i in range(2)]
        assert early[0] == early[1]
        fin = cells.finalise(now)
        assert rows_of(fin, 0) == rows_of(fin, 1)
    fin = cells.finalise(10**12)
    assert rows_of(fin, 0) == rows_of(fin, 1)
    for name in COUNTERS:
        assert getattr(cells.cell(0), name) == getattr(cells.cell(1), name), name
