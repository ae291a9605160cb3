"""Rollup forwarding in a worker: the series stage's finalised windows go, as ROLLUP_IN
records, to the owners of the rolled-up (group) series, whose group cells aggregate them.

Two halves, both driven from the event loop or the drain thread exactly as the Aggregator's own
paths are (m3shm/workers/aggregate.py), never per sample in Python:

- **source** (:class:`RollupSource`, hooked into the raw namespace's Aggregator): a series that
  matches a rollup rule gets, per policy, a series-stage cell (m3shm.rules.cells
  rollup_series_cell) of kind M3_AGGK_ROLLUP whose fixed labels are the group's canonical
  labels followed by the rule id (u32, little-endian). The finalise round's phase 1 yields
  their rows; :meth:`RollupSource.forward` builds ROLLUP_IN records in C (csrc/rollup.c) and
  submits them to the policy's namespace pipeline, which routes each to the owner of the
  group's shard in that namespace's segment and makes it durable in that namespace's commit
  log. Only then does the round commit (drop the windows). The forward's id is recorded in the
  shard's store before the submit and cleared after the commit, so a worker killed in between
  resends the same forward (same now, same rows, same ids) and the group owners skip the
  records they already applied.
- **group** (:class:`GroupPlanner`, hooked into an aggregated namespace's Aggregator): a series
  of that namespace whose labels are a rollup rule's group (``__name__`` = the rule's
  metricName, exactly its groupBy labels) gets one group cell per such rule with this
  namespace's policy (rollup_group_cell, tagged with the rule id; planned in batches by the
  Aggregator's resolve, grouped by metric name and label names); the drain applies ROLLUP_IN
  records to it in C, exactly once (m3_rollup_apply), and its finalised rows are ordinary
  points of the group series in the same namespace.

No deadlock: forwarding runs on the event loop and waits on a pipeline, never on the drain
thread, so an owner never blocks on a lane while it holds its shards.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Iterable
from typing import Any

import numpy as np

from m3shm._native import lib
from m3shm.aggstore import KIND_OUTPUT, KIND_ROLLUP, Prepared
from m3shm.rules.cells import rollup_group_cell
from m3shm.rules.forward import build_records
from m3shm.rules.matcher import RollupInput, SeriesPlan
from m3shm.rules.projection import group_projection
from m3shm.rules.rollup_plan import canonical, group_plans, rule_id
from m3shm.workers.aggregate import Aggregator, CellSpec
from m3shm.workers.barrier import RollupBarrier

log = logging.getLogger("m3shm.rollup")

RULE = struct.Struct("<I")


def cell_labels(canon: bytes, rule: int) -> bytes:
    """Fixed labels of a series-stage rollup cell: the group's canonical labels + rule id."""
    return canon + RULE.pack(rule)


def split_cell_labels(blob: bytes) -> tuple[bytes, int]:
    return blob[:-RULE.size], RULE.unpack_from(blob, len(blob) - RULE.size)[0]


