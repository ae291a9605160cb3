"""``GET /metrics``: the daemon's own metrics in Prometheus text exposition format 0.0.4.

Whichever worker answers, the figures are the daemon's: counters come from every worker's
block of the stats file (m3shm/stats.py) summed, per-shard gauges from the shared segment, and
the ``process_*`` metrics (the names Prometheus client libraries use) from /proc of the
supervisor and every live worker, summed. ``process_cpu_seconds_total`` adds the supervisor's
reaped children, so the CPU of restarted workers is not lost; ``process_resident_memory_bytes``
is a plain sum of RSS (the shared segment counts once per process that touched it).

Names are ``m3shm_<subsystem>_<what>_<unit>``; counters end in ``_total``. The page is built on
the worker's thread pool (a few hundred lines; no per-sample work).
"""

from __future__ import annotations

import contextlib
import os
import resource
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from m3shm import __version__
from m3shm import stats as st

if TYPE_CHECKING:
    from m3shm.shm import Segment

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


class _Page:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_: str,
               samples: Iterable[tuple[str, float]]) -> None:
        """One metric family; samples are (label text without braces, value)."""
        self.lines.append(f"# HELP {name} {help_}")
        self.lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            self.lines.append(f"{name}{{{labels}}} {_num(value)}" if labels else
                              f"{name} {_num(value)}")

    def one(self, name: str, kind: str, help_: str, value: float) -> None:
        self.family(name, kind, help_, [("", value)])

    def text(self) -> bytes:
        return ("\n".join(self.lines) + "\n").encode()


def _num(v: float) -> str:
    if isinstance(v, int):
        return str(v)
    if v != v:
        return "NaN"
    if v in (float("inf"), float("-inf")):
        return "+Inf" if v > 0 else "-Inf"
    return repr(v)


