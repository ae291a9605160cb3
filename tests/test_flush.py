"""Flush through a real daemon: closed blocks become checkpointed filesets (with their reverse
index), the commit log they cover is deleted, and every sample reads back exactly from the
filesets (and shared memory) across restarts."""

from __future__ import annotations

import time
from pathlib import Path

from test_daemon_harness import Daemon, now_ms

from m3shm.storage import commitlog
from m3shm.storage.fileset import Fileset, list_filesets
from m3shm.storage.flushed import FlushedStore

# 2-second blocks that close 1 s after they end, so a test sees blocks close in seconds
FAST = """
namespaces:
  - {name: default, retention: 1h, blockSize: 2s, bufferPast: 1s, bufferFuture: 1s}
flush: {interval: 1h}
"""
BLOCK = 2000


def fast_daemon(tmp: Path, workers: int = 2, extra: str = "") -> Daemon:
    return Daemon(tmp, workers=workers, extra=FAST + extra)


def wait_closed(last_ts: int) -> None:
    """Sleep until the block of last_ts has closed (end + buffer past)."""
    close = last_ts - last_ts % BLOCK + BLOCK + 1000
    while now_ms() <= close + 50:
        time.sleep(0.05)


def write_burst(d: Daemon, name: str, nseries: int, nsamples: int) -> dict:
    """nsamples per series spread over the last ~second (inside bufferPast)."""
    t = now_ms() - 900
    series = [({"__name__": name, "i": str(i)},
               [(t + k * (800 // nsamples), float(i * 1000 + k) / 3) for k in range(nsamples)])
              for i in range(nseries)]
    code, body, _ = d.write(series)
    assert code == 204, body
    return {tuple(sorted(lab.items())): dict(smp) for lab, smp in series}


def cl_files(d: Daemon) -> list[Path]:
    return sorted((d.data / "commitlog").glob("*.log"))


def test_flush_roundtrip_trims_commitlog_and_survives_restart(tmp_path):
    d = fast_daemon(tmp_path).start()
    try:
        want = write_burst(d, "f", 50, 8)
        last = max(t for v in want.values() for t in v)
        wait_closed(last)
        held = [p for p in cl_files(d) if list(commitlog.read_file(str(p)))]
        code, body = d.post("/api/v1/admin/flush", b"")[:2]
        assert code == 200, body
        fids = list_filesets(d.data / "filesets")
        assert fids, "no fileset written"
        assert {f.namespace for f in fids} == {"default"} and all(f.volume == 0 for f in fids)
        total = 0
        for fid in fids:
            with Fileset(d.data / "filesets", fid) as fs:
                fs.verify()
                total += fs.info.num_samples
            with FlushedStore(d.data / "filesets").reverse_index(fid) as ri:
                assert len(ri.select([("__name__", "=", "f")])) == len(
                    list(FlushedStore(d.data / "filesets").series_labels(fid)))
        assert total == sum(len(v) for v in want.values())
        # every commit-log file that held these samples is gone; the ones left are empty
        assert held and not set(held) & set(cl_files(d))
        assert not any(list(commitlog.read_file(str(p))) for p in cl_files(d))
        assert d.export_map("f") == want
        # a second flush writes nothing new (each block is flushed once)
        assert d.post("/api/v1/admin/flush", b"")[0] == 200
        assert list_filesets(d.data / "filesets") == fids
    finally:
        assert d.stop() == 0
    d.start()
    try:
        assert d.export_map("f") == want
        more = write_burst(d, "f", 5, 3)  # new samples land beside the flushed ones
        for k, v in more.items():
            want[k] = {**want[k], **v}
        assert d.export_map("f") == want
    finally:
        assert d.stop() == 0
    d.start()
    try:
        assert d.export_map("f") == want
    finally:
        assert d.stop() == 0
