"""What reading across resolutions costs a query (perf, not a test).

Two shared-memory segments as the daemon has them by default: the raw namespace and
agg_1m_30d, both holding the same ``--series`` series (the default rules keep every series at
1m), raw with one sample every 10 s over the last ``--hours``, the aggregated one with 1m
points over the last ``--agg-hours``. Each query runs ``--runs`` times (after a warm-up,
the storages interleaved) through two storages and the median wall time of each is printed:

- ``raw_only``: LocalStorage over the raw namespace (what the daemon read before),
- ``xres``: ResolutionStorage over both (what it reads now),

for three shapes: ``count(<all>)`` inside the raw retention (the aggregated namespace must
cost only its index lookup and the want filter), ``sum(rate(<all>[5m]))`` over a range that
crosses the raw retention boundary (both read and stitched), and an instant selector of one
series (the per-query fixed cost).

    .venv/bin/python perf/xres.py [--series 20000] [--hours 3] [--runs 5]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from m3shm._native import ffi, lib  # noqa: E402
from m3shm.query.context import QueryContext  # noqa: E402
from m3shm.query.engine import Engine  # noqa: E402
from m3shm.query.local import LocalStorage, ShmSource  # noqa: E402
from m3shm.query.resolution import NamespaceView, ResolutionStorage  # noqa: E402
from m3shm.shm import Segment, SegParams, make_record  # noqa: E402
from m3shm.storage.shm_index import ShmIndex  # noqa: E402

SHARDS = 16
MIN, HOUR = 60_000, 3_600_000


def segment(name: str, series: int, arena: int) -> Segment:
    path = f"/dev/shm/m3shm-perf-xres-{name}-{os.getpid()}"
    return Segment.create(path, SegParams(num_shards=SHARDS, num_producers=1,
                                          lane_bytes=1 << 16,
                                          series_per_shard=series // SHARDS * 2,
                                          arena_bytes=arena, block_ms=2 * HOUR))


def fill(seg: Segment, n: int, start: int, end: int, step: int) -> None:
    ts = list(range(start, end + 1, step))
    for i in range(n):
        labels = {"__name__": "m", "job": f"j{i % 10}", "instance": f"h{i}"}
        vs = [float(k * 7 + i) for k in range(len(ts))]
        for a in range(0, len(ts), 400):
            rec = make_record(labels, ts[a:a + 400], vs[a:a + 400], SHARDS)
            rc = lib.m3_shard_apply(seg.base, ffi.cast("const m3_rec *", ffi.from_buffer(rec)))
            assert rc == 0, rc


def medians_ms(fns: dict, runs: int) -> dict[str, float]:
    """Median wall time of each function, runs interleaved (after one warm-up each) so that
    load from elsewhere on the machine falls on all of them alike."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(runs):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k + "_ms": round(1000 * statistics.median(v), 2) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--series", type=int, default=20_000)
    ap.add_argument("--hours", type=float, default=3)
    ap.add_argument("--agg-hours", type=float, default=6)
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()
    now = int(time.time() * 1000) // MIN * MIN
    raw_ret = int(a.hours * HOUR) - HOUR  # the raw segment holds a block past its retention
    raw = segment("raw", a.series, 64 << 20)
    agg = segment("agg", a.series, 32 << 20)
    try:
        t0 = time.time()
        fill(raw, a.series, now - int(a.hours * HOUR), now, 10_000)
        fill(agg, a.series, now - int(a.agg_hours * HOUR), now, MIN)
        load_s = time.time() - t0
        ri, ai = ShmIndex(raw), ShmIndex(agg)
        ri.refresh()
        ai.refresh()
        views = [NamespaceView("default", 0, raw_ret, [ShmSource(ri)]),
                 NamespaceView("agg_1m_30d", MIN, 30 * 24 * HOUR, [ShmSource(ai)])]

        def run(kind: str, q: str, start: int, end: int, step: int) -> None:
            ctx = QueryContext()
            st = LocalStorage(views[0].sources, ctx) if kind == "raw_only" else \
                ResolutionStorage(views, ctx, now)
            eng = Engine(st)
            if start == end:
                eng.instant(q, end)
            else:
                eng.range(q, start, end, step)

        shapes = {
            "count_all_in_raw_retention": ("count(m)", now - 30 * MIN, now, MIN),
            "sum_rate_across_boundary": ("sum(rate(m[5m]))", now - raw_ret - HOUR, now,
                                         MIN),
            "one_series_instant": ('m{instance="h7"}', now, now, 0),
        }
        out: dict = {"series": a.series, "raw_hours": a.hours, "raw_retention_h":
                     raw_ret / HOUR, "agg_hours": a.agg_hours, "runs": a.runs,
                     "load_s": round(load_s, 1)}
        for name, shape in shapes.items():
            out[name] = medians_ms({kind: (lambda k=kind, sh=shape: run(k, *sh))
                                    for kind in ("raw_only", "xres")}, a.runs)
        print(json.dumps(out))
    finally:
        raw.unlink()
        agg.unlink()


if __name__ == "__main__":
    main()
