"""SIGHUP reloads the config of a running daemon: live keys change at once in every worker,
fixed keys are named in the log and kept, a bad file is logged and the old config kept."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
import snappy
from test_daemon_harness import Daemon, now_ms, write_request

from m3shm.config import ConfigError, live_update, load


def _labels(n: int, name: str = "reload_probe") -> dict[str, str]:
    return {"__name__": name, **{f"l{i}": "v" for i in range(n - 1)}}


def _reload(d: Daemon, marker: str, timeout: float = 20) -> None:
    """SIGHUP the supervisor and wait for ``marker`` to appear in the log once more."""
    before = d.log.read_text().count(marker)
    assert d.proc is not None
    d.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + timeout
    while d.log.read_text().count(marker) == before:
        assert time.monotonic() < deadline, f"no {marker!r} in the log:\n{d.logtext()}"
        time.sleep(0.05)


def _write_fresh(d: Daemon, labels: dict[str, str]) -> int:
    """Remote write on a new connection (SO_REUSEPORT picks any worker); the status."""
    return d.write([(labels, [(now_ms(), 1.0)])])[0]


def test_sighup_changes_limits_live_and_keeps_fixed_keys(tmp_path: Path) -> None:
    d = Daemon(tmp_path)
    base = d.cfg.read_text()
    d.start()
    try:
        assert _write_fresh(d, _labels(10)) == 204
        d.cfg.write_text(base + "threads: 3\nlimits:\n  max_labels: 5\n"
                         "  max_body_bytes: 2000\n")
        _reload(d, "applied by every worker")
        log = d.log.read_text()
        assert "limits.max_labels: 64 -> 5" in log
        assert "threads: 2 -> 3 cannot change while running" in log
        # every worker took it: new connections land on either worker, all are refused
        for i in range(12):
            code, body, _ = d.write([(_labels(10, f"over_{i}"), [(now_ms(), 1.0)])])
            assert code == 400 and b"label" in body, body
            assert _write_fresh(d, _labels(5, f"under_{i}")) == 204
        big = snappy.compress(write_request([(_labels(3, "big"), [(now_ms(), float(i))])
                                             for i in range(400)]))
        assert len(big) > 2000
        code, body, _ = d.post("/api/v1/write", big)
        assert code == 400 and b"limits.max_body_bytes=2000" in body, body
        assert d.export_map('{__name__="over_3"}') == {}

        d.cfg.write_text("limits: [this is: not a mapping\n")
        _reload(d, "keeping the running config")
        assert "not valid YAML" in d.log.read_text()
        assert _write_fresh(d, _labels(10, "still_over")) == 400   # the old (reloaded) limits
        assert _write_fresh(d, _labels(4, "still_under")) == 204
        d.cfg.write_text(base + "limits:\n  max_labels: 0\n")
        _reload(d, "keeping the running config")
        assert "limits.max_labels: must be 1..256" in d.log.read_text()

        d.cfg.write_text(base)  # back to the defaults: 10 labels pass again
        _reload(d, "applied by every worker")
        assert _write_fresh(d, _labels(10, "ok_again")) == 204
        metrics = d.get("/metrics")[1].decode()
        assert 'm3shm_config_reloads_total{result="success"} 2' in metrics
        assert 'm3shm_config_reloads_total{result="failure"} 2' in metrics
        assert "m3shm_config_generation 3" in metrics
    finally:
        assert d.stop() == 0, d.logtext()


def test_restarted_worker_keeps_the_reloaded_config(tmp_path: Path) -> None:
    d = Daemon(tmp_path, workers=1)
    base = d.cfg.read_text()
    d.start()
    try:
        d.cfg.write_text(base + "limits:\n  max_labels: 5\n")
        _reload(d, "applied by every worker")
        (worker,) = d.workers()
        import os

        os.kill(worker, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while d.workers() in ([], [worker]):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        d.wait_ready()
        assert _write_fresh(d, _labels(10)) == 400
        assert _write_fresh(d, _labels(5)) == 204
    finally:
        assert d.stop() == 0, d.logtext()


def test_live_update_splits_live_and_fixed_keys(tmp_path: Path) -> None:
    old = load(None)
    f = tmp_path / "c.yaml"
    f.write_text("listen: 0.0.0.0:9999\nshards: 32\nlimits:\n  max_labels: 7\n"
                 "ingest:\n  reserve_wait: 1s\n")
    applied, live, fixed = live_update(old, load(str(f)))
    assert applied.limits.max_labels == 7 and applied.ingest.reserve_wait_ms == 1000
    assert applied.listen == old.listen and applied.shards == old.shards
    assert live == ["limits.max_labels: 64 -> 7", "ingest.reserve_wait: 250 -> 1000"]
    assert fixed == ["listen: '127.0.0.1:7201' -> '0.0.0.0:9999'", "shards: 64 -> 32"]
    f.write_text("limits:\n  max_labels: 1000\n")
    with pytest.raises(ConfigError, match="limits.max_labels"):
        load(str(f))
