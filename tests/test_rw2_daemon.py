"""End-to-end remote write 2.0: the daemon as a subprocess, 2.0 bodies (symbols, metadata)
over HTTP on both endpoints, read back with /api/v1/export with exact equality; 1.0 and 2.0 on
the same series; the Written headers on every answer; partial-invalid requests write and count
the valid series; unknown protos get 415; metadata survives SIGKILL of every process."""

from __future__ import annotations

import json

import snappy
from test_daemon_harness import Daemon, now_ms
from test_rw2_harness import V2_HEADERS, write_request_v2

from m3shm.proto import remote_pb2
from m3shm.storage.metadata import MetadataStore

SAMPLES = "X-Prometheus-Remote-Write-Samples-Written"
HISTS = "X-Prometheus-Remote-Write-Histograms-Written"
EXEMPLARS = "X-Prometheus-Remote-Write-Exemplars-Written"


def post_v2(d: Daemon, series, path: str = "/api/v1/write", **kw):
    return d.post(path, snappy.compress(write_request_v2(series, **kw)), V2_HEADERS)


def written(h: dict[str, str]) -> tuple[int, int, int]:
    return int(h[SAMPLES]), int(h[HISTS]), int(h[EXEMPLARS])


def test_rw2_end_to_end(tmp_path):
    d = Daemon(tmp_path).start()
    try:
        t0 = now_ms() - 60_000
        series = [({"__name__": "http_requests_total", "job": "api", "instance": f"i{i}"},
                   [(t0 + k * 1000, (i * 1000 + k) / 7) for k in range(30)],
                   (1, "Requests served.", "")) for i in range(20)]
        series += [({"__name__": "temp_celsius", "room": r}, [(t0, 21.5), (t0 + 1, -0.0)],
                    (2, "Temperature.", "celsius")) for r in ("a", "b")]
        for path in ("/api/v1/write", "/api/v1/prom/remote/write"):
            code, body, h = post_v2(d, series, path)
            assert code == 204, body
            assert written(h) == (604, 0, 0)
        got = d.export_map('http_requests_total{job="api"}')
        assert got == {tuple(sorted(lab.items())): dict(smp) for lab, smp, _ in series[:20]}
        rows = d.export('temp_celsius{room="a"}')
        assert rows == [{"metric": {"__name__": "temp_celsius", "room": "a"},
                         "values": [21.5, 0], "timestamps": [t0, t0 + 1]}]
        # metadata was fsynced before the 2xx: it survives SIGKILL of every process
        d.kill_all()
        md = MetadataStore(str(d.data)).all()
        assert {n: (e.type, e.help, e.unit) for n, e in md.items()} == {
            "http_requests_total": (1, "Requests served.", ""),
            "temp_celsius": (2, "Temperature.", "celsius")}
        # a changed help text is stored again; the unchanged entry is not rewritten
        d.start()
        series[-1] = (series[-1][0], [(now_ms(), 1.0)], (2, "Temperature, in C.", "celsius"))
        code, body, _ = post_v2(d, series[-1:])
        assert code == 204, body
        assert d.stop() == 0
        md = MetadataStore(str(d.data)).all()
        assert md["temp_celsius"].help == "Temperature, in C."
        size = sum(f.stat().st_size for f in (d.data / "metadata").iterdir())
        d.start()
        for _ in range(3):
            assert post_v2(d, series[-1:])[0] == 204
        assert d.stop() == 0
        assert sum(f.stat().st_size for f in (d.data / "metadata").iterdir()) == size
    finally:
        d.stop()