class RollupSource:
    """The series stage of every rollup whose inputs this worker owns."""

    def __init__(self, agg: Aggregator, forward_delay_ms: int) -> None:
        self.agg = agg
        self.forward_delay_ms = forward_delay_ms
        self.stats = {"forwards": 0, "records": 0, "rows": 0, "failures": 0, "refused": 0}
        self._missing: set[str] = set()
        agg.rollup_cells = self.cells
        agg.on_rollup_rows = self.forward

    def cells(self, plan: SeriesPlan, labels: dict[str, str]) -> Iterable[CellSpec]:
        a = self.agg
        out = []
        for inp in plan.rollups:
            for gp in group_plans(inp, a.admission_ms, self.forward_delay_ms, a.future_ms):
                ns_id = a.ns_ids.get(gp.namespace)
                if ns_id is None:
                    if gp.namespace not in self._missing:
                        self._missing.add(gp.namespace)
                        log.error("rollup %r: no namespace %s for policy %s; not rolled up",
                                  inp.rule.name, gp.namespace, gp.policy)
                    continue
                out.append(CellSpec(gp.series_cell.to_c(), ns_id, KIND_ROLLUP, 0,
                                    cell_labels(gp.canon, gp.rule)))
        return out

    def _activations(self) -> np.ndarray | None:
        """Activation times of the rule-set versions this worker knows (None: none)."""
        a = self.agg
        with a._lock:
            pending = [act for act, _, _ in a._pending]
        acts = sorted({act for act, _, _ in a.versions if act > 0} | {x for x in pending if x > 0})
        return np.array(acts, dtype=np.int64) if acts else None

    async def forward(self, p: Prepared, rows: np.ndarray) -> bool:
        """Submit one prepared chunk's rollup rows; True once every record is durable."""
        a = self.agg
        store = a.store
        pend = store.fwd_pending(p.shard)
        if pend is not None and (pend[1], pend[2]) == (p.now_ms, p.first):
            fwd = pend[0]  # resending an unfinished forward: the same id
        else:
            fwd = int(lib.m3_seg_next_seq(a.seg.base))
            store.set_fwd_pending(p.shard, fwd, p.now_ms, p.first)
        ok = True
        for ns_id in np.unique(rows["ns"]):
            sel = rows[rows["ns"] == ns_id]
            rt = a._runtime(int(ns_id))
            pipe = getattr(rt, "pipeline", None)
            if pipe is None:
                ok = False
                continue
            # a record never holds windows of both sides of a rules activation: the group
            # owner routes each record to the plan (rule-set version) of its windows
            acts = self._activations()
            key = sel["stream"].astype(np.int64)
            if acts is not None:
                key = key * (len(acts) + 1) + np.searchsorted(acts, sel["ts"], side="left")
            keys, row_group = np.unique(key, return_inverse=True)
            streams = keys if acts is None else keys // (len(acts) + 1)
            canon, rules = [], []
            for s in streams.tolist():
                c, r = split_cell_labels(p.labels[int(p.loffs[s]):int(p.loffs[s + 1])])
                canon.append(c)
                rules.append(r)
            res = rt.cfg.resolution_ms
            batch, nrec = build_records(canon, rules, row_group, sel["ts"], sel["value"],
                                        rt.seg.params.num_shards, fwd, a.w.index, res)
            try:
                adm = await pipe.submit(batch, len(batch), nrec)
            except Exception as e:  # noqa: BLE001 - overload, disk full: resent next round
                self.stats["failures"] += 1
                log.warning("worker %d: rollup forward to %s not written yet: %s", a.w.index,
                            rt.name, e)
                ok = False
                continue
            if adm.rejected_records:
                # not resent: the owner skips records numbered below one it applied, and a
                # refused record may be (docs/rules.md "Refused forwards")
                self.stats["refused"] += adm.rejected_records
                store.count_refused(p.shard, adm.rejected_records)
                log.error("worker %d: %d rollup records refused by %s, not rolled up: %s",
                          a.w.index, adm.rejected_records, rt.name, adm.message)
            self.stats["records"] += nrec - adm.rejected_records
            self.stats["rows"] += len(sel)
        self.stats["forwards"] += 1
        return ok


def group_cells(labels: dict[str, str], agg: Aggregator, ns_name: str,
                forward_delay_ms: int, rs: Any = None) -> list[tuple[Any, int]]:
    """(cell params, rule id) of the group cells a series of aggregated namespace ``ns_name``
    needs: one per rollup rule of rule set ``rs`` (default: the current one) whose group it
    is."""
    rs = agg.compiled.rules if rs is None else rs
    name = labels.get("__name__")
    out = []
    for rule in rs.rollup:
        op = rule.rollup
        if op.metric_name != name:
            continue
        if op.group_by is not None and set(labels) != {"__name__", *op.group_by}:
            continue
        if op.exclude_by is not None and set(op.exclude_by) & set(labels):
            continue
        for pol in rule.policies or rs.default_policies:
            if pol.namespace != ns_name:
                continue
            group = tuple(sorted(labels.items()))
            cp = rollup_group_cell(RollupInput(rule, group, (pol,)), pol, agg.admission_ms,
                                   forward_delay_ms, agg.future_ms)
            out.append((cp.to_c(), rule_id(rule)))
    return out


class GroupPlanner:
    """Plans for the series of one aggregated namespace: group cells for rollup groups, and
    nothing for the rest (their points are stored as they come). It tells the namespace's
    Aggregator what a series' plan is (:meth:`plan_cells`) and which labels decide it
    (m3shm.rules.projection.group_projection: the metric name and the label names); the
    Aggregator's resolve does the rest (batches, versions, activations)."""

    def __init__(self, agg: Aggregator, ns_id: int, ns_name: str, forward_delay_ms: int) -> None:
        self.agg = agg
        self.ns_id = ns_id
        self.ns_name = ns_name
        self.forward_delay_ms = forward_delay_ms
        # group windows final only once every source forwarded them (docs/rules.md)
        agg.barrier = RollupBarrier(agg, forward_delay_ms)
        agg.plan_cells = self.plan_cells
        agg.projection = lambda compiled: group_projection()

    def plan_cells(self, labels: dict[str, str], compiled: Any) -> tuple[bool, tuple[CellSpec,
                                                                                    ...]]:
        cells = group_cells(labels, self.agg, self.ns_name, self.forward_delay_ms,
                            compiled.rules)
        return False, tuple(CellSpec(c, self.ns_id, KIND_OUTPUT, 0, b"", r) for c, r in cells)


__all__ = ["RollupSource", "GroupPlanner", "cell_labels", "split_cell_labels", "group_cells",
           "canonical"]
