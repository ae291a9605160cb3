"""The query service while a worker is down, and under a whole-store query with the default
limits: a real daemon (2 workers) on 127.0.0.1.

- A worker that owns shards is stopped (SIGSTOP), so writes acknowledged by the other worker
  wait in its lanes: a query answered by the other worker returns 200 with what it has and a
  "may be partial" warning in Prometheus' ``warnings`` field. Then the stopped worker is
  SIGKILLed; once the supervisor has restarted it, the same query answers every acknowledged
  series and no warning.
- ``count({__name__=~".+"})`` over 50,000 series with the default ``query:`` limits answers
  (the daemon stays alive and the count is exact).
"""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.error
import urllib.parse
import urllib.request

import snappy
from test_daemon_harness import Daemon, now_ms, write_request

WORKER_HEADER = "X-M3shm-Worker"


def try_get(d: Daemon, path: str, timeout: float) -> tuple[int, dict, dict] | None:
    """GET with a short timeout; None when the connection landed on the stopped worker."""
    try:
        with urllib.request.urlopen(d.url + path, timeout=timeout) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), dict(e.headers)
    except (TimeoutError, urllib.error.URLError, ConnectionError):
        return None


def try_write(d: Daemon, body: bytes, timeout: float) -> int | None:
    req = urllib.request.Request(
        d.url + "/api/v1/prom/remote/write", data=body, method="POST",
        headers={"Content-Type": "application/x-protobuf", "Content-Encoding": "snappy",
                 "X-Prometheus-Remote-Write-Version": "0.1.0"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (TimeoutError, urllib.error.URLError, ConnectionError):
        return None


def until(fn, what: str, limit: float = 60):  # noqa: ANN001, ANN201 - test helper
    deadline = time.monotonic() + limit
    while True:
        got = fn()
        if got is not None:
            return got
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


N_SERIES = 32  # spread over all 8 shards, so both workers own some


def test_query_while_a_worker_is_stopped_then_killed_warns_partial(tmp_path):
    d = Daemon(tmp_path, extra="query:\n  catchup_wait: 300ms\n").start()
    try:
        t0 = now_ms() - 60_000
        first = [({"__name__": "up", "i": str(i)}, [(t0, 1.0)]) for i in range(N_SERIES)]
        assert d.write(first)[0] == 204
        q = "/api/v1/query?" + urllib.parse.urlencode(
            {"query": "count(up)", "time": (t0 + 30_000) / 1000})
        code, r, _ = until(lambda: try_get(d, q, 10), "no answer")
        assert (code, r["data"]["result"][0]["value"][1]) == (200, str(N_SERIES))
        assert "warnings" not in r

        stopped = d.workers()[0]
        os.kill(stopped, signal.SIGSTOP)  # its shards stop applying what others acknowledge
        try:
            body = snappy.compress(write_request(
                [({"__name__": "up", "i": str(i)}, [(t0 + 10_000, 2.0)])
                 for i in range(N_SERIES, 2 * N_SERIES)]))
            # a connection the kernel gave the stopped worker times out: try again
            until(lambda: try_write(d, body, 2) == 204 or None, "no worker acknowledged")
            code, r, h = until(lambda: try_get(d, q, 5), "the running worker never answered")
            assert code == 200 and r["status"] == "success", r
            assert any("may be partial" in w for w in r.get("warnings", [])), r
            # what is there is answered: the first batch at least, never more than was written
            n = int(r["data"]["result"][0]["value"][1])
            assert N_SERIES <= n < 2 * N_SERIES
            answering = int(h[WORKER_HEADER])
        finally:
            os.kill(stopped, signal.SIGKILL)  # really killed while it was behind
        # the supervisor forks it again; it drains its lanes: nothing acknowledged is lost
        def complete():  # noqa: ANN202
            got = try_get(d, q, 10)
            if got is None or got[0] != 200 or "warnings" in got[1]:
                return None
            return got

        code, r, _ = until(complete, "never answered completely after the restart")
        assert r["data"]["result"][0]["value"][1] == str(2 * N_SERIES)
        assert stopped not in d.workers()
        assert answering in (0, 1)
    finally:
        d.stop()


def test_count_all_series_with_default_limits(tmp_path):
    n, per_req = 50_000, 5_000
    d = Daemon(tmp_path, series=8192, arena="8MiB").start()
    try:
        t0 = (now_ms() - 10 * 60_000) // 1000 * 1000
        for a in range(0, n, per_req):
            code, body, _ = d.write(
                [({"__name__": f"metric_{i % 100}", "instance": f"host-{i // 100}",
                   "job": "big"}, [(t0 + k * 60_000, float(i + k)) for k in range(5)])
                 for i in range(a, a + per_req)], timeout=120)
            assert code == 204, body
        at = (t0 + 4 * 60_000) / 1000
        q = "/api/v1/query?" + urllib.parse.urlencode(
            {"query": 'count({__name__=~".+"})', "time": at})
        code, r, _ = try_get(d, q, 300)
        assert code == 200, r
        assert r["data"]["result"][0]["value"] == [at, str(n)]
        q = "/api/v1/query_range?" + urllib.parse.urlencode(
            {"query": 'count by (job) ({__name__=~".+"})', "start": t0 / 1000, "end": at,
             "step": "60s"})
        code, r, _ = try_get(d, q, 300)
        assert code == 200, r
        assert [v for _, v in r["data"]["result"][0]["values"]] == [str(n)] * 5
        assert d.proc is not None and d.proc.poll() is None
        assert len(d.workers()) == 2
    finally:
        d.stop()
