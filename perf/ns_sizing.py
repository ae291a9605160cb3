"""Sizing of an aggregated namespace's segment (shm.agg_arena_bytes), from real data.

For every series of the dataset (default ../shared/data/real-10s.jsonl.gz, 10 s scrapes): the
codec's bytes per raw sample, and per point of its 1-minute Last downsampling (the default
policy 1m:30d: window (k·60s, (k+1)·60s], the last raw value stamped at the window end); then
the open-block memory one series needs for a full block (2h of raw samples at the dataset's
scrape interval; 12h = 720 points in agg_1m_30d): a 192-byte first chunk (88 bytes of stream)
and 512-byte chunks after it (408 bytes each), plus its 128-byte slot and labels (docs/formats/
shm.md). Prints JSON; the series-weighted mean is what a shard's arena must hold per series.

    .venv/bin/python perf/ns_sizing.py
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from m3shm import codec
from m3shm.dataset import default_dataset, read_export
from m3shm.shm import canonical_labels

FIRST_CAP, LATER_CAP, FIRST, LATER, SLOT = 88, 408, 192, 512, 128


def chunk_bytes(stream_bytes: float) -> int:
    """Chunk memory for a stream of this many bytes (first chunk, then full ones)."""
    if stream_bytes <= FIRST_CAP:
        return FIRST
    return FIRST + LATER * int(np.ceil((stream_bytes - FIRST_CAP) / LATER_CAP))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default=str(default_dataset()))
    ap.add_argument("--resolution", default=60_000, type=int, help="ms")
    ap.add_argument("--agg-block-points", default=720, type=int, help="12h of 1m points")
    ap.add_argument("--raw-block-ms", default=7_200_000, type=int)
    args = ap.parse_args()
    raw_bps, agg_bps, raw_mem, agg_mem = [], [], [], []
    for s in read_export(args.dataset):
        ts, vs = s.timestamps, s.values
        if len(ts) < 50:
            continue
        labels = len(canonical_labels(s.labels))
        b = len(codec.encode(ts, vs)) / len(ts)
        w = (ts - 1) // args.resolution
        last = np.r_[np.nonzero(np.diff(w))[0], len(w) - 1]
        a = len(codec.encode((w[last] + 1) * args.resolution, vs[last])) / len(last)
        raw_bps.append(b)
        agg_bps.append(a)
        per_raw_block = args.raw_block_ms / float(np.median(np.diff(ts)))
        raw_mem.append(SLOT + labels + chunk_bytes(b * per_raw_block))
        agg_mem.append(SLOT + labels + chunk_bytes(a * args.agg_block_points))
    print(json.dumps({
        "dataset": args.dataset, "series": len(raw_bps),
        "raw_bytes_per_sample": {"median": round(float(np.median(raw_bps)), 3),
                                 "mean": round(float(np.mean(raw_bps)), 3)},
        "agg_bytes_per_point": {"median": round(float(np.median(agg_bps)), 3),
                                "mean": round(float(np.mean(agg_bps)), 3)},
        "raw_full_block_bytes_per_series": {"mean": round(float(np.mean(raw_mem))),
                                            "p90": round(float(np.percentile(raw_mem, 90)))},
        "agg_full_block_bytes_per_series": {"mean": round(float(np.mean(agg_mem))),
                                            "p90": round(float(np.percentile(agg_mem, 90)))},
    }, indent=1))


if __name__ == "__main__":
    main()