def test_v1_and_v2_on_the_same_series(tmp_path):
    d = Daemon(tmp_path).start()
    try:
        t0 = now_ms() - 30_000
        lab = {"__name__": "mixed", "b": "2", "a": "1"}
        code, _, h = d.write([(lab, [(t0, 1.0), (t0 + 2, 3.0)])])
        assert code == 204 and written(h) == (2, 0, 0)
        rev = list(reversed(list(lab.items())))  # 2.0 with the labels in another order
        code, _, h = post_v2(d, [(rev, [(t0 + 1, 2.0), (t0 + 3, 4.0)])])
        assert code == 204 and written(h) == (2, 0, 0)
        code, _, _ = d.write([(lab, [(t0 + 3, 5.0)])])  # 1.0 overwrites a 2.0 sample
        assert code == 204
        assert d.export_map("mixed") == {tuple(sorted(lab.items())): {
            t0: 1.0, t0 + 1: 2.0, t0 + 2: 3.0, t0 + 3: 5.0}}
        # 1.0 metadata (a metadata-only request, as Prometheus sends it) and 2.0 metadata
        w = remote_pb2.WriteRequest()
        m = w.metadata.add()
        m.type, m.metric_family_name, m.help, m.unit = 5, "rpc_seconds", "RPC latency.", "s"
        code, _, h = d.post("/api/v1/write", snappy.compress(w.SerializeToString()))
        assert code == 204 and written(h) == (0, 0, 0)
        code, _, _ = post_v2(d, [(lab, [(t0 + 4, 6.0)], (2, "Mixed.", ""))])
        assert code == 204
        for _ in range(4):  # any worker answers: each reads every worker's log
            code, body = d.get("/api/v1/metadata")
            assert code == 200 and json.loads(body)["data"] == {
                "mixed": [{"type": "gauge", "help": "Mixed.", "unit": ""}],
                "rpc_seconds": [{"type": "summary", "help": "RPC latency.", "unit": "s"}]}
        code, body = d.get("/api/v1/metadata?metric=rpc_seconds")
        assert list(json.loads(body)["data"]) == ["rpc_seconds"]
        code, body = d.get("/api/v1/metadata?limit=1")
        assert list(json.loads(body)["data"]) == ["mixed"]
        assert d.stop() == 0
        md = MetadataStore(str(d.data)).all()
        assert {n: (e.type_name, e.help, e.unit) for n, e in md.items()} == {
            "rpc_seconds": ("summary", "RPC latency.", "s"), "mixed": ("gauge", "Mixed.", "")}
    finally:
        d.stop()


def test_partial_invalid_and_unsupported(tmp_path):
    d = Daemon(tmp_path).start()
    try:
        t = now_ms()
        good = [({"__name__": "ok", "i": str(i)}, [(t, float(i)), (t + 1, 1.0)])
                for i in range(3)]
        code, body, h = post_v2(d, [good[0], ({"__name__": "m", "1bad": "x"}, [(t, 1.0)]),
                                    good[1], ({"job": "noname"}, [(t, 1.0)]), good[2]])
        assert code == 400
        assert 'series #1 {__name__="m", 1bad="x"}: invalid label name "1bad"' in body.decode()
        assert "written: 6 samples; rejected: 2 samples of 2 series" in body.decode()
        assert written(h) == (6, 0, 0)
        assert len(d.export_map("ok")) == 3
        # histograms: the series is rejected by name; exemplars: the samples are written
        code, body, h = post_v2(d, [({"__name__": "hist"}, []), good[0]], histograms=2)
        assert code == 400 and b'series #0 {__name__="hist"}: native histograms' in body
        assert b"2 histogram samples rejected" in body and written(h) == (2, 0, 0)
        code, body, h = post_v2(d, [({"__name__": "exm"}, [(t, 9.0)])], exemplars=2)
        assert code == 400 and b'series #0 {__name__="exm"}: 2 exemplars not stored' in body
        assert written(h) == (1, 0, 0) and d.export_map("exm") != {}
        # content negotiation
        body = snappy.compress(write_request_v2(good))
        for ct in ("application/x-protobuf;proto=io.prometheus.write.v3.Request",
                   "application/x-protobuf; proto=foo.Bar"):
            code, msg, h = d.post("/api/v1/write", body, {"Content-Type": ct})
            assert code == 415 and b"io.prometheus.write.v2.Request" in msg
            assert written(h) == (0, 0, 0)
        code, msg, h = d.post("/api/v1/write", body, {
            "Content-Type": "application/x-protobuf;proto=prometheus.WriteRequest"})
        assert code == 204 and written(h) == (0, 0, 0)  # a 2.0 body read as 1.0 is empty
        code, msg, h = d.post("/api/v1/write", b"\x00garbage", V2_HEADERS)
        assert code == 400 and b"malformed snappy" in msg and written(h) == (0, 0, 0)
        assert d.get("/ready")[0] == 200
    finally:
        d.stop()
