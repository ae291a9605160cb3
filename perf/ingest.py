"""Remote-write ingest throughput of a real daemon (perf, not a test).

Starts `m3shm serve` in a temporary directory, prebuilds snappy-compressed remote write 1.0
bodies (realistic label sets; every request carries new samples, none is resent), and drives it
from client processes over keep-alive HTTP connections, all starting together. Prints
acknowledged samples per second and request latency percentiles. On a 2-core machine the
clients share the CPUs with the daemon, so the figure is a floor.

    .venv/bin/python perf/ingest.py [--requests 1500] [--clients 2] [--series 500]
                                    [--samples 4] [--workers 2] [--fsync every_batch]
"""

from __future__ import annotations

import argparse
import http.client
import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from multiprocessing import get_context
from pathlib import Path

import snappy

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from m3shm.proto import remote_pb2  # noqa: E402


def body(client: int, req: int, nseries: int, nsamples: int, t0: int) -> bytes:
    w = remote_pb2.WriteRequest()
    for i in range(nseries):
        ts = w.timeseries.add()
        for k, v in (("__name__", f"http_requests_total_{i % 50}"), ("job", "api"),
                     ("instance", f"10.0.{client}.{i % 200}:9100"), ("code", str(200 + i % 5)),
                     ("handler", f"/api/v{i % 7}")):
            lab = ts.labels.add()
            lab.name, lab.value = k, v
        for j in range(nsamples):
            s = ts.samples.add()
            s.timestamp = t0 + (req * nsamples + j) * 15
            s.value = float(req * nsamples + j + i)
    return snappy.compress(w.SerializeToString())


def client(port: int, cid: int, nreq: int, nseries: int, nsamples: int, q, go) -> None:
    t0 = int(time.time() * 1000) - 9 * 60_000
    bodies = [body(cid, r, nseries, nsamples, t0) for r in range(nreq)]  # every one unique
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    lat, ok, other = [], 0, 0
    q.put("built")
    go.wait()
    start = time.perf_counter()
    for b in bodies:
        t = time.perf_counter()
        conn.request("POST", "/api/v1/write", b, {"Content-Type": "application/x-protobuf",
                                                   "Content-Encoding": "snappy"})
        resp = conn.getresponse()
        resp.read()
        lat.append(time.perf_counter() - t)
        if resp.status == 204:
            ok += 1
        else:
            other += 1
    q.put((ok, other, lat, time.perf_counter() - start))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=1500, help="per client")
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--series", type=int, default=500)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--fsync", default="every_batch")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="m3shm-perf-"))
    cfg = tmp / "m3shm.yaml"
    cfg.write_text(f"shards: 16\nworkers: {a.workers}\ncommitlog:\n  fsync: {a.fsync}\n"
                   "shm:\n  arena_bytes: 64MiB\n  lane_bytes: 4MiB\n")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp / "daemon.log", "wb")  # noqa: SIM115
    d = subprocess.Popen([sys.executable, "-c", "import sys; from m3shm.cli import main; "
                          "sys.exit(main())", "serve", "-c", str(cfg), "--data", str(tmp / "d"),
                          "--listen", f"127.0.0.1:{port}"], stdout=log, stderr=log)
    try:
        for _ in range(300):
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/ready").status == 200:
                    break
            except OSError:
                time.sleep(0.05)
        ctx = get_context("fork")
        q = ctx.Queue()
        go = ctx.Event()
        ps = [ctx.Process(target=client, args=(port, c, a.requests, a.series, a.samples, q, go))
              for c in range(a.clients)]
        for p in ps:
            p.start()
        for _ in ps:
            assert q.get() == "built"
        go.set()
        res = [q.get() for _ in ps]
        for p in ps:
            p.join()
        ok = sum(r[0] for r in res)
        other = sum(r[1] for r in res)
        lat = sorted(x for r in res for x in r[2])
        samples = ok * a.series * a.samples
        elapsed = max(r[3] for r in res)
        out = {"workers": a.workers, "clients": a.clients, "fsync": a.fsync,
               "samples_per_request": a.series * a.samples, "requests_ok": ok,
               "requests_other": other, "samples_per_s": round(samples / elapsed),
               "p50_ms": round(lat[len(lat) // 2] * 1000, 2) if lat else None,
               "p99_ms": round(lat[int(len(lat) * 0.99)] * 1000, 2) if lat else None}
        print(json.dumps(out))
    finally:
        d.terminate()
        d.wait(60)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
