"""What a live rule change costs the daemon: how long each worker takes to plan its series
again with the new version, and the cell memory held while both versions' plans exist.

A 2-worker daemon holds N series (``perf_<i>``, one sample every second from a writer thread)
kept at 10 s as Last; ``PUT /api/v1/rules`` changes them to Max and Last. Figures per run:
replan seconds per worker (from its log: version installed -> version planned; wall time,
so it includes waiting for the CPU on a busy machine), the drain threads' CPU seconds for it
(thread_time, logged by the Aggregator), series changed, ``m3shm_downsample_cell_bytes``
before the change, once both plans exist, and after the activation + admission when the old
plans are freed. Prints JSON (medians of --runs).

    .venv/bin/python perf/rules_change.py --series 20000 --runs 3
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import threading
import time
import urllib.request
from datetime import datetime
from pathlib import Path

import snappy
from perfdaemon import metric, serve

from m3shm.proto import remote_pb2

CFG = """
workers: 2
shards: 16
namespaces:
  - {name: default, retention: 2h, blockSize: 1h, bufferPast: 10s, bufferFuture: 5s}
downsample:
  admission: 10s
  rules:
    defaultPolicies: []
    mappingRules:
      - {name: perf, filter: "__name__:perf_*", aggregations: [Last], storagePolicies: [10s:2h]}
"""
V2 = {"defaultPolicies": [], "mappingRules": [
    {"name": "perf", "filter": "__name__:perf_*", "aggregations": ["Max", "Last"],
     "storagePolicies": ["10s:2h"]}]}
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \d+ m3shm\.\S+ \w+ (.*)$")


def body(nseries: int, lo: int, hi: int, ts: int) -> bytes:
    w = remote_pb2.WriteRequest()
    for i in range(lo, hi):
        t = w.timeseries.add()
        for k, v in (("__name__", f"perf_{i % 50}"), ("instance", f"i{i}")):
            lab = t.labels.add()
            lab.name, lab.value = k, v
        s = t.samples.add()
        s.timestamp, s.value = ts, float(i)
    return snappy.compress(w.SerializeToString())


def post(url: str, data: bytes, method: str = "POST", ctype: str = "application/x-protobuf",
         enc: str | None = "snappy") -> bytes:
    h = {"Content-Type": ctype}
    if enc:
        h["Content-Encoding"] = enc
    req = urllib.request.Request(url, data=data, method=method, headers=h)
    with urllib.request.urlopen(req, timeout=60) as r:
        return r.read()


def log_times(log: Path, pattern: str) -> dict[int, float]:
    """worker -> unix time of its first log line matching pattern (with a (\\d+) worker)."""
    out: dict[int, float] = {}
    for line in log.read_text(errors="replace").splitlines():
        m = LOG_TIME.match(line)
        if not m:
            continue
        g = re.search(pattern, m.group(2))
        if g and int(g.group(1)) not in out:
            t = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f")
            out[int(g.group(1))] = t.timestamp()
    return out


def run_once(nseries: int) -> dict:
    stop = threading.Event()
    with serve(CFG, "m3shm-perf-rules-") as d:
        url, logp = d.url, d.log
        try:
            def writer() -> None:
                while not stop.is_set():
                    t = int(time.time() * 1000)
                    for lo in range(0, nseries, 5000):
                        post(url + "/api/v1/write", body(nseries, lo, min(nseries, lo + 5000), t))
                    stop.wait(1.0)

            th = threading.Thread(target=writer, daemon=True)
            th.start()
            while metric(url, "m3shm_downsample_cells") < nseries:
                time.sleep(0.5)
            time.sleep(1.0)
            before = metric(url, "m3shm_downsample_cell_bytes")
            put = json.loads(post(url + "/api/v1/rules", json.dumps(V2).encode(), "PUT",
                                  "application/json", None))["data"]
            act = put["activation_ms"] / 1000
            while len(log_times(logp, r"worker (\d+): rules version 2 planned")) < 2:
                time.sleep(0.2)
            during = metric(url, "m3shm_downsample_cell_bytes")
            installed = log_times(logp, r"worker (\d+): rules version 2 installed")
            planned = log_times(logp, r"worker (\d+): rules version 2 planned")
            text = logp.read_text()
            changed = [int(m) for m in re.findall(r"rules version 2 planned \((\d+) series",
                                                  text)]
            cpu = [float(m) for m in re.findall(r"rules version 2 planned \(\d+ series "
                                                r"changed, ([\d.]+) s CPU", text)]
            while time.time() < act + 10 + 4:   # activation + admission + finalise rounds
                time.sleep(0.5)
            after = metric(url, "m3shm_downsample_cell_bytes")
            late = metric(url, "m3shm_downsample_late_samples_total")
            return {"replan_seconds": {w: round(planned[w] - installed[w], 3)
                                       for w in sorted(planned)},
                    "series_changed": sum(changed), "replan_cpu_seconds": sum(cpu),
                    "cell_bytes_before": before,
                    "cell_bytes_during": during, "cell_bytes_after": after,
                    "activation_after_put_s": round(act - put["updated_ms"] / 1000, 1),
                    "late_samples": late}
        finally:
            stop.set()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--series", type=int, default=20_000)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    runs = [run_once(a.series) for _ in range(a.runs)]
    worst = [max(r["replan_seconds"].values()) for r in runs]
    med = statistics.median
    print(json.dumps({
        "series": a.series, "workers": 2, "runs": runs,
        "median_replan_seconds_slowest_worker": med(worst),
        "median_replan_cpu_us_per_series": round(
            med(r["replan_cpu_seconds"] / r["series_changed"] for r in runs) * 1e6, 1),
        "median_cell_bytes_before": med(r["cell_bytes_before"] for r in runs),
        "median_cell_bytes_during": med(r["cell_bytes_during"] for r in runs),
        "median_cell_bytes_after": med(r["cell_bytes_after"] for r in runs),
    }, indent=1))


if __name__ == "__main__":
    main()