def render(stats: st.StatsFile, seg: Segment, workers_configured: int,
           aggregator: Any = None, namespaces: dict[str, Segment] | None = None) -> bytes:
    """The whole page (runs on a pool thread). ``aggregator``: the asking worker's
    m3shm.workers.aggregate.Aggregator (its cell store holds every shard's counters).
    ``namespaces``: every namespace's segment by name (per-namespace totals)."""
    p = _Page()
    n = stats.nworkers
    ws = [stats.worker(i) for i in range(n)]
    now = st.monotonic_ms()
    p.family("m3shm_build_info", "gauge", "Build of the m3shm daemon (always 1).",
             [(f'version="{__version__}"', 1)])
    p.one("m3shm_workers", "gauge", "Worker processes configured.", workers_configured)
    p.family("m3shm_worker_up", "gauge",
             "1 if the worker's heartbeat is fresh (the supervisor's watchdog rule).",
             [(f'worker="{i}"', int(_fresh(w, now))) for i, w in enumerate(ws)])
    p.family("m3shm_worker_state", "gauge", "The worker's state (1 for the current one).",
             [(f'worker="{i}",state="{name}"', int(w.get(st.W_STATE) == k))
              for i, w in enumerate(ws) for k, name in enumerate(st.STATES)])
    p.family("m3shm_worker_restarts_total", "counter",
             "Times the supervisor restarted the worker after it exited.",
             [(f'worker="{i}"', w.get(st.W_RESTARTS)) for i, w in enumerate(ws)])
    p.one("m3shm_ready", "gauge", "1 once every worker recovered (READY=1 was sent).",
          stats.header(st.H_READY))
    p.one("m3shm_config_generation", "gauge", "Generation of the config in force (1 at start, "
          "+1 per accepted reload).", stats.header(st.H_CONFIG_GEN))
    p.family("m3shm_config_reloads_total", "counter", "SIGHUP reloads by result.",
             [('result="success"', stats.header(st.H_RELOADS)),
              ('result="failure"', stats.header(st.H_RELOAD_FAILURES))])
    p.one("m3shm_rules_version", "gauge", "Newest version of the downsampling rules "
          "(<data>/rules.json).", stats.header(st.H_RULES_VERSION))
    p.one("m3shm_rules_activation_timestamp_seconds", "gauge", "When the newest rules version "
          "takes over (windows starting at or after it use it).",
          stats.header(st.H_RULES_ACTIVATION_MS) / 1000)
    p.one("m3shm_rules_changes_total", "counter", "Rules versions written since start "
          "(PUT /api/v1/rules, SIGHUP).", stats.header(st.H_RULES_CHANGES))
    p.family("m3shm_rules_worker_version", "gauge", "Newest rules version each worker "
             "installed.", [(f'worker="{i}"', w.get(st.W_RULES_VERSION))
                            for i, w in enumerate(ws)])

    p.one("m3shm_remote_write_requests_total", "counter", "Remote write requests received.",
          stats.sum(st.W_REQUESTS))
    p.family("m3shm_remote_write_requests_rejected_total", "counter",
             "Remote write requests answered with an error (4xx, 503, 507), by reason.",
             [(f'reason="{r}"', stats.sum(st.W_REQ_REJECTED + i))
              for i, r in enumerate(st.REQUEST_REASONS)])
    p.one("m3shm_ingest_samples_received_total", "counter",
          "Samples in remote write requests that could be decoded.",
          stats.sum(st.W_SAMPLES_RECEIVED))
    p.one("m3shm_ingest_samples_written_total", "counter",
          "Samples acknowledged: durable in the commit log and published to the shards.",
          stats.sum(st.W_SAMPLES_WRITTEN))
    p.family("m3shm_ingest_samples_rejected_total", "counter",
             "Samples not written, by reason (samples of invalid series count under the "
             "reason of the request's first invalid series).",
             [(f'reason="{r}"', stats.sum(st.W_SAMPLES_REJECTED + i))
              for i, r in enumerate(st.SAMPLE_REASONS)])

    p.family("m3shm_flush_failures_total", "counter",
             "Flush passes and commit-log rotations that failed (retried by the next pass), "
             "by cause.",
             [('cause="disk_full"', stats.sum(st.W_FLUSH_DISK_FULL)),
              ('cause="other"', stats.sum(st.W_FLUSH_FAILURES) - stats.sum(st.W_FLUSH_DISK_FULL))])
    p.one("m3shm_commitlog_written_bytes_total", "counter", "Bytes appended to commit logs.",
          stats.sum(st.W_CL_BYTES))
    p.one("m3shm_commitlog_batches_total", "counter", "Batches appended to commit logs.",
          stats.sum(st.W_CL_BATCHES))
    p.lines.append("# HELP m3shm_commitlog_fsync_seconds Latency of commit log fdatasync calls.")
    p.lines.append("# TYPE m3shm_commitlog_fsync_seconds histogram")
    for i, le in enumerate((*st.FSYNC_BUCKETS_S, float("inf"))):
        le_s = "+Inf" if le == float("inf") else repr(le)
        p.lines.append(f'm3shm_commitlog_fsync_seconds_bucket{{le="{le_s}"}} '
                       f"{stats.sum(st.W_FSYNC_BUCKETS + i)}")
    p.lines.append(f"m3shm_commitlog_fsync_seconds_sum {stats.sum(st.W_FSYNC_SUM_NS) / 1e9!r}")
    p.lines.append(f"m3shm_commitlog_fsync_seconds_count {stats.sum(st.W_FSYNC_COUNT)}")

    _shards(p, seg)
    if namespaces:
        _namespaces(p, namespaces)
    if aggregator is not None:
        _downsample(p, aggregator.store.totals())
        groups = getattr(getattr(aggregator, "w", None), "group_aggs", None)
        if groups:
            _rollup(p, {name: g.store.totals() for name, g in groups.items()})
            _rollup_barrier(p, stats, ws, aggregator.w.cfg.downsample.forward_delay_ms)
    _process(p, stats, ws)
    return p.text()


def _fresh(w: st.WorkerStats, now_ms: int) -> bool:
    from m3shm.supervisor import HEARTBEAT_STALE_S

    hb = w.get(st.W_HEARTBEAT_MS)
    return hb > 0 and now_ms - hb <= HEARTBEAT_STALE_S * 1000


def _namespaces(p: _Page, segs: dict[str, Segment]) -> None:
    """Each namespace's segment summed over its shards (the per-shard families above are
    the raw namespace's)."""
    tot = {}
    for name, seg in segs.items():
        per = [seg.shard_stats(s) for s in range(seg.params.num_shards)]
        tot[name] = {k: sum(x[k] for x in per) for k in ("nseries", "arena_used",
                                                          "arena_bytes", "samples",
                                                          "dropped")}
        tot[name]["backlog"] = sum(seg.lane_backlog(s) for s in range(seg.params.num_shards))
    for metric, kind, key, help_ in (
            ("m3shm_namespace_series", "gauge", "nseries",
             "Series in the namespace's segment (every shard)."),
            ("m3shm_namespace_arena_used_bytes", "gauge", "arena_used",
             "Bytes of the namespace's shard arenas in use."),
            ("m3shm_namespace_arena_bytes", "gauge", "arena_bytes",
             "Size of the namespace's shard arenas (all shards)."),
            ("m3shm_namespace_samples_total", "counter", "samples",
             "Samples applied to the namespace's segment since it was created."),
            ("m3shm_namespace_dropped_samples_total", "counter", "dropped",
             "Samples the namespace's shards could not apply (see the daemon log)."),
            ("m3shm_namespace_lane_backlog_bytes", "gauge", "backlog",
             "Bytes published to the namespace's lanes and not yet applied.")):
        p.family(metric, kind, help_,
                 [(f'namespace="{name}"', t[key]) for name, t in tot.items()])


