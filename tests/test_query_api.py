"""The Prometheus HTTP query API end to end: a real daemon (2 workers) on 127.0.0.1, data
remote-written into it, answers checked for Prometheus' JSON shapes, error types and codes,
the /prometheus prefix, POST forms, limits (422 naming the limit), timeouts (503), a client
disconnect cancelling its query, and the running-queries registry seen from every worker."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.parse
import urllib.request

import pytest
from test_daemon_harness import Daemon, now_ms

N_HOSTS = 6
STEP_MS = 10_000
N_POINTS = 30


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = Daemon(tmp_path_factory.mktemp("qapi"), extra="query:\n  max_concurrency: 2\n").start()
    t0 = (now_ms() - 8 * 60_000) // 1000 * 1000
    series = []
    for h in range(N_HOSTS):
        for job in ("api", "db"):
            series.append(({"__name__": "req_total", "job": job, "instance": f"host-{h}"},
                           [(t0 + i * STEP_MS, float(i * (h + 1))) for i in range(N_POINTS)]))
    series.append(({"__name__": "temp", "room": "a"},
                   [(t0 + i * STEP_MS, 20.0 + (i % 7) * 0.25) for i in range(N_POINTS)]))
    code, body, _ = d.write(series)
    assert code == 204, body
    yield d, t0
    d.stop()


def get(d: Daemon, path: str, **params) -> tuple[int, dict]:
    code, body = d.get(path + "?" + urllib.parse.urlencode(params, doseq=True))
    return code, json.loads(body)


def post_form(d: Daemon, path: str, params: dict, timeout: float = 60) -> tuple[int, dict]:
    body = urllib.parse.urlencode(params, doseq=True).encode()
    code, out, _ = d.post(path, body, {"Content-Type": "application/x-www-form-urlencoded",
                                       "Content-Encoding": "identity"}, timeout=timeout)
    return code, json.loads(out)


def test_instant_vector_scalar_and_string(data):
    d, t0 = data
    at = str((t0 + 10 * STEP_MS) / 1000)
    code, r = get(d, "/api/v1/query", query="sum by (job) (req_total)", time=at)
    assert code == 200 and r["status"] == "success"
    assert r["data"]["resultType"] == "vector"
    got = {s["metric"]["job"]: s["value"] for s in r["data"]["result"]}
    want = str(sum(10 * (h + 1) for h in range(N_HOSTS)))
    assert got == {"api": [int(at.split(".")[0]), want], "db": [int(at.split(".")[0]), want]}
    code, r = get(d, "/api/v1/query", query="1.5 * 2", time="100.25")
    assert r["data"] == {"resultType": "scalar", "result": [100.25, "3"]}
    code, r = get(d, "/api/v1/query", query='"hi"', time="100")
    assert r["data"] == {"resultType": "string", "result": [100, "hi"]}
    # regex across hosts, and a value that needs Go's float formatting
    code, r = get(d, "/api/v1/query", query='temp{room=~"a|b"} / 3', time=at)
    assert r["data"]["result"][0]["value"][1] == repr((20.0 + 3 * 0.25) / 3)


def test_range_query_matrix_and_max_points(data):
    d, t0 = data
    params = {"query": 'req_total{instance="host-1", job="api"}', "start": t0 / 1000,
              "end": (t0 + (N_POINTS - 1) * STEP_MS) / 1000, "step": "10s"}
    code, r = get(d, "/api/v1/query_range", **params)
    assert code == 200 and r["data"]["resultType"] == "matrix"
    (s,) = r["data"]["result"]
    assert s["metric"] == {"__name__": "req_total", "instance": "host-1", "job": "api"}
    assert s["values"] == [[(t0 + i * STEP_MS) // 1000, str(i * 2)] for i in range(N_POINTS)]
    code, r = get(d, "/api/v1/query_range", max_points=5, **params)
    pts = r["data"]["result"][0]["values"]
    assert len(pts) == 5 and pts[0] == s["values"][0] and pts[-1] == s["values"][-1]
    assert all(p in s["values"] for p in pts)
    for bad, msg in [({"step": "0"}, "zero or negative"), ({"end": t0 / 1000 - 10}, "before"),
                     ({"step": "0.001"}, "11,000 points"), ({"max_points": "2"}, "max_points")]:
        code, r = get(d, "/api/v1/query_range", **{**params, **bad})
        assert (code, r["errorType"]) == (400, "bad_data") and msg in r["error"], r


def test_post_form_and_prometheus_prefix(data):
    d, t0 = data
    at = (t0 + 5 * STEP_MS) / 1000
    code, r = post_form(d, "/prometheus/api/v1/query",
                        {"query": 'count(req_total{job="db"})', "time": at})
    assert code == 200 and r["data"]["result"][0]["value"] == [at, str(N_HOSTS)]


def test_series_labels_values_limit(data):
    d, t0 = data
    code, r = get(d, "/api/v1/series", **{"match[]": ['req_total{instance=~"host-[01]"}',
                                                      "temp"]})
    assert code == 200
    assert sorted(tuple(sorted(m.items())) for m in r["data"]) == sorted(
        [(("__name__", "req_total"), ("instance", f"host-{h}"), ("job", j))
         for h in (0, 1) for j in ("api", "db")] + [(("__name__", "temp"), ("room", "a"))])
    code, r = get(d, "/api/v1/series")
    assert (code, r["errorType"]) == (400, "bad_data")
    code, r = get(d, "/api/v1/labels")
    assert r["data"] == ["__name__", "instance", "job", "room"]
    code, r = get(d, "/api/v1/labels", **{"match[]": "temp"})
    assert r["data"] == ["__name__", "room"]
    code, r = get(d, "/api/v1/label/instance/values")
    assert r["data"] == [f"host-{h}" for h in range(N_HOSTS)]
    code, r = get(d, "/api/v1/label/instance/values", limit=2)
    assert r["data"] == ["host-0", "host-1"] and r["warnings"]
    code, r = get(d, "/api/v1/label/job/values", **{"match[]": '{instance="host-3"}'})
    assert r["data"] == ["api", "db"]
    # a time range with no data selects nothing
    code, r = get(d, "/api/v1/series", **{"match[]": "temp", "start": "1", "end": "2"})
    assert r["data"] == []


def test_errors_metadata_buildinfo_format(data):
    d, _ = data
    code, r = get(d, "/api/v1/query", query="sum(")
    assert (code, r["status"], r["errorType"]) == (400, "error", "bad_data")
    code, r = get(d, "/api/v1/query", query="x", time="yesterday")
    assert (code, r["errorType"]) == (400, "bad_data") and "time" in r["error"]
    code, r = get(d, "/api/v1/query", query='req_total + on() req_total', time="1000")
    assert code == 200  # no samples at t=1000: nothing to match
    code, r = get(d, "/api/v1/query", query="req_total + on() group_left req_total")
    assert (code, r["errorType"]) == (422, "execution"), r
    code, r = get(d, "/api/v1/metadata")
    assert (code, r) == (200, {"status": "success", "data": {}})
    code, r = get(d, "/api/v1/status/buildinfo")
    assert r["data"]["version"].startswith("2.")
    code, r = get(d, "/api/v1/format_query", query="sum by(a)(rate(x[5m]))")
    assert r["data"] == "sum by (a) (rate(x[5m]))"


def test_export_takes_any_matchers(data):
    d, _ = data
    rows = d.export('{__name__=~"req_.*", instance!~"host-[0-3]", job!="db"}')
    assert sorted(r["metric"]["instance"] for r in rows) == ["host-4", "host-5"]
    code, body = d.get("/api/v1/export?match[]=" + urllib.parse.quote('{a=""}'))
    assert code == 400 and b"match[]" in body


def slow_query(leaves: int = 1 << 13) -> str:
    """A query whose evaluation takes many seconds but many small steps (cancel points)."""
    parts = ["req_total"] * leaves
    while len(parts) > 1:
        parts = [f"({a} or {b})" for a, b in zip(parts[::2], parts[1::2], strict=True)]
    return parts[0]


def range_form(t0: int, q: str, **extra) -> dict:
    return {"query": q, "start": t0 / 1000, "end": (t0 + N_POINTS * STEP_MS) / 1000,
            "step": "1s", **extra}


def test_timeout_answers_503(data):
    d, t0 = data
    code, r = post_form(d, "/api/v1/query_range", range_form(t0, slow_query(), timeout="0.3s"))
    assert (code, r["errorType"]) == (503, "timeout"), r


def running(d: Daemon) -> list[dict]:
    code, r = get(d, "/api/v1/status/queries")
    assert code == 200
    return r["data"]


def test_disconnect_cancels_and_registry_is_shared(data):
    d, t0 = data
    q = slow_query(1 << 14)
    body = urllib.parse.urlencode(range_form(t0, q)).encode()
    sock = socket.create_connection(("127.0.0.1", d.port))
    sock.sendall(b"POST /api/v1/query_range HTTP/1.1\r\nHost: x\r\nContent-Type: "
                 b"application/x-www-form-urlencoded\r\nContent-Length: %d\r\n\r\n%s"
                 % (len(body), body))
    deadline = time.monotonic() + 30
    # until both workers answered with it (the other worker reads it from the registry file,
    # written within queryreg.FLUSH_S of the query's start)
    answered: set[int] = set()
    while answered != {0, 1}:
        with urllib.request.urlopen(d.url + "/api/v1/status/queries", timeout=30) as r:
            if any(e["expr"] == q for e in json.loads(r.read())["data"]):
                answered.add(int(r.headers["X-M3shm-Worker"]))
        assert time.monotonic() < deadline, "query never showed up in status/queries"
        time.sleep(0.05)
    # every worker keeps seeing it (requests land on either worker through SO_REUSEPORT)
    seen_by = set()
    for _ in range(20):
        entries = [e for e in running(d) if e["expr"] == q]
        assert entries and entries[0]["started"]
        seen_by.add(entries[0]["worker"])
    sock.close()  # the client goes away: the query must stop, not run on for minutes
    deadline = time.monotonic() + 20
    while any(e["expr"] == q for e in running(d)):
        assert time.monotonic() < deadline, "a disconnected client's query kept running"
        time.sleep(0.05)
    # the daemon still answers queries afterwards
    code, r = get(d, "/api/v1/query", query="count(temp)")
    assert code == 200


def test_concurrent_queries_all_answered(data):
    d, t0 = data
    results = []

    def one(i: int) -> None:
        results.append(get(d, "/api/v1/query", query=f"count(req_total) + {i}",
                           time=(t0 + 5 * STEP_MS) / 1000))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(int(r["data"]["result"][0]["value"][1]) for _, r in results) == \
        [2 * N_HOSTS + i for i in range(8)]


def test_limits_refuse_with_422_naming_the_limit(tmp_path):
    d = Daemon(tmp_path, extra="query:\n  max_series: 5\n  max_samples: 100000\n").start()
    try:
        t0 = now_ms() - 60_000
        d.write([({"__name__": f"m{i}", "job": "j"}, [(t0, 1.0), (t0 + 1000, 2.0)])
                 for i in range(20)])
        code, r = get(d, "/api/v1/query", query='count({__name__=~".+"})')
        assert (code, r["errorType"]) == (422, "execution")
        assert "query.max_series=5" in r["error"]
        code, r = get(d, "/api/v1/query", query='count({__name__=~"m1.*"})')
        assert code == 422  # m1, m10..m19: 11 series
        code, r = get(d, "/api/v1/query", query='count({__name__=~"m[1-3]"})')
        assert code == 200 and r["data"]["result"][0]["value"][1] == "3"
    finally:
        d.stop()


def test_running_queries_seen_from_the_other_worker(data):
    """A slow query runs on one worker; polling status/queries until the *other* worker
    answers (X-M3shm-Worker names the answering worker) shows it there too."""
    d, t0 = data
    q = slow_query(1 << 14) + " + 0"
    body = urllib.parse.urlencode(range_form(t0, q)).encode()
    sock = socket.create_connection(("127.0.0.1", d.port))
    try:
        sock.sendall(b"POST /api/v1/query_range HTTP/1.1\r\nHost: x\r\nContent-Type: "
                     b"application/x-www-form-urlencoded\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(body), body))
        answered_by: dict[int, list[dict]] = {}
        deadline = time.monotonic() + 60
        while True:
            with urllib.request.urlopen(d.url + "/api/v1/status/queries", timeout=30) as r:
                worker = int(r.headers["X-M3shm-Worker"])
                entries = [e for e in json.loads(r.read())["data"] if e["expr"] == q]
            if entries:
                answered_by[worker] = entries
                runs_on = entries[0]["worker"]
                if worker != runs_on:
                    break
            assert time.monotonic() < deadline, f"only seen by {sorted(answered_by)}"
            time.sleep(0.02)
        (e,) = answered_by[worker]
        assert e["worker"] == runs_on != worker and e["started"].endswith("Z")
        assert e["elapsed_seconds"] >= 0
    finally:
        sock.close()
    deadline = time.monotonic() + 20
    while any(e["expr"] == q for e in running(d)):
        assert time.monotonic() < deadline, "a disconnected client's query kept running"
        time.sleep(0.05)
