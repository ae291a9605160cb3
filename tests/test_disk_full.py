"""Disk full, on a real filesystem: the data directory is a small tmpfs that a ballast file
fills while the daemon runs. Writes that cannot be made durable are refused with 507 saying the
disk is full (never a 2xx), flushes that fail leave no partial fileset and are retried, every
acknowledged sample reads back (before and after a restart), and ingestion resumes by itself
once the ballast is gone. Needs root to mount the tmpfs; skipped (saying why) otherwise."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import snappy
from test_daemon_harness import Daemon, now_ms
from test_rw2_harness import V2_HEADERS, write_request_v2

from m3shm.storage.fileset import Fileset, list_filesets

CONFIG = """
namespaces:
  - {name: default, retention: 1h, blockSize: 2s, bufferPast: 1s, bufferFuture: 1s,
     coldWrites: true}
flush: {interval: 300ms}
"""


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str = "8m") -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                           capture_output=True, text=True, timeout=30)
    except OSError as e:
        pytest.skip(f"cannot run mount: {e}")
    if r.returncode != 0:
        pytest.skip(f"mounting a tmpfs was refused: {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, timeout=30)


def fill(path: Path) -> None:
    """Write zeros to ``path`` until the filesystem has no room left (the last partly used
    pages too)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        for size in (65536, 4096, 1):
            with contextlib.suppress(OSError):
                while os.write(fd, b"\0" * size):
                    pass
    finally:
        os.close(fd)


def write(d: Daemon, want: dict, t: int, k: int) -> tuple[int, bytes]:
    """One request: series dfN, each with a sample at t (value k); remembered if acked."""
    series = [({"__name__": "df", "i": str(i)}, [(t, float(k * 100 + i))]) for i in range(10)]
    code, body, _ = d.write(series)
    assert code in (204, 507), (code, body)
    if code == 204:
        for lab, smp in series:
            want.setdefault(tuple(sorted(lab.items())), {}).update(dict(smp))
    return code, body


def complete_filesets(d: Daemon) -> None:
    """Every fileset a reader can see verifies; no file belongs to an unfinished one."""
    root = d.data / "filesets"
    ids = list_filesets(root)
    for fid in ids:
        with Fileset(root, fid) as fs:
            fs.verify()
    names = {f"fileset-{f.block_start}-{f.volume}-" for f in ids}
    for p in root.glob("*/*/fileset-*"):
        assert any(p.name.startswith(n) for n in names), f"partial fileset file {p}"


def metric(d: Daemon, line_start: str) -> float:
    code, body = d.get("/metrics")
    assert code == 200
    for line in body.decode().splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no metric {line_start}")


