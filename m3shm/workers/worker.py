"""A worker process: one uvloop event loop, a contiguous range of shards, a small thread pool.

Started by the supervisor with fork (it inherits the mappings of every namespace's segment and
the data directory lock). A worker owns the same shard range in every namespace
(m3shm/workers/nsruntime.py: ``Worker.ns[name]`` / ``Worker.ns_by_id[i]`` hold each one's
segment, commit log and ingest pipeline; ``self.seg`` / ``clog`` / ``pipeline`` are the raw
namespace's). At start it, in every namespace, (1) resets its own lanes as a producer, dropping
anything a previous incarnation reserved but never published; (2) repairs its shards (encoder
states torn mid-append, chain ends, the last series' table entry); (3) if its shards are not
yet marked recovered, replays every commit log of earlier boots into them, each namespace's
directory into its own segment (this happens once per boot, or again if the worker died during
replay: applying a record twice is harmless); and only then (4) starts the drain thread that
applies its shards' lanes of every segment. HTTP is served from the beginning
(``/ready`` says 503 until every shard is recovered) on a SO_REUSEPORT socket of its own.

C calls that take real time (snappy, decoding, commit-log writes, export reads) run on a
fixed ThreadPoolExecutor; the drain loop is one long-lived thread. All release the GIL in C.
With nothing to drain, the drain thread sleeps on its doorbell in the raw segment (csrc/bell.c)
until a producer publishes to one of its shards in any namespace (every pipeline rings the raw
segment's doorbells), a rule set is installed, or DRAIN_IDLE_MS pass: an idle worker costs
a few passes a second, not a poll every few milliseconds.

Health and reload: a task on the event loop beats into the worker's block of the stats file
(m3shm/stats.py) every HEARTBEAT_S, but only while the drain thread has made a pass within
DRAIN_STALL_S, so a hung loop or a hung drain thread both stop the supervisor's watchdog pings.
On SIGHUP (or when the beat sees a newer config generation) the worker loads the config the
supervisor applied and uses its live keys from the next request on.

SIGTERM: stop accepting, finish in-flight requests, commit every queued batch, fsync and close
the commit log, flag this producer done, keep draining until every producer is done and its
shards' lanes are empty, exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import pickle
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from m3shm import stats as st
from m3shm._native import lib
from m3shm.config import Config
from m3shm.shm import Segment
from m3shm.storage import commitlog, snapshot
from m3shm.storage.flushed import FlushedStore
from m3shm.storage.metadata import MetadataStore
from m3shm.storage.volptr import VolumePointers, table_path
from m3shm.workers.ingest import IngestPipeline
from m3shm.workers.nsruntime import NsRuntime, commitlog_dir
from m3shm.workers.rulesync import RuleSync

log = logging.getLogger("m3shm.worker")

PR_SET_PDEATHSIG = 1
HEARTBEAT_S = 0.25
DRAIN_STALL_S = 1.0
DRAIN_IDLE_MS = 250  # longest doorbell sleep of an idle drain thread (< DRAIN_STALL_S)


def shard_range(index: int, nworkers: int, nshards: int) -> tuple[int, int]:
    """The contiguous shards worker ``index`` owns."""
    return index * nshards // nworkers, (index + 1) * nshards // nworkers


def die_with_parent(parent: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the supervisor died before prctl took effect
        os._exit(1)


class Worker:
    def __init__(self, cfg: Config, seg: Segment, index: int, boot: int, incarnation: int,
                 data_dir: str, stats: st.StatsFile,
                 segs: dict[str, Segment] | None = None) -> None:
        self.cfg = cfg
        self.statsfile = stats
        self.stats = stats.worker(index)
        self.seg = seg
        self.index = index
        self.nworkers = seg.params.num_producers
        self.lo, self.hi = shard_range(index, self.nworkers, seg.params.num_shards)
        self.boot = boot
        self.incarnation = incarnation
        self.data_dir = data_dir
        self.cl_dir = commitlog_dir(data_dir, cfg.raw_namespace)
        segs = dict(segs or {cfg.raw_namespace.name: seg})
        segs[cfg.raw_namespace.name] = seg
        # every configured namespace that has a segment (all of them under the supervisor)
        self.ns: dict[str, NsRuntime] = {
            ns.name: NsRuntime(ns.name, i, ns, segs[ns.name], commitlog_dir(data_dir, ns))
            for i, ns in enumerate(cfg.namespaces) if ns.name in segs}
        self.ns_by_id: dict[int, NsRuntime] = {rt.id: rt for rt in self.ns.values()}
        self.stopping = False
        self.tasks: set[asyncio.Task] = set()
        self.background: set[asyncio.Task] = set()
        self._drain_stop = threading.Event()
        self._drain_thread: threading.Thread | None = None
        self._drain_beat = 0.0
        self.flushed_store = FlushedStore(os.path.join(data_dir, "filesets"))
        for rt in self.ns.values():  # newest fileset volumes (m3shm/storage/volptr.py)
            table = VolumePointers.open(table_path(rt.seg.path))
            if table is not None:
                self.flushed_store.attach(rt.name, table)
        # rule-set versions (m3shm/workers/rulesync.py); the Aggregator attaches to it
        self.rules = RuleSync(data_dir, stats, self.stats, index)
        self.aggregator = None  # m3shm/workers/aggregate.py, made once the shards are recovered

    def drain_stopped(self) -> bool:
        return self._drain_stop.is_set()

    def seq_sync(self) -> int:
        return int(lib.m3_seq_sync(self.seg.base))

    def run(self) -> int:
        import uvloop

        return uvloop.run(self.main())

    async def main(self) -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        ws = self.stats
        ws.set(st.W_PID, os.getpid())
        ws.set(st.W_INCARNATION, self.incarnation)
        ws.set(st.W_STATE, st.ST_STARTING)
        ws.beat()
        loop.add_signal_handler(signal.SIGHUP, self._check_config)
        # the supervisor forks with these blocked (so a SIGTERM sent while the child still had
        # the supervisor's handlers is not lost); now that ours are in place, let them in
        from m3shm.supervisor import FORK_BLOCKED_SIGNALS

        signal.pthread_sigmask(signal.SIG_UNBLOCK, FORK_BLOCKED_SIGNALS)
        self.rules.check(force=True)
        beat = loop.create_task(self._heartbeat())
        # admin flush requests from sibling workers (m3shm/workers/flush.py); remembered
        # until this worker has recovered its shards
        self.flusher = None
        self._pending_signals: list[int] = []
        for sig in (signal.SIGUSR1, signal.SIGUSR2):
            loop.add_signal_handler(sig, self._on_flush_signal, sig)
        for rt in self.ns.values():
            rt.seg.set_producer_done(self.index, False)
            rt.seg.recover_producer(self.index)
            for s in range(self.lo, self.hi):
                rt.seg.recover_shard(s)
        self.pool = ThreadPoolExecutor(self.cfg.threads, thread_name_prefix="m3shm-c")
        cl = self.cfg.commitlog
        ing = self.cfg.ingest
        for rt in self.ns.values():
            base = rt.seg.base
            rt.clog = commitlog.CommitLog(
                rt.cl_dir, self.boot, self.index, self.incarnation, cl.fsync,
                cl.fsync_interval_ms, cl.max_segment_bytes, observer=ws,
                seq_sync=lambda base=base: int(lib.m3_seq_sync(base)))
            rt.pipeline = IngestPipeline(rt.seg, self.index, rt.clog, self.pool,
                                         ing.reserve_wait_ms, ing.max_pending_batches,
                                         bells=self.seg)
            rt.pipeline.start()
        raw = self.ns[self.cfg.raw_namespace.name]
        self.clog, self.pipeline = raw.clog, raw.pipeline
        # after the pipelines: the aggregator lays out cells only for namespaces it can
        # write to (Worker.ns_by_id[i].pipeline)
        self.aggregator = self._make_aggregator()
        # rollup forwarding (m3shm/workers/rollup.py): the series stage hooked into the raw
        # aggregator, group cells in each aggregated namespace's store
        self.group_aggs = self._make_group_aggregators()
        if self.aggregator is not None:
            aggs = [self.aggregator, *self.group_aggs.values()]

            def install(compiled: Any, version: int, activation_ms: int) -> None:
                for a in aggs:
                    a.install_rules(compiled, version, activation_ms)
                self.wake_drain()  # it plans the series again with the new version

            self.rules.attach(install)
            for a in aggs:
                a.activate_now(self.lo, self.hi)
        self.metadata = MetadataStore(self.data_dir, self.index)
        self._refresh_task = loop.create_task(self._refresh_metadata())
        from m3shm.net.api import Api
        from m3shm.net.http import HttpProtocol

        api = Api(self)
        sock = socket.socket(socket.AF_INET6 if ":" in self.cfg.host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((self.cfg.host, self.cfg.port))
        sock.listen(1024)
        server = await loop.create_server(
            lambda: HttpProtocol(api.route, self._max_body, self.tasks),
            sock=sock)
        from m3shm.workers.flush import Flusher

        flusher = Flusher(self)
        replaying = not all(rt.seg.shard_stats(s)["recovered"] for rt in self.ns.values()
                            for s in range(self.lo, self.hi))
        await loop.run_in_executor(self.pool, flusher.start_up, replaying)
        if replaying:
            ws.set(st.W_STATE, st.ST_RECOVERING)
            for rt in self.ns.values():
                t0 = time.monotonic()
                n = await loop.run_in_executor(self.pool, self._replay, rt,
                                               flusher.snapshots[rt.key])
                log.info("worker %d: replayed %d records of namespace %s into shards [%d, %d) "
                         "in %.3fs", self.index, n, rt.name, self.lo, self.hi,
                         time.monotonic() - t0)
            for rt in self.ns.values():
                for s in range(self.lo, self.hi):
                    rt.seg.set_recovered(s, True)
        self._drain_thread = threading.Thread(target=self._drain_loop, name="m3shm-drain",
                                              daemon=True)
        self._drain_beat = time.monotonic()
        self._drain_thread.start()
        ws.set(st.W_STATE, st.ST_SERVING)
        log.info("worker %d (pid %d, incarnation %d) serving shards [%d, %d)", self.index,
                 os.getpid(), self.incarnation, self.lo, self.hi)
        self._warm = loop.create_task(api.warm_query())  # held: tasks are weakly referenced
        await loop.run_in_executor(self.pool, self._close_predecessors)
        self.flusher = flusher
        for sig in self._pending_signals:
            self._on_flush_signal(sig)
        self._spawn(self.flusher.timer)
        if self.aggregator is not None:
            self._spawn(self.aggregator.timer)
        for g in self.group_aggs.values():
            self._spawn(g.timer)
        await stop.wait()
        ws.set(st.W_STATE, st.ST_STOPPING)
        await self._shutdown(server)
        beat.cancel()
        return 0

    def _make_aggregator(self):  # noqa: ANN202 - Aggregator | None (imports numpy)
        """Downsampling over the raw segment's cell store (m3shm/workers/aggregate.py);
        checks this worker's cells a killed predecessor may have left half-written."""
        from m3shm.aggstore import AggStore, store_path
        from m3shm.workers.aggregate import Aggregator

        if not os.path.exists(store_path(self.seg.path)):
            return None  # a segment made without one (tools, tests of the bare segment)
        agg = Aggregator(self, self.seg, AggStore.open(self.seg))
        for s in range(self.lo, self.hi):
            dropped = agg.store.recover(s)
            if dropped:
                log.warning("worker %d: shard %d: %d plans with damaged cells dropped (planned "
                            "again)", self.index, s, dropped)
        return agg

    def _make_group_aggregators(self) -> dict[str, Any]:
        """Per aggregated namespace with a cell store: an Aggregator whose plans are rollup
        group cells (m3shm/workers/rollup.py); and the rollup series stage on the raw one."""
        from m3shm.aggstore import AggStore, store_path
        from m3shm.workers.aggregate import Aggregator
        from m3shm.workers.rollup import GroupPlanner, RollupSource

        out: dict[str, Any] = {}
        if self.aggregator is None:
            return out
        delay = self.cfg.downsample.forward_delay_ms
        RollupSource(self.aggregator, delay)
        for rt in self.ns.values():
            if rt.seg is self.seg or not os.path.exists(store_path(rt.seg.path)):
                continue
            g = Aggregator(self, rt.seg, AggStore.open(rt.seg), watermark=f"{rt.name}-")
            GroupPlanner(g, rt.id, rt.name, delay)
            for s in range(self.lo, self.hi):
                g.store.recover(s)
            out[rt.name] = g
        return out

    def _drain_beat_now(self) -> None:
        self._drain_beat = time.monotonic()

    def _max_body(self) -> int:
        return self.cfg.limits.max_body_bytes

    async def _heartbeat(self) -> None:
        stalled = False
        while True:
            if self.statsfile.header(st.H_CONFIG_GEN) != self.stats.get(st.W_CONFIG_GEN):
                self._check_config()
            if self.statsfile.header(st.H_RULES_VERSION) > self.rules.version:
                self.rules.check()
            drain = self._drain_thread
            ok = drain is None or self.stopping or (drain.is_alive() and
                                   time.monotonic() - self._drain_beat < DRAIN_STALL_S)
            if ok:
                self.stats.beat()
            elif not stalled:
                log.error("worker %d: drain thread made no progress for %.1fs; not beating",
                          self.index, DRAIN_STALL_S)
            stalled = not ok
            await asyncio.sleep(HEARTBEAT_S)

    def _check_config(self) -> None:
        """Load the config the supervisor applied, if its generation is newer than ours."""
        gen = self.statsfile.header(st.H_CONFIG_GEN)
        if gen == self.stats.get(st.W_CONFIG_GEN):
            return
        from m3shm.supervisor import applied_config_path

        try:
            with open(applied_config_path(self.statsfile.path), "rb") as f:
                loaded_gen, cfg = pickle.load(f)
        except Exception as e:  # noqa: BLE001 - keep serving on the old config
            log.error("worker %d: cannot load config generation %d: %s", self.index, gen, e)
            return
        if not isinstance(cfg, Config):
            log.error("worker %d: %s holds no config", self.index, f.name)
            return
        self.cfg = cfg
        ing = cfg.ingest
        for rt in self.ns.values():
            if rt.pipeline is not None:
                rt.pipeline.reserve_wait = ing.reserve_wait_ms / 1000
                rt.pipeline.max_pending = ing.max_pending_batches
        self.stats.set(st.W_CONFIG_GEN, loaded_gen)
        log.info("worker %d: applied config generation %d", self.index, loaded_gen)

    async def _refresh_metadata(self) -> None:
        """Merge what other workers stored (so this worker's known-hash set follows them)."""
        loop = asyncio.get_running_loop()
        while not self.stopping:
            await asyncio.sleep(1.0)
            try:
                await loop.run_in_executor(self.pool, self.metadata.refresh)
            except Exception:  # noqa: BLE001 - keep refreshing; the next try may succeed
                log.exception("worker %d: metadata refresh failed", self.index)

    def _spawn(self, coro_fn) -> None:  # noqa: ANN001 - an async callable
        async def guarded() -> None:
            try:
                await coro_fn()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - logged; the next request or timer retries
                log.exception("worker %d: background task failed", self.index)

        t = asyncio.get_running_loop().create_task(guarded())
        self.background.add(t)
        t.add_done_callback(self.background.discard)

    def _on_flush_signal(self, sig: int) -> None:
        if self.flusher is None:
            self._pending_signals.append(sig)
        elif sig == signal.SIGUSR1:
            self._spawn(self.flusher.rotate)
        else:
            self._spawn(self.flusher.admin_pass)

    def _close_predecessors(self) -> None:
        """Index the files earlier incarnations of this worker left open in this boot (they
        died): everything they published happened before this process started, so a
        sequence number drawn now (from that namespace's segment) closes them for trimming."""
        for rt in self.ns.values():
            for p in commitlog.list_files(rt.cl_dir):
                m = commitlog.NAME.match(os.path.basename(p))
                if (m and int(m.group(1)) == self.boot and int(m.group(2)) == self.index
                        and int(m.group(3)) < self.incarnation
                        and commitlog.read_index(p) is None):
                    lo, hi, n = commitlog.scan_file(p)
                    commitlog.write_index(p, int(lib.m3_seq_sync(rt.seg.base)), lo, hi, n)

    def _replay(self, rt: NsRuntime, snaps: snapshot.Snapshots) -> int:
        """Load namespace ``rt``'s snapshots of this worker's shards, then replay its commit
        logs of earlier boots into its segment's shards: only batches the snapshots do not
        hold (m3shm/storage/snapshot.py); files every worker's last pass of that namespace
        (or kept snapshot) covered are skipped."""
        from m3shm.workers.flush import read_passes

        passes = read_passes(self.data_dir, self.nworkers, rt.key)

        gone = set(commitlog.deletable(rt.cl_dir, passes))
        floors = snaps.load()

        def skip(path: str) -> bool:
            return path in gone

        n = 0
        files = [p for p in commitlog.list_files(rt.cl_dir, self.boot) if not skip(p)]
        # the aggregator's cells belong to the raw segment (aggregated namespaces' records are
        # applied as they are)
        agg = (self.aggregator if rt.seg is self.seg
               else getattr(self, "group_aggs", {}).get(rt.name))
        apply, cells = rt.seg.apply_batch, None
        if agg is not None:
            from m3shm.workers.watermark import replay_watermark

            # windows final at the last complete finalise round were written before the
            # crash: their raw samples count as late, every later window is re-aggregated --
            # also from raw samples a snapshot holds: those batches feed the cells only
            agg.replay_now_ms = replay_watermark(self.data_dir, self.boot)
            apply = agg.replay_batch
            if self._rules_aggregate(agg):
                floors = floors.with_start(snapshot.first_seq_since(
                    files, agg.replay_now_ms - self._aggregation_horizon_ms()))

                def cells(payload: Any, seq: int, lo: int, hi: int) -> int:
                    return agg.replay_batch(payload, seq, lo, hi, cells_only=True)

        read = [p for p in files if not floors.skips_file(p)]
        raw = [p for p in read if not floors.cells_only_file(p)]

        def names(ps: list[str]) -> str:
            return " ".join(os.path.basename(p) for p in ps[:20]) + (" ..." if ps[20:] else "")

        log.info("worker %d: namespace %s: replaying %d of %d commit-log files into the open "
                 "blocks (the others are covered by snapshots): %s", self.index, rt.name,
                 len(raw), len(files), names(raw))
        if len(read) > len(raw):
            log.info("worker %d: and %d into aggregation cells only (their raw samples are in "
                     "snapshots): %s", self.index, len(read) - len(raw),
                     names([p for p in read if p not in raw]))
        # replay mode (m3_aggst_replay_mode, this thread): a group owner keeps only the
        # ROLLUP_IN rows of input windows final at the watermark (the sources forward every
        # later one again), and its group series' replayed points seal their cells
        if agg is not None:
            log.info("worker %d: namespace %s: aggregation replayed as of the finalise "
                     "watermark %d", self.index, rt.name, agg.replay_now_ms)
            lib.m3_aggst_replay_mode(1, agg.replay_now_ms - agg.admission_ms
                                     if rt.seg is not self.seg else 2**63 - 1)
        try:
            for b in commitlog.replay(rt.cl_dir, self.boot, repair=self.index == 0,
                                      skip=lambda p: skip(p) or floors.skips_file(p)):
                n += floors.apply(apply, b.payload, b.seq, cells)
        finally:
            lib.m3_aggst_replay_mode(0, 0)
        if self.index == 0:
            # files of earlier boots left without an index (a crash): every worker of this
            # boot replays them before its first flush pass, so they are closed as of this
            # boot's first sequence number
            for p in files:
                if commitlog.read_index(p) is None:
                    lo, hi, nb = commitlog.scan_file(p)
                    commitlog.write_index(p, rt.seg.params.seq_base, lo, hi, nb)
        return n

    @staticmethod
    def _rules_aggregate(agg: Any) -> bool:
        """Whether any installed rule-set version writes to a storage policy (else no cell
        ever outputs anything, and a snapshot's batches need no replay into cells)."""
        compiled = [agg.compiled] + [c for _, _, c in getattr(agg, "versions", [])]
        return any(c.rules.policies() for c in compiled if c is not None)

    def _aggregation_horizon_ms(self) -> int:
        """How far before a finalise watermark a raw sample may still feed a window that was
        not final at it (admission plus the coarsest resolution; twice that, to be safe:
        feeding a final window only counts the sample as late)."""
        adm = self.cfg.downsample.admission_ms or self.cfg.raw_namespace.buffer_past_ms
        res = max((ns.resolution_ms for ns in self.cfg.namespaces if ns.aggregated), default=0)
        return 2 * (adm + res)

    def wake_drain(self) -> None:
        """Wake the drain thread if it sleeps on its doorbell (csrc/bell.c)."""
        self.seg.ring(self.index)

    def _drain_loop(self) -> None:
        idle = 0
        # the raw segment through the aggregator (its cells), the aggregated ones as they are
        groups = getattr(self, "group_aggs", {})
        others = [rt.seg for rt in self.ns.values()
                  if rt.seg is not self.seg and rt.name not in groups]
        segs = [rt.seg for rt in self.ns.values()]
        bases = Segment.bases(segs)
        while not self._drain_stop.is_set():
            self._drain_beat = time.monotonic()
            if self.aggregator is not None:
                n = self.aggregator.drain(self.lo, self.hi, 1024, self._drain_beat_now)
            else:
                n = self.seg.drain_range(self.lo, self.hi, 1024)
            for g in groups.values():  # aggregated namespaces: their rollup group cells
                n += g.drain(self.lo, self.hi, 1024, self._drain_beat_now)
            for seg in others:
                n += seg.drain_range(self.lo, self.hi, 1024)
            if n:
                idle = 0
                continue
            # nothing applied: sleep on the doorbell until a producer publishes to one of our
            # shards (at most DRAIN_IDLE_MS, so the beat above stays fresh); if records wait
            # (for another producer's pending seq, lane.c), poll as before
            if self.seg.wait_for_work(self.index, bases, len(segs), self.lo, self.hi,
                                      DRAIN_IDLE_MS):
                idle += 1
                time.sleep(0.0002 if idle < 100 else 0.002)

    async def _shutdown(self, server: asyncio.base_events.Server) -> None:
        self.stopping = True
        server.close()
        for t in list(self.background):
            t.cancel()
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=20)
        # the raw pipeline first: what its last batches make (aggregated points) may still
        # be submitted to the aggregated namespaces' pipelines
        for rt in sorted(self.ns.values(), key=lambda rt: rt.aggregated):
            if rt.pipeline is not None:
                await rt.pipeline.close()
        self._refresh_task.cancel()
        self.metadata.close()
        for rt in self.ns.values():
            if rt.clog is not None:
                rt.clog.close()
            rt.seg.set_producer_done(self.index, True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if all(rt.seg.all_producers_done() and not any(
                    rt.seg.backlog(s) for s in range(self.lo, self.hi))
                    for rt in self.ns.values()):
                break
            await asyncio.sleep(0.005)
        self._drain_stop.set()
        self.wake_drain()
        if self._drain_thread is not None:
            self._drain_thread.join()
        self.pool.shutdown(wait=True)
        self.flushed_store.close()
        with contextlib.suppress(Exception):
            await server.wait_closed()
        log.info("worker %d: stopped cleanly", self.index)


def worker_main(cfg: Config, seg: Segment, index: int, boot: int, incarnation: int,
                data_dir: str, parent: int, stats: st.StatsFile,
                segs: dict[str, Segment] | None = None) -> int:
    """Entry point in the forked child."""
    die_with_parent(parent)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    for sig in (signal.SIGUSR1, signal.SIGUSR2):  # until the event loop handles them
        signal.signal(sig, signal.SIG_IGN)
    return Worker(cfg, seg, index, boot, incarnation, data_dir, stats, segs).run()
