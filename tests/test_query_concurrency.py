"""query.max_concurrency is daemon-wide: with a limit of 1 and a slow query running on one
worker, a query sent to *either* worker (X-M3shm-Worker names the one that answered) waits in
line for its timeout and gets Prometheus' 503 ``timeout``; once the slow query is gone, both
workers answer again. A real daemon (2 workers) on 127.0.0.1."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.parse
import urllib.request

from test_daemon_harness import Daemon, now_ms
from test_query_api import slow_query


def ask(d: Daemon, path: str) -> tuple[int, dict, int]:
    try:
        with urllib.request.urlopen(d.url + path, timeout=60) as r:
            return r.status, json.loads(r.read()), int(r.headers["X-M3shm-Worker"])
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), int(e.headers["X-M3shm-Worker"])


def test_max_concurrency_is_daemon_wide(tmp_path):
    d = Daemon(tmp_path, extra="query:\n  max_concurrency: 1\n").start()
    try:
        t0 = (now_ms() - 5 * 60_000) // 1000 * 1000
        assert d.write([({"__name__": "req_total", "instance": f"h{h}"},
                         [(t0 + i * 10_000, float(i)) for i in range(30)])
                        for h in range(4)])[0] == 204
        slow = slow_query(1 << 14)
        body = urllib.parse.urlencode({"query": slow, "start": t0 / 1000,
                                       "end": (t0 + 300_000) / 1000, "step": "1s"}).encode()
        sock = socket.create_connection(("127.0.0.1", d.port))
        quick = "/api/v1/query?" + urllib.parse.urlencode(
            {"query": "count(req_total)", "time": (t0 + 100_000) / 1000, "timeout": "0.3s"})
        try:
            sock.sendall(b"POST /api/v1/query_range HTTP/1.1\r\nHost: x\r\nContent-Type: "
                         b"application/x-www-form-urlencoded\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(body), body))
            deadline = time.monotonic() + 60
            while not any(e["expr"] == slow for e in ask(d, "/api/v1/status/queries")[1]["data"]):
                assert time.monotonic() < deadline, "the slow query never started"
                time.sleep(0.05)
            refused_by: set[int] = set()
            while refused_by != {0, 1}:
                code, r, worker = ask(d, quick)
                assert (code, r.get("errorType")) == (503, "timeout"), (worker, r)
                assert "query.max_concurrency=1" in r["error"], r
                refused_by.add(worker)
                assert time.monotonic() < deadline, f"only worker {refused_by} answered"
        finally:
            sock.close()  # the slow query is cancelled and frees the daemon's one slot
        answered_by: set[int] = set()
        deadline = time.monotonic() + 60
        while answered_by != {0, 1}:
            code, r, worker = ask(d, quick)
            if code == 200:
                assert r["data"]["result"][0]["value"][1] == "4"
                answered_by.add(worker)
            assert time.monotonic() < deadline, f"only worker {answered_by} answered"
    finally:
        d.stop()
