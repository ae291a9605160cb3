"""The aggregation store alone (csrc/aggstore.c through m3shm/aggstore.py): plans asked for in
batches, records applied to cells in the drain, drop rules, two-phase finalise, eviction spill,
replay, and a SIGKILLed owner that leaves its cells behind."""

from __future__ import annotations

import mmap
import os
import random
import signal
import struct
import time
from collections import Counter

import numpy as np
import pytest

from m3shm.aggstore import CELL_AGG_LABEL, AggStore
from m3shm.rules.aggwin import AGG_NAMES, CellParams, Cells
from m3shm.shm import Segment, SegParams, canonical_labels, make_record, parse_labels
from m3shm.storage.records import LabelTable, build_records
from tests.forking import fork_call

pytestmark = pytest.mark.native

MIN = 60_000


@pytest.fixture
def seg():
    path = f"/dev/shm/m3shm-test-{os.getpid()}-{random.getrandbits(32):08x}"
    s = Segment.create(path, SegParams(num_shards=1, num_producers=1, lane_bytes=1 << 16,
                                       series_per_shard=256, arena_bytes=1 << 20,
                                       block_ms=7_200_000, seq_base=1000))
    st = AggStore.create(s, 1 << 20)
    yield s, st
    st.unlink()
    s.unlink()


def publish(seg: Segment, *recs: bytes) -> int:
    seq = seg.reserve_next(0, b"".join(recs))
    assert seq is not None
    seg.publish(0)
    return seq


def last_cell(res_ms: int = MIN, adm: int = MIN, aggs: tuple[str, ...] = ("Last",)):
    return CellParams(res_ms, adm, aggs, nwin=4).to_c()


def drain_all(st: AggStore, plan, now: int) -> tuple[int, int]:
    """Drain shard 0, installing plan(labels) -> (drop, params, meta) for every series asked."""
    applied = asked = 0
    while True:
        n, need = st.drain(0, 1024, now)
        applied += n
        if not len(need):
            return applied, asked
        asked += len(need)
        for slot, gen in need:
            labels = parse_labels(st.seg.series_labels(0, slot))
            drop, params, meta = plan(labels)
            st.install(0, slot, gen, drop, params, meta, [b""] * len(params))


def finalise(st: AggStore, now: int) -> tuple[list[tuple[dict, int, float]], object]:
    p, done = st.prepare(0, now)
    assert done
    table = LabelTable.from_blob(p.labels, p.loffs)
    out = [(parse_labels(table.labels(int(r["stream"]))), int(r["ts"]), float(r["value"]))
           for r in p.rows]
    return out, p


def test_plans_are_asked_once_per_series_and_points_finalise(seg):
    s, st = seg
    t0 = 1_000 * MIN
    recs = [make_record({"__name__": f"m{i}"}, [t0 + 10_000, t0 + 50_000], [i, i + 0.5], 1)
            for i in range(5)]
    publish(s, *recs)
    publish(s, make_record({"__name__": "m0"}, [t0 + 70_000], [9.0], 1))
    applied, asked = drain_all(st, lambda labels: (False, [last_cell()], [0]), t0)
    assert (applied, asked) == (6, 5)
    assert st.stats(0)["cells"] == 5
    # raw samples stored as before
    ts, vs = s.read_series(0, 0, 0, 2**62)
    assert list(vs) == [0.0, 0.5, 9.0]
    # nothing final yet at t0 + 1m (window end t0 + 1m, admission 1m)
    rows, p = finalise(st, t0 + MIN + 59_999)
    assert rows == []
    rows, p = finalise(st, t0 + 2 * MIN)
    assert sorted((r[0]["__name__"], r[1], r[2]) for r in rows) == sorted(
        [(f"m{i}", t0 + MIN, i + 0.5) for i in range(5)])
    # phase 1 changed nothing: the same rows again until committed
    rows2, p2 = finalise(st, t0 + 2 * MIN)
    assert sorted(map(repr, rows2)) == sorted(map(repr, rows))
    st.commit(p2)
    rows3, _ = finalise(st, t0 + 2 * MIN)
    assert rows3 == []
    assert st.stats(0)["points"] == 5
    # a sample for the committed window is late; the next window still gets m0's 9.0
    publish(s, make_record({"__name__": "m0"}, [t0 + 30_000], [7.0], 1))
    drain_all(st, lambda labels: (False, [last_cell()], [0]), t0 + 2 * MIN)
    assert st.stats(0)["late"] == 1
    rows, p = finalise(st, t0 + 3 * MIN)
    assert [(r[0]["__name__"], r[1], r[2]) for r in rows] == [("m0", t0 + 2 * MIN, 9.0)]