def _shards(p: _Page, seg: Segment) -> None:
    nshards = seg.params.num_shards
    per = [seg.shard_stats(s) for s in range(nshards)]
    lane_cap = seg.params.lane_bytes * seg.params.num_producers
    backlog = [seg.lane_backlog(s) for s in range(nshards)]
    p.family("m3shm_shard_series", "gauge", "Series in the shard's table.",
             [(f'shard="{s}"', x["nseries"]) for s, x in enumerate(per)])
    p.family("m3shm_shard_arena_used_bytes", "gauge",
             "Bytes of the shard's arena (labels, open-block chunks) in use.",
             [(f'shard="{s}"', x["arena_used"]) for s, x in enumerate(per)])
    p.one("m3shm_shard_arena_bytes", "gauge", "Size of each shard's arena.",
          per[0]["arena_bytes"] if per else 0)
    p.family("m3shm_shard_samples_total", "counter",
             "Samples applied to the shard since the segment was created.",
             [(f'shard="{s}"', x["samples"]) for s, x in enumerate(per)])
    p.family("m3shm_shard_out_of_order_samples_total", "counter",
             "Samples applied out of order (to a block's additional stream).",
             [(f'shard="{s}"', x["ooo_samples"]) for s, x in enumerate(per)])
    p.family("m3shm_shard_dropped_samples_total", "counter",
             "Samples the shard could not apply (see the daemon log).",
             [(f'shard="{s}"', x["dropped"]) for s, x in enumerate(per)])
    p.family("m3shm_ingest_lane_backlog_bytes", "gauge",
             "Bytes published to the shard's lanes (its MPSC ring) and not yet applied.",
             [(f'shard="{s}"', b) for s, b in enumerate(backlog)])
    p.family("m3shm_ingest_lane_fill_ratio", "gauge",
             "The shard's lane backlog over the capacity of all its lanes.",
             [(f'shard="{s}"', b / lane_cap) for s, b in enumerate(backlog)])
    p.one("m3shm_ingest_lane_capacity_bytes", "gauge",
          "Capacity of one shard's lanes together (lane_bytes x workers).", lane_cap)


def _downsample(p: _Page, t: dict[str, int]) -> None:
    """Counters of the downsampling cells of every shard (docs/rules.md)."""
    p.one("m3shm_downsample_late_samples_total", "counter",
          "Samples for windows already final (older than the admission window): counted, not "
          "aggregated (once per cell).", t["late"])
    p.one("m3shm_downsample_evicted_windows_total", "counter",
          "Windows finalised before their admission window ended, to make room in a cell.",
          t["evicted"])
    p.one("m3shm_downsample_out_of_order_samples_total", "counter",
          "Samples a transform that needs time order (Increase, PerSecond, Add) skipped.",
          t["ooo"])
    p.one("m3shm_downsample_points_total", "counter",
          "Aggregated points written (finalised windows, one per aggregation).", t["points"])
    p.one("m3shm_downsample_samples_total", "counter",
          "Samples applied to aggregation windows (once per cell).", t["applied"])
    p.one("m3shm_downsample_raw_dropped_samples_total", "counter",
          "Samples not stored raw because a drop rule matched their series.",
          t["raw_dropped"])
    p.one("m3shm_downsample_evicted_points_lost_total", "counter",
          "Points of windows evicted early that found the shard's spill full (not written).",
          t["spill_lost"])
    p.one("m3shm_downsample_cells", "gauge", "Aggregation cells (series x policy x rule).",
          t["cells"])
    p.one("m3shm_downsample_cell_bytes", "gauge", "Bytes of aggregation cells and plans.",
          t["cell_bytes"])
    p.one("m3shm_downsample_plans_refused_total", "counter",
          "Series left without cells because the cell arena was full (shm.cell_arena_bytes).",
          t["refused"])
    p.one("m3shm_rollup_forward_refused_total", "counter",
          "Forwarded rollup records a group namespace's admission refused (its shard full): "
          "their values are not rolled up.", t["fwd_refused"])


