"""Codec benchmark: size and speed of m3shm's block codec on real series.

    python perf/codec.py [--dataset PATH] [--runs 5]

Prints one JSON object. Sizes are exact; times are medians over --runs runs of encoding (and
decoding) every series of the dataset as one block each, one Python call per series, on one
thread; ``decode_batched_*`` decodes all blocks, stored back to back, in one call
(``codec.decode_many``, the way a query reads a fileset) into fresh arrays, and
``decode_batched_reused_*`` into arrays reused from run to run.
``*_cpu_ns_per_sample`` is that thread's CPU time (user+sys), which travels between
machines better than wall-clock time; ``*_ns_per_sample`` is wall-clock. The baseline
``gorilla_bytes_per_sample`` is the same data in Prometheus' XOR chunk encoding, one chunk per
series (perf/gorilla.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gorilla import xor_chunk_bytes  # noqa: E402

from m3shm import codec  # noqa: E402
from m3shm.dataset import default_dataset, read_export  # noqa: E402


def _timed(fn) -> tuple[int, int]:
    w0, c0 = time.perf_counter_ns(), time.thread_time_ns()
    fn()
    return time.perf_counter_ns() - w0, time.thread_time_ns() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dataset", default=str(default_dataset()))
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()

    series = [s for s in read_export(args.dataset) if len(s.timestamps)]
    samples = sum(len(s.timestamps) for s in series)
    blocks = [codec.encode(s.timestamps, s.values) for s in series]
    for s, b in zip(series, blocks, strict=True):  # the benchmark refuses a lossy codec
        ts, vs = codec.decode(b)
        if not (np.array_equal(ts, s.timestamps)
                and np.array_equal(vs.view(np.uint64), s.values.view(np.uint64))):
            raise SystemExit(f"round trip failed for {s.labels}")
    ours = sum(len(b) for b in blocks)
    gorilla = sum(xor_chunk_bytes(s.timestamps, s.values) for s in series)

    def encode_all() -> None:
        for s in series:
            codec.encode(s.timestamps, s.values)

    def decode_all() -> None:
        for b in blocks:
            codec.decode(b)

    joined = b"".join(blocks)
    offsets = np.cumsum([0] + [len(b) for b in blocks])

    def decode_batched() -> None:
        codec.decode_many(joined, offsets)

    reuse = (np.zeros(samples, dtype=np.int64), np.zeros(samples, dtype=np.float64))

    def decode_batched_reused() -> None:
        codec.decode_many(joined, offsets, out=reuse)

    enc = [_timed(encode_all) for _ in range(args.runs)]
    dec = [_timed(decode_all) for _ in range(args.runs)]
    batch = [_timed(decode_batched) for _ in range(args.runs)]
    reused = [_timed(decode_batched_reused) for _ in range(args.runs)]
    med = statistics.median
    out = {
        "dataset": Path(args.dataset).name,
        "series": len(series),
        "samples": samples,
        "runs": args.runs,
        "bytes": ours,
        "bytes_per_sample": round(ours / samples, 4),
        "gorilla_bytes": gorilla,
        "gorilla_bytes_per_sample": round(gorilla / samples, 4),
        "ratio_to_gorilla": round(ours / gorilla, 4),
        "encode_ns_per_sample": round(med(w for w, _ in enc) / samples, 2),
        "decode_ns_per_sample": round(med(w for w, _ in dec) / samples, 2),
        "decode_batched_ns_per_sample": round(med(w for w, _ in batch) / samples, 2),
        "decode_batched_reused_ns_per_sample": round(med(w for w, _ in reused) / samples, 2),
        "encode_cpu_ns_per_sample": round(med(c for _, c in enc) / samples, 2),
        "decode_cpu_ns_per_sample": round(med(c for _, c in dec) / samples, 2),
        "decode_batched_cpu_ns_per_sample": round(med(c for _, c in batch) / samples, 2),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