def test_drop_rule_keeps_cells_not_raw_and_agg_label(seg):
    s, st = seg
    t0 = 1_000 * MIN
    publish(s, make_record({"__name__": "dbg", "a": "1"}, [t0 + 1, t0 + 2], [1.0, 3.0], 1))
    params = [CellParams(MIN, 0, ("Max", "Min"), nwin=2).to_c()]
    drain_all(st, lambda labels: (True, params, [3 | CELL_AGG_LABEL << 24]), t0)
    assert s.read_series(0, 0, 0, 2**62)[0].size == 0
    assert st.stats(0)["raw_dropped"] == 2
    rows, p = finalise(st, t0 + MIN)
    got = sorted((tuple(sorted(r[0].items())), r[2]) for r in rows)
    assert got == [((("__name__", "dbg"), ("a", "1"), ("m3_aggregation", "max")), 3.0),
                   ((("__name__", "dbg"), ("a", "1"), ("m3_aggregation", "min")), 1.0)]
    assert {int(r["ns"]) for r in p.rows} == {3}
    # the rows build into records of the target namespace (label sets are canonical)
    batch, length, nrec = build_records(LabelTable.from_blob(p.labels, p.loffs),
                                        p.rows["stream"], p.rows["ts"], p.rows["value"], 4)
    assert nrec == 2 and length == len(batch)


def test_evicted_windows_go_through_the_spill(seg):
    s, st = seg
    t0 = 1_000 * MIN
    params = [CellParams(1000, 3_600_000, ("Count",), nwin=2).to_c()]
    # samples 1 s apart: each new window evicts the one two seconds back
    publish(s, make_record({"__name__": "x"}, [t0 + 1000 * i for i in range(1, 11)],
                           [1.0] * 10, 1))
    drain_all(st, lambda labels: (False, params, [0]), t0)
    assert st.stats(0)["spill_n"] == 8 and st.stats(0)["evicted"] == 8
    rows, p = finalise(st, t0)
    assert [r[1] for r in rows] == [t0 + 1000 * i for i in range(1, 9)]
    st.commit(p)
    assert st.stats(0)["spill_n"] == 0


def test_redrained_record_is_not_applied_twice_and_replay_aggregates(seg):
    s, st = seg
    t0 = 1_000 * MIN
    rec = make_record({"__name__": "c"}, [t0 + 5, t0 + 6], [1.0, 2.0], 1)
    seq = publish(s, rec, make_record({"__name__": "c"}, [t0 + 7], [4.0], 1))
    params = [CellParams(MIN, MIN, ("Sum",), nwin=2).to_c()]
    drain_all(st, lambda labels: (False, params, [0]), t0)
    # the same batch replayed on top (as after a crash mid-drain): skipped per cell
    n, off, need = st.apply_batch(rec, seq, 0, 1, t0, 0)
    assert (n, len(need)) == (1, 0)
    rows, _ = finalise(st, t0 + 2 * MIN)
    assert [r[2] for r in rows] == [7.0]


def test_replay_asks_for_plans_and_treats_watermark_windows_as_late(seg):
    s, st = seg
    t0 = 1_000 * MIN
    batch = make_record({"__name__": "r"}, [t0 + 1, t0 + MIN + 1], [1.0, 2.0], 1) + \
        make_record({"__name__": "q"}, [t0 + MIN + 2], [5.0], 1)
    params = [CellParams(MIN, MIN, ("Last",), nwin=4).to_c()]
    off, asked = 0, 0
    while True:
        n, off, need = st.apply_batch(batch, 42, 0, 1, t0 + 2 * MIN, off)
        if not len(need):
            break
        asked += len(need)
        for shard, slot, gen in need:
            st.install(shard, slot, gen, False, params, [0], [b""])
    assert asked == 2
    # replay watermark t0 + 2m: the window ending t0 + 1m was final then (late)
    assert st.stats(0)["late"] == 1
    rows, _ = finalise(st, t0 + 3 * MIN)
    assert sorted((r[0]["__name__"], r[1], r[2]) for r in rows) == [
        ("q", t0 + 2 * MIN, 5.0), ("r", t0 + 2 * MIN, 2.0)]


