"""Snapshots of open blocks through a real daemon (m3shm/storage/snapshot.py): SIGKILL after a
snapshot and every acknowledged sample comes back while replay reads only the commit-log files
written after it; a corrupt snapshot is named and the daemon falls back to the commit log it
kept; SIGKILL while snapshots are being written loses nothing and leaves no partial snapshot
readable."""

from __future__ import annotations

import contextlib
import random
import re
import threading
import time
from pathlib import Path

from test_daemon_harness import Daemon, now_ms

from m3shm.storage import commitlog, snapshot

# 2-hour blocks: everything written stays in open blocks; snapshots only on admin flush
OPEN = """
flush: {interval: 1h, snapshot_interval: 1h}
"""


def write(d: Daemon, name: str, nseries: int, nsamples: int, t0: int,
          scale: float = 1.0) -> dict:
    series = [({"__name__": name, "i": str(i)},
               [(t0 + k * 1000, (i * 1000 + k) * scale) for k in range(nsamples)])
              for i in range(nseries)]
    for lo in range(0, nseries, 500):
        code, body, _ = d.write(series[lo:lo + 500])
        assert code == 204, body
    return {tuple(sorted(lab.items())): dict(smp) for lab, smp in series}


def merge(into: dict, more: dict) -> None:
    for k, v in more.items():
        into.setdefault(k, {}).update(v)


def cl_names(d: Daemon) -> set[str]:
    """Commit-log files that hold batches."""
    return {p.name for p in (d.data / "commitlog").glob("*.log")
            if next(commitlog.read_file(str(p)), None) is not None}


def snap_files(d: Daemon) -> list[Path]:
    return sorted((d.data / "snapshots").glob("*/snapshot-*"))


def replayed(log: str) -> list[str]:
    """Names of the commit-log files the workers said they replay into the open blocks (they
    may read older ones for the aggregation cells only)."""
    out = []
    for m in re.finditer(r"namespace default: replaying \d+ of \d+ commit-log files into the "
                         r"open blocks \(.*?\): ?(.*)", log):
        out += m.group(1).split()
    return out


def test_sigkill_after_snapshot_replays_only_newer_files(tmp_path):
    d = Daemon(tmp_path, workers=2, extra=OPEN).start()
    t = now_ms() - 60_000
    want = write(d, "s", 300, 20, t)
    assert d.post("/api/v1/admin/flush", b"")[0] == 200  # snapshot 1
    first = {p.name for p in snap_files(d)}
    assert any(n.endswith("-0000-0004.db") for n in first)  # worker 0: shards [0, 4)
    merge(want, write(d, "s", 300, 10, t + 20_000))
    before_second = cl_names(d)
    assert d.post("/api/v1/admin/flush", b"")[0] == 200  # snapshot 2: the log before 1 goes
    # one file per worker, two kept
    assert len([p for p in snap_files(d) if p.parts[-2] == "default"]) == 2 * 2
    merge(want, write(d, "s", 300, 5, t + 5_000, scale=-1.0))  # overwrites after the snapshot
    merge(want, write(d, "s2", 50, 5, t))
    d.kill_all()
    d.start()
    try:
        assert d.export_map("{__name__=~\"s|s2\"}") == want
        log = d.log.read_text(errors="replace")
        read = replayed(log)
        assert read, log[-3000:]
        assert not set(read) & before_second, (read, before_second)
        assert re.search(r"loaded snapshot \d+ of default shard", log)
    finally:
        assert d.stop() == 0
    d.start()  # and once more after a clean stop (its own snapshots, new log files)
    try:
        assert d.export_map("{__name__=~\"s|s2\"}") == want
    finally:
        assert d.stop() == 0


def test_corrupt_snapshot_is_named_and_the_commit_log_replayed(tmp_path):
    d = Daemon(tmp_path, workers=2, extra=OPEN).start()
    t = now_ms() - 60_000
    want = write(d, "c", 200, 10, t)
    assert d.post("/api/v1/admin/flush", b"")[0] == 200  # the only snapshot: log kept
    merge(want, write(d, "c", 200, 10, t + 2_000, scale=0.5))
    d.kill_all()
    bad = []
    for p in snap_files(d):
        if p.stat().st_size > snapshot.HEADER2.size + 64:
            raw = bytearray(p.read_bytes())
            raw[snapshot.HEADER2.size + 40] ^= 0x01
            p.write_bytes(bytes(raw))
            bad.append(p)
    assert bad
    d.start()
    try:
        assert d.export_map("c") == want
        log = d.log.read_text(errors="replace")
        for p in bad:
            assert f"corrupt snapshot file {p}" in log
    finally:
        assert d.stop() == 0


def admin_flush_until_killed(d: Daemon) -> None:
    with contextlib.suppress(OSError):  # the daemon is killed under it
        d.post("/api/v1/admin/flush", b"", timeout=10)


def test_sigkill_while_writing_snapshots_loses_nothing(tmp_path):
    rng = random.Random(8)
    d = Daemon(tmp_path, workers=2, series=16384, arena="16MiB", extra=OPEN).start()
    t = now_ms() - 600_000
    want = write(d, "k", 4000, 30, t)
    assert d.post("/api/v1/admin/flush", b"")[0] == 200
    for trial in range(3):
        merge(want, write(d, "k", 4000, 3, t + 30_000 + trial * 3_000, scale=trial + 2.0))
        th = threading.Thread(target=admin_flush_until_killed, args=(d,))
        th.start()
        time.sleep(rng.uniform(0.0, 0.25))
        d.kill_all()
        th.join()
        d.start()
        assert d.export_map("k") == want, f"trial {trial}"
        for p in snap_files(d):  # nothing incomplete survives start-up
            assert p.name.endswith(".db"), p
    assert d.stop() == 0
