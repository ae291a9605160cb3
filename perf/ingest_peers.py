"""The same ingest load on m3shm, VictoriaMetrics and Prometheus, several runs each; medians.

    python perf/ingest_peers.py [--runs 3] [--targets m3shm,victoria-metrics,prometheus]
                                [--m3shm-config FILE] [ingest.py options after --]

Each run starts the server fresh on 127.0.0.1 with an empty temporary data directory, waits
until it is ready, runs ``perf/ingest.py --target URL --pid PID`` against it (its own
process, so the client's CPU is never counted as the server's), stops the server and deletes
its data. m3shm runs on its embedded defaults (one worker per core, fsync every batch) unless
``--m3shm-config`` is given; VictoriaMetrics (/usr/bin/victoria-metrics) and Prometheus
(/usr/bin/prometheus --web.enable-remote-write-receiver) on theirs. Prints one JSON object:
per target the median of each figure and every run's raw JSON, and m3shm's ratios to
VictoriaMetrics (the issue's targets: CPU per million samples and PSS per series each at most
0.5).
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIGURES = ("samples_per_s", "server_cpu_s_per_million_samples", "pss_bytes_per_series",
           "seconds", "p50_ms", "p99_ms", "rejected", "retries")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(target: str, tmp: Path, port: int, m3shm_config: str | None) -> subprocess.Popen:
    log = open(tmp / "server.log", "wb")  # noqa: SIM115 - the child keeps it
    addr = f"127.0.0.1:{port}"
    if target == "m3shm":
        cmd = [sys.executable, "-c", "import sys; from m3shm.cli import main; sys.exit(main())",
               "serve", "--data", str(tmp / "data"), "--listen", addr]
        if m3shm_config:
            cmd += ["-c", m3shm_config]
    elif target == "victoria-metrics":
        cmd = ["/usr/bin/victoria-metrics", f"-storageDataPath={tmp / 'data'}",
               f"-httpListenAddr={addr}", "-retentionPeriod=1y"]
    elif target == "prometheus":
        cfg = tmp / "prometheus.yml"
        cfg.write_text("global:\n  scrape_interval: 1h\nscrape_configs: []\n")
        cmd = ["/usr/bin/prometheus", f"--config.file={cfg}",
               f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address={addr}",
               "--web.enable-remote-write-receiver"]
    else:
        raise SystemExit(f"unknown target {target!r}")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=tmp)


def wait_ready(target: str, port: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    path = {"m3shm": "/ready", "victoria-metrics": "/health", "prometheus": "/-/ready"}[target]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{target} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{target} not ready after {timeout}s")


def run_once(target: str, m3shm_config: str | None, extra: list[str]) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix=f"ingest-{target}-"))
    port = free_port()
    proc = start(target, tmp, port, m3shm_config)
    try:
        wait_ready(target, port, proc)
        time.sleep(1.0)  # start-up work (e.g. Prometheus' WAL setup) out of the CPU window
        p = subprocess.run([sys.executable, str(ROOT / "perf" / "ingest.py"), "--target",
                            f"http://127.0.0.1:{port}/api/v1/write", "--pid", str(proc.pid),
                            *extra], capture_output=True, text=True, check=True)
        return json.loads(p.stdout.strip().splitlines()[-1])
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--targets", default="m3shm,victoria-metrics,prometheus")
    ap.add_argument("--m3shm-config", help="YAML config for m3shm (default: embedded defaults)")
    ap.add_argument("extra", nargs="*", help="options passed on to perf/ingest.py (after --)")
    a = ap.parse_args()
    out: dict[str, dict] = {}
    for target in a.targets.split(","):
        runs = []
        for i in range(a.runs):
            r = run_once(target, a.m3shm_config, a.extra)
            print(f"{target} run {i + 1}: {json.dumps(r)}", file=sys.stderr)
            runs.append(r)
        med = {k: statistics.median(r[k] for r in runs) for k in FIGURES
               if all(r.get(k) is not None for r in runs)}
        out[target] = {"median": med, "series": runs[0]["series"],
                       "samples": runs[0]["samples"], "runs": runs}
    if "m3shm" in out and "victoria-metrics" in out:
        m, v = out["m3shm"]["median"], out["victoria-metrics"]["median"]
        out["m3shm_vs_victoria_metrics"] = {
            k: round(m[k] / v[k], 3) for k in ("server_cpu_s_per_million_samples",
                                               "pss_bytes_per_series", "samples_per_s")
            if k in m and v.get(k)}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
