"""GET /metrics of a real daemon: valid exposition format (promtool), and the counters count
exactly what the test sent, summed over every worker whichever worker answers."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import snappy
from test_daemon_harness import Daemon, now_ms, write_request


def test_every_decoder_reason_has_a_counter() -> None:
    from m3shm import stats
    from m3shm.net.rwdecode import REASONS

    assert set(REASONS.values()) <= set(stats.SAMPLE_REASONS)
    assert len(set(stats.SAMPLE_REASONS)) == len(stats.SAMPLE_REASONS)


def parse(text: str) -> dict[str, float]:
    """``{'name{labels}': value}`` for every sample line."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def family_sum(m: dict[str, float], name: str) -> float:
    return sum(v for k, v in m.items() if re.fullmatch(rf"{name}(\{{.*\}})?", k))


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_metrics_valid_and_count_what_was_sent(tmp_path: Path) -> None:
    d = Daemon(tmp_path, extra="limits:\n  max_labels: 8\n").start()
    try:
        t = now_ms()
        written = 0
        series = set()
        for r in range(10):  # new connection each time: both workers take requests
            batch = [({"__name__": "m_probe", "instance": f"h{i}", "r": str(r % 3)},
                      [(t - 1000 * r + j, float(j)) for j in range(3)]) for i in range(20)]
            code, _, _ = d.write(batch)
            assert code == 204
            written += 60
            series |= {(i, r % 3) for i in range(20)}
        # 2 valid series (2 samples each) + 1 series too old (4 samples) -> 400, partial
        code, _, _ = d.write([({"__name__": "m_ok", "a": "1"}, [(t, 1.0), (t + 1, 2.0)]),
                              ({"__name__": "m_ok", "a": "2"}, [(t, 1.0), (t + 1, 2.0)]),
                              ({"__name__": "m_old"}, [(t - 86_400_000 * 30 + k, 0.0)
                                                       for k in range(4)])])
        assert code == 400
        written += 4
        series |= {"ok1", "ok2"}
        # too many labels: 1 series of 5 samples rejected
        code, _, _ = d.write([({"__name__": "m_wide", **{f"x{k}": "v" for k in range(9)}},
                               [(t + k, 1.0) for k in range(5)])])
        assert code == 400
        assert d.post("/api/v1/write", b"\xff\x00 not snappy")[0] == 400
        assert d.post("/api/v1/write", snappy.compress(write_request([])),
                      {"Content-Type": "text/plain"})[0] == 415
        requests = 10 + 1 + 1 + 1 + 1

        assert len(d.export('{__name__="m_probe"}')) == 60  # waits until shards applied all
        texts = [d.get("/metrics")[1].decode() for _ in range(6)]
        p = subprocess.run(["promtool", "check", "metrics"], input=texts[0], text=True,
                           capture_output=True, timeout=60)
        assert p.returncode == 0 and not p.stdout.strip() and not p.stderr.strip(), \
            p.stdout + p.stderr
        for text in texts:  # whichever worker answered, the same totals
            m = parse(text)
            assert m["m3shm_remote_write_requests_total"] == requests
            assert m["m3shm_ingest_samples_written_total"] == written
            assert m["m3shm_ingest_samples_received_total"] == written + 4 + 5
            assert m['m3shm_ingest_samples_rejected_total{reason="too_old"}'] == 4
            assert m['m3shm_ingest_samples_rejected_total{reason="too_many_labels"}'] == 5
            assert family_sum(m, "m3shm_ingest_samples_rejected_total") == 9
            assert m['m3shm_remote_write_requests_rejected_total{reason="invalid_series"}'] == 2
            assert m['m3shm_remote_write_requests_rejected_total{reason="malformed"}'] == 1
            assert m['m3shm_remote_write_requests_rejected_total'
                     '{reason="unsupported_media_type"}'] == 1
            assert family_sum(m, "m3shm_remote_write_requests_rejected_total") == 4
            # export waited for the shards; series counts are what was written
            assert family_sum(m, "m3shm_shard_series") == len(series)
            assert m["m3shm_commitlog_batches_total"] == 11
            assert m["m3shm_commitlog_written_bytes_total"] > written * 16
            assert m['m3shm_commitlog_fsync_seconds_bucket{le="+Inf"}'] == \
                m["m3shm_commitlog_fsync_seconds_count"] >= 1
            assert m["m3shm_workers"] == 2 and m["m3shm_processes"] == 3
            assert m["process_cpu_seconds_total"] > 0
            assert m["process_resident_memory_bytes"] > 0
            assert family_sum(m, "m3shm_worker_restarts_total") == 0
            assert m['m3shm_worker_up{worker="0"}'] == m['m3shm_worker_up{worker="1"}'] == 1

        victim = d.workers()[1]
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while victim in d.workers() or len(d.workers()) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        d.wait_ready()
        for _ in range(4):
            m = parse(d.get("/metrics")[1].decode())
            assert m['m3shm_worker_restarts_total{worker="1"}'] == 1
            # counters survive the restart: the new incarnation keeps the block
            assert m["m3shm_ingest_samples_written_total"] == written
    finally:
        assert d.stop() == 0, d.logtext()
