"""Every remote-write limit of the YAML `limits:` section, set small on a real daemon: each is
answered with its 4xx and a message that names the key and its value, for 1.0 and 2.0; the
daemon stays up and the valid series of a request are still written; SIGHUP changes them live."""

from __future__ import annotations

import signal
import time

import pytest
import snappy
from test_daemon_harness import Daemon, now_ms, write_request
from test_rw2_harness import V2_HEADERS, write_request_v2

LIMITS = """limits:
  max_body_bytes: 6000
  max_decompressed_bytes: 12000
  max_labels: 4
  max_label_name_bytes: 10
  max_label_value_bytes: 20
  max_series_per_request: 5
"""


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = Daemon(tmp_path_factory.mktemp("limits"), extra=LIMITS).start()
    yield d
    d.stop()


def body(version: int, series) -> tuple[bytes, dict[str, str]]:
    if version == 2:
        return snappy.compress(write_request_v2(series)), V2_HEADERS
    return snappy.compress(write_request(series)), {}


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("labels,needle", [
    ({"__name__": "m", "a": "1", "b": "2", "c": "3", "d": "4"},
     "more than 4 labels (limits.max_labels=4)"),
    ({"__name__": "m", "abcdefghijk": "1"},
     'label name "abcdefghijk" is 11 bytes, more than limits.max_label_name_bytes=10'),
    ({"__name__": "m", "a": "x" * 21},
     'value of label "a" is 21 bytes, more than limits.max_label_value_bytes=20'),
])
def test_series_limits(daemon, version, labels, needle):
    t = now_ms()
    good = ({"__name__": "good", "v": str(version)}, [(t, 1.0)])
    data, hdrs = body(version, [good, (labels, [(t, 2.0)])])
    code, msg, h = daemon.post("/api/v1/write", data, hdrs)
    assert code == 400, msg
    assert needle in msg.decode() and "series #1" in msg.decode()
    assert h["X-Prometheus-Remote-Write-Samples-Written"] == "1"
    assert daemon.export_map(f'good{{v="{version}"}}') != {}


@pytest.mark.parametrize("version", [1, 2])
def test_request_limits(daemon, version):
    t = now_ms()
    data, hdrs = body(version, [({"__name__": f"s{version}", "i": str(i)}, [(t, 1.0)])
                                for i in range(6)])
    code, msg, h = daemon.post("/api/v1/write", data, hdrs)
    assert code == 400
    assert b"request has 6 series, more than limits.max_series_per_request=5" in msg
    assert h["X-Prometheus-Remote-Write-Samples-Written"] == "0"
    assert daemon.export_map(f"s{version}") == {}
    data, hdrs = body(version, [({"__name__": f"s{version}", "i": str(i)}, [(t, 1.0)])
                                for i in range(5)])
    assert daemon.post("/api/v1/write", data, hdrs)[0] == 204
    # decompressed size: announced by the snappy preamble, checked before decompressing
    data, hdrs = body(version, [({"__name__": "z"}, [(t + i, 1.5) for i in range(1000)])])
    assert len(data) < 6000
    code, msg, h = daemon.post("/api/v1/write", data, hdrs)
    assert code == 400 and b"limits.max_decompressed_bytes=12000" in msg
    assert h["X-Prometheus-Remote-Write-Samples-Written"] == "0"
    # compressed body size
    code, msg, h = daemon.post("/api/v1/write", b"\x00" * 7000, hdrs)
    assert code == 400 and b"limits.max_body_bytes=6000" in msg
    assert daemon.get("/ready")[0] == 200


def test_bad_limit_config_names_the_key(tmp_path):
    d = Daemon(tmp_path, extra="limits:\n  max_series_per_request: 0\n")
    with pytest.raises(AssertionError, match="limits.max_series_per_request: must be >= 1"):
        d.start()


def test_series_limit_changes_on_sighup(tmp_path):
    d = Daemon(tmp_path)
    base = d.cfg.read_text()
    d.start()
    try:
        t = now_ms()
        data, hdrs = body(2, [({"__name__": "hup", "i": str(i)}, [(t, 1.0)]) for i in range(4)])
        assert d.post("/api/v1/write", data, hdrs)[0] == 204
        d.cfg.write_text(base + "limits:\n  max_series_per_request: 3\n")
        before = d.log.read_text().count("applied by every worker")
        d.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while d.log.read_text().count("applied by every worker") == before:
            assert time.monotonic() < deadline, d.logtext()
            time.sleep(0.05)
        assert "limits.max_series_per_request: 100000 -> 3" in d.log.read_text()
        for _ in range(4):  # new connections: whichever worker answers has the new limit
            code, msg, _ = d.post("/api/v1/write", data, hdrs)
            assert code == 400 and b"limits.max_series_per_request=3" in msg
    finally:
        assert d.stop() == 0
