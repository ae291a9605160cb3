"""Downsampling cost at the library level: C aggregation per million samples, rule matching.

1. Aggregation: ``--series`` series (default 1,000) of ``--samples`` samples each (default
   1,000, 10 s apart: 1,000,000 samples) go through csrc/aggwin.c with 0, 10 and 100 rules
   matching every series (one cell per (series, rule), 1 m windows, a 10 m admission window
   and 2 m of future: 13 open windows). Data is fed one minute at a time, as ingest would: one
   ``m3_agg_apply_runs`` call applies that minute's samples of every series to each of its
   cells (runs share the samples, no copies), then ``m3_agg_finalise`` runs over all cells;
   wall time moves with the samples, so nothing is late (``late_samples`` shows it).
   Reported: CPU seconds per million samples (thread CPU time, median of ``--runs``, including
   the per-minute Python calls), ns per (sample x cell), points finalised, and the bytes a cell
   holds (memory per aggregated series and policy). Variants: the default Last; the scalar set
   (Min Max Mean Sum Count Stdev); P99 (which adds a 1,296-byte sketch per window).
2. Matching: CPU microseconds to match one new series against 10 / 100 / 1,000 rules (one
   per metric name, so few match; plus 5 rules scanned for every series), median per series.

The daemon-level figure (ingest CPU per million samples with rules wired in) comes with the
wiring; see docs/rules.md. Usage: ``.venv/bin/python perf/downsample.py [--runs R]``;
prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from m3shm._native import ffi
from m3shm.rules.aggwin import CellParams, Cells
from m3shm.rules.matcher import CompiledRules
from m3shm.rules.ruleset import parse_rules

RES, ADM, FUTURE = 60_000, 600_000, 120_000
VARIANTS = {"last": ("Last",), "scalars": ("Min", "Max", "Mean", "Sum", "Count", "Stdev"),
            "p99": ("P99",)}


def nwin() -> int:
    return -(-(ADM + FUTURE) // RES) + 1


def aggregate_once(nseries: int, nsamples: int, rules: int, aggs: tuple[str, ...]
                   ) -> tuple[float, int, int, int]:
    """CPU seconds, points finalised, bytes per cell, late samples (must be 0)."""
    if rules == 0:
        return 0.0, 0, 0, 0
    step, per_slice = 10_000, 6  # one minute of samples per series per slice
    t0 = 1_700_000_000_000
    ts = np.tile(t0 + step * np.arange(1, nsamples + 1, dtype=np.int64), nseries)
    vs = np.random.default_rng(1).random(nseries * nsamples) * 100
    params = CellParams(RES, ADM, aggs, nwin())
    cells = Cells.of([params] * (nseries * rules))
    # run (series s, rule r) -> cell s * rules + r over series s's samples (shared, no copy)
    run_cell = np.arange(nseries * rules, dtype=np.uint32)
    base = np.repeat(np.arange(nseries, dtype=np.uint64) * np.uint64(nsamples), rules)
    points = 0
    c0 = time.thread_time()
    for j in range(0, nsamples, per_slice):
        k = min(per_slice, nsamples - j)
        now = t0 + step * (j + k)  # wall time moves with the data, as at ingest
        starts = base + np.uint64(j)
        points += len(cells.apply_runs(run_cell, starts, starts + np.uint64(k), ts, vs, now))
        points += len(cells.finalise(now))
    points += len(cells.finalise(t0 + step * nsamples + ADM + 2 * RES))
    cpu = time.thread_time() - c0
    off = ffi.offsetof("m3_aggcell", "late")
    raw = cells.buf.view(np.uint8).reshape(cells.n, cells.stride)
    late = int(raw[:, off:off + 8].copy().view(np.uint64).sum())
    return cpu, points, params.cell_bytes(), late


def match_cost(nrules: int, nseries: int = 5_000) -> float:
    mapping = [{"name": f"m{i}", "filter": f"__name__:metric_{i} job:api*",
                "storagePolicies": ["1h:5y"]} for i in range(nrules)]
    mapping += [{"name": f"s{i}", "filter": f"job:batch-{i}* env:{{prod,staging}}",
                 "storagePolicies": ["10s:2d"]} for i in range(5)]
    cr = CompiledRules(parse_rules({"mappingRules": mapping}))
    labels = [{"__name__": f"metric_{i % (2 * nrules)}", "job": f"api-{i % 7}",
               "instance": f"10.0.{i % 250}.{i % 13}:9100", "env": "prod"}
              for i in range(nseries)]
    c0 = time.thread_time()
    for lab in labels:
        cr.match(lab)
    return (time.thread_time() - c0) / nseries * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--series", type=int, default=1_000)
    ap.add_argument("--samples", type=int, default=1_000)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    total = a.series * a.samples
    out: dict = {"samples": total, "series": a.series, "resolution_ms": RES,
                 "admission_ms": ADM, "open_windows_per_cell": nwin(), "aggregation": {}}
    for name, aggs in VARIANTS.items():
        for rules in (0, 10, 100):
            if rules == 0 and name != "last":
                continue
            res = [aggregate_once(a.series, a.samples, rules, aggs) for _ in range(a.runs)]
            cpu = statistics.median(r[0] for r in res)
            out["aggregation"][f"{name}_{rules}_rules"] = {
                "cpu_seconds_per_million_samples": round(cpu / total * 1e6, 4),
                "ns_per_sample_cell": round(cpu / (total * rules) * 1e9, 2) if rules else 0,
                "points_finalised": res[0][1],
                "cell_bytes": res[0][2],
                "late_samples": res[0][3],
            }
    out["match_us_per_series"] = {str(n): round(statistics.median(
        match_cost(n) for _ in range(a.runs)), 2) for n in (10, 100, 1000)}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
