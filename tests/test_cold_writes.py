"""Cold writes through a real daemon: samples older than bufferPast (within retention) are
accepted when the namespace enables them, merged into volume N+1 of their block at the next
flush (volume N deleted, a reader that mapped it keeps its data), read back exactly across
restarts and SIGKILL; without cold writes they get a 400 "too old" naming the window."""

from __future__ import annotations

import time
from pathlib import Path

from test_daemon_harness import Daemon, now_ms

from m3shm.storage.fileset import Fileset, FilesetId, list_filesets

BLOCK = 2000
COLD = """
namespaces:
  - {name: default, retention: 1h, blockSize: 2s, bufferPast: 1s, bufferFuture: %s}
flush: {interval: 1h}
"""


def cold_daemon(tmp: Path, workers: int = 2, future: str = "1s") -> Daemon:
    return Daemon(tmp, workers=workers, extra=COLD % future)


def flush(d: Daemon) -> None:
    code, body = d.post("/api/v1/admin/flush", b"")[:2]
    assert code == 200, body


def wait_closed(ts: int) -> None:
    close = ts - ts % BLOCK + BLOCK + 1000
    while now_ms() <= close + 50:
        time.sleep(0.05)


def write(d: Daemon, want: dict, name: str, samples: dict[str, list[tuple[int, float]]]
          ) -> None:
    series = [({"__name__": name, "i": i}, smp) for i, smp in samples.items()]
    code, body, _ = d.write(series)
    assert code == 204, body
    for lab, smp in series:
        want.setdefault(tuple(sorted(lab.items())), {}).update(dict(smp))


def volumes(d: Daemon, block_start: int) -> list[FilesetId]:
    return [f for f in list_filesets(d.data / "filesets") if f.block_start == block_start]


def test_cold_writes_become_next_volume(tmp_path):
    d = cold_daemon(tmp_path).start()
    want: dict = {}
    try:
        t = now_ms() - 500
        bs = t - t % BLOCK
        write(d, want, "c", {str(i): [(t + k, float(i + k)) for k in range(5)] for i in range(20)})
        wait_closed(t)
        flush(d)
        v0 = volumes(d, bs)
        assert v0 and {f.volume for f in v0} == {0}
        assert d.export_map("c") == want
        # cold: older than bufferPast now; overwrite existing timestamps, add new ones and a
        # new series, and reach a block that was never written (30 min back)
        old = now_ms() - 1_800_000
        write(d, want, "c", {"0": [(t, -1.0), (t + 100, 7.5)], "3": [(t + 2, 99.0)],
                             "new": [(t + 1, 1.0), (old, 2.0)]})
        assert d.export_map("c") == want  # fileset + cold chunks in memory, cold wins
        held = [Fileset(d.data / "filesets", f) for f in v0]  # a reader mapping volume 0
        flush(d)
        v1 = volumes(d, bs)
        by_shard: dict[int, set[int]] = {}
        for f in v1:
            by_shard.setdefault(f.shard, set()).add(f.volume)
        assert 1 in {v for vs in by_shard.values() for v in vs}, v1
        for shard, vols in by_shard.items():  # one volume per block: N+1 replaced N
            assert len(vols) == 1, (shard, vols)
            files = {p.name.split("-")[2] for p in (d.data / "filesets" / "default" /
                                                    f"{shard:04d}").glob(f"fileset-{bs}-*")}
            assert files == {str(v) for v in vols}, (shard, files)
        for fs in held:  # unlinked, but the reader's map still holds the old volume
            assert sum(1 for _ in fs) == fs.info.num_series
            fs.close()
        assert volumes(d, old - old % BLOCK), "cold block never written warm: its volume 0"
        assert d.export_map("c") == want
        write(d, want, "c", {"0": [(t, -2.0)]})
        flush(d)
        assert 2 in {f.volume for f in volumes(d, bs)}
        assert d.export_map("c") == want
    finally:
        assert d.stop() == 0
    d.start()
    try:
        assert d.export_map("c") == want
    finally:
        d.kill_all()
    d.start()
    try:
        assert d.export_map("c") == want
    finally:
        assert d.stop() == 0


def test_overwrite_survives_restart_with_older_log_kept(tmp_path):
    """A commit-log file that must stay (it holds a sample of a block still open) also holds
    an older value of a sample that a later, covered file overwrote: the later file must not
    be deleted before it, or replay would put the older value back over the fileset."""
    d = Daemon(tmp_path, workers=1, extra="""
namespaces:
  - {name: default, retention: 1h, blockSize: 10s, bufferPast: 1s, bufferFuture: 10s}
flush: {interval: 1h, snapshot_interval: 0}
""").start()  # no snapshots: they would cover (and delete) the kept file legitimately
    want: dict = {}
    try:
        t = now_ms() - 600_000  # a closed block; z's block stays open for ~10 s
        write(d, want, "o", {"x": [(t, 1.0)], "z": [(now_ms() + 9_500, 5.0)]})
        flush(d)  # x's block -> volume 0; the file stays (z's block is open)
        kept = [p for p in (d.data / "commitlog").glob("*.log") if p.stat().st_size > 40]
        assert len(kept) == 1
        write(d, want, "o", {"x": [(t, 2.0)]})  # cold overwrite, in a new file
        flush(d)  # volume 1 holds x = 2
        assert kept[0].exists()
        assert d.export_map("o") == want
    finally:
        d.kill_all()
    d.start()
    try:
        assert d.export_map("o") == want
        flush(d)
        assert d.export_map("o") == want
    finally:
        assert d.stop() == 0


def test_too_old_names_the_window(tmp_path):
    d = Daemon(tmp_path, extra="""
namespaces:
  - {name: default, retention: 1h, blockSize: 2s, bufferPast: 1s, bufferFuture: 1s,
     coldWrites: false}
""").start()
    try:
        t = now_ms()
        code, body, _ = d.write([({"__name__": "w"}, [(t - 5000, 1.0), (t, 2.0)])])
        assert code == 400 and b"too old" in body, body
        assert b"accepts now-1s (bufferPast) .. now+1s (bufferFuture)" in body, body
        assert b"coldWrites is off" in body
        assert d.export_map("w") == {(("__name__", "w"),): {t: 2.0}}
    finally:
        assert d.stop() == 0
    (tmp_path / "on").mkdir()
    d = Daemon(tmp_path / "on", extra=COLD % "1s").start()
    try:
        t = now_ms()
        code, body, _ = d.write([({"__name__": "w"}, [(t - 2 * 3_600_000, 1.0),
                                                      (t - 5000, 3.0)])])
        assert code == 400 and b"too old" in body, body
        assert b"accepts now-1h (retention, cold writes on) .. now+1s" in body, body
        assert d.export_map("w") == {(("__name__", "w"),): {t - 5000: 3.0}}
    finally:
        assert d.stop() == 0
