"""End-to-end: the daemon as a subprocess on 127.0.0.1, remote write 1.0 over HTTP, read back
with /api/v1/export, exact equality; every validation rule answered with a 4xx that names the
offending series while the valid series are still written; restart replays the commit log."""

from __future__ import annotations

import math
import struct

import pytest
import snappy
from test_daemon_harness import Daemon, now_ms, write_request

from m3shm.proto import remote_pb2


@pytest.fixture
def daemon(tmp_path):
    d = Daemon(tmp_path).start()
    yield d
    d.stop()


def _stale() -> float:
    return struct.unpack("<d", struct.pack("<Q", 0x7FF0000000000002))[0]


def test_write_and_export_exact(daemon):
    t0 = now_ms() - 60_000
    series = [({"__name__": "req_total", "job": "api", "instance": f"i{i}"},
               [(t0 + k * 1000, float(i * 1000 + k) / 7) for k in range(50)]) for i in range(40)]
    code, body, _ = daemon.write(series)
    assert code == 204, body
    got = daemon.export_map('req_total{job="api"}')
    want = {tuple(sorted(lab.items())): {t: v for t, v in smp} for lab, smp in series}
    assert got == want
    # both endpoints, and a selector with several labels
    code, body, _ = daemon.write([({"__name__": "other", "a": "b"}, [(t0, 1.0)])],
                                 path="/api/v1/write")
    assert code == 204, body
    assert daemon.export_map('{__name__="other",a="b"}') == {
        (("__name__", "other"), ("a", "b")): {t0: 1.0}}
    assert daemon.export_map('req_total{instance="i3"}').keys() == {
        (("__name__", "req_total"), ("instance", "i3"), ("job", "api"))}


def test_out_of_order_duplicates_and_overwrite(daemon):
    t0 = now_ms() - 120_000
    lab = {"__name__": "ooo"}
    for samples in ([(t0 + 10, 1.0), (t0 + 30, 3.0)], [(t0 + 20, 2.0)],
                    [(t0 + 10, 1.0), (t0 + 30, 3.0)],       # a resend
                    [(t0 + 20, 9.5)],                         # overwrite: last write wins
                    [(t0 + 5, 0.5), (t0 + 40, 4.0)]):
        code, body, _ = daemon.write([(lab, samples)])
        assert code == 204, body
    assert daemon.export_map("ooo") == {(("__name__", "ooo"),): {
        t0 + 5: 0.5, t0 + 10: 1.0, t0 + 20: 9.5, t0 + 30: 3.0, t0 + 40: 4.0}}


def test_nan_stale_and_range(daemon):
    t0 = now_ms() - 30_000
    code, _, _ = daemon.write([({"__name__": "nan"}, [(t0, _stale()), (t0 + 1, math.nan),
                                                      (t0 + 2, math.inf), (t0 + 3, 2.5),
                                                      (t0 + 4, -math.inf)])])
    assert code == 204
    code, body = daemon.get("/api/v1/export?match[]=nan")
    assert code == 200 and b'"values":[NaN,NaN,+Inf,2.5,-Inf]' in body, body  # as VM writes
    rows = daemon.export("nan")
    assert rows[0]["timestamps"] == [t0, t0 + 1, t0 + 2, t0 + 3, t0 + 4]
    v = rows[0]["values"]
    assert math.isnan(v[0]) and math.isnan(v[1]) and v[2] == math.inf and v[3] == 2.5
    assert v[4] == -math.inf
    rows = daemon.export("nan", start=str((t0 + 1) / 1000), end=str((t0 + 2) / 1000))
    assert rows[0]["timestamps"] == [t0 + 1, t0 + 2]


GOOD = ({"__name__": "good"}, 1.0)


@pytest.mark.parametrize("labels,needle", [
    ({"__name__": "m", "1bad": "x"}, 'invalid label name "1bad"'),
    ({"job": "x"}, "no __name__ label"),
    ({}, "empty label set"),
    ({"__name__": "m", **{f"l{i}": "v" for i in range(70)}}, "max_labels"),
    ({"__name__": "m", "a": "v" * 5000}, "limits.max_label_value_bytes=4096"),
])
def test_bad_series_rejected_valid_ones_written(daemon, labels, needle):
    t = now_ms()
    code, body, _ = daemon.write([({"__name__": "good", "case": needle[:8]}, [(t, 1.0)]),
                                  (labels, [(t, 2.0)])])
    assert code == 400
    msg = body.decode()
    assert needle in msg and "series #1" in msg and "written: 1 samples" in msg
    assert daemon.export_map(f'good{{case="{needle[:8]}"}}') != {}