def test_owner_killed_keeps_cells(seg):
    s, st = seg
    t0 = 1_000 * MIN
    pid = os.fork()
    if pid == 0:  # the owner: drains, then dies without any cleanup
        try:
            publish(s, make_record({"__name__": "k"}, [t0 + 1, t0 + 2], [1.0, 2.0], 1))
            drain_all(st, lambda labels: (False, [last_cell()], [0]), t0)
        finally:
            os.kill(os.getpid(), 9)
    os.waitpid(pid, 0)
    s.recover_shard(0)
    assert st.recover(0) == 0
    assert st.plan(0, 0)[1:] == (1, 1)
    rows, _ = finalise(st, t0 + 2 * MIN)
    assert [(r[1], r[2]) for r in rows] == [(t0 + MIN, 2.0)]


def test_labels_canonical_with_agg_label_in_order(seg):
    s, st = seg
    t0 = 1_000 * MIN
    labels = {"__name__": "n", "a": "1", "m3_aggregation": "old", "z": "2"}
    publish(s, make_record(labels, [t0 + 1], [1.0], 1))
    params = [CellParams(MIN, 0, ("Last", "Count"), nwin=2).to_c()]
    drain_all(st, lambda labels: (False, params, [CELL_AGG_LABEL << 24]), t0)
    p, _ = st.prepare(0, t0 + MIN)
    table = LabelTable.from_blob(p.labels, p.loffs)
    got = sorted(table.labels(i) for i in range(len(table)))
    want = sorted(canonical_labels({**labels, "m3_aggregation": a}) for a in ("last", "count"))
    assert got == want
    assert np.all(np.diff(p.rows["stream"].astype(np.int64)) >= 0)


def test_a_plan_from_an_activation_keeps_the_old_one_for_earlier_samples(seg):
    """Rules activation at A: the new plan (namespace 1) takes samples stamped after A, the
    old one (namespace 0) those at or before A, in whatever order they arrive; the old plan is
    freed once its windows are final and written."""
    s, st = seg
    t0 = 1_000 * MIN
    act = t0 + 2 * MIN
    count = CellParams(MIN, MIN, ("Count",), nwin=4).to_c()
    publish(s, make_record({"__name__": "m"}, [act - 50_000], [1.0], 1))
    drain_all(st, lambda labels: (False, [count], [0]), act - 40_000)
    assert st.stats(0)["plans"] == 1
    gen = next(iter(s.live_series(0))).gen
    st.install(0, 0, gen, False, [count], [1], [b""], act)
    assert (st.stats(0)["plans"], st.stats(0)["cells"]) == (2, 2)
    # the same activation again (a replan repeated after a kill): the plan stays as it is
    st.install(0, 0, gen, False, [count], [1], [b""], act)
    assert (st.stats(0)["plans"], st.stats(0)["cells"]) == (2, 2)
    # one ahead of the activation first, then two behind it (arriving late), in one record
    publish(s, make_record({"__name__": "m"}, [act + 10_000, act - 30_000, act - 10_000],
                           [2.0, 3.0, 4.0], 1))
    drain_all(st, None, act + 5_000)
    publish(s, make_record({"__name__": "m"}, [act - 1], [5.0], 1))   # later still, not late
    drain_all(st, None, act + 30_000)

    def rows(now: int) -> list[tuple[int, int, float]]:
        p, done = st.prepare(0, now)
        assert done
        st.commit(p)
        return sorted((int(r["ns"]), int(r["ts"]), float(r["value"])) for r in p.rows)

    assert rows(act + MIN - 1) == []
    # the window ending at the activation: every sample stamped in it, all in the old plan
    assert rows(act + MIN) == [(0, act, 4.0)]
    assert (st.stats(0)["plans"], st.stats(0)["cells"]) == (1, 1)   # the old plan is freed
    assert rows(act + 2 * MIN) == [(1, act + MIN, 1.0)]
    assert st.stats(0)["late"] == 0
    # a sample stamped before the activation, after the old plan's windows were written: late
    publish(s, make_record({"__name__": "m"}, [act - 2], [6.0], 1))
    drain_all(st, None, act + 2 * MIN)
    assert st.stats(0)["late"] == 1