def _rollup(p: _Page, by_ns: dict[str, dict[str, int]]) -> None:
    """Rollup group cells per aggregated namespace (m3shm/workers/rollup.py)."""
    rows = sorted(by_ns.items())
    p.family("m3shm_rollup_records_applied_total", "counter",
             "Forwarded rollup records (ROLLUP_IN) applied to group cells.",
             [(f'namespace="{n}"', t["rollup_applied"]) for n, t in rows])
    p.family("m3shm_rollup_records_duplicate_total", "counter",
             "Forwarded rollup records skipped as already applied (a resent forward).",
             [(f'namespace="{n}"', t["rollup_dup"]) for n, t in rows])
    p.family("m3shm_rollup_records_unmatched_total", "counter",
             "Forwarded rollup records with no group cell of their rule (dropped).",
             [(f'namespace="{n}"', t["rollup_unmatched"]) for n, t in rows])
    p.family("m3shm_rollup_late_values_total", "counter",
             "Forwarded window values for group windows already final (beyond admission + "
             "downsample.forward_delay): counted, not aggregated.",
             [(f'namespace="{n}"', t["late"]) for n, t in rows])
    p.family("m3shm_rollup_evicted_windows_total", "counter",
             "Group windows finalised early to make room in a cell (a source held them back "
             "longer than the cell's ring covers; its later values for them are late).",
             [(f'namespace="{n}"', t["evicted"]) for n, t in rows])
    p.family("m3shm_rollup_group_cells", "gauge", "Rollup group cells.",
             [(f'namespace="{n}"', t["cells"]) for n, t in rows])


def _rollup_barrier(p: _Page, stats: st.StatsFile, ws: list[st.WorkerStats],
                    forward_delay_ms: int) -> None:
    """The rollup barrier's source marks (m3shm/workers/barrier.py, csrc/fwdmark.c)."""
    marks = [w.get(st.W_FWD_MARK_MS) for w in ws]
    now = time.time()
    p.family("m3shm_rollup_source_watermark_seconds", "gauge",
             "Unix time up to which the worker has forwarded every final rollup input window "
             "(0: not yet known this boot).",
             [(f'worker="{i}"', m / 1000) for i, m in enumerate(marks)])
    lag = max(0.0, now - min(marks) / 1000) if marks else 0.0
    p.one("m3shm_rollup_barrier_lag_seconds", "gauge",
          "How far the slowest source's forwarding is behind the clock (about one finalise "
          "round when every worker is healthy).", lag)
    p.one("m3shm_rollup_held_back_seconds", "gauge",
          "How long rollup group windows are held past their schedule (window end + admission "
          "+ downsample.forward_delay) waiting for a source to forward them.",
          max(0.0, lag - forward_delay_ms / 1000))


def _proc_stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _process(p: _Page, stats: st.StatsFile, ws: list[st.WorkerStats]) -> None:
    sup = stats.header(st.H_SUPERVISOR_PID)
    pids = [sup] + [w.get(st.W_PID) for w in ws if w.get(st.W_PID)]
    cpu_ticks = rss = vsz = fds = 0
    alive = 0
    for i, pid in enumerate(pids):
        f = _proc_stat(pid)
        # fields after ")": state=0 ppid=1 ... utime=11 stime=12 cutime=13 cstime=14 vsize=20
        # rss=21 (pages)
        if f is None or (i > 0 and int(f[1]) != sup) or f[0] == "Z":
            continue
        alive += 1
        cpu_ticks += int(f[11]) + int(f[12])
        if i == 0:
            cpu_ticks += int(f[13]) + int(f[14])  # reaped workers of earlier incarnations
        vsz += int(f[20])
        rss += int(f[21]) * _PAGE
        with contextlib.suppress(OSError):
            fds += len(os.listdir(f"/proc/{pid}/fd"))

    p.one("process_cpu_seconds_total", "counter",
          "User and system CPU time of the supervisor and its workers, in seconds.",
          cpu_ticks / _CLK_TCK)
    p.one("process_resident_memory_bytes", "gauge",
          "Resident memory of the supervisor and workers, summed (shared pages count in "
          "every process).", rss)
    p.one("process_virtual_memory_bytes", "gauge", "Virtual memory of all processes, summed.",
          vsz)
    p.one("process_open_fds", "gauge", "Open file descriptors of all processes, summed.", fds)
    p.one("process_max_fds", "gauge", "Per-process limit on open file descriptors.",
          resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    p.one("process_start_time_seconds", "gauge",
          "Start time of the supervisor since the Unix epoch in seconds.",
          stats.header(st.H_START_UNIX_MS) / 1000)
    p.one("m3shm_processes", "gauge", "Live daemon processes (supervisor and workers).", alive)
