"""Correctness against a real Prometheus 2.42: the last minutes of a recorded capture
(../shared/data/real-10s.jsonl.gz) are remote-written into both m3shm and a Prometheus started
with --web.enable-remote-write-receiver (both on 127.0.0.1), then a list of queries runs on
both over the same range; results must agree within a relative 1e-5 (NaN equals NaN)."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request

import numpy as np
import pytest
import snappy
from promcompare import diff
from test_daemon_harness import Daemon, free_port, now_ms, write_request

from m3shm.dataset import default_dataset, read_export

WINDOW_MS = 8 * 60_000

QUERIES = [
    "node_cpu_seconds_total",
    "rate(node_cpu_seconds_total[1m])",
    "sum by (mode) (rate(node_cpu_seconds_total[2m]))",
    "sum by (instance) (irate(node_cpu_seconds_total[1m]))",
    "histogram_quantile(0.9, sum by (le) (rate(prometheus_http_request_duration_seconds_bucket"
    "[2m])))",
    "count by (job) (up)",
    'count({__name__=~"node_network_.+"})',
    'avg_over_time(go_goroutines[3m])',
    'max_over_time(process_resident_memory_bytes[2m]) / 1024',
    "deriv(process_resident_memory_bytes[3m])",
    'increase(prometheus_http_requests_total{handler=~"/api.*"}[2m])',
    "delta(go_memstats_heap_inuse_bytes[2m])",
    'label_replace(up, "host", "$1", "instance", "(.*):.*")',
    "go_goroutines > bool 30",
    "sum(rate(node_network_receive_bytes_total[1m])) by (device)",
    "changes(go_goroutines[5m])",
    'quantile_over_time(0.5, go_goroutines[2m])',
    "topk(3, rate(node_cpu_seconds_total[1m]))",
    "count_values(\"v\", node_scrape_collector_success)",
    "absent(nonexistent_metric)",
    "scalar(sum(up)) * 2",
    "rate(node_cpu_seconds_total[1m] offset 1m)",
    'sum without (cpu) (node_cpu_seconds_total)',
    "go_goroutines and on(instance) up",
    "stddev_over_time(go_goroutines[2m])",
    "timestamp(up)",
]


def _series():
    """The capture's last WINDOW_MS, shifted to end 30 s ago."""
    items = list(read_export(default_dataset()))
    end = max(int(s.timestamps[-1]) for s in items)
    shift = (now_ms() - 30_000) // 10_000 * 10_000 - end
    out = []
    for s in items:
        keep = s.timestamps > end - WINDOW_MS
        if keep.any():
            ts = s.timestamps[keep] + shift
            out.append((s.labels, list(zip(ts.tolist(), s.values[keep].tolist(), strict=True))))
    return out, end + shift


def _get(url: str) -> dict:
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            return json.load(r)
    except urllib.error.HTTPError as e:
        return json.loads(e.read())


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    binary = shutil.which("prometheus")
    if not binary:
        pytest.fail("prometheus is not installed (apt-get install prometheus; .ci/run does)")
    tmp = tmp_path_factory.mktemp("vsprom")
    (tmp / "m3").mkdir()
    d = Daemon(tmp / "m3").start()
    port = free_port()
    (tmp / "prom.yml").write_text("global: {scrape_interval: 1h}\n")
    prom = subprocess.Popen([binary, f"--config.file={tmp}/prom.yml",
                             f"--storage.tsdb.path={tmp}/prom",
                             "--web.enable-remote-write-receiver",
                             f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    purl = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(purl + "/-/ready", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline and prom.poll() is None
                time.sleep(0.2)
        series, end = _series()
        for i in range(0, len(series), 200):
            body = snappy.compress(write_request(series[i:i + 200]))
            assert d.post("/api/v1/write", body)[0] == 204
            req = urllib.request.Request(purl + "/api/v1/write", data=body, method="POST",
                                         headers={"Content-Type": "application/x-protobuf",
                                                  "Content-Encoding": "snappy"})
            with urllib.request.urlopen(req, timeout=30) as r:
                assert r.status == 204
        yield d.url, purl, end
    finally:
        prom.terminate()
        prom.wait(30)
        d.stop()


@pytest.mark.parametrize("query", QUERIES)
def test_range_query_agrees(both, query):
    ours, theirs, end = both
    params = urllib.parse.urlencode({"query": query, "start": (end - WINDOW_MS + 60_000) / 1000,
                                     "end": end / 1000, "step": "15"})
    a = _get(f"{theirs}/api/v1/query_range?{params}")
    b = _get(f"{ours}/api/v1/query_range?{params}")
    assert a["status"] == "success", a
    assert b["status"] == "success", b
    assert a["data"]["result"], f"{query}: Prometheus returned nothing; the case tests nothing"
    if query.startswith("topk"):  # ties may be ordered differently; compare the kept sets
        a["data"]["result"].sort(key=lambda s: sorted(s["metric"].items()))
    assert diff(a["data"], b["data"]) is None, diff(a["data"], b["data"])


@pytest.mark.parametrize("query", QUERIES[:12])
def test_instant_query_agrees(both, query):
    ours, theirs, end = both
    for at in np.linspace(end - WINDOW_MS + 120_000, end, 4).astype(int).tolist():
        params = urllib.parse.urlencode({"query": query, "time": at / 1000})
        a = _get(f"{theirs}/api/v1/query?{params}")
        b = _get(f"{ours}/api/v1/query?{params}")
        assert a["status"] == b["status"] == "success", (a, b)
        assert diff(a["data"], b["data"]) is None, (at, diff(a["data"], b["data"]))
