"""Planning new series in batches: series grouped in C by the labels the rules read
(csrc/plangroup.c, m3shm/rules/projection.py), one plan installed for a whole group
(m3_aggst_install_many), and the Aggregator's resolve over both (m3shm/workers/aggregate.py):
the plans equal what matching each series alone gives, excludeBy, and a rules-change replan
that skips the series whose cells do not change."""

from __future__ import annotations

import contextlib
import os
import random
import time
from types import SimpleNamespace

import numpy as np
import pytest

from m3shm._native import lib
from m3shm.aggstore import KIND_ROLLUP, AggStore
from m3shm.config import DownsampleConfig, load
from m3shm.rules.aggwin import CellParams
from m3shm.rules.matcher import CompiledRules
from m3shm.rules.projection import ALL, NAMES, SKIP, Projection, rules_projection
from m3shm.rules.ruleset import parse_rules
from m3shm.shm import Segment, SegParams, canonical_labels, make_record, parse_labels
from m3shm.storage.records import LabelTable
from m3shm.workers.aggregate import GONE, Aggregator
from m3shm.workers.rollup import RollupSource

pytestmark = pytest.mark.native

MIN = 60_000
T0 = (int(time.time() * 1000) // MIN - 2) * MIN  # the Aggregator drains at the clock's now


@contextlib.contextmanager
def segment(num_shards: int = 1, series_per_shard: int = 1024, lane_bytes: int = 1 << 20,
            arena_bytes: int = 1 << 22, cell_bytes: int = 1 << 23):
    """A fresh segment and its aggregation store in /dev/shm, unlinked after."""
    path = f"/dev/shm/m3shm-test-{os.getpid()}-{random.getrandbits(32):08x}"
    s = Segment.create(path, SegParams(num_shards=num_shards, num_producers=1,
                                       lane_bytes=lane_bytes, series_per_shard=series_per_shard,
                                       arena_bytes=arena_bytes, block_ms=7_200_000,
                                       seq_base=1000))
    st = AggStore.create(s, cell_bytes)
    try:
        yield s, st
    finally:
        st.unlink()
        s.unlink()


@pytest.fixture
def seg():
    with segment() as pair:
        yield pair


def publish(s: Segment, series: list[dict[str, str]], ts: int = T0 + 1) -> None:
    batch = b"".join(make_record(lab, [ts], [1.0], 1) for lab in series)
    assert s.reserve_next(0, batch) is not None
    s.publish(0)


def asked(st: AggStore) -> np.ndarray:
    """[slot, gen] of every series the drain asks a plan for (none installed)."""
    n, need = st.drain(0, 1 << 16, T0)
    assert n == 0
    return need


def test_projection_of_rules():
    rs = parse_rules({
        "mappingRules": [{"name": "m", "filter": "name:disk* dc:eu", "policies": ["10s:2d"]}],
        "rollupRules": [{"name": "r", "filter": "__name__:x app:!debug",
                         "transforms": [{"rollup": {"metricName": "xs",
                                                    "groupBy": ["svc", "env"]}}]}]}, "t")
    p = rules_projection(rs)
    assert p == Projection(frozenset({"name", "__name__", "dc", "app", "svc", "env"}), SKIP)
    rs2 = parse_rules({"rollupRules": [{"name": "r", "filter": "__name__:x",
                                        "transforms": [{"rollup": {"metricName": "xs",
                                                                   "excludeBy": ["pod"]}}]}]},
                      "t")
    assert rules_projection(rs2).others == ALL
    assert rules_projection(parse_rules(None, "t")) == Projection(frozenset(), SKIP)
    assert (SKIP, NAMES, ALL) == (lib.M3_PROJ_SKIP, lib.M3_PROJ_NAMES, lib.M3_PROJ_ALL)


def test_group_equal_projections_share_a_group(seg):
    s, st = seg
    series = [{"__name__": "a", "x": "1", "y": "1"},   # 0
              {"__name__": "a", "x": "1", "y": "2"},   # 1: differs in y only
              {"__name__": "a", "x": "2", "y": "1"},   # 2: differs in x
              {"__name__": "b", "x": "1", "y": "1"},   # 3: another name
              {"__name__": "a", "x": "1"},             # 4: no y
              {"__name__": "a", "x": "1", "z": "1"}]   # 5: z instead of y
    publish(s, series)
    need = asked(st)
    order = [parse_labels(s.series_labels(0, int(slot))) for slot in need[:, 0]]
    idx = [order.index(lab) for lab in series]
    slots, gens = need[idx, 0], need[idx, 1]

    def groups(names: set[str], others: int) -> list[int]:
        g, reps = st.group(0 * slots, slots, gens, names, others)
        assert sorted(g[reps].tolist()) == list(range(len(reps)))  # reps name their groups
        return g.tolist()

    g = groups({"__name__", "x"}, SKIP)
    assert g[0] == g[1] == g[4] == g[5] and len({g[0], g[2], g[3]}) == 3
    g = groups({"__name__", "x"}, NAMES)
    assert g[0] == g[1] and len({g[0], g[2], g[3], g[4], g[5]}) == 5
    assert len(set(groups({"x"}, ALL))) == 6
    assert len(set(groups(set(), SKIP))) == 1  # the default rules read nothing: one plan
    # a series of another generation (or gone) is in no group
    g, _ = st.group(0 * slots, slots, gens + np.uint32(1), {"x"}, SKIP)
    assert set(g.tolist()) == {GONE}


def test_group_agrees_with_the_python_projection(seg):
    """C groups exactly as Projection.key does, for random label sets and projections."""
    s, st = seg
    rnd = random.Random(7)
    names = ["__name__", "a", "b", "c", "name"]
    series = []
    seen = set()
    while len(series) < 300:
        lab = {"__name__": rnd.choice(["m", "n"])}
        for k in names[1:]:
            if rnd.random() < 0.6:
                lab[k] = rnd.choice(["", "1", "2", "10"])
        key = canonical_labels(lab)
        if key not in seen:
            seen.add(key)
            series.append(lab)
    publish(s, series)
    need = asked(st)
    labels = [parse_labels(s.series_labels(0, int(slot))) for slot in need[:, 0]]
    for _ in range(20):
        proj = Projection(frozenset(rnd.sample(names, rnd.randint(0, 3))),
                          rnd.choice([SKIP, NAMES, ALL]))
        g, reps = st.group(0 * need[:, 0], need[:, 0], need[:, 1], proj.names, proj.others)
        keys = [proj.key(lab) for lab in labels]
        for i in range(len(labels)):
            j = int(reps[g[i]])
            assert keys[i] == keys[j]
        assert len(reps) == len(set(keys))


def test_install_many_installs_one_plan_per_series(seg):
    s, st = seg
    series = [{"__name__": "c", "i": str(i)} for i in range(5)]
    publish(s, series)
    need = asked(st)
    slots, gens = need[:, 0].copy(), need[:, 1].copy()
    gens[4] += 1  # not this generation: not installed
    params = [CellParams(MIN, MIN, ("Sum",), nwin=4).to_c()]
    assert st.install_many(0 * slots, slots, gens, False, params, [0], [b""]) == 4
    for slot in slots[:4].tolist():
        assert st.plan(0, slot)[1:] == (1, 1)
    assert st.plan(0, int(slots[4]))[1] == 0
    n, need = st.drain(0, 1 << 16, T0)  # the fifth series is asked for again
    assert n == 4 and need[:, 0].tolist() == [slots[4]]
    st.install_many(0 * need[:, 0], need[:, 0], need[:, 1], False, params, [0], [b""])
    assert st.drain(0, 1 << 16, T0)[0] == 1
    # each series' cell took its own sample: one row each under its own labels
    p, _ = st.prepare(0, T0 + 3 * MIN)
    table = LabelTable.from_blob(p.labels, p.loffs)
    got = sorted(parse_labels(table.labels(int(r["stream"])))["i"] for r in p.rows)
    assert got == [str(i) for i in range(5)]
    with pytest.raises(Exception, match="installing the plans"):
        st.install_many(0 * gens[:1], np.array([1 << 30], dtype=np.uint32), gens[:1], False,
                        params, [0], [b""])


RULES = {
    "mappingRules": [{"name": "eu fine", "filter": "__name__:x* dc:eu",
                      "policies": ["10s:2d"]}],
    "rollupRules": [{"name": "by svc", "filter": "__name__:x*",
                     "transforms": [{"rollup": {"metricName": "x_by_svc",
                                                "groupBy": ["svc"]}}],
                     "policies": ["1m:30d"]}]}


def aggregator(s: Segment, st: AggStore, rules: dict) -> Aggregator:
    """An Aggregator over the segment with a worker stand-in: the config and, per namespace,
    a pipeline object (planning only checks that a namespace has one; nothing is written)."""
    cfg = load(downsample=DownsampleConfig(rules=rules))
    w = SimpleNamespace(cfg=cfg, index=0, ns_by_id={
        i: SimpleNamespace(pipeline=object()) for i in range(len(cfg.namespaces))})
    agg = Aggregator(w, s, st)
    RollupSource(agg, cfg.downsample.forward_delay_ms)
    return agg


def counted(agg: Aggregator) -> list[int]:
    calls = [0]
    inner = agg.plan_cells

    def plan_cells(labels, compiled):
        calls[0] += 1
        return inner(labels, compiled)

    agg.plan_cells = plan_cells
    return calls


def counted_rounds(agg: Aggregator) -> list[int]:
    """Count the Aggregator's planning rounds (calls of resolve)."""
    rounds = [0]
    inner = agg.resolve

    def resolve(needs, **kw):
        rounds[0] += 1
        return inner(needs, **kw)

    agg.resolve = resolve
    return rounds


def plan_cells_of(agg: Aggregator, s: Segment, shard: int = 0) -> dict[tuple, tuple]:
    """series labels -> (flags, cells) of its installed plan."""
    out = {}
    for slot, _ in s.live_slots(shard).tolist():
        lab = parse_labels(s.series_labels(shard, slot))
        out[tuple(sorted(lab.items()))] = agg.store.plan(shard, slot)[1:]
    return out


def test_resolve_matches_once_per_projection_with_per_series_plans(seg):
    s, st = seg
    agg = aggregator(s, st, RULES)
    calls = counted(agg)
    series = [{"__name__": "x1", "dc": dc, "svc": svc, "pod": str(p)}
              for dc in ("eu", "us") for svc in ("a", "b") for p in range(25)]
    series += [{"__name__": "y", "dc": "eu", "pod": str(p)} for p in range(25)]
    publish(s, series)
    assert agg.drain(0, 1) == len(series) + 1  # one plan round, then every record
    # pods differ only in a label no rule reads: one match per (dc, svc) and one for y
    assert calls[0] == 5
    # every series got exactly the plan matching it alone gives
    compiled = CompiledRules(parse_rules(RULES, "t"))
    for lab, (flags, ncells) in plan_cells_of(agg, s).items():
        d = dict(lab)
        drop, cells = agg._plan_cells(d, compiled)
        assert (flags, ncells) == (1 | (2 if drop else 0), len(cells)), d
    # the rollup cells carry each series' own group
    assert rollup_groups(st) == {(("__name__", "x_by_svc"), ("svc", "a")): 50,
                                 (("__name__", "x_by_svc"), ("svc", "b")): 50}


def rollup_groups(st: AggStore) -> dict[tuple, int]:
    """Group labels of the finalised rollup rows -> rows (one per input series here)."""
    p, _ = st.prepare(0, T0 + 100 * MIN)
    got: dict[tuple, int] = {}
    for r in p.rows[p.rows["kind"] == KIND_ROLLUP]:
        blob = p.labels[int(p.loffs[r["stream"]]):int(p.loffs[r["stream"] + 1])]
        g = tuple(sorted(parse_labels(blob[:-4]).items()))  # canonical labels + rule id
        got[g] = got.get(g, 0) + 1
    return got


def test_exclude_by_plans_every_series_with_its_own_group(seg):
    s, st = seg
    rules = {"rollupRules": [{"name": "no pod", "filter": "__name__:x",
                              "transforms": [{"rollup": {"metricName": "x_all",
                                                         "excludeBy": ["pod"]}}],
                              "policies": ["1m:30d"]}]}
    agg = aggregator(s, st, rules)
    series = [{"__name__": "x", "svc": svc, "pod": str(p)} for svc in "ab" for p in range(3)]
    publish(s, series)
    calls = counted(agg)
    agg.drain(0, 1)
    assert calls[0] == 6  # every label may name the group: a match per series
    assert rollup_groups(st) == {(("__name__", "x_all"), ("svc", "a")): 3,
                                 (("__name__", "x_all"), ("svc", "b")): 3}


def test_rules_change_replans_only_series_whose_cells_change(seg):
    s, st = seg
    agg = aggregator(s, st, RULES)
    agg.install_rules(CompiledRules(parse_rules(RULES, "t")), 1, 0)  # as RuleSync at start
    agg.activate_now(0, 1)
    series = [{"__name__": "x1", "dc": dc, "svc": "a", "pod": str(p)}
              for dc in ("eu", "us", "ap") for p in range(10)]
    publish(s, series)
    agg.drain(0, 1)
    before = plan_cells_of(agg, s)
    new = dict(RULES, mappingRules=[{"name": "us fine", "filter": "__name__:x* dc:us",
                                     "policies": ["10s:2d"]}])
    compiled = CompiledRules(parse_rules(new, "t"))
    calls = counted(agg)
    planned = agg.stats["planned"]
    agg.install_rules(compiled, 2, T0 + 10 * MIN)
    assert agg._maybe_activate(0, 1, None) == 30  # every live series considered ...
    assert agg.stats["planned"] - planned == 20   # ... eu and us changed, ap did not
    assert calls[0] == 6  # one match per (dc) group and version (new and before)
    # cells: 10s (the dc's mapping rule) + the default 1m + the rollup's 1m
    assert {dict(lab)["dc"]: n for lab, (_, n) in before.items()} == {"eu": 3, "us": 2,
                                                                        "ap": 2}
    after = plan_cells_of(agg, s)
    assert {dict(lab)["dc"]: n for lab, (_, n) in after.items()} == {"eu": 2, "us": 3,
                                                                       "ap": 2}


def test_replay_and_drain_plan_every_shard_in_one_go():
    """A batch spreads its series over every shard: replay lists the planless series of all
    the worker's shards at the first stop, and the drain plans all its shards' at once, so
    the default rules (which read no label) make one match for the whole batch."""
    with segment(num_shards=4, series_per_shard=256, lane_bytes=1 << 18,
                 arena_bytes=1 << 20, cell_bytes=1 << 20) as (s, st):
        agg = aggregator(s, st, None)
        series = [{"__name__": "m", "i": str(i)} for i in range(200)]
        batch = b"".join(make_record(lab, [T0 + 1], [1.0], 4) for lab in series)
        calls = counted(agg)
        rounds = counted_rounds(agg)
        assert agg.replay_batch(batch, 7, 0, 4) == 200
        assert (rounds[0], calls[0]) == (1, 1)
        assert sum(st.stats(sh)["plans"] for sh in range(4)) == 200
        assert all(st.stats(sh)["plans"] for sh in range(4))  # every shard had some
        more = [{"__name__": "m", "j": str(i)} for i in range(200)]
        assert s.reserve_next(0, b"".join(make_record(lab, [T0 + 2], [1.0], 4)
                                          for lab in more)) is not None
        s.publish(0)
        assert agg.drain(0, 4) == 200 + 1  # every record, one planning round
        assert (rounds[0], calls[0]) == (2, 1)  # the plan of that projection was remembered
        assert sum(st.stats(sh)["plans"] for sh in range(4)) == 400


def test_replay_plans_more_series_than_one_list_and_more_than_64_shards():
    """A batch with more new series than the need list holds (4,096), over 70 shards (more
    than one listing window): every series planned, in two rounds."""
    with segment(num_shards=70, series_per_shard=256, lane_bytes=1 << 16,
                 arena_bytes=1 << 18, cell_bytes=1 << 20) as (s, st):
        agg = aggregator(s, st, None)
        batch = b"".join(make_record({"__name__": "m", "i": str(i)}, [T0 + 1], [1.0], 70)
                         for i in range(5000))
        rounds = counted_rounds(agg)
        assert agg.replay_batch(batch, 7, 0, 70) == 5000
        assert rounds[0] == 2
        assert sum(st.stats(sh)["plans"] for sh in range(70)) == 5000
        assert agg.replay_batch(batch, 8, 0, 70) == 5000  # planned: no round
        assert rounds[0] == 2
