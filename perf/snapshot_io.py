"""Taking and loading snapshots of open blocks in one process: version 2 (one file per worker)
against version 1 (a file and a checkpoint per shard), same segment, same run.

    .venv/bin/python perf/snapshot_io.py [--series 100000] [--samples 10] [--shards 32] [--runs 5]

A segment of ``--shards`` shards (one worker's share of the daemon's 64) is filled with
``--series`` series of ``--samples`` samples each (10 s apart, one open block), then snapshotted
``--runs`` times in each version (``write_snapshot``, ``write_shard_v1`` for every shard: each
fsyncs what it writes) and loaded ``--runs`` times into a fresh segment (``load_shards``: file
checks, CRC, the C loader). Prints one JSON object: wall and CPU seconds (medians), files and
bytes per snapshot. The load is the part of a restart snapshots add (docs/formats/snapshot.md).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from m3shm.shm import Segment, SegParams, make_record  # noqa: E402
from m3shm.storage import snapshot  # noqa: E402

BLOCK_MS = 7_200_000
NS = "default"


def new_segment(shards: int, per_shard: int) -> Segment:
    path = f"/dev/shm/m3shm-perf-snap-{os.getpid()}-{random.getrandbits(32):08x}"
    return Segment.create(path, SegParams(num_shards=shards, num_producers=1,
                                          lane_bytes=1 << 16, series_per_shard=per_shard,
                                          arena_bytes=max(8 << 20, per_shard * 1024),
                                          block_ms=BLOCK_MS))


def timed(fn) -> tuple[float, float]:
    c0, w0 = time.process_time(), time.perf_counter()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--series", type=int, default=100_000)
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--shards", type=int, default=32)
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()
    per_shard = 1 << max(10, (2 * a.series // a.shards - 1).bit_length())
    seg = new_segment(a.shards, per_shard)
    tmp = Path(tempfile.mkdtemp(prefix="m3shm-perf-snap-"))
    segs = [seg]
    try:
        t0 = int(time.time() * 1000) // BLOCK_MS * BLOCK_MS
        ts = [t0 + k * 10_000 for k in range(a.samples)]
        vs = [float(k) for k in range(a.samples)]
        for i in range(a.series):
            seg.apply_batch(make_record({"__name__": "perf_snap", "i": str(i), "job": "node"},
                                        ts, vs, a.shards), 1, 0, a.shards)
        fs = tmp / "filesets"
        out: dict = {"series": a.series, "samples_per_series": a.samples, "shards": a.shards,
                     "runs": a.runs}
        roots = {"v1": tmp / "v1", "v2": tmp / "v2"}
        writes: dict[str, list[tuple[float, float]]] = {"v1": [], "v2": []}
        for run in range(a.runs):
            seq = 10 + run
            writes["v1"].append(timed(lambda seq=seq: [
                snapshot.write_shard_v1(seg, roots["v1"], NS, s, seq, fs)
                for s in range(a.shards)]))
            writes["v2"].append(timed(lambda seq=seq: snapshot.write_snapshot(
                seg, roots["v2"], NS, range(a.shards), seq, fs)))
            for r in roots.values():  # keep the newest only: one snapshot is loaded
                for f in snapshot.listing(r, NS):
                    if f.seq != seq:
                        snapshot._delete(f)
        for v, r in roots.items():
            files = [p for p in r.rglob("snapshot-*") if p.is_file()]
            loads = []
            for _ in range(a.runs):
                b = new_segment(a.shards, per_shard)
                segs.append(b)
                loads.append(timed(lambda b=b, r=r: snapshot.load_shards(
                    b, r, NS, range(a.shards), fs)))
                assert sum(1 for s in range(a.shards) for _ in b.live_series(s)) == a.series
                segs.pop().unlink()
            out[v] = {"files": len(files), "bytes": sum(p.stat().st_size for p in files),
                      "write_s": round(statistics.median(w for w, _ in writes[v]), 4),
                      "write_cpu_s": round(statistics.median(c for _, c in writes[v]), 4),
                      "load_s": round(statistics.median(w for w, _ in loads), 4),
                      "load_cpu_s": round(statistics.median(c for _, c in loads), 4)}
        print(json.dumps(out))
    finally:
        for s in segs:
            s.unlink()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
