"""Rollup end to end (issue 8): `http_requests_total` of 50 instances, with counter resets,
rolled up by (service, endpoint) with Increase -> rollup Sum -> Add, through the daemon as a
subprocess: remote write in, the rolled-up counters read back over the HTTP query API.

The rolled-up counter's increase between any two of its window ends must equal the sum of the
instances' raw increases between the same times (relative 1e-9), resets included; and so again
when a worker is SIGKILLed while the data arrive (nothing lost or double-counted). Windows are
1 s, so the test runs in seconds; the admission (6 s) and the forward delay (6 s) exceed a
worker's restart and the stalls of a loaded machine, so the inputs a killed worker owns are
still on time for their windows and for their groups' when it is back (with 1 s and 3 s the
SIGKILL run loses values as late; a late value is counted in /metrics, and the test says so).
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.test_daemon_harness import Daemon, now_ms

RES_MS = 1000
INSTANCES = 50
GROUPS = [("api", "/a"), ("api", "/b"), ("web", "/a"), ("web", "/b")]



def rollup_config(admission_s: int, forward_delay_s: int) -> str:
    """The canonical counter rollup at 1s:2d, raw bufferPast = the admission."""
    return f"""
namespaces:
  - {{name: default, retention: 2h, blockSize: 1h, bufferPast: {admission_s}s,
     bufferFuture: 1s}}
downsample:
  admission: {admission_s}s
  forward_delay: {forward_delay_s}s
  rules:
    defaultPolicies: []
    rollupRules:
      - name: requests by endpoint
        filter: "__name__:http_requests_total"
        transforms:
          - transform: {{type: Increase}}
          - rollup: {{metricName: http_requests_by_endpoint_total,
                     groupBy: [service, endpoint], aggregations: [Sum]}}
          - transform: {{type: Add}}
        storagePolicies: [1s:2d]
"""


CONFIG = rollup_config(6, 6)


def instance_labels(i: int) -> dict[str, str]:
    svc, ep = GROUPS[i % len(GROUPS)]
    return {"__name__": "http_requests_total", "service": svc, "endpoint": ep,
            "instance": f"10.0.0.{i}:9100", "job": "app"}


class Counters:
    """50 counters with random increments and occasional resets; remembers every sample.
    ``labels`` names instance i; with ``lag_ms`` the odd instances' samples are stamped that
    far behind the others'."""

    def __init__(self, seed: int, labels: Callable[[int], dict[str, str]] = instance_labels,
                 lag_ms: int = 0) -> None:
        self.labels = labels
        self.lag_ms = lag_ms
        self.rnd = random.Random(seed)
        self.value = [float(self.rnd.randrange(0, 10_000)) for _ in range(INSTANCES)]
        self.samples: list[list[tuple[int, float]]] = [[] for _ in range(INSTANCES)]

    def step(self, ts: int) -> list:
        series = []
        for i in range(INSTANCES):
            if self.samples[i] and self.rnd.random() < 0.04:
                self.value[i] = float(self.rnd.randrange(0, 5))  # a restart: counter reset
            elif self.samples[i]:
                self.value[i] += self.rnd.randrange(0, 50) + self.rnd.random()
            t = ts - (self.lag_ms if i % 2 else 0)
            self.samples[i].append((t, self.value[i]))
            series.append((self.labels(i), [(t, self.value[i])]))
        return series

    def raw_increase(self, group: tuple[str, str], t0: int, t1: int) -> float:
        """Sum over the (service, endpoint) group's instances of their increases in (t0, t1]."""
        return self.increase(lambda lb: (lb["service"], lb["endpoint"]) == group, t0, t1)

    def increase(self, select: Callable[[dict[str, str]], bool], t0: int, t1: int) -> float:
        """Sum over the instances whose labels ``select`` takes of their increases in
        (t0, t1]: each sample after the first adds v - prev, or v after a reset (Prometheus'
        counter semantics)."""
        total = 0.0
        for i in range(INSTANCES):
            if not select(self.labels(i)):
                continue
            s = self.samples[i]
            for (_, pv), (t, v) in zip(s, s[1:], strict=False):
                if t0 < t <= t1:
                    total += v - pv if v >= pv else v
        return total


def write_until_ok(d: Daemon, series: list, deadline: float) -> None:
    """Remote write, retried (as Prometheus does) through a worker restart."""
    while True:
        try:
            code, body, _ = d.write(series, timeout=10)
            if code in (200, 204):
                return
            err = f"{code} {body[:200]!r}"
        except OSError as e:
            err = str(e)
        if time.monotonic() > deadline:
            raise AssertionError(f"remote write keeps failing: {err}\n{d.logtext()}")
        time.sleep(0.05)


