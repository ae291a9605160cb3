"""PromQL evaluation benchmark: data in memory, evaluation alone (decode included).

10,000 series x 2 hours at 15 s (4.8 M samples) of counters ``x``, 1,000 classic histograms
of 10 buckets (``x_bucket``, 10,000 series) and a 100-series ``info`` metric; each query runs
as a range query over the 2 hours at 60 s steps. Prints one JSON object: per query the median
milliseconds of --runs runs and the samples decoded per second.

    .venv/bin/python perf/promql.py [--runs 5] [--series 10000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from m3shm.query.engine import Engine
from m3shm.query.storage import MemoryStore

HOUR_MS = 3_600_000
SCRAPE_MS = 15_000
STEP_MS = 60_000

QUERIES = {
    "rate": "rate(x[5m])",
    "sum_by_rate": "sum by (instance) (rate(x[5m]))",
    "topk": "topk(5, rate(x[5m]))",
    "histogram_quantile": "histogram_quantile(0.9, sum by (le) (rate(x_bucket[5m])))",
    "avg_over_time": "avg_over_time(x[10m])",
    "group_left_join": "rate(x[5m]) * on (instance) group_left (version) info",
}


def build(series: int, seed: int = 1) -> MemoryStore:
    rng = np.random.default_rng(seed)
    ts = np.arange(0, 2 * HOUR_MS, SCRAPE_MS, dtype=np.int64)
    store = MemoryStore()
    instances = 100
    for i in range(series):
        vals = np.cumsum(rng.integers(0, 50, len(ts))).astype(np.float64)
        store.add({"__name__": "x", "instance": f"host-{i % instances}", "id": str(i)}, ts, vals)
    les = ["0.005", "0.01", "0.05", "0.1", "0.5", "1", "2.5", "5", "10", "+Inf"]
    for h in range(series // len(les)):
        base = np.cumsum(rng.integers(0, 10, (len(les), len(ts))), axis=1)
        cum = np.cumsum(base, axis=0).astype(np.float64)
        for b, le in enumerate(les):
            store.add({"__name__": "x_bucket", "instance": f"host-{h % instances}",
                       "h": str(h), "le": le}, ts, cum[b])
    for i in range(instances):
        store.add({"__name__": "info", "instance": f"host-{i}", "version": f"v{i % 3}"}, ts,
                  np.ones(len(ts)))
    return store


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--series", type=int, default=10_000)
    args = ap.parse_args()
    t0 = time.perf_counter()
    store = build(args.series)
    build_s = time.perf_counter() - t0
    engine = Engine(store)
    out: dict[str, object] = {"series": args.series, "samples_per_series": 2 * HOUR_MS //
                              SCRAPE_MS, "step_s": STEP_MS // 1000, "runs": args.runs,
                              "build_store_s": round(build_s, 2)}
    results = {}
    for name, q in QUERIES.items():
        times, samples = [], 0
        for _ in range(args.runs):
            t = time.perf_counter()
            res = engine.range(q, 0, 2 * HOUR_MS, STEP_MS)
            times.append(time.perf_counter() - t)
            samples = res.stats.samples_decoded
        med = statistics.median(times)
        results[name] = {"query": q, "median_ms": round(med * 1000, 1),
                         "samples": samples, "samples_per_s": round(samples / med)}
    out["queries"] = results
    print(json.dumps(out))


if __name__ == "__main__":
    main()