def test_increase_state_goes_on_across_an_activation(seg):
    """A series whose plan changes at activation A (Increase -> Sum cells in both): the new
    cell's first sample takes the old cell's Increase state, so the increment from the last
    sample at or before A to the first after it counts once, in the new plan's window; and a
    record holding samples of both sides reaches the old plan first."""
    s, st = seg
    t0 = 1_000 * MIN
    act = t0 + 2 * MIN
    inc = CellParams(MIN, MIN, ("Sum",), nwin=4, pre=("Increase",)).to_c()
    publish(s, make_record({"__name__": "c"}, [act - 50_000], [10.0], 1))
    drain_all(st, lambda labels: (False, [inc], [0]), act - 40_000)
    gen = next(iter(s.live_series(0))).gen
    st.install(0, 0, gen, False, [inc], [1], [b""], act)
    # one record across the activation: 13 (old), then 20 and 21 (new); then a reset to 2
    publish(s, make_record({"__name__": "c"}, [act - 10_000, act + 5_000, act + 6_000],
                           [13.0, 20.0, 21.0], 1))
    publish(s, make_record({"__name__": "c"}, [act + 7_000], [2.0], 1))
    drain_all(st, None, act + 8_000)

    def rows(now: int) -> list[tuple[int, int, float]]:
        p, done = st.prepare(0, now)
        assert done
        st.commit(p)
        return sorted((int(r["ns"]), int(r["ts"]), float(r["value"])) for r in p.rows)

    assert rows(act + MIN) == [(0, act, 3.0)]
    # 13 -> 20 (the increment across the activation), 20 -> 21, a reset to 2
    assert rows(act + 2 * MIN) == [(1, act + MIN, 7.0 + 1.0 + 2.0)]
    assert st.stats(0)["ooo"] == 0 and st.stats(0)["late"] == 0


def test_an_idle_replaced_plan_is_freed_once_its_windows_are_final(seg):
    """No cell is due (the series went quiet): the finalise still visits the slot when the old
    plan can go, and frees it."""
    s, st = seg
    t0 = 1_000 * MIN
    act = t0 + 10 * MIN
    count = CellParams(MIN, MIN, ("Count",), nwin=4).to_c()
    publish(s, make_record({"__name__": "m"}, [t0 + 1], [1.0], 1))
    drain_all(st, lambda labels: (False, [count], [0]), t0 + 2)
    p, _ = st.prepare(0, t0 + 3 * MIN)
    st.commit(p)
    assert len(p.rows) == 1
    gen = next(iter(s.live_series(0))).gen
    st.install(0, 0, gen, False, [count], [1], [b""], act)
    assert st.stats(0)["plans"] == 2
    for now in (act, act + MIN - 1):
        p, _ = st.prepare(0, now)
        st.commit(p)
        assert st.stats(0)["plans"] == 2
    p, _ = st.prepare(0, act + MIN)
    st.commit(p)
    assert (st.stats(0)["plans"], st.stats(0)["cells"]) == (1, 1) and len(p.rows) == 0


def _drain_batches(st: AggStore, batches: list[tuple[int, bytes]], head: mmap.mmap,
                   now: int, params: list) -> None:
    """An owner: applies batches in order, installing plans when asked; word 0 of head is the
    next batch (a lane head that moves after each whole batch, as the drain's does)."""
    while True:
        i = struct.unpack_from("<Q", head, 0)[0]
        if i >= len(batches):
            return
        seq, batch = batches[i]
        off = 0
        while True:
            _, off, need = st.apply_batch(batch, seq, 0, 1, now, off)
            if not len(need):
                break
            for shard, slot, gen in need:
                st.install(shard, slot, gen, True, params,  # cells only: no raw blocks
                           [CELL_AGG_LABEL << 24] * len(params), [b""] * len(params))
        struct.pack_into("<Q", head, 0, i + 1)


def drain_with_kills(s, st, batches: list[tuple[int, bytes]], t0: int, params: list,
                     rnd: random.Random) -> int:
    """Drain ``batches`` in forked owners SIGKILLed at random points, each successor
    recovering the shard first as a restarted worker does, until all are applied; returns
    the number of owners killed."""
    head = mmap.mmap(-1, 8)
    kills = 0
    while struct.unpack_from("<Q", head, 0)[0] < len(batches):
        pid = fork_call(_drain_batches, st, batches, head, t0, params)
        time.sleep(rnd.random() * 0.004)
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        kills += os.WIFSIGNALED(status)
        s.recover_shard(0)  # as a restarted worker does before it drains
        st.recover(0)
    return kills


