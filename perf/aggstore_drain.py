"""Drain cost through the aggregation store (csrc/aggstore.c, m3_shard_apply_batch_agg): what
applying records to raw-series cells costs, including the per-record undo copy that makes a
SIGKILLed owner exact (docs/formats/aggstore.md "After a crash").

``--series`` series (default 2,000) in one shard, one cell each (1 m windows, 13 of them, a
10 m admission), raw samples dropped (cells only); ``--batches`` batches (default 20) with one
record of K samples per series (K = 1, as remote write sends; 10; 100), 1 s apart. Reported:
thread CPU ns per (sample x cell) for a Last cell and a P99 cell (1,296-byte sketch per
window), the median over batches after the first two (plans are installed in those), median
of ``--runs`` fresh stores.

Usage: ``.venv/bin/python perf/aggstore_drain.py [--runs R]``; prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from m3shm.aggstore import AggStore
from m3shm.rules.aggwin import CellParams
from m3shm.shm import Segment, SegParams, make_record

MIN = 60_000


def one_run(aggs: tuple[str, ...], k: int, nser: int, nbatches: int) -> float:
    """ns per (sample x cell) over one fresh segment and store."""
    path = f"/dev/shm/m3shm-perf-drain-{os.getpid()}"
    seg = Segment.create(path, SegParams(num_shards=1, num_producers=1, lane_bytes=1 << 16,
                                         series_per_shard=max(4096, nser), arena_bytes=1 << 26,
                                         block_ms=7_200_000, seq_base=1000))
    st = AggStore.create(seg, 1 << 28)
    try:
        params = [CellParams(MIN, 10 * MIN, aggs, nwin=13).to_c()]
        t0 = 1000 * MIN
        batches = [b"".join(make_record({"__name__": "m", "i": str(i)},
                                        [t0 + (r * k + j) * 1000 for j in range(k)],
                                        [float(j) for j in range(k)], 1)
                            for i in range(nser)) for r in range(nbatches)]
        times = []
        for seq, batch in enumerate(batches, start=2000):
            off = 0
            c0 = time.thread_time_ns()
            while True:
                _, off, need = st.apply_batch(batch, seq, 0, 1, t0, off)
                if not len(need):
                    break
                for shard, slot, gen in need:
                    st.install(shard, slot, gen, True, params, [0], [b""])
            times.append(time.thread_time_ns() - c0)
        return statistics.median(times[2:]) / (nser * k)
    finally:
        st.unlink()
        seg.unlink()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--series", type=int, default=2_000)
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    out: dict[str, float] = {}
    for aggs in (("Last",), ("P99",)):
        for k in (1, 10, 100):
            runs = [one_run(aggs, k, a.series, a.batches) for _ in range(a.runs)]
            out[f"{aggs[0].lower()}_{k}_samples_per_record_ns_per_sample_cell"] = round(
                statistics.median(runs), 1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
