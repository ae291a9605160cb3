"""A real Prometheus (Debian package `prometheus`, installed by .ci/run) scrapes itself every
second and remote-writes (1.0) to the daemon; its samples arrive, exactly as Prometheus
stored them."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request

import pytest
from test_daemon_harness import Daemon, free_port

CONFIG = """
global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: prom
    static_configs:
      - targets: ['127.0.0.1:{pport}']
remote_write:
  - url: http://127.0.0.1:{dport}/api/v1/write
    queue_config:
      batch_send_deadline: 500ms
      min_backoff: 50ms
      max_backoff: 500ms
"""


def _prom_query(port: int, q: str, at: float) -> list:
    qs = urllib.parse.urlencode({"query": q, "time": f"{at:.3f}"})
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/query?{qs}", timeout=10) as r:
        return json.loads(r.read())["data"]["result"]


def test_real_prometheus_remote_writes_into_daemon(tmp_path):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus is not installed (apt-get install prometheus; .ci/run does)")
    d = Daemon(tmp_path, series=8192, arena="4MiB").start()
    pport = free_port()
    (tmp_path / "prom.yml").write_text(CONFIG.format(pport=pport, dport=d.port))
    log = open(tmp_path / "prom.log", "wb")  # noqa: SIM115
    prom = subprocess.Popen(
        [binary, f"--config.file={tmp_path / 'prom.yml'}",
         f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{pport}"],
        stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        rows: list = []
        while time.monotonic() < deadline:
            rows = d.export('up{job="prom"}')
            if rows and len(rows[0]["timestamps"]) >= 5:
                break
            assert prom.poll() is None, (tmp_path / "prom.log").read_text()[-3000:]
            time.sleep(0.5)
        assert rows and len(rows[0]["timestamps"]) >= 5, (tmp_path / "prom.log").read_text()
        assert rows[0]["metric"] == {"__name__": "up", "instance": f"127.0.0.1:{pport}",
                                     "job": "prom"}
        assert set(rows[0]["values"]) == {1}
        # every raw sample Prometheus holds up to our newest one arrived, bit for bit
        ours = dict(zip(rows[0]["timestamps"], rows[0]["values"], strict=True))
        last = max(ours) / 1000
        res = _prom_query(pport, 'up{job="prom"}[5m]', last)
        theirs = {int(round(float(t) * 1000)): float(v) for t, v in res[0]["values"]}
        assert theirs and theirs == {t: v for t, v in ours.items() if t in theirs}
        assert set(theirs) <= set(ours)
        # many other series arrive too (Prometheus' own metrics)
        many = d.export('{job="prom"}')
        assert len(many) > 0
        build = d.export('prometheus_build_info{job="prom"}')
        assert build and build[0]["metric"]["version"].startswith("2.")
    finally:
        prom.terminate()
        prom.wait(30)
        log.close()
        assert d.stop() == 0
