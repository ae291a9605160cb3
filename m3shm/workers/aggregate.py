"""Downsampling in the shard owner: plans per series, cells in shared memory, finalised points
written through the aggregated namespaces' pipelines (docs/rules.md "How it is wired").

The worker creates one :class:`Aggregator` over its raw segment's aggregation store
(m3shm/aggstore.py, csrc/aggstore.c). Three paths run through it:

- **drain** (the worker's drain thread): :meth:`Aggregator.drain` drains the worker's shards in
  C, applying every record's samples to the open blocks and to its series' cells. A record
  whose series has no plan stops the shard's drain; C lists every planless series among the
  published records (up to 4,096) and groups them by the labels the rules read
  (m3shm.rules.projection, csrc/plangroup.c); Python matches the rules once per group, on one
  of its series (m3shm.rules.matcher), lays out the cells (m3shm.rules.cells) and installs
  that plan for every series of the group with one C call (m3_aggst_install_many); the drain
  then goes on. With the default rules (they read no label) a whole batch is one match and
  one install call. Replay after a full restart goes the same way
  (:meth:`Aggregator.replay_batch`), and so does the replan after a rules change.
- **finalise** (a task on the event loop, every FINALISE_S): per shard, phase 1 in C computes
  the rows of every window final now, with the labels of their output series; they become
  lane records (m3shm.storage.records, C) submitted to each aggregated namespace's pipeline;
  once that submit has returned (the points are in that namespace's commit log), phase 2
  finalises the same windows for real. A crash in between repeats the points, never loses
  them. Then the worker records the time of its last complete round (the replay watermark)
  and raises its rollup mark (m3shm/workers/barrier.py); a group owner's Aggregator applies
  and finalises its group cells on the barrier's clock (:meth:`Aggregator.clock`).
- **rules** (:meth:`Aggregator.install_rules`, called by m3shm/workers/rulesync.py): as soon
  as a new version is installed (well before its activation: see m3shm/rules/versions.py)
  the drain thread plans every series of the worker again with it, from its activation: the
  new plan keeps the old one as its prev (csrc/aggstore.c), and the drain sends samples
  stamped at or before the activation to the old cells, later ones to the new, so every
  worker switches at the same sample time however late or early samples arrive. A series
  first seen while versions are pending gets the whole chain (a version whose cells equal
  the one before adds nothing: those cells go on across it). Old cells are finalised at
  their normal time, then freed.

Hooks for the rollup forwarding: :attr:`Aggregator.rollup_cells` adds cells to a series'
plan (default: none) and :attr:`Aggregator.on_rollup_rows` receives the finalised rows of
cells of kind M3_AGGK_ROLLUP (default: counted and dropped, with a warning). An aggregated
namespace's Aggregator plans group series instead: m3shm/workers/rollup.py's GroupPlanner
sets :attr:`Aggregator.plan_cells` (a series' cells under one rule-set version) and
:attr:`Aggregator.projection` (the labels they depend on); :meth:`Aggregator.resolve` is the
one loop over batches, groups, versions and activations for both.

After a full restart, replay applies raw samples with ``now`` = the oldest worker watermark:
windows already final then were written before the crash (their points come back from the
aggregated namespace's commit log) and count as late; every other window is re-aggregated
from the replayed raw samples.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from m3shm._native import ffi
from m3shm.aggstore import CELL_AGG_LABEL, KIND_OUTPUT, KIND_ROLLUP, SKIPPED, AggStore, Prepared
from m3shm.atomicfile import replace_json
from m3shm.errors import NoSuchSeriesError
from m3shm.rules.cells import output_cell
from m3shm.rules.matcher import CompiledRules, SeriesPlan
from m3shm.rules.projection import ALL, Projection, rules_projection, union
from m3shm.shm import Segment, parse_labels
from m3shm.storage.records import LabelTable, build_records
from m3shm.workers.barrier import raise_mark
from m3shm.workers.watermark import replay_watermark, watermark_path

log = logging.getLogger("m3shm.aggregate")

FINALISE_S = 1.0
REPLAN_BATCH = 2000   # series planned again per drain pass after a rules change
FINALISE_BATCH_ROWS = 200_000   # finalised rows held before they are submitted
WATERMARK_EVERY_MS = 10_000     # the replay watermark moves at least this often when idle


@dataclass(frozen=True)
class CellSpec:
    """One cell of a plan: its C parameters (``m3_agg_params *``), where its rows go, under
    which labels (b"" = the series' own), and ``rule``: 0, or the rollup rule id whose
    forwarded records feed this group cell (csrc/rollup.c)."""

    params: Any
    ns_id: int
    kind: int = KIND_OUTPUT
    flags: int = 0
    labels: bytes = b""
    rule: int = 0

    @property
    def meta(self) -> int:
        return self.ns_id | self.kind << 16 | self.flags << 24


def now_ms() -> int:
    return int(time.time() * 1000)


Cells = tuple[bool, tuple[CellSpec, ...]]   # a plan: (drop the raw samples, its cells)
GONE = 0xFFFFFFFF   # m3_series_group: a series no longer live
PLAN_CACHE = 65536  # plans remembered by projection (cleared when full)


def same_cells(a: Cells, b: Cells) -> bool:
    """Do two plans make the same cells (parameters, destinations, labels)?"""
    return a[0] == b[0] and len(a[1]) == len(b[1]) and all(
        (x.meta, x.labels, x.rule) == (y.meta, y.labels, y.rule)
        and ffi.buffer(x.params)[:] == ffi.buffer(y.params)[:]
        for x, y in zip(a[1], b[1], strict=True))


class Aggregator:
    def __init__(self, worker: Any, seg: Segment, store: AggStore, watermark: str = "") -> None:
        self.w = worker
        self.watermark = watermark  # file name prefix: one Aggregator per segment
        self.seg = seg
        self.store = store
        cfg = worker.cfg
        raw = cfg.raw_namespace
        self.admission_ms = cfg.downsample.admission_ms or raw.buffer_past_ms
        self.future_ms = raw.buffer_future_ms
        self.ns_ids = {ns.name: i for i, ns in enumerate(cfg.namespaces)}
        self.ns_names = {i: name for name, i in self.ns_ids.items()}
        rs = cfg.downsample.rule_set()
        self.compiled = CompiledRules(rs)
        self.version = 0  # the config's rules until the worker's RuleSync installs versions
        self._pending: list[tuple[int, int, CompiledRules]] = []  # (activation, version, ...)
        # versions planned, oldest first: a new series gets a plan of each, chained
        self.versions: list[tuple[int, int, CompiledRules]] = []
        # after a version's successor activates, its windows are final this much later
        self.horizon_ms = self.admission_ms + cfg.downsample.forward_delay_ms
        # replans under way (drain thread): (version entry, the version before, shards left),
        # the series of the first shard still to do, series changed so far
        self._todo: list[tuple[tuple[int, int, CompiledRules], CompiledRules | None,
                               list[int]]] = []
        self._replan_needs: np.ndarray | None = None  # [shard, slot, gen] rows
        self._replan_n = 0
        self._replan_cpu = 0.0
        self._lock = threading.Lock()
        self._cache: dict[Any, tuple[bool, tuple[CellSpec, ...]]] = {}
        # plans by (versions, projection key), projections by versions; the versions are
        # keyed by id() and held in _pinned while a key names them (no id is reused)
        self._plans: dict[tuple, list[Cells]] = {}
        self._proj: dict[tuple[int, ...], Projection] = {}
        self._pinned: dict[int, CompiledRules] = {}
        # what a series' plan under one rule-set version is (a GroupPlanner replaces both)
        self.plan_cells: Callable[[dict[str, str], CompiledRules], Cells] = self._plan_cells
        self.projection: Callable[[CompiledRules], Projection] = (
            lambda compiled: rules_projection(compiled.rules))
        self._missing: set[str] = set()
        self.rollup_cells: Callable[[SeriesPlan, dict[str, str]], Iterable[CellSpec]] = (
            lambda plan, labels: ())
        self.on_rollup_rows: Callable[[Prepared, np.ndarray], Any] | None = None
        self.stats = {"rounds": 0, "rows_submitted": 0, "submit_failures": 0,
                      "rows_rejected": 0, "rollup_rows_dropped": 0, "planned": 0}
        self.replay_now_ms = 0
        self._mark_ms = 0
        # the rollup barrier (m3shm/workers/barrier.py): a group owner's RollupBarrier (set by
        # GroupPlanner) holds its cells' clock at the sources' marks; the raw segment's
        # Aggregator is a source and publishes its mark, from the replay watermark on
        self.barrier: Any = None
        if not watermark and hasattr(worker, "data_dir") and hasattr(worker, "boot"):
            raise_mark(worker, replay_watermark(worker.data_dir, worker.boot))
        # no aggregated namespace at all (they follow the policies; a rule set needing one is
        # refused until a restart): no plan can hold a cell
        self._no_cells = not any(ns.aggregated for ns in cfg.namespaces)

    def plain(self) -> bool:
        """True while no plan could do anything: no aggregated namespace to write to and no
        drop rule in any version installed or pending. Records then go straight to the
        blocks without planning each new series (replay of a million series stays a C loop);
        once a version with a drop rule arrives, planless series are planned as they come."""
        if not self._no_cells:
            return False
        with self._lock:
            pending = [c for _, _, c in self._pending]
        compiled = [self.compiled, *pending, *(c for _, _, c in self.versions)]
        return not any(m.drop for c in compiled for m in c.rules.mapping)

    # -- rules and plans --------------------------------------------------------------------

    def install_rules(self, compiled: CompiledRules, version: int, activation_ms: int) -> None:
        """Rule-set ``version`` applies to windows starting at or after ``activation_ms`` (a
        window boundary of every policy, stored in <data>/rules.json, the same for every
        worker; 0 = always). The drain thread plans every series of this worker with it on
        its next pass (:meth:`_maybe_activate`). Any thread may call it (RuleSync calls it
        from the event loop); versions come in increasing order."""
        with self._lock:
            if version > max([self.version] + [v for _, v, _ in self._pending]):
                self._pending.append((activation_ms, version, compiled))

    def activate_now(self, lo: int, hi: int) -> None:
        """Plan with every installed version (at worker start, before replay and drain)."""
        self._maybe_activate(lo, hi, None)

    def _maybe_activate(self, lo: int, hi: int, budget: int | None = REPLAN_BATCH) -> int:
        """Drain thread: plan live series again with each newly installed version, from its
        activation (the old plans keep the samples stamped before it), at most ``budget``
        series per call (None: all), so the drain goes on between batches. Returns the
        series planned. A version takes part in new series' chains at once."""
        if self._pending:
            with self._lock:
                new, self._pending = self._pending, []
            for entry in sorted(new, key=lambda p: p[1]):
                before = self.compiled if self.versions else None
                self.versions.append(entry)
                self.compiled, self.version = entry[2], entry[1]
                self._todo.append((entry, before, list(range(lo, hi))))
        done = 0
        while self._todo and (budget is None or done < budget):
            entry, before, shards = self._todo[0]
            act, version, _ = entry
            shard = shards[0]
            if self._replan_needs is None:
                if self.store.stats(shard)["rules_version"] >= version:
                    needs = np.empty((0, 3), dtype=np.uint32)  # planned before a restart
                else:
                    live = self.seg.live_slots(shard)
                    needs = np.column_stack([np.full(len(live), shard, dtype=np.uint32),
                                             live])
                self._replan_needs = needs
            needs = self._replan_needs
            take = needs if budget is None else needs[:budget - done]
            t0 = time.thread_time()
            self._replan_n += self.resolve(take, only=entry, before=before)
            self._replan_cpu += time.thread_time() - t0
            done += len(take)
            self._replan_needs = needs = needs[len(take):]
            if len(needs):
                break
            self._replan_needs = None
            if self.store.stats(shard)["rules_version"] < version:  # never lowered
                self.store.set_rules_version(shard, version)
            shards.pop(0)
            if not shards:
                self._todo.pop(0)
                if self.watermark:  # a namespace's rollup group cells (workers/rollup.py)
                    log.info("worker %d: %s: rollup groups of rule-set version %d (%d series "
                             "changed), active from %d ms", self.w.index,
                             self.watermark.rstrip("-"), version, self._replan_n, act)
                else:
                    log.info("worker %d: rules version %d planned (%d series changed, %.3f s "
                             "CPU), active from %d ms", self.w.index, version, self._replan_n,
                             self._replan_cpu, act)
                self._replan_n, self._replan_cpu = 0, 0.0
        return done

    def _chain(self) -> list[tuple[int, int, CompiledRules]]:
        """The versions a series first seen now needs, oldest first: the one whose windows
        may still be open and every later one."""
        if not self.versions:
            return [(0, self.version, self.compiled)]
        cutoff = now_ms() - self.horizon_ms
        vs = self.versions
        while len(vs) > 1 and vs[1][0] <= cutoff:
            vs = vs[1:]
        self.versions = vs
        return vs

    def cells_for(self, plan: SeriesPlan) -> tuple[bool, tuple[CellSpec, ...]]:
        """(drop raw, cells) for a plan's mapping outputs (memoised by outputs)."""
        key = (plan.store_raw, plan.outputs)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        cells = []
        for out in plan.outputs:
            ns = out.policy.namespace
            ns_id = self.ns_ids.get(ns)
            if ns_id is None or self._pipeline(ns_id) is None:
                if ns not in self._missing:
                    self._missing.add(ns)
                    log.error("worker %d: storage policy %s: this worker has no namespace %r "
                              "to write to; its points are not kept", self.w.index, out.policy,
                              ns)
                continue
            params = output_cell(out, self.admission_ms, self.future_ms).to_c()
            flags = CELL_AGG_LABEL if len(out.aggregations) > 1 else 0
            cells.append(CellSpec(params, ns_id, KIND_OUTPUT, flags))
        hit = (not plan.store_raw, tuple(cells))
        self._cache[key] = hit
        return hit

    def _plan_cells(self, labels: dict[str, str], compiled: CompiledRules) -> Cells:
        """(drop raw, cells) of a raw series under one rule-set version: its mapping outputs
        and, through :attr:`rollup_cells`, its rollup series-stage cells."""
        plan = compiled.match(labels)
        drop, cells = self.cells_for(plan)
        extra = tuple(self.rollup_cells(plan, labels))
        return drop, cells + extra if extra else cells

    def _projection_of(self, versions: list[CompiledRules]) -> Projection:
        key = tuple(id(c) for c in versions)
        p = self._proj.get(key)
        if p is None:
            if len(self._proj) > 64 or len(self._plans) >= PLAN_CACHE:
                self._proj.clear()
                self._plans.clear()
                self._pinned.clear()
            for c in versions:
                self._pinned[id(c)] = c
            p = self._proj[key] = union(self.projection(c) for c in versions)
        return p

    def resolve(self, needs: np.ndarray,
                only: tuple[int, int, CompiledRules] | None = None,
                before: CompiledRules | None = None) -> int:
        """Plan series ``needs`` ([shard, slot, gen] rows, uint32): one plan per version of
        :meth:`_chain`, each from its activation (planless series), or only version ``only``
        (activation, version, compiled) on top of each series' plan, except where it makes
        the same cells as ``before`` (the version it follows). Returns the series planned.

        In batches, never per series in Python: C groups the series by the labels the
        versions read (m3shm.rules.projection, csrc/plangroup.c); each group is matched once,
        on one of its series, and its plan installed for all of them with one C call."""
        chain = [only] if only is not None else self._chain()
        if not len(needs):
            return 0
        versions = [c for _, _, c in chain]
        if only is not None and before is not None:
            versions.append(before)
        proj = self._projection_of(versions)
        shards = np.ascontiguousarray(needs[:, 0], dtype=np.uint32)
        slots = np.ascontiguousarray(needs[:, 1], dtype=np.uint32)
        gens = np.ascontiguousarray(needs[:, 2], dtype=np.uint32)
        with self.seg.reading():
            group, reps = self.store.group(shards, slots, gens, proj.names, proj.others)
        order = np.argsort(group, kind="stable")
        bounds = np.searchsorted(group[order], np.arange(len(reps) + 1))
        vkey = tuple(id(c) for c in versions)
        n = 0
        for g in range(len(reps)):
            members = order[bounds[g]:bounds[g + 1]]
            labels = self._labels_of(shards[members], slots[members])
            if labels is None:
                continue  # every series of the group is gone
            key = (vkey, proj.key(labels)) if proj.others != ALL else None
            plans = self._plans.get(key) if key is not None else None
            if plans is None:
                plans = [self.plan_cells(labels, c) for c in versions]
                if key is not None and len(self._plans) < PLAN_CACHE:
                    self._plans[key] = plans
            if only is not None and before is not None and same_cells(plans[-1], plans[0]):
                continue  # unchanged: the series keep their cells across the activation
            for i, ((act, _, _), (drop, cells)) in enumerate(zip(chain, plans, strict=False)):
                if only is None and i > 0 and same_cells(plans[i], plans[i - 1]):
                    continue  # the same cells under the next version: they go on across it
                start = act if act > 0 and (only is not None or i > 0) else None
                self.store.install_many(shards[members], slots[members], gens[members], drop,
                                        [c.params for c in cells], [c.meta for c in cells],
                                        [c.labels for c in cells], start,
                                        [c.rule for c in cells])
            n += len(members)
        self.stats["planned"] += n
        return n

    def _labels_of(self, shards: np.ndarray, slots: np.ndarray) -> dict[str, str] | None:
        """The labels of the first series still live (one read: its group's labels)."""
        for shard, slot in zip(shards.tolist(), slots.tolist(), strict=True):
            try:
                return parse_labels(self.seg.series_labels(shard, slot))
            except NoSuchSeriesError:
                continue
        return None

    # -- drain thread -----------------------------------------------------------------------

    def drain(self, lo: int, hi: int, max_records: int = 1024,
              beat: Callable[[], None] | None = None) -> int:
        """One pass over shards [lo, hi): records applied. ``beat`` is called after each
        batch of plans (matching many new series takes a while; the drain is not stuck)."""
        if self.plain():
            return self.seg.drain_range(lo, hi, max_records)
        replanned = self._maybe_activate(lo, hi)
        if replanned and beat is not None:
            beat()
        total = replanned  # progress: the caller loops again at once
        now = self.clock()
        shards = list(range(lo, hi))
        while shards:
            # drain every shard until it stops at a planless series; plan all those series
            # in one go (one resolve for the worker, not one per shard), then go on
            waiting, needs = [], []
            for shard in shards:
                n, need = self.store.drain(shard, max_records, now)
                total += n
                if len(need):
                    waiting.append(shard)
                    needs.append(np.column_stack(
                        [np.full(len(need), shard, dtype=np.uint32), need]))
            if needs:
                self.resolve(np.concatenate(needs))
                total += 1  # progress: the caller loops again at once
                if beat is not None:
                    beat()
            shards = waiting
        return total

    def replay_batch(self, payload: Any, seq: int, lo: int, hi: int,
                     cells_only: bool = False) -> int:
        """Replay one commit-log batch into shards [lo, hi) with aggregation (``cells_only``:
        a batch whose raw samples a loaded snapshot holds only feeds the cells)."""
        if self.plain():
            return 0 if cells_only else self.seg.apply_batch(payload, seq, lo, hi)
        off, total = 0, 0
        while True:
            n, off, needs = self.store.apply_batch(payload, seq, lo, hi, self.replay_now_ms,
                                                   off, cells_only)
            total += n
            if not len(needs):
                return total
            self.resolve(needs)

    # -- finalise (event loop) --------------------------------------------------------------

    def _runtime(self, ns_id: int) -> Any:
        """The worker's runtime of namespace ``ns_id`` (m3shm/workers/nsruntime.py), if any."""
        rts = getattr(self.w, "ns_by_id", None)
        if rts is None:
            return None
        try:
            return rts[ns_id]
        except (KeyError, IndexError):
            return None

    def _pipeline(self, ns_id: int) -> Any:
        return getattr(self._runtime(ns_id), "pipeline", None)

    def _num_shards(self, ns_id: int) -> int:
        rt = self._runtime(ns_id)
        return rt.seg.params.num_shards if rt is not None else self.seg.params.num_shards

    async def _submit(self, p: Prepared) -> bool:
        """Write a shard's finalised rows to their namespaces; True once all are durable."""
        rows = p.rows
        if not len(rows):
            return True
        table = LabelTable.from_blob(p.labels, p.loffs)
        out = rows[rows["kind"] == KIND_OUTPUT]
        ok = True
        for ns_id in np.unique(out["ns"]):
            sel = out[out["ns"] == ns_id]
            pipe = self._pipeline(int(ns_id))
            if pipe is None:
                name = self.ns_names.get(int(ns_id), str(ns_id))
                if name not in self._missing:
                    self._missing.add(name)
                    log.error("worker %d: namespace %s has no pipeline: its points wait",
                              self.w.index, name)
                ok = False
                continue
            batch, length, nrec = build_records(table, sel["stream"], sel["ts"],
                                                sel["value"], self._num_shards(int(ns_id)))
            try:
                adm = await pipe.submit(batch, length, nrec)
            except Exception as e:  # noqa: BLE001 - overload, disk full: retried next round
                self.stats["submit_failures"] += 1
                log.warning("worker %d: finalised points for %s not written yet: %s",
                            self.w.index, self.ns_names.get(int(ns_id)), e)
                ok = False
                continue
            self.stats["rows_submitted"] += len(sel)
            if adm.rejected_samples:
                self.stats["rows_rejected"] += adm.rejected_samples
                log.error("worker %d: %d finalised points refused by %s: %s", self.w.index,
                          adm.rejected_samples, self.ns_names.get(int(ns_id)), adm.message)
        roll = rows[rows["kind"] == KIND_ROLLUP]
        if len(roll):
            if self.on_rollup_rows is None:
                self.stats["rollup_rows_dropped"] += len(roll)
            else:
                r = self.on_rollup_rows(p, roll)
                if asyncio.iscoroutine(r):
                    ok = bool(await r) and ok
        return ok

    async def finalise_once(self, now: int | None = None) -> int:
        """One finalise round over this worker's shards; returns rows made durable.

        Shards are prepared one after the other (C, on the pool), their rows submitted
        together (the pipeline commits them as one group: one commit-log write and fsync per
        namespace, not one per shard), and each shard committed once all its submits
        returned. At most FINALISE_BATCH_ROWS rows are held at once.

        Rollup forwards (rows of kind ROLLUP, m3shm/workers/rollup.py) are never in flight
        two at a time: a chunk holding some is submitted at once, alone among forwards. A
        shard with an unfinished forward (its submit failed, or the worker was killed between
        submit and commit) first resends exactly that forward (prepared at the same now and
        first slot: the same rows; the group owners skip what they have), and while any
        forward is unfinished no newer one is made, so none overtakes it."""
        loop = asyncio.get_running_loop()
        pool = self.w.pool
        if now is None:
            if self.barrier is not None:
                await self.barrier.advance(loop, pool)
            now = self.clock()
        done_all = True
        rows = 0
        batch: list[Prepared] = []
        held = 0

        async def flush() -> None:
            nonlocal done_all, rows, held
            oks = await asyncio.gather(*(self._submit(p) for p in batch))
            for p, ok in zip(batch, oks, strict=True):
                if ok:
                    await loop.run_in_executor(pool, self.store.commit, p)
                    if self.store.fwd_pending(p.shard):
                        self.store.set_fwd_pending(p.shard, 0)
                    rows += len(p.rows)
                else:
                    done_all = False  # its windows stay open for the next round
            batch.clear()
            held = 0

        def unfinished() -> bool:
            return any(self.store.fwd_pending(s) for s in range(self.w.lo, self.w.hi))

        for shard in range(self.w.lo, self.w.hi):
            pend = self.store.fwd_pending(shard)
            if pend is not None:
                p, _ = await loop.run_in_executor(pool, self.store.prepare, shard, pend[1],
                                                  pend[2])
                if p.last == SKIPPED:  # nothing due: it was committed before the kill
                    self.store.set_fwd_pending(shard, 0)
                    continue
                batch.append(p)
                await flush()
        for shard in range(self.w.lo, self.w.hi):
            if unfinished():
                break
            first = 0
            while True:
                p, done = await loop.run_in_executor(pool, self.store.prepare, shard, now, first)
                if p.last != SKIPPED:
                    batch.append(p)
                    held += len(p.rows)
                    if held >= FINALISE_BATCH_ROWS or bool(
                            (p.rows["kind"] == KIND_ROLLUP).any()):
                        await flush()
                        if unfinished():
                            break
                if done:
                    break
                first = p.last
        if batch:
            await flush()
        if unfinished():
            done_all = False
        self.stats["rounds"] += 1
        if done_all and not self.watermark:
            raise_mark(self.w, now)  # a source: every input window final at now is forwarded
        if done_all and (rows or now - self._mark_ms >= WATERMARK_EVERY_MS):
            await loop.run_in_executor(pool, self._write_watermark, now)
            self._mark_ms = now
        return rows

    def clock(self) -> int:
        """The time cells are applied and finalised at: now, or for a group owner's cells at
        most the barrier's (m3shm/workers/barrier.py)."""
        now = now_ms()
        return now if self.barrier is None else self.barrier.clock(now)

    def _write_watermark(self, now: int) -> None:
        path = watermark_path(self.w.data_dir, self.w.index, self.watermark)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        # no fsync: an older mark only repeats points on replay
        replace_json(path, {"now_ms": now}, sync=False)

    async def timer(self) -> None:
        while True:
            t0 = time.monotonic()
            try:
                await self.finalise_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - logged; the next round retries
                log.exception("worker %d: finalise round failed", self.w.index)
            await asyncio.sleep(max(0.05, FINALISE_S - (time.monotonic() - t0)))