def test_owner_sigkilled_mid_record_counts_each_sample_once(seg):
    """Batches of long records are applied by a child SIGKILLed at random moments, most of
    them inside the C apply (part of a record's samples on a cell); a fresh owner recovers the
    shard and re-drains from the batch the killed one was in. Every window must hold exactly
    the sum and count of the distinct samples (an in-place apply without an undo doubles the
    part applied before the kill)."""
    s, st = seg
    rnd = random.Random(9)
    t0 = 1_000 * MIN
    params = [CellParams(MIN, MIN, ("Sum", "Count"), nwin=8).to_c(),
              CellParams(20_000, MIN, ("Sum", "Count"), nwin=16).to_c()]
    want: Counter = Counter()
    batches: list[tuple[int, bytes]] = []
    seq = 5000
    for _ in range(60):
        seq += 1
        recs = []
        for _ in range(24):
            ts = [t0 + rnd.randrange(12) * 20_000 + rnd.randrange(1, 20_000)  # no window edge
                  for _ in range(512)]
            vals = [float(rnd.randrange(1, 100)) for _ in ts]
            recs.append(make_record({"__name__": "c"}, ts, vals, 1))
            for t, v in zip(ts, vals, strict=True):
                for res in (MIN, 20_000):  # both cells' rows, summed per (agg, end)
                    end = (t // res + 1) * res
                    want[("sum", end)] += v
                    want[("count", end)] += 1
        batches.append((seq, b"".join(recs)))
    assert drain_with_kills(s, st, batches, t0, params, rnd) > 5
    rows, _ = finalise(st, t0 + 100 * MIN)
    got: Counter = Counter()
    for labels, ts, value in rows:
        got[(labels["m3_aggregation"], ts)] += value
    assert got == want


def test_owner_sigkilled_mid_record_is_exact_for_compact_cells(seg):
    """The kill test above with compact cells (docs/formats/aggwin.md): a Last cell (16-byte
    windows), Min/Max (24 bytes) and an Increase -> Sum cell whose transform state sits after
    the header. The undo saves exactly what a record can change in each layout, so after any
    number of kills the rows equal those of the same records applied once, in order, to
    cells in process memory (bit for bit, late and early-finalised windows included)."""
    s, st = seg
    rnd = random.Random(17)
    t0 = 1_000 * MIN
    cparams = [CellParams(MIN, MIN, ("Last",), nwin=4),
               CellParams(20_000, MIN, ("Min", "Max"), nwin=16),
               CellParams(MIN, MIN, ("Sum",), nwin=8, pre=("Increase",))]
    assert [p.layout()[1] for p in cparams] == [16, 24, 24]
    params = [p.to_c() for p in cparams]
    ref = Cells.of(cparams)
    want: dict[tuple[str, int], float] = {}

    def keep(rows: np.ndarray) -> None:
        for _, agg, ts, value in rows.tolist():
            want[(AGG_NAMES[agg].lower(), ts)] = value

    batches: list[tuple[int, bytes]] = []
    seq, t = 7000, t0
    for _ in range(40):
        seq += 1
        recs = []
        for _ in range(24):
            # time moves on through the records (so the Increase chain skips none as out of
            # order), 1-3 ms apart: ~16 minutes in all, past every ring (early finalising)
            ts = (t + np.cumsum([rnd.randrange(1, 4) for _ in range(512)])).tolist()
            t = ts[-1]
            vals = [float(rnd.randrange(1, 100)) for _ in ts]
            recs.append(make_record({"__name__": "c"}, ts, vals, 1))
            for i in range(len(cparams)):
                keep(ref.apply(i, ts, vals, now_ms=t0))
        batches.append((seq, b"".join(recs)))
    keep(ref.finalise(t0 + 100 * MIN))
    assert ref.cell(2).ooo == 0 and ref.cell(0).evicted > 5
    assert drain_with_kills(s, st, batches, t0, params, rnd) > 5
    rows, _ = finalise(st, t0 + 100 * MIN)
    got = {(labels["m3_aggregation"], ts): value for labels, ts, value in rows}
    assert len(got) == len(rows) and len(want) > 20
    assert got == want


def _group_forward(fwd: int, rule: int, rows: list[tuple[int, float]]) -> bytes:
    """A forward (source 0) of window values to the rollup group series {__name__="g"}."""
    from m3shm.rules.forward import build_records as build_rollup

    batch, _ = build_rollup([canonical_labels({"__name__": "g"})], [rule], [0] * len(rows),
                            [t for t, _ in rows], [v for _, v in rows], 1, fwd, 0, MIN)
    return bytes(batch)


def _changed_group(s: Segment, st: AggStore) -> int:
    """A group series whose rollup rule changes at activation A (rule 5 -> rule 6, both a Sum
    with an Add post transform: a rolled-up counter), old windows A - 1m (10) and A (5, its
    forward drained after the replan), new window A + 1m (7). Returns A."""
    act = 1_002 * MIN
    gsum = CellParams(MIN, MIN, ("Sum",), nwin=4, post=("Add",)).to_c()
    publish(s, _group_forward(1, 5, [(act - MIN, 10.0)]))
    _, need = st.drain(0, 1024, act - MIN)
    ((slot, gen),) = need
    st.install(0, int(slot), int(gen), False, [gsum], [0], [b""], rules=[5])
    st.drain(0, 1024, act - MIN)
    st.install(0, int(slot), int(gen), False, [gsum], [0], [b""], act, rules=[6])
    publish(s, _group_forward(2, 5, [(act, 5.0)]))
    publish(s, _group_forward(3, 6, [(act + MIN, 7.0)]))
    st.drain(0, 1024, act + 1)
    assert st.stats(0)["rollup_unmatched"] == 0
    return act


def _round(st: AggStore, now: int, commit: bool = True) -> list[tuple[int, float]]:
    """One finalise round; its prepare is repeated (as after a kill) and must agree."""
    p1, done = st.prepare(0, now)
    assert done
    p2, _ = st.prepare(0, now)
    out = sorted((int(r["ts"]), float(r["value"])) for r in p1.rows)
    assert sorted((int(r["ts"]), float(r["value"])) for r in p2.rows) == out
    if commit:
        st.commit(p2)
    return out


@pytest.mark.parametrize("finalise_between", [True, False])
def test_a_changed_rollup_rules_group_counter_goes_on_across_an_activation(seg,
                                                                          finalise_between):
    """The new group cell's total continues from the old cell's (_changed_group). With
    finalise_between the old cell's last window is final (and the old plan freed) a round
    before the new cell's first window; without, both are due in the same round, and the new
    cell waits one round for the old total. Prepare and commit agree (_round)."""
    s, st = seg
    act = _changed_group(s, st)
    if finalise_between:
        assert _round(st, act + MIN) == [(act - MIN, 10.0), (act, 15.0)]
        assert (st.stats(0)["plans"], st.stats(0)["cells"]) == (1, 1)   # old plan freed
        assert _round(st, act + 2 * MIN) == [(act + MIN, 22.0)]
    else:
        # both due at once: the old cell's windows now, the new one's a round later
        assert _round(st, act + 2 * MIN) == [(act - MIN, 10.0), (act, 15.0)]
        assert _round(st, act + 2 * MIN) == [(act + MIN, 22.0)]
    assert _round(st, act + 5 * MIN) == []
    assert st.stats(0)["late"] == 0


def test_a_handed_over_group_total_survives_its_owner_sigkilled(seg):
    """The owner takes the old total over (the old plan is freed), prepares the new cell's
    first window and is SIGKILLed before the commit: its successor prepares the same point."""
    s, st = seg
    act = _changed_group(s, st)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the owner: one round, a prepare, then death without any cleanup
        try:
            os.close(r)
            _round(st, act + 2 * MIN)
            os.write(w, repr(_round(st, act + 3 * MIN, commit=False)).encode())
        finally:
            os.kill(os.getpid(), signal.SIGKILL)
    os.close(w)
    with os.fdopen(r) as f:
        child = f.read()
    os.waitpid(pid, 0)
    assert child == repr([(act + MIN, 22.0)])
    s.recover_shard(0)
    assert st.recover(0) == 0
    assert st.stats(0)["plans"] == 1   # the old plan was freed before the kill
    assert _round(st, act + 3 * MIN) == [(act + MIN, 22.0)]
    assert _round(st, act + 5 * MIN) == []
