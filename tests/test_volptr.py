"""The newest fileset volume of every block in shared memory (csrc/volptr.c,
m3shm/storage/volptr.py): owner updates, readers in other processes never see a torn pair,
overflow and unbuilt shards send readers to the directory, and through a real daemon the table
agrees with the checkpoints on disk after warm and cold flushes, retention and a SIGKILL."""

from __future__ import annotations

import os
import random
import time

import pytest
from test_daemon_harness import Daemon, now_ms

from m3shm.storage.fileset import COMPLETE_KINDS, NAME
from m3shm.storage.flushed import FlushedStore
from m3shm.storage.volptr import VolumePointers, capacity, table_path

pytestmark = pytest.mark.native

BLOCK = 3_600_000


@pytest.fixture
def table(tmp_path):
    path = f"/dev/shm/m3shm-test-{os.getpid()}-{random.getrandbits(32):08x}.vol"
    t = VolumePointers.create(path, 4, 48 * BLOCK, BLOCK)
    yield t
    t.unlink()


def test_capacity_covers_retention():
    assert capacity(48 * BLOCK, BLOCK) >= 2 * 48 + 16
    assert capacity(30 * 24 * BLOCK, 12 * BLOCK) == 256


def test_set_list_remove_and_ready(table, tmp_path):
    assert table.volumes(0) is None  # not built: readers list the directory
    d = tmp_path / "0000"
    d.mkdir()
    for bs, vol in ((0, 0), (BLOCK, 0), (-BLOCK, 3)):
        (d / f"fileset-{bs}-{vol}-checkpoint.db").write_bytes(b"")
    (d / f"fileset-{BLOCK}-1-sealed.db").write_bytes(b"")  # version 4: the file is enough
    (d / f"fileset-{2 * BLOCK}-0-content.db").write_bytes(b"")  # no checkpoint: not there
    (d / f"fileset-{3 * BLOCK}-0-sealed.db.tmp").write_bytes(b"")  # not renamed: not there
    table.rebuild(0, d)
    assert table.volumes(0) == {0: 0, BLOCK: 1, -BLOCK: 3}
    assert table.set(0, BLOCK, 2) and table.volumes(0)[BLOCK] == 2
    assert table.set(0, 0, -1) and table.volumes(0) == {BLOCK: 2, -BLOCK: 3}
    assert table.volumes(1) is None  # other shards untouched
    other = VolumePointers.open(table.path)  # another process opens it by path
    assert other is not None and other.volumes(0) == {BLOCK: 2, -BLOCK: 3}
    # a block whose slot holds another live block: the shard overflows, readers list
    cap = capacity(48 * BLOCK, BLOCK)
    assert not table.set(0, BLOCK + cap * BLOCK, 0)
    assert table.volumes(0) is None
    table.rebuild(0, d)  # the owner's next start rebuilds it
    assert table.volumes(0) == {0: 0, BLOCK: 1, -BLOCK: 3}


def test_flushed_store_uses_the_table(table, tmp_path):
    root = tmp_path / "filesets"
    d = root / "default" / "0001"
    d.mkdir(parents=True)
    (d / f"fileset-{BLOCK}-4-checkpoint.db").write_bytes(b"")
    store = FlushedStore(root)
    assert store.newest("default", 1) == {BLOCK: 4}  # listing
    store.attach("default", table)
    assert store.newest("default", 1) == {BLOCK: 4}  # not built yet: listing
    table.rebuild(1, d)
    (d / f"fileset-{BLOCK}-5-checkpoint.db").write_bytes(b"")  # the owner has not pointed
    assert store.newest("default", 1) == {BLOCK: 4}  # at it yet: readers keep using 4
    table.set(1, BLOCK, 5)
    assert store.newest("default", 1) == {BLOCK: 5}


def test_readers_never_see_a_torn_pair(table):
    """An owner rewrites slots as fast as it can while reader processes list them: every
    (block, volume) pair a reader sees was written together (volume encodes its block)."""
    for b in range(8):
        table.set(2, b * BLOCK, b)
    from m3shm._native import lib

    lib.m3_volptr_set_ready(table.base, 2)
    readers = []
    for _ in range(2):
        pid = os.fork()
        if pid == 0:  # reader
            code = 0
            try:
                t = VolumePointers.open(table.path)
                end = time.monotonic() + 1.0
                n = 0
                while time.monotonic() < end:
                    got = t.volumes(2)
                    if got is None:
                        continue
                    n += 1
                    for bs, vol in got.items():
                        if vol % 1000 != bs // BLOCK:
                            code = 3
                if n == 0:
                    code = 4
            except BaseException:
                code = 5
            os._exit(code)
        readers.append(pid)
    k = 0
    end = time.monotonic() + 1.0
    while time.monotonic() < end:
        k += 1
        for b in range(8):
            table.set(2, b * BLOCK, b + 1000 * k)
    for pid in readers:
        assert os.waitpid(pid, 0)[1] == 0


def disk_newest(root, ns: str, shard: int) -> dict[int, int]:
    best: dict[int, int] = {}
    for p in (root / ns / f"{shard:04d}").glob("fileset-*.db"):
        m = NAME.match(p.name)
        if m.group(3) in COMPLETE_KINDS:  # version 4's file, versions 1-3's checkpoint
            bs, vol = int(m.group(1)), int(m.group(2))
            best[bs] = max(vol, best.get(bs, -1))
    return best


def test_daemon_table_follows_flushes_cold_volumes_and_restarts(tmp_path):
    from m3shm.supervisor import segment_path

    d = Daemon(tmp_path, workers=2, extra="""
namespaces:
  - {name: default, retention: 1h, blockSize: 2s, bufferPast: 1s, bufferFuture: 1s}
flush: {interval: 1h}
""").start()
    root = d.data / "filesets"
    try:
        t = now_ms() - 600_000  # closed blocks: flushed at once, later writes are cold
        series = [({"__name__": "v", "i": str(i)}, [(t + k * 500, float(k)) for k in range(8)])
                  for i in range(40)]
        assert d.write(series)[0] == 204
        assert d.post("/api/v1/admin/flush", b"")[0] == 200
        table = VolumePointers.open(table_path(segment_path(str(d.data))))
        assert table is not None
        for s in range(8):
            assert table.volumes(s) == disk_newest(root, "default", s)
        assert d.write([(lab, [(ts, -v) for ts, v in smp]) for lab, smp in series])[0] == 204
        assert d.post("/api/v1/admin/flush", b"")[0] == 200  # cold: volume 1 of each block
        vols = set()
        for s in range(8):
            got = table.volumes(s)
            assert got == disk_newest(root, "default", s)
            vols |= set(got.values())
        assert vols == {1}
        assert all(v == -(ts - t) / 500 for row in d.export("v")
                   for ts, v in zip(row["timestamps"], row["values"], strict=True))
        d.kill_all()
        d.start()
        table = VolumePointers.open(table_path(segment_path(str(d.data))))
        for s in range(8):
            assert table.volumes(s) == disk_newest(root, "default", s)
    finally:
        assert d.stop() == 0