def test_duplicate_label_name(daemon):
    w = remote_pb2.WriteRequest()
    ts = w.timeseries.add()
    for k, v in (("__name__", "dup"), ("a", "x"), ("a", "y")):
        lab = ts.labels.add()
        lab.name, lab.value = k, v
    smp = ts.samples.add()
    smp.timestamp, smp.value = now_ms(), 1.0
    code, body, _ = daemon.post("/api/v1/write", snappy.compress(w.SerializeToString()))
    assert code == 400 and b'duplicate label name "a"' in body


def test_time_window(daemon):
    t = now_ms()  # default namespace: 48h retention, cold writes on
    code, body, _ = daemon.write([({"__name__": "old"}, [(t - 49 * 3_600_000, 1.0),
                                                         (t - 3_600_000, 3.0), (t, 2.0)])])
    assert code == 400 and b"too old" in body, body
    assert b"accepts now-2d (retention, cold writes on) .. now+2m" in body, body
    assert daemon.export_map("old") == {(("__name__", "old"),): {t - 3_600_000: 3.0, t: 2.0}}
    code, body, _ = daemon.write([({"__name__": "future"}, [(t + 3_600_000, 1.0)])])
    assert code == 400 and b"too far in the future" in body


def test_bad_bodies(daemon):
    body = snappy.compress(write_request([({"__name__": "x"}, [(now_ms(), 1.0)])]))
    code, msg, _ = daemon.post("/api/v1/write", b"\xff\xff\xff\xff garbage")
    assert code == 400 and b"malformed snappy" in msg
    code, msg, _ = daemon.post("/api/v1/write", snappy.compress(b"\x0a\x05\x0a\x03"))
    assert code == 400 and b"malformed protobuf at byte" in msg
    code, msg, _ = daemon.post("/api/v1/write", body, {"Content-Type": "application/json"})
    assert code == 415 and b"Content-Type" in msg
    code, msg, _ = daemon.post("/api/v1/write", body, {
        "Content-Type": "application/x-protobuf;proto=io.prometheus.write.v3.Request"})
    assert code == 415 and b"io.prometheus.write.v2.Request" in msg
    code, msg, _ = daemon.post("/api/v1/write", body, {"Content-Encoding": "gzip"})
    assert code == 415 and b"Content-Encoding" in msg
    assert daemon.get("/ready")[0] == 200


def test_size_limits(tmp_path):
    d = Daemon(tmp_path, extra="limits:\n  max_body_bytes: 8000\n"
                               "  max_decompressed_bytes: 20000\n").start()
    try:
        t = now_ms()
        big = [({"__name__": "big", "i": str(i)}, [(t, 1.0)]) for i in range(600)]
        raw = write_request(big)
        code, msg, _ = d.post("/api/v1/write", snappy.compress(raw) + b"\0" * 6000)
        assert code == 400 and b"max_body_bytes=8000" in msg
        assert len(snappy.compress(raw)) < 8000 < 20000 < len(raw)
        code, msg, _ = d.write(big)
        assert code == 400 and b"max_decompressed_bytes=20000" in msg
        assert d.write([({"__name__": "small"}, [(t, 1.0)])])[0] == 204
    finally:
        assert d.stop() == 0


def test_segment_full_refuses_new_series_only(tmp_path):
    d = Daemon(tmp_path, series=2).start()  # 8 shards x 2 series
    try:
        t = now_ms() - 10_000
        accepted = {}
        for i in range(60):
            lab = {"__name__": "cap", "i": str(i)}
            code, body, _ = d.write([(lab, [(t, 1.0)])])
            if code == 204:
                accepted[i] = lab
            else:
                assert code == 400 and b"series_per_shard=2" in body, body
        assert 16 <= len(accepted) < 60
        for lab in accepted.values():  # existing series keep ingesting
            assert d.write([(lab, [(t + 1000, 2.0)])])[0] == 204
        got = d.export_map("cap")
        assert len(got) == len(accepted)
        assert all(v == {t: 1.0, t + 1000: 2.0} for v in got.values())
    finally:
        assert d.stop() == 0


