"""Dashboard query latency of m3shm against VictoriaMetrics and Prometheus (perf, not a test).

Starts `m3shm serve`, /usr/bin/victoria-metrics and /usr/bin/prometheus
(--web.enable-remote-write-receiver), each on 127.0.0.1 with a temporary data directory, and
remote-writes the same node_exporter-like data into all three: ``--hosts`` hosts (135 series
each: CPU seconds by cpu and mode, network and disk counters, memory and filesystem gauges,
load, an HTTP latency histogram, up), ``--hours`` of history ending now at one sample every
``--interval`` seconds, sent oldest first (Prometheus only takes samples near its head), in
requests of ``--batch`` series x 10 samples. m3shm runs with a namespace whose blocks and
bufferPast (4h) accept that history as warm writes.

Then each query of a fixed dashboard-like set runs as ``query_range`` over the last
``--range`` at ``--step``, ``--runs`` times per system (after one warm-up run, systems
interleaved), and the median latency of each is reported with the geometric mean per system
and the targets of issue 7: m3shm's geometric mean at most VictoriaMetrics', and no query more
than twice as slow as the faster peer. VictoriaMetrics runs with -search.disableCache so that
repeated runs measure the query, not its result cache. Every query's result series count must
agree between the three (a check that they hold the same data), or the run fails.

    .venv/bin/python perf/query.py [--hosts 750] [--hours 2] [--interval 30] [--runs 5]
                                   [--workers 2] [--keep]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import snappy

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from m3shm._native import ffi, lib  # noqa: E402

JOBS = ("node", "api", "db", "cache", "batch")
MODES = ("user", "system", "idle", "iowait", "irq", "softirq", "steal", "nice")
WINDOW = 10  # samples per series per request

QUERIES = {
    "rate_sum_by_instance":
        'sum by (instance) (rate(node_cpu_seconds_total{mode!="idle"}[5m]))',
    "topk": "topk(5, rate(node_network_receive_bytes_total[5m]))",
    "regex_across_hosts":
        'sum by (instance) (rate(node_network_transmit_bytes_total{instance=~"host-1.*"}[5m]))',
    "histogram_quantile":
        "histogram_quantile(0.99, sum by (le) (rate(http_request_duration_seconds_bucket[5m])))",
    "count_by_job": 'count by (job) (node_cpu_seconds_total{mode="idle"})',
}


# -- data --------------------------------------------------------------------------------------

def host_series(h: int) -> list[tuple[tuple[tuple[str, str], ...], str, float]]:
    """(labels, kind, scale) of every series of host h; kind: counter, gauge or bucket<i>."""
    inst, job = f"host-{h}:9100", JOBS[h % len(JOBS)]
    out = []

    def add(name: str, kind: str, scale: float, **extra: str) -> None:
        lab = {"__name__": name, "instance": inst, "job": job, **extra}
        out.append((tuple(sorted(lab.items())), kind, scale))

    for cpu in range(4):
        for m in MODES:
            add("node_cpu_seconds_total", "counter", 0.9 if m == "idle" else 0.02,
                cpu=str(cpu), mode=m)
    for dev in ("eth0", "eth1", "lo", "docker0"):
        for d in ("receive", "transmit"):
            add(f"node_network_{d}_bytes_total", "counter", 2e5, device=dev)
            add(f"node_network_{d}_packets_total", "counter", 300.0, device=dev)
    for g in ("MemAvailable", "MemFree", "MemTotal", "Buffers", "Cached", "SwapFree",
              "SwapTotal", "Active", "Inactive", "Dirty"):
        add(f"node_memory_{g}_bytes", "gauge", 8e9)
    for g in ("1", "5", "15"):
        add(f"node_load{g}", "gauge", 4.0)
    for mp in ("/", "/boot", "/var", "/home", "/data"):
        for g in ("avail", "size", "free"):
            add(f"node_filesystem_{g}_bytes", "gauge", 1e11, mountpoint=mp, fstype="ext4")
    for disk in ("sda", "sdb", "nvme0n1", "nvme1n1"):
        for c in ("read_bytes", "written_bytes", "reads_completed", "writes_completed"):
            add(f"node_disk_{c}_total", "counter", 5e4, device=disk)
    for handler in ("/api/v1/query", "/api/v1/write", "/metrics"):
        for i, le in enumerate(LES):
            add("http_request_duration_seconds_bucket", f"bucket{i}", 50.0, handler=handler,
                le=le)
        add("http_request_duration_seconds_sum", "counter", 5.0, handler=handler)
        add("http_request_duration_seconds_count", "counter", 50.0, handler=handler)
    add("up", "gauge", 0.0)
    return out


LES = ("0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1", "2.5", "5", "10", "+Inf")
CDF = np.array([0.05, 0.12, 0.3, 0.5, 0.7, 0.85, 0.93, 0.97, 0.99, 0.995, 0.999, 1.0])


def pb_field(tag: int, payload: bytes) -> bytes:
    n, head = len(payload), bytearray([tag << 3 | 2])
    while n >= 0x80:
        head.append((n & 0x7F) | 0x80)
        n >>= 7
    head.append(n)
    return bytes(head) + payload


def labels_pb(labels: tuple[tuple[str, str], ...]) -> bytes:
    return b"".join(pb_field(1, pb_field(1, k.encode()) + pb_field(2, v.encode()))
                    for k, v in labels)


class Data:
    """Every series' values, computed window by window (vectorised over series)."""

    def __init__(self, hosts: int, seed: int = 1) -> None:
        rows = [s for h in range(hosts) for s in host_series(h)]
        self.labels = [labels_pb(r[0]) for r in rows]
        kinds = [r[1] for r in rows]
        rnd = np.random.default_rng(seed)
        n = len(rows)
        scale = np.array([r[2] for r in rows])
        self.counter = np.array([k == "counter" for k in kinds])
        self.bucket = np.array([CDF[int(k[6:])] if k.startswith("bucket") else -1.0
                                for k in kinds])
        self.rate = scale * rnd.uniform(0.5, 1.5, n)
        self.level = np.where(self.counter | (self.bucket >= 0), rnd.uniform(0, 1e6, n),
                              scale * rnd.uniform(0.2, 0.8, n))
        self.up = np.array([r[0][0][1] == "up" for r in rows])  # __name__ sorts first
        self.rnd = rnd
        self.n = n
        # one histogram "total" increment per (host, handler): the buckets of a handler share it
        self.group = np.cumsum(np.r_[0, [int(k == "bucket0") for k in kinds[1:]]])

    def window(self, k0: int, k: int, interval_s: float) -> np.ndarray:
        """Values of steps k0 .. k0+k-1 (nseries x k)."""
        out = np.empty((self.n, k))
        for j in range(k):
            noise = self.rnd.uniform(0.7, 1.3, self.n)
            total = self.rnd.uniform(0.7, 1.3, self.group[-1] + 1)[self.group]
            inc = np.where(self.bucket >= 0, np.floor(self.rate * interval_s * total *
                                                      np.maximum(self.bucket, 0)),
                           self.rate * interval_s * noise)
            mono = self.counter | (self.bucket >= 0)
            self.level = np.where(mono, self.level + inc,
                                  np.abs(self.level + self.rate * 0.02 * (noise - 1.0)))
            out[:, j] = np.where(self.up, 1.0, self.level)
        return out