def rolled_up(d: Daemon, at_ms: int) -> dict[tuple[str, str], list[tuple[int, float]]]:
    """Every stored point of the rolled-up counters, from the query API (a range selector
    returns the points as stored)."""
    q = urllib.parse.urlencode({"query": "http_requests_by_endpoint_total[1h]",
                                "time": f"{at_ms / 1000:.3f}"})
    code, body = d.get(f"/api/v1/query?{q}")
    assert code == 200, body
    out = {}
    for r in json.loads(body)["data"]["result"]:
        m = r["metric"]
        assert set(m) == {"__name__", "service", "endpoint"}, m
        out[(m["service"], m["endpoint"])] = [(round(float(t) * 1000), float(v))
                                              for t, v in r["values"]]
    return out


def wait_rolled_up(d: Daemon, last_end: int, deadline: float
                   ) -> tuple[dict[tuple[str, str], list[tuple[int, float]]], str, list[str]]:
    """Every group's stored points once each has one at ``last_end`` or later; the /metrics
    page and its rollup and lateness lines (for assertion messages)."""
    got: dict = {}
    while time.monotonic() < deadline:
        got = rolled_up(d, now_ms())
        if len(got) == len(GROUPS) and all(
                pts and pts[-1][0] >= last_end for pts in got.values()):
            break
        time.sleep(0.3)
    else:
        raise AssertionError(f"rolled-up series incomplete: {got}\n{d.logtext()}")
    page = d.get("/metrics")[1].decode()
    info = [ln for ln in page.splitlines() if ln.startswith(
        ("m3shm_rollup", "m3shm_downsample_late", "m3shm_downsample_out_of_order",
         "m3shm_downsample_evicted"))]
    return got, page, info


def check_counters(got: dict[tuple[str, str], list[tuple[int, float]]], counters: Counters,
                   info: object) -> None:
    """Each rolled-up counter: its window ends are distinct, ordered and on the resolution;
    its increase between ANY two of them equals its instances' raw increases (1e-9), and its
    first value the increases up to its first end (nothing before it lost)."""
    for group, pts in got.items():
        ends = [t for t, _ in pts]
        assert all(t % RES_MS == 0 for t in ends) and ends == sorted(set(ends)), ends
        value = dict(pts)
        bad = [(t1, value[t1] - value[t0], counters.raw_increase(group, t0, t1))
               for t0, t1 in zip(ends, ends[1:], strict=False)
               if value[t1] - value[t0] != pytest.approx(
                   counters.raw_increase(group, t0, t1), rel=1e-9, abs=1e-9)]
        assert not bad, (group, "windows (end, have, want):", bad, info)
        for a in range(len(ends)):
            for b in range(a + 1, len(ends)):
                t0, t1 = ends[a], ends[b]
                want = counters.raw_increase(group, t0, t1)
                have = value[t1] - value[t0]
                assert have == pytest.approx(want, rel=1e-9, abs=1e-9), (
                    group, t0, t1, have - want, info)
        assert value[ends[0]] == pytest.approx(
            counters.raw_increase(group, 0, ends[0]), rel=1e-9, abs=1e-9), group


def run_rollup(tmp: Path, kill_worker: bool) -> None:
    d = Daemon(tmp, workers=2, series=4096, arena="4MiB", extra=CONFIG).start()
    try:
        counters = Counters(seed=8 + kill_worker)
        steps = 28
        t_start = now_ms()
        deadline = time.monotonic() + 90
        for k in range(steps):
            ts = t_start + k * 250
            while now_ms() < ts:
                time.sleep(0.005)
            if kill_worker and k == steps // 2:
                os.kill(d.workers()[0], signal.SIGKILL)
            write_until_ok(d, counters.step(ts), deadline)
        last_ts = t_start + (steps - 1) * 250
        # every window ending at or before last_ts is final after admission + forward delay
        # and both stages' finalise rounds; wait until each group has its last point
        last_end = last_ts // RES_MS * RES_MS
        got, page, info = wait_rolled_up(d, last_end, deadline)
        first_end = (t_start // RES_MS + 1) * RES_MS
        for group, pts in got.items():  # the first window is there too
            assert pts[0][0] <= first_end + RES_MS, (group, pts[0])
        check_counters(got, counters, info)
        assert 'm3shm_downsample_late_samples_total 0' in page
        assert 'm3shm_rollup_late_values_total{namespace="agg_1s_2d"} 0' in page
        assert 'm3shm_rollup_records_unmatched_total{namespace="agg_1s_2d"} 0' in page
    finally:
        d.stop()


def test_rollup_of_50_counters_equals_the_sum_of_their_increases(tmp_path: Path) -> None:
    run_rollup(tmp_path, kill_worker=False)


def test_rollup_survives_a_worker_sigkill(tmp_path: Path) -> None:
    run_rollup(tmp_path, kill_worker=True)