def test_disk_full_refuses_keeps_and_resumes(tmp_path):
    with small_tmpfs(tmp_path / "data") as data:
        d = Daemon(tmp_path, workers=2, extra=CONFIG).start()
        want: dict = {}
        try:
            t0 = now_ms()
            k = 0
            assert write(d, want, t0, k)[0] == 204
            ballast = data / "ballast"
            fill(ballast)
            refused = []
            for _ in range(200):  # a few may still fit in partly used pages
                k += 1
                code, body = write(d, want, t0 + k, k)
                if code == 507:
                    refused.append(body.decode())
                    if len(refused) >= 3:
                        break
            assert len(refused) >= 3, "the full disk never refused a write"
            assert all("disk full" in b for b in refused), refused
            # remote write 2.0 with metadata the store has not seen (written before samples);
            # small writes may still fit in the slack of partly used pages, so several tries
            for j in range(200):
                series2 = [({"__name__": f"df_meta{j}"}, [(t0, 1.0)], (1, "help " * 50, "s"))]
                code, body, _ = d.post("/api/v1/write",
                                       snappy.compress(write_request_v2(series2)), V2_HEADERS)
                assert code in (204, 507), (code, body)
                if code == 507:
                    break
            assert code == 507 and b"disk full" in body, (code, body)
            assert metric(d, 'm3shm_remote_write_requests_rejected_total{reason="disk_full"}'
                          ) >= 4
            assert metric(d, 'm3shm_ingest_samples_rejected_total{reason="disk_full"}') >= 30
            # the block of t0 closes (2 s block + 1 s bufferPast): timed flushes fail now
            close = t0 - t0 % 2000 + 3000
            while now_ms() <= close:
                time.sleep(0.05)
            failed = d.log.read_text(errors="replace").count("flush pass failed")
            deadline = time.monotonic() + 30
            while d.log.read_text(errors="replace").count("flush pass failed") < failed + 4:
                assert time.monotonic() < deadline, d.logtext()
                time.sleep(0.1)
            assert "its partial files are removed" in d.log.read_text(errors="replace")
            assert metric(d, 'm3shm_flush_failures_total{cause="disk_full"}') >= 4
            # an admin flush says so (not a 503 after its 120 s timeout: the failing workers
            # cannot record their passes in the state files, the stats file tells it)
            code, body = d.post("/api/v1/admin/flush", b"")[:2]
            assert code == 507 and b"disk full" in body, (code, body)
            complete_filesets(d)
            assert d.export_map("df") == want  # acknowledged samples read back, from memory
            code, body = write(d, want, t0 + 1000 + k, k)
            assert code == 507, body
            ballast.unlink()
            # ingestion resumes by itself: no restart, no admin call
            deadline = time.monotonic() + 10
            while write(d, want, now_ms(), k := k + 1)[0] != 204:
                assert time.monotonic() < deadline, d.logtext()
                time.sleep(0.1)
            for _ in range(5):
                assert write(d, want, now_ms(), k := k + 1)[0] == 204
            # the timed flush retries by itself: the closed block reaches a fileset
            deadline = time.monotonic() + 30
            while not any(f.block_start == t0 - t0 % 2000
                          for f in list_filesets(d.data / "filesets")):
                assert time.monotonic() < deadline, d.logtext()
                time.sleep(0.1)
            # SIGKILL of everything: replay of the commit log written around the full disk
            # (refused groups cut off or in retired files) brings back every acked sample
            d.kill_all()
            d.start()
            assert d.export_map("df") == want
            complete_filesets(d)
            code, body = d.post("/api/v1/admin/flush", b"")[:2]
            assert code == 200, body
            complete_filesets(d)
            assert d.export_map("df") == want
            assert d.stop() == 0
            d.start()
            assert d.export_map("df") == want
            complete_filesets(d)
        finally:
            if d.proc is not None and d.proc.poll() is None:
                d.stop()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(data / "ballast")


def test_commitlog_cuts_partial_group_and_resumes(tmp_path):
    """A group that fills the disk half-way is cut off again, so groups appended after space
    is freed are not hidden behind a torn record: replay returns exactly the groups whose
    append returned."""
    from m3shm.storage.commitlog import Batch, CommitLog, list_files, read_file

    with small_tmpfs(tmp_path / "cl", size="1m") as d:
        log = CommitLog(str(d / "commitlog"), boot=1, worker=0, incarnation=0)
        ok: list[int] = []
        seq = 0

        def append(size: int) -> bool:
            nonlocal seq
            seq += 1
            try:
                log.append([Batch(seq, 0, 1, bytes([seq % 251]) * size)])
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
                return False
            ok.append(seq)
            return True

        assert append(1000)
        fill(d / "ballast")
        os.truncate(d / "ballast", os.path.getsize(d / "ballast") - 20000)
        assert append(12000)  # fits in the 20000 bytes freed
        assert not append(30000)  # does not: part of it was written, then cut off
        assert not append(30000)
        os.unlink(d / "ballast")
        assert append(30000) and append(100)
        log.close()
        got = [b.seq for p in list_files(str(d / "commitlog")) for b in read_file(p)]
        assert got == ok
