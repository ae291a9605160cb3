"""ROLLUP_IN records (csrc/rollup.c): building, validation, routing through real lanes and
commit-log replay, the group plan, and exactly-once application to group cells (a source
retrying a forward, a forward committed in parts, an owner SIGKILLed mid-apply)."""

from __future__ import annotations

import mmap
import os
import random
import signal
import struct
import time

import numpy as np
import pytest

from m3shm._native import ffi, lib
from m3shm.errors import CorruptError, InvalidArgumentError
from m3shm.rules.aggwin import CellParams, Cells
from m3shm.rules.forward import ForwardTable, build_records, check_record, split_records, tail_of
from m3shm.rules.matcher import CompiledRules
from m3shm.rules.rollup_plan import group_cell_for, group_plans, rule_id, rules_by_id
from m3shm.rules.ruleset import parse_yaml
from m3shm.shm import REC_HEADER, canonical_labels, labels_hash
from tests.forking import fork_call

pytestmark = pytest.mark.native  # also run against the ASan+UBSan build (make test-asan)

RULES = """
rollupRules:
  - name: requests by endpoint
    filter: "__name__:http_requests_total"
    transforms:
      - transform: {type: Increase}
      - rollup: {metricName: http_requests_by_endpoint_total, groupBy: [service, endpoint],
                 aggregations: [Sum]}
      - transform: {type: Add}
    storagePolicies: [1s:1h, 1m:30d]
"""

def canon(**labels: str) -> bytes:
    return canonical_labels(labels)


def test_build_splits_groups_numbers_records_and_routes_by_group_hash() -> None:
    ga, gb = canon(__name__="a", x="1"), canon(__name__="b")
    rows_g = np.array([1] * 3 + [0] * 600, dtype=np.uint32)
    ts = np.arange(len(rows_g), dtype=np.int64) * 1000
    vals = np.arange(len(rows_g), dtype=np.float64)
    batch, n = build_records([ga, gb], [7, 9], rows_g, ts, vals, 16, fwd=123, source=1,
                             res_ms=1000)
    recs = split_records(batch)
    assert n == len(recs) == 3  # group 0: 512 + 88 rows, group 1: 3 rows
    got = []
    for rec in recs:
        check_record(bytes(rec), 16, 2)
        length, rtype, vtype, shard, _t, _s, h, ns, ll, nl, _p = REC_HEADER.unpack_from(rec)
        t = tail_of(rec)
        labels = bytes(rec[48:48 + ll])
        assert rtype == lib.M3_REC_ROLLUP_IN and h == labels_hash(labels) and shard == h % 16
        assert (t.fwd, t.source, t.res_ms) == (123, 1, 1000)
        assert nl == (2 if labels == ga else 1)
        off = 48 + (ll + 7) // 8 * 8
        rts = np.frombuffer(rec, np.int64, ns, off)
        rv = np.frombuffer(rec, np.float64, ns, off + 8 * ns)
        got.append((t.ordinal, labels, t.rule, rts.tolist(), rv.tolist()))
    assert [g[0] for g in got] == [0, 1, 2]
    assert got[0][1] == ga and got[0][2] == 7 and len(got[0][3]) == 512
    assert got[1][1] == ga and got[1][3][0] == 3000 + 512 * 1000
    assert got[2][1] == gb and got[2][2] == 9 and got[2][4] == [0.0, 1.0, 2.0]


def test_build_refuses_bad_rows() -> None:
    g = canon(__name__="a")
    with pytest.raises(InvalidArgumentError):  # not a window end
        build_records([g], [1], [0], [1500], [1.0], 4, 1, 0, 1000)
    with pytest.raises(InvalidArgumentError):  # rule 0
        build_records([g], [0], [0], [1000], [1.0], 4, 1, 0, 1000)
    with pytest.raises(InvalidArgumentError):  # no such group
        build_records([g], [1], [1], [1000], [1.0], 4, 1, 0, 1000)
    assert build_records([g], [1], [], [], [], 4, 1, 0, 1000) == (bytearray(), 0)


def _one(**kw: int) -> bytearray:
    batch, _ = build_records([canon(__name__="g")], [kw.get("rule", 5)], [0, 0],
                             [1000, 2000], [1.0, 2.0], 4, kw.get("fwd", 1),
                             kw.get("source", 0), 1000)
    return batch


