"""Recovery time: seconds from start to /ready, per million samples replayed from the commit log
and per million series on disk (perf, not a test).

    .venv/bin/python perf/recovery.py [--series 200000] [--samples 10] [--runs 3]

Two fresh daemons (``m3shm serve`` of this checkout, 64 shards, 2 workers, the default
namespace: 2 h blocks, 10 min buffer past), each filled over remote write and then restarted
``--runs`` times; every restart is timed from the spawn of ``m3shm serve`` to the first 200 of
``/ready`` (polled every 5 ms):

- ``commitlog``: ``--series`` series x ``--samples`` samples in the open block (not flushed),
  then the whole daemon is SIGKILLed; every restart replays all of it from the commit log
  (after a kill nothing is flushed or trimmed, so each restart replays the same records). After
  each restart one metric's samples are read back with /api/v1/export and counted.
- ``filesets``: the same series with ``--samples`` samples each in a block that closed hours
  ago (cold writes), ``POST /api/v1/admin/flush`` (filesets written, the commit log they cover
  deleted), then SIGTERM; every restart starts over ``--series`` series on disk.
- ``--age-min`` (default 9) places the ``commitlog`` and ``snapshot`` samples: 9 keeps them
  inside the buffer past (warm); 60 makes them cold writes older than what downsampling
  re-aggregates after a restart (its admission window), the steady state of a daemon that has
  run for a while, where the commit log before a snapshot holds nothing a window still needs.
- ``snapshot``: as ``commitlog``, but after writing ``POST /api/v1/admin/flush`` (which
  rotates the commit logs and snapshots the open blocks, docs/formats/snapshot.md), then one
  more sample per series, then SIGKILL: every restart loads the snapshots and replays only the
  batches written after them (``--samples`` - 1 of every series' samples come from the
  snapshot). Compare its ``s_per_million_active_series`` with ``commitlog``'s (no snapshot).
- ``empty``: a daemon with an empty data directory, the fixed cost of starting.

Memory: the peak RSS (``VmHWM``) of the supervisor and of each worker after ready, summed and
largest (shared-memory pages count in every process that touched them), and the commit log's
size, to show replay does not hold the log in memory. Times are medians of the restarts; so is
``cpu_s``, the CPU seconds (user + system) the daemon's processes had used when ready, which
travels better than wall time on a shared machine (``load_average`` is the 1-minute load seen).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stores import M3shm, du, http_call, slice_bodies  # noqa: E402

BLOCK_MS = 2 * 3_600_000


def dataset(nseries: int, nsamples: int, t0: int, step: int = 15_000):
    labels, tss, vss = [], [], []
    ts = t0 + np.arange(nsamples, dtype=np.int64) * step
    for n in range(nseries):
        labels.append({"__name__": f"node_metric_{n % 100}", "job": "node",
                       "instance": f"host-{n // 100}:9100", "cpu": str(n % 8)})
        tss.append(ts)
        vss.append(np.arange(nsamples, dtype=np.float64) * (1 + n % 3) + n)
    return labels, tss, vss


def bodies_of(ds, per_body: int = 20_000, slice_ms: int = 1 << 40) -> list[bytes]:
    """Bodies of at most ``per_body`` series each (every series' samples in one body, or
    with ``slice_ms`` the step: one body per scrape round, as Prometheus sends them)."""
    labels, tss, vss = ds
    out = []
    for i in range(0, len(labels), per_body):
        part = (labels[i:i + per_body], tss[i:i + per_body], vss[i:i + per_body])
        out += slice_bodies(part, slice_ms)
    return out


def peak_rss(pid: int) -> dict:
    """VmHWM (peak resident set) of the supervisor and each worker, in MiB, and the CPU time
    (user + system) they have used so far, in seconds."""
    def hwm(p: int) -> int:
        with open(f"/proc/{p}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        return 0

    def cpu(p: int) -> float:
        with open(f"/proc/{p}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(x) for x in f.read().split()]
    except OSError:
        kids = []
    each = [hwm(pid)] + [hwm(k) for k in kids]
    return {"sum_mib": round(sum(each) / 2**20, 1), "max_mib": round(max(each) / 2**20, 1),
            "processes": len(each), "cpu_s": round(sum(cpu(p) for p in [pid, *kids]), 2)}


def timed_start(d: M3shm) -> tuple[float, dict]:
    t0 = time.perf_counter()
    d.start(wait=False)
    import urllib.request

    while True:
        assert d.proc is not None
        if d.proc.poll() is not None:
            raise RuntimeError(f"daemon exited {d.proc.returncode}:\n{d.logtail()}")
        try:
            with urllib.request.urlopen(d.url + "/ready", timeout=5) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        time.sleep(0.005)
    took = time.perf_counter() - t0
    assert d.proc is not None
    return took, peak_rss(d.proc.pid)


def kill_all(d: M3shm) -> None:
    assert d.proc is not None
    pid = d.proc.pid
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(x) for x in f.read().split()]
    except OSError:
        kids = []
    for p in [pid, *kids]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)
    d.proc.wait()
    for p in kids:
        while os.path.exists(f"/proc/{p}"):
            try:
                with open(f"/proc/{p}/stat") as f:
                    if f.read().split(")")[-1].split()[0] == "Z":
                        break
            except FileNotFoundError:
                break
            time.sleep(0.01)


def count_samples(d: M3shm, metric: str) -> int:
    q = urllib.parse.urlencode([("match[]", f'{{__name__="{metric}"}}')])
    body = http_call(f"{d.url}/api/v1/export?{q}").decode()
    return sum(len(json.loads(line)["timestamps"]) for line in body.splitlines() if line)


def make_daemon(tmp: Path, nseries: int, extra: str = "") -> M3shm:
    per_shard = 1 << max(14, (2 * nseries // 64 - 1).bit_length())
    arena = max(16, 2 * -(-(nseries * 1024 // 64) >> 20))  # MiB per shard
    return M3shm(tmp, shards=64, workers=2, arena=f"{arena}MiB", series_per_shard=per_shard,
                 extra=extra)


def scenario(kind: str, nseries: int, nsamples: int, runs: int, keep: bool = False,
             age_min: int = 9, downsampling: bool = True, rounds: bool = False) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix=f"m3shm-recovery-{kind}-"))
    # snapshots only when a scenario asks (admin flush); none taken by the timer meanwhile
    extra = "flush: {interval: 1h, snapshot_interval: 1h}\n"
    if not downsampling:  # no storage policy: no aggregated namespace, empty plans
        extra += "downsample:\n  rules: {defaultPolicies: []}\n"
    d = make_daemon(tmp, nseries, extra)
    try:
        first, _ = timed_start(d)
        out: dict = {"first_start_s": round(first, 3)}
        now = int(time.time() * 1000)
        if kind in ("commitlog", "snapshot"):
            # default: inside the 10 min buffer past (warm, in the open block); older ages are
            # cold writes into the open blocks, older than downsampling's admission window
            t0 = now - age_min * 60_000
            step = min(15_000, 8 * 60_000 // max(nsamples, 1))
        else:
            t0 = (now - 8 * 3_600_000) // BLOCK_MS * BLOCK_MS  # a block closed hours ago
            step = 15_000
        if kind != "empty":
            ds = dataset(nseries, nsamples, t0, step)
            if kind == "snapshot":  # all but the last sample before the snapshot
                ds, last = ((ds[0], [t[:-1] for t in ds[1]], [v[:-1] for v in ds[2]]),
                            (ds[0], [t[-1:] for t in ds[1]], [v[-1:] for v in ds[2]]))
            slice_ms = step if rounds and kind != "filesets" else 1 << 40
            bodies = bodies_of(ds, slice_ms=slice_ms)
            w0 = time.perf_counter()
            d.write(bodies)
            out["write_s"] = round(time.perf_counter() - w0, 2)
            if kind == "snapshot":
                s0 = time.perf_counter()
                http_call(d.url + "/api/v1/admin/flush", "POST", b"")
                out["admin_flush_with_snapshot_s"] = round(time.perf_counter() - s0, 2)
                d.write(bodies_of(last, slice_ms=slice_ms))
            out["samples"] = nseries * nsamples
            out["series"] = nseries
        if kind == "filesets":
            http_call(d.url + "/api/v1/admin/flush", "POST", b"")
            d.stop()
        else:
            kill_all(d)
        out["commitlog_bytes"] = du(d.data / "commitlog")["apparent"]
        out["filesets_bytes"] = du(d.data / "filesets")["apparent"]
        out["snapshots_bytes"] = du(d.data / "snapshots")["apparent"]
        times, rss = [], []
        for _ in range(runs):
            took, peak = timed_start(d)
            times.append(took)
            rss.append(peak)
            if kind in ("commitlog", "snapshot"):
                got = count_samples(d, "node_metric_0")
                want = len(range(0, nseries, 100)) * nsamples
                if got != want:
                    raise RuntimeError(f"after replay node_metric_0 has {got} samples, "
                                       f"expected {want}")
            if kind == "filesets":
                d.stop()
            else:
                kill_all(d)
        out["ready_s"] = round(statistics.median(times), 3)
        out["ready_s_all"] = [round(t, 3) for t in times]
        out["cpu_s"] = statistics.median(r["cpu_s"] for r in rss)
        out["load_average"] = os.getloadavg()[0]
        out["peak_rss"] = max(rss, key=lambda r: r["sum_mib"])
        return out
    except Exception as e:
        raise RuntimeError(f"{kind}: {e}\n{d.logtail()}") from e
    finally:
        d.stop()
        if keep:
            print(f"{kind}: kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--series", type=int, default=200_000)
    ap.add_argument("--samples", type=int, default=10, help="per series")
    ap.add_argument("--runs", type=int, default=3, help="restarts timed per scenario")
    ap.add_argument("--scenarios", default="empty,commitlog,snapshot,filesets")
    ap.add_argument("--keep", action="store_true", help="keep the data directories")
    ap.add_argument("--scrape-rounds", action="store_true",
                    help="commitlog/snapshot: one sample per series per request (a scrape "
                    "round each, as Prometheus sends), not every sample of a series at once")
    ap.add_argument("--no-downsampling", action="store_true",
                    help="run the daemon without storage policies (no aggregated namespace)")
    ap.add_argument("--age-min", type=int, default=9,
                    help="commitlog/snapshot: the first sample's age in minutes (samples span "
                    "8 min from it); above ~25 the samples are older than what downsampling "
                    "re-aggregates after a restart, as in a steady state")
    a = ap.parse_args()
    res: dict = {"series": a.series, "samples_per_series": a.samples, "runs": a.runs,
                 "age_min": a.age_min, "downsampling": not a.no_downsampling,
                 "scrape_rounds": a.scrape_rounds,
                 "shards": 64, "workers": 2}
    for kind in a.scenarios.split(","):
        res[kind] = scenario(kind, a.series, a.samples, a.runs, a.keep, a.age_min,
                             not a.no_downsampling, a.scrape_rounds)
    base = res.get("empty", {}).get("ready_s", 0.0)
    if "commitlog" in res:
        c = res["commitlog"]
        c["s_per_million_samples_replayed"] = round(c["ready_s"] / c["samples"] * 1e6, 3)
        c["s_per_million_active_series"] = round(c["ready_s"] / c["series"] * 1e6, 3)
        c["s_per_million_samples_above_empty"] = round((c["ready_s"] - base) /
                                                       c["samples"] * 1e6, 3)
        c["cpu_s_per_million_samples_above_empty"] = round(
            (c["cpu_s"] - res.get("empty", {}).get("cpu_s", 0.0)) / c["samples"] * 1e6, 3)
    if "snapshot" in res:
        c = res["snapshot"]
        c["s_per_million_active_series"] = round(c["ready_s"] / c["series"] * 1e6, 3)
        c["s_per_million_active_series_above_empty"] = round(
            (c["ready_s"] - base) / c["series"] * 1e6, 3)
    if "commitlog" in res:
        c = res["commitlog"]
        c["s_per_million_active_series_above_empty"] = round(
            (c["ready_s"] - base) / c["series"] * 1e6, 3)
    if "filesets" in res:
        f = res["filesets"]
        f["s_per_million_series_on_disk"] = round(f["ready_s"] / f["series"] * 1e6, 3)
        f["s_per_million_series_above_empty"] = round((f["ready_s"] - base) /
                                                      f["series"] * 1e6, 3)
        f["cpu_s_per_million_series_above_empty"] = round(
            (f["cpu_s"] - res.get("empty", {}).get("cpu_s", 0.0)) / f["series"] * 1e6, 3)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