def bodies(data: Data, t0_ms: int, steps: int, interval_s: int, batch: int):
    """Remote write 1.0 bodies (snappy) in time order: every series advances together."""
    for k0 in range(0, steps, WINDOW):
        k = min(WINDOW, steps - k0)
        vals = data.window(k0, k, interval_s)
        ts = t0_ms + (k0 + np.arange(k, dtype=np.int64)) * interval_s * 1000
        tsb = ffi.from_buffer("int64_t[]", ts)
        buf = np.empty(22 * k, dtype=np.uint8)
        bp = ffi.from_buffer("uint8_t[]", buf)
        for a in range(0, data.n, batch):
            parts = []
            for i in range(a, min(a + batch, data.n)):
                row = np.ascontiguousarray(vals[i])
                got = lib.m3_pb_samples(tsb, ffi.from_buffer("double[]", row), k, bp, len(buf))
                parts.append(pb_field(1, data.labels[i] + buf[:got].tobytes()))
            yield snappy.compress(b"".join(parts))


# -- systems -----------------------------------------------------------------------------------

def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class System:
    def __init__(self, name: str, port: int, write_path: str, proc: subprocess.Popen) -> None:
        self.name, self.port, self.write_path, self.proc = name, port, write_path, proc
        self._conn: http.client.HTTPConnection | None = None

    def get(self, path: str, timeout: float = 300) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}",
                                        timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def write(self, body: bytes) -> None:
        for attempt in range(200):
            if self._conn is None:
                self._conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
            try:
                self._conn.request("POST", self.write_path, body, {
                    "Content-Type": "application/x-protobuf", "Content-Encoding": "snappy",
                    "X-Prometheus-Remote-Write-Version": "0.1.0"})
                r = self._conn.getresponse()
                msg = r.read()
            except (OSError, http.client.HTTPException):
                self._conn.close()
                self._conn = None
                time.sleep(0.1)
                continue
            if r.status in (200, 204):
                return
            if r.status in (429, 503):  # backpressure: retry as Prometheus would
                time.sleep(min(1.0, 0.05 * (attempt + 1)))
                continue
            raise RuntimeError(f"{self.name}: write answered {r.status}: {msg[:300]!r}")
        raise RuntimeError(f"{self.name}: write kept failing")

    def wait(self, path: str, timeout: float = 60) -> None:
        t = time.monotonic()
        while time.monotonic() - t < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.proc.returncode}")
            try:
                if self.get(path, 5)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} not ready after {timeout}s")

    def query_range(self, q: str, start: float, end: float, step: int) -> tuple[float, int]:
        """(seconds, result series) of one query_range."""
        qs = urllib.parse.urlencode({"query": q, "start": f"{start:.3f}", "end": f"{end:.3f}",
                                     "step": str(step)})
        t = time.perf_counter()
        status, body = self.get(f"/api/v1/query_range?{qs}")
        dt = time.perf_counter() - t
        if status != 200:
            raise RuntimeError(f"{self.name}: {q}: {status} {body[:300]!r}")
        return dt, len(json.loads(body)["data"]["result"])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_all(tmp: Path, workers: int) -> list[System]:
    systems = []
    cfg = tmp / "m3shm.yaml"
    cfg.write_text(f"shards: 16\nworkers: {workers}\ncommitlog:\n  fsync: interval\n"
                   "shm:\n  arena_bytes: 64MiB\n  lane_bytes: 4MiB\n  series_per_shard: 16384\n"
                   "namespaces:\n  - {name: default, retention: 48h, blockSize: 4h, "
                   "bufferPast: 4h, bufferFuture: 10m}\n")
    p = free_port()
    log = open(tmp / "m3shm.log", "wb")  # noqa: SIM115 - the child keeps it
    systems.append(System("m3shm", p, "/api/v1/write", subprocess.Popen(
        [sys.executable, "-c", "import sys; from m3shm.cli import main; sys.exit(main())",
         "serve", "-c", str(cfg), "--data", str(tmp / "m3shm"), "--listen", f"127.0.0.1:{p}"],
        stdout=log, stderr=log)))
    p = free_port()
    log = open(tmp / "vm.log", "wb")  # noqa: SIM115
    systems.append(System("victoriametrics", p, "/api/v1/write", subprocess.Popen(
        ["/usr/bin/victoria-metrics", f"-storageDataPath={tmp / 'vm'}",
         f"-httpListenAddr=127.0.0.1:{p}", "-search.disableCache", "-retentionPeriod=1y",
         "-loggerLevel=ERROR"], stdout=log, stderr=log)))
    p = free_port()
    (tmp / "prometheus.yml").write_text("global:\n  scrape_interval: 1h\n")
    log = open(tmp / "prom.log", "wb")  # noqa: SIM115
    systems.append(System("prometheus", p, "/api/v1/write", subprocess.Popen(
        ["/usr/bin/prometheus", f"--config.file={tmp / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp / 'prom'}", f"--web.listen-address=127.0.0.1:{p}",
         "--web.enable-remote-write-receiver", "--log.level=error"],
        stdout=log, stderr=log)))
    for s, path in zip(systems, ("/ready", "/health", "/-/ready"), strict=True):
        s.wait(path)
    return systems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hosts", type=int, default=750, help="135 series each")
    ap.add_argument("--hours", type=float, default=2.0)
    ap.add_argument("--interval", type=int, default=30, help="seconds between samples")
    ap.add_argument("--batch", type=int, default=2000, help="series per write request")
    ap.add_argument("--range", type=int, default=3600, help="seconds each query covers")
    ap.add_argument("--step", type=int, default=30)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--only", default="", help="comma-separated query names")
    ap.add_argument("--keep", action="store_true", help="keep the systems running at the end "
                    "(prints their ports; Ctrl-C or SIGTERM stops them)")
    a = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the systems on TERM too
    tmp = Path(tempfile.mkdtemp(prefix="m3shm-perf-query-"))
    systems: list[System] = []
    try:
        systems = start_all(tmp, a.workers)
        data = Data(a.hosts)
        steps = int(a.hours * 3600 // a.interval)
        now_s = int(time.time()) // a.interval * a.interval
        t0_ms = (now_s - (steps - 1) * a.interval) * 1000
        end_s = now_s
        t = time.perf_counter()
        nbodies = 0
        with ThreadPoolExecutor(len(systems)) as pool:
            for body in bodies(data, t0_ms, steps, a.interval, a.batch):
                list(pool.map(lambda s, b=body: s.write(b), systems))
                nbodies += 1
        ingest_s = time.perf_counter() - t
        vm = systems[1]
        vm.get("/internal/force_flush")
        queries = {k: v for k, v in QUERIES.items() if not a.only or k in a.only.split(",")}
        start_s = end_s - a.range
        result: dict[str, dict] = {}
        # results must agree in size: the three hold the same data (VM may take a moment)
        for name, q in queries.items():
            for _ in range(100):
                counts = {s.name: s.query_range(q, start_s, end_s, a.step)[1] for s in systems}
                if len(set(counts.values())) == 1:
                    break
                time.sleep(0.5)
            else:
                raise RuntimeError(f"{name}: result series differ: {counts}")
            times: dict[str, list[float]] = {s.name: [] for s in systems}
            for _ in range(a.runs):
                for s in systems:
                    times[s.name].append(s.query_range(q, start_s, end_s, a.step)[0])
            result[name] = {"series": counts["m3shm"], **{
                s: round(statistics.median(v) * 1000, 2) for s, v in times.items()}}
        geo = {s.name: round(math.exp(statistics.fmean(
            math.log(max(r[s.name], 1e-3)) for r in result.values())), 2) for s in systems}
        worst = max(r["m3shm"] / min(r["victoriametrics"], r["prometheus"])
                    for r in result.values())
        out = {"series": data.n, "samples": data.n * steps, "interval_s": a.interval,
               "hours": a.hours, "query_range_s": a.range, "step_s": a.step, "runs": a.runs,
               "write_requests": nbodies, "ingest_s_all_three": round(ingest_s, 1),
               "median_ms": result, "geomean_ms": geo,
               "m3shm_geomean_le_vm": geo["m3shm"] <= geo["victoriametrics"],
               "m3shm_worst_ratio_vs_faster_peer": round(worst, 2)}
        print(json.dumps(out))
        if a.keep:
            print(json.dumps({s.name: s.port for s in systems}), file=sys.stderr)
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
    finally:
        for s in systems:
            s.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
