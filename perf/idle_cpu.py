"""CPU an idle daemon spends (its workers' drain threads, timers and beats), by namespaces.

Starts ``m3shm serve`` on the embedded defaults (64 shards, one worker per core) with 0, 1 and
3 aggregated namespaces (default policies none, ``1m:30d`` = the embedded default, and
``10s:2d, 1m:30d, 1h:5y``), waits for /ready plus a settling pause, and measures the workers'
user+system CPU seconds per wall second over ``--seconds``. An idle drain thread sleeps on its
doorbell (csrc/bell.c) and makes a pass over every shard of every namespace's segment only
every 250 ms; each aggregated namespace still adds its finalise and flush timers. Prints JSON
with the median of ``--runs`` runs per case (cases interleaved).

    .venv/bin/python perf/idle_cpu.py --runs 3 --seconds 20
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from perfdaemon import serve

CASES = {
    "0_aggregated": "downsample: {rules: {defaultPolicies: []}}\n",
    "1_aggregated": "",
    "3_aggregated": "downsample: {rules: {defaultPolicies: [10s:2d, 1m:30d, 1h:5y]}}\n",
}


def _cpu(pids: list[int]) -> float:
    tck = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / tck


def run(extra: str, seconds: float) -> float:
    with serve(extra, "m3shm-perf-idle-", ready_s=120) as d:
        time.sleep(3)
        pid = d.proc.pid
        kids = [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        c0, t0 = _cpu(kids), time.monotonic()
        time.sleep(seconds)
        return (_cpu(kids) - c0) / (time.monotonic() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=20)
    args = ap.parse_args()
    got: dict[str, list[float]] = {k: [] for k in CASES}
    for _ in range(args.runs):
        for name, extra in CASES.items():
            got[name].append(run(extra, args.seconds))
    print(json.dumps({"workers_cpu_seconds_per_second": {
        k: round(statistics.median(v), 4) for k, v in got.items()},
        "runs": {k: [round(x, 4) for x in v] for k, v in got.items()},
        "seconds": args.seconds, "cpus": os.cpu_count()}, indent=1))


if __name__ == "__main__":
    main()