@pytest.mark.parametrize("where,value", [
    ("type", 2),                 # a SAMPLES record is not a ROLLUP_IN one
    ("len", -8),                 # the tail is missing
    ("tail_pad", 1),
    ("rule", 0),
    ("fwd", 0),                  # 0 means "none" in the forward table
    ("source", 2),               # num_sources is 2
    ("res", 0),
    ("res", 1 << 41),
    ("ts0", 1500),               # not a multiple of res_ms
    ("tenant", 1),
])
def test_check_refuses_each_malformed_field(where: str, value: int) -> None:
    rec = _one()
    check_record(bytes(rec), 4, 2)
    end = len(rec) - 32
    if where == "type":
        struct.pack_into("<H", rec, 4, value)
    elif where == "len":
        struct.pack_into("<I", rec, 0, len(rec) + value)
    elif where == "tenant":
        struct.pack_into("<I", rec, 12, value)
    elif where == "tail_pad":
        struct.pack_into("<I", rec, end + 20, value)
    elif where == "fwd":
        struct.pack_into("<Q", rec, end, value)
    elif where == "rule":
        struct.pack_into("<I", rec, end + 12, value)
    elif where == "source":
        struct.pack_into("<I", rec, end + 16, value)
    elif where == "res":
        struct.pack_into("<q", rec, end + 24, value)
    elif where == "ts0":
        ll = struct.unpack_from("<I", rec, 36)[0]
        struct.pack_into("<q", rec, 48 + (ll + 7) // 8 * 8, value)
    with pytest.raises(CorruptError):
        check_record(bytes(rec), 4, 2)


def test_lanes_and_replay_carry_rollup_records_without_storing_samples(tmp_path) -> None:
    from m3shm.shm import Segment, SegParams

    seg = Segment.create(str(tmp_path / "seg"), SegParams(4, 1, lane_bytes=1 << 16,
                                                          series_per_shard=64,
                                                          arena_bytes=1 << 16))
    try:
        batch = _one()
        (rec,) = split_records(batch)
        shard = REC_HEADER.unpack_from(rec)[3]
        assert seg.reserve_next(0, batch) is not None  # m3_rec_check accepts type 3
        seg.publish(0)
        assert seg.drain_range(0, 4, 100) == 1
        st = seg.shard_stats(shard)
        assert st["nseries"] == 1 and st["samples"] == 0 and st["dropped"] == 0
        # commit-log replay applies the same bytes the same way
        assert seg.apply_batch(bytes(batch), 99, 0, 4) == 1
        st = seg.shard_stats(shard)
        assert st["nseries"] == 1 and st["samples"] == 0
        lo, hi = ffi.new("int64_t *"), ffi.new("int64_t *")
        assert lib.m3_batch_time_range(bytes(batch), len(batch), lo, hi) == 0
        assert (lo[0], hi[0]) == (1000, 2000)  # window ends keep their commit-log file
    finally:
        seg.close()
        seg.unlink()


def test_group_plan_from_a_matched_series() -> None:
    rs = parse_yaml(RULES)
    plan = CompiledRules(rs).match({"__name__": "http_requests_total", "service": "api",
                                    "endpoint": "/a", "instance": "i1"})
    (inp,) = plan.rollups
    plans = group_plans(inp, admission_ms=2000, forward_delay_ms=1000, future_ms=0)
    assert [p.namespace for p in plans] == ["agg_1s_1h", "agg_1m_30d"]
    p = plans[0]
    assert dict(p.labels) == {"__name__": "http_requests_by_endpoint_total",
                              "endpoint": "/a", "service": "api"}
    assert p.canon == canonical_labels(dict(p.labels)) and p.hash == labels_hash(p.canon)
    assert p.rule == rule_id(inp.rule) != 0
    assert p.series_cell == CellParams(1000, 2000, ("Sum",), 3, pre=("Increase",))
    assert p.group_cell == CellParams(1000, 3000, ("Sum",), 4, post=("Add",))
    # the group owner finds the same cell from the record's rule id and the namespace's policy
    assert group_cell_for(rs, p.rule, p.labels, p.policy, 2000, 1000, 0) == p.group_cell
    assert group_cell_for(rs, p.rule ^ 1, p.labels, p.policy, 2000, 1000, 0) is None
    # the id follows the definition: a changed rule is another rule
    rs2 = parse_yaml(RULES.replace("Add}", "Absolute}"))
    assert rule_id(rs2.rollup[0]) != p.rule and list(rules_by_id(rs)) == [p.rule]
    assert rule_id(parse_yaml(RULES).rollup[0]) == p.rule


def _records(fwd: int, source: int, rows: list[tuple[int, float]],
             per_record: int = 1) -> list[bytes]:
    """A forward whose rows go to group 0, ``per_record`` rows per record."""
    out = []
    g = canon(__name__="g")
    for i in range(0, len(rows), per_record):
        part = rows[i:i + per_record]
        batch, _ = build_records([g], [5], [0] * len(part), [t for t, _ in part],
                                 [v for _, v in part], 4, fwd, source, 1000)
        rec = bytearray(batch)
        struct.pack_into("<I", rec, len(rec) - 32 + 8, i // per_record)  # ordinal
        out.append(bytes(rec))
    return out


def _sum_cell() -> CellParams:
    return CellParams(1000, 10**12, ("Sum",), 8)


def _window_sums(cells: Cells) -> dict[int, float]:
    rows = cells.finalise(2**61)
    return {int(r["ts"]): float(r["value"]) for r in rows}


def test_retried_and_partial_forwards_apply_exactly_once() -> None:
    cells = Cells.of([_sum_cell()])
    stride = cells.stride
    table = ForwardTable(bytearray(ForwardTable.bytes_for(2, stride)), num_sources=2,
                         scratch_cap=stride)
    f1 = _records(10, 0, [(1000, 1.0), (1000, 2.0), (2000, 4.0)])
    f2 = _records(11, 1, [(1000, 8.0)])
    f3 = _records(12, 0, [(2000, 16.0)])
    res = [table.apply(r, cells, 0, 0)[0] for r in f1[:2]]    # first attempt: a part
    res += [table.apply(r, cells, 0, 0)[0] for r in f2]       # another source meanwhile
    res += [table.apply(r, cells, 0, 0)[0] for r in f1]       # the source retries forward 10
    res += [table.apply(r, cells, 0, 0)[0] for r in f1 + f2]  # a stale duplicate
    res += [table.apply(r, cells, 0, 0)[0] for r in f3]
    assert res == [1, 1, 1, 0, 0, 1] + [0] * 4 + [1]
    assert _window_sums(cells) == {1000: 11.0, 2000: 20.0}
    h = table.header
    assert (h.applied_records, h.dup_records) == (5, 6)


def test_apply_refuses_a_cell_of_another_resolution() -> None:
    cells = Cells.of([CellParams(60_000, 0, ("Sum",), 2)])
    table = ForwardTable(bytearray(ForwardTable.bytes_for(1, cells.stride)), num_sources=1,
                         scratch_cap=cells.stride)
    with pytest.raises(InvalidArgumentError):
        table.apply(_records(1, 0, [(1000, 1.0)])[0], cells, 0, 0)


class _ShmCells(Cells):
    """Cells over caller memory (a shared mapping) instead of a private numpy buffer."""

    def __init__(self, mem: mmap.mmap, offset: int, n: int, stride: int) -> None:
        self.n, self.stride, self.buf = n, stride, mem
        self._base = ffi.from_buffer("uint8_t[]", mem, require_writable=True) + offset
        self._out = np.empty(4096, dtype=[("cell", "<u4"), ("agg", "<u4"), ("ts", "<i8"),
                                          ("value", "<f8")])
        self._pout = ffi.cast("m3_agg_out *", ffi.from_buffer(self._out))


def _drain(mem: mmap.mmap, recs: list[bytes], cells_off: int, stride: int) -> None:
    """An owner: apply records from a 'lane' whose head (word 0 of mem) moves after each."""
    table = ForwardTable(mem, offset=64)
    cells = _ShmCells(mem, cells_off, 1, stride)
    while True:
        head = struct.unpack_from("<Q", mem, 0)[0]
        if head >= len(recs):
            return
        table.apply(recs[head], cells, 0, 0)
        struct.pack_into("<Q", mem, 0, head + 1)


def test_owner_sigkilled_mid_apply_loses_and_doubles_nothing() -> None:
    """Records are applied by a child that is SIGKILLed at random moments; a fresh owner then
    re-drains from the lane head it left (as a restarted worker does). Sources also retry
    forwards. The group windows must hold exactly the sum of every distinct record."""
    rnd = random.Random(8)
    stride = _sum_cell().cell_bytes()
    tbl = ForwardTable.bytes_for(3, stride)
    cells_off = 64 + (tbl + 63) // 64 * 64
    mem = mmap.mmap(-1, cells_off + stride)
    ForwardTable(mem, num_sources=3, scratch_cap=stride, offset=64)
    base = ffi.from_buffer("uint8_t[]", mem)
    lib.m3_agg_cell_init(base + cells_off, stride, _sum_cell().to_c())
    recs: list[bytes] = []
    want: dict[int, float] = {}
    fwd = 100
    for _ in range(600):  # forwards from 3 sources, some retried whole or from a prefix
        src = rnd.randrange(3)
        fwd += 1
        # long records, so that most kills land inside the C apply (between the intent and
        # the entry's update), where a missing intent would double-count
        rows = [(rnd.randrange(1, 9) * 1000, float(rnd.randrange(1, 1000)))
                for _ in range(rnd.randrange(1, 1500))]
        for t, v in rows:
            want[t] = want.get(t, 0.0) + v
        f = _records(fwd, src, rows, per_record=512)
        if rnd.random() < 0.3:
            recs += f[:rnd.randrange(len(f) + 1)]  # an attempt that died part-way
        recs += f
    kills = 0
    while struct.unpack_from("<Q", mem, 0)[0] < len(recs):
        pid = fork_call(_drain, mem, recs, cells_off, stride)
        time.sleep(rnd.random() * 0.0003)
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        kills += os.WIFSIGNALED(status)
    assert kills > 5
    cells = _ShmCells(mem, cells_off, 1, stride)
    lib.m3_agg_cell_check(base + cells_off, stride)
    got = {int(r["ts"]): float(r["value"]) for r in cells.finalise(2**61)}
    assert got == want
