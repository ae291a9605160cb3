"""Series lookup: matchers resolved per second on 1,000,000 series, in memory and from a segment.

Series look like node-exporter targets: ``{__name__, job (100), instance (one per series),
cpu (8)}``. Selectors are ``{job="x", instance=~"host-1.*"}``-style; each is timed over several
runs and the median reported (regex scans over values are cached per column, so
``first_query_seconds`` shows the uncached cost). Also reported: build time and Python heap
bytes per series of the in-memory index (tracemalloc), segment write time and bytes per series,
and the same selectors against :class:`CompactIndex` (``compact``: the index the query path
keeps per worker over the series in shared memory; its columns are built by the first query).
Usage: ``.venv/bin/python perf/series_lookup.py [--series N] [--runs R]``; prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import tracemalloc
from pathlib import Path

from m3shm.storage.compact_index import CompactIndex
from m3shm.storage.index_segment import SegmentReader, write_segment
from m3shm.storage.reverse_index import ReverseIndex

SELECTORS = {
    "job_and_instance_prefix": [("job", "=", "job-7"), ("instance", "=~", "host-1.*")],
    "instance_prefix_only": [("instance", "=~", "host-12.*")],
    "name_job_alternation": [("__name__", "=", "node_cpu_seconds_total"),
                             ("job", "=~", "job-1|job-2|job-3")],
    "job_not_cpu": [("job", "=", "job-42"), ("cpu", "!=", "0")],
    "job_general_regex": [("job", "=", "job-7"), ("instance", "=~", "host-[0-9]+7")],
}


def build(n: int) -> ReverseIndex:
    idx = ReverseIndex()
    for i in range(n):
        idx.add(i, {"__name__": "node_cpu_seconds_total", "job": f"job-{i % 100}",
                    "instance": f"host-{i}", "cpu": str(i % 8)})
    for name in idx.names():  # build the query columns, as the first query would
        idx.column(name)
    return idx


def build_compact(n: int) -> CompactIndex:
    """The index every worker keeps over the series in shared memory (the query path's)."""
    idx = CompactIndex()
    for i in range(n):
        idx.add_labels((("__name__", "node_cpu_seconds_total"), ("cpu", str(i % 8)),
                        ("instance", f"host-{i}"), ("job", f"job-{i % 100}")))
    return idx


def rate(reader, matchers, runs: int) -> tuple[float, int]:
    times, hits = [], 0
    for _ in range(runs):
        t0 = time.perf_counter()
        hits = reader.select(matchers).size
        times.append(time.perf_counter() - t0)
    return len(matchers) / statistics.median(times), hits


def selectors(reader, runs: int) -> dict[str, dict[str, float]]:
    """Every selector's rate against ``reader``, and its first (uncached) query's time."""
    out = {}
    for key, ms in SELECTORS.items():
        first = time.perf_counter()
        reader.select(ms)
        first_s = time.perf_counter() - first
        r, hits = rate(reader, ms, runs)
        out[key] = {"matchers_per_second": round(r, 1), "series_selected": hits,
                    "first_query_seconds": round(first_s, 4)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--series", type=int, default=1_000_000)
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    n = args.series

    tracemalloc.start()
    t0 = time.perf_counter()
    idx = build(n)
    build_s = time.perf_counter() - t0
    heap = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    # build time without tracemalloc's overhead
    builds = []
    for _ in range(2):
        t0 = time.perf_counter()
        build(n)
        builds.append(time.perf_counter() - t0)

    out: dict[str, object] = {
        "series": n, "runs": args.runs,
        "build_seconds": round(statistics.median(builds), 3),
        "build_seconds_traced": round(build_s, 3),
        "memory_bytes_per_series": round(heap / n, 1),
    }
    mem = {}
    for key, ms in SELECTORS.items():
        r, hits = rate(idx, ms, args.runs)
        mem[key] = {"matchers_per_second": round(r, 1), "series_selected": hits}
    out["memory"] = mem
    del idx
    tracemalloc.start()
    t0 = time.perf_counter()
    cidx = build_compact(n)
    cbuild_s = time.perf_counter() - t0
    cheap = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    comp: dict[str, object] = {"build_seconds_traced": round(cbuild_s, 3),
                               "memory_bytes_per_series_before_columns": round(cheap / n, 1)}
    comp.update(selectors(cidx, args.runs))
    out["compact"] = comp
    del cidx
    idx = build(n)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "index.seg"
        t0 = time.perf_counter()
        write_segment(path, idx)
        out["segment_write_seconds"] = round(time.perf_counter() - t0, 3)
        out["segment_bytes_per_series"] = round(path.stat().st_size / n, 1)
        with SegmentReader(path) as seg:
            out["segment"] = selectors(seg, args.runs)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
