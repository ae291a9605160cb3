"""Remote-write decoding cost, 1.0 against 2.0 (perf, not a test).

Builds one request of node_exporter-like series (2,000 series with one sample each, as
Prometheus sends them; ~70 metric names over 30 hosts, 6 labels) in both versions, every 2.0
series carrying metadata, and times the C decoders on the decompressed body (what a worker's
pool thread does after snappy): CPU ns per sample (thread CPU time, so other load on the
machine inflates it less than wall time would), medians of several runs. For 2.0 it reports the
steady state (metadata already stored: the known-hash set filters it in C) and the first
request (every entry handed to Python). Prints one JSON object.

    .venv/bin/python perf/rw_decode.py [--series 2000] [--runs 7] [--iters 200]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_daemon_harness import write_request  # noqa: E402
from test_rw2_harness import write_request_v2  # noqa: E402

from m3shm.net.rwdecode import Limits, decode_rw1, decode_rw2  # noqa: E402
from m3shm.storage.metadata_hashes import MetaHashSet  # noqa: E402

METRICS = [f"node_{g}_{k}" for g in ("cpu", "memory", "disk", "network", "filesystem", "vmstat",
                                      "netstat") for k in range(10)]


def series(n: int, t0: int) -> list:
    out = []
    for i in range(n):
        name = METRICS[i % len(METRICS)]
        lab = {"__name__": name, "job": "node", "instance": f"host-{i % 30}:9100",
               "device": f"dev{i // len(METRICS) % 8}", "mode": ("user", "system", "idle")[i % 3],
               "region": "eu-west-1"}
        meta = (1 if name.endswith(("0", "1", "2")) else 2, f"Help text for {name} from the "
                "node exporter, as long as real ones are.", "")
        out.append((lab, [(t0 + i % 1000, float(i) * 1.5)], meta))
    return out


def timeit(fn, iters: int, runs: int) -> float:
    res = []
    for _ in range(runs):
        t = time.thread_time()  # CPU time of this thread: robust on a shared machine
        for _ in range(iters):
            fn()
        res.append((time.thread_time() - t) / iters)
    return statistics.median(res)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--series", type=int, default=2000)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--iters", type=int, default=200)
    a = ap.parse_args()
    t0 = 1_700_000_000_000
    s = series(a.series, t0)
    b1 = write_request([(lab, smp) for lab, smp, _ in s])
    b2 = write_request_v2(s)
    lim = Limits(min_ts=0, max_ts=1 << 62, num_shards=64)
    known = MetaHashSet()
    for m in decode_rw2(b2, lim).metadata:
        known.add(m.hash)
    assert decode_rw2(b2, lim, known).metadata == []
    n = a.series
    v1 = timeit(lambda: decode_rw1(b1, lim), a.iters, a.runs)
    v2_steady = timeit(lambda: decode_rw2(b2, lim, known), a.iters, a.runs)
    v2_first = timeit(lambda: decode_rw2(b2, lim), a.iters, a.runs)
    print(json.dumps({
        "series": n, "samples": n, "body_bytes_v1": len(b1), "body_bytes_v2": len(b2),
        "metadata_entries": len(known.live),
        "v1_ns_per_sample": round(v1 / n * 1e9, 1),
        "v2_ns_per_sample_metadata_stored": round(v2_steady / n * 1e9, 1),
        "v2_ns_per_sample_metadata_new": round(v2_first / n * 1e9, 1),
        "v1_request_us": round(v1 * 1e6, 1), "v2_request_us": round(v2_steady * 1e6, 1),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