def test_restart_replays_commit_log(tmp_path):
    d = Daemon(tmp_path).start()
    t0 = now_ms() - 60_000
    series = [({"__name__": "persist", "i": str(i)}, [(t0 + k, float(k * i)) for k in range(20)])
              for i in range(30)]
    assert d.write(series)[0] == 204
    before = d.export_map("persist")
    assert d.stop() == 0
    assert "stopped cleanly" in d.logtext()
    d.start()
    try:
        assert d.export_map("persist") == before
        assert d.write([({"__name__": "persist", "i": "0"}, [(t0 + 100, 7.0)])])[0] == 204
        assert d.export_map('persist{i="0"}')[(("__name__", "persist"), ("i", "0"))][
            t0 + 100] == 7.0
    finally:
        assert d.stop() == 0


def test_config_errors_name_the_key(tmp_path):
    d = Daemon(tmp_path, extra="bogus_key: 1\n")
    d.start(wait=False)
    assert d.proc.wait(30) == 2
    assert "bogus_key: unknown key" in d.logtext()
    d2 = Daemon(tmp_path / "x" if (tmp_path / "x").mkdir() is None else tmp_path,
                fsync="sometimes")
    d2.start(wait=False)
    assert d2.proc.wait(30) == 2
    assert "commitlog.fsync: must be one of every_batch, interval" in d2.logtext()


def test_second_daemon_on_same_data_dir_refused(tmp_path, daemon):
    other = Daemon(tmp_path)
    other.data = daemon.data
    other.start(wait=False)
    assert other.proc.wait(60) == 2
    assert "is locked by another m3shm process" in other.logtext()


def test_batch_larger_than_a_lane_is_split(tmp_path):
    d = Daemon(tmp_path, lane="64KiB", arena="4MiB").start()
    try:
        t = now_ms() - 30_000
        series = [({"__name__": "wide", "i": str(i)}, [(t + k, float(k)) for k in range(100)])
                  for i in range(200)]  # ~350 KB of records, 5x a lane
        code, body, _ = d.write(series)
        assert code == 204, body
        got = d.export_map("wide")
        assert len(got) == 200 and all(len(v) == 100 for v in got.values())
    finally:
        assert d.stop() == 0


def test_overload_answers_503_with_retry_after_then_recovers(tmp_path):
    import os
    import signal
    import threading
    import time

    d = Daemon(tmp_path, lane="64KiB", arena="4MiB").start()
    acked: dict[int, list] = {}
    statuses: list[tuple[int, dict]] = []
    stop = threading.Event()
    t0 = now_ms() - 30_000

    def client(c: int) -> None:
        k = 0
        while not stop.is_set():
            series = [({"__name__": "ovl", "c": str(c), "i": str(i)},
                       [(t0 + k * 10 + j, float(k)) for j in range(10)]) for i in range(40)]
            try:
                code, _, headers = d.write(series, timeout=0.5)
            except OSError:
                code, headers = 0, {}
            statuses.append((code, headers))
            if code == 204:
                acked[c * 100_000 + k] = series
            k += 1

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(3)]
    try:
        owner = d.workers()[1]
        os.kill(owner, signal.SIGSTOP)  # its lanes fill up: producers push back, not grow
        try:
            for th in threads:
                th.start()
            deadline = time.monotonic() + 20
            while not any(code == 503 for code, _ in statuses):
                assert time.monotonic() < deadline, statuses[-5:]
                time.sleep(0.05)
        finally:
            os.kill(owner, signal.SIGCONT)
            stop.set()
            for th in threads:
                if th.is_alive() or th.ident:
                    th.join(30)
        h = next(h for code, h in statuses if code == 503)
        assert h.get("Retry-After") == "1"
        got = d.export_map("ovl")
        for series in acked.values():
            for lab, samples in series:
                stored = got[tuple(sorted(lab.items()))]
                assert all(stored[ts] == v for ts, v in samples)
        assert d.write([({"__name__": "after"}, [(now_ms(), 1.0)])])[0] == 204
    finally:
        assert d.stop() == 0
