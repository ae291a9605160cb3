"""Snapshots of open blocks (csrc/snapshot.c, m3shm/storage/snapshot.py), in one process on
real segments: copy a shard's chunks, load them into a fresh segment, compare every series;
replay after the snapshot keeps the last write; blocks flushed after the snapshot are not
loaded; a corrupt snapshot is named and the next older one (or none) is used. End-to-end
tests (SIGKILL) are in tests/test_daemon_snapshot.py."""

from __future__ import annotations

import contextlib
import os
import random
from pathlib import Path

import pytest

from m3shm.errors import CorruptError
from m3shm.shm import COLD, WARM, Segment, SegParams, make_record
from m3shm.storage import snapshot
from m3shm.storage.shard_flush import flush_block

pytestmark = pytest.mark.native

BLOCK = 3_600_000
NS = "default"


def new_seg(shards: int = 2) -> Segment:
    path = f"/dev/shm/m3shm-test-{os.getpid()}-{random.getrandbits(32):08x}"
    return Segment.create(path, SegParams(num_shards=shards, num_producers=1,
                                          lane_bytes=1 << 16, series_per_shard=4096,
                                          arena_bytes=8 << 20, block_ms=BLOCK))


@pytest.fixture
def segs():
    made: list[Segment] = []

    def make(shards: int = 2) -> Segment:
        made.append(new_seg(shards))
        return made[-1]

    yield make
    for s in made:
        s.unlink()


def put(seg: Segment, name: str, ts: list[int], vs: list[float], seq: int = 1) -> None:
    n = seg.params.num_shards
    for i in range(0, len(ts), 500):
        rec = make_record({"__name__": name, "job": "j"}, ts[i:i + 500], vs[i:i + 500], n)
        assert seg.apply_batch(rec, seq, 0, n) == 1


def contents(seg: Segment) -> dict[tuple, tuple[list, list]]:
    out = {}
    for s in range(seg.params.num_shards):
        for info in seg.live_series(s):
            ts, vs = seg.read_series(s, info.slot, -(1 << 62), 1 << 62)
            if len(ts):
                out[(s, seg.series_labels(s, info.slot))] = (ts.tolist(), vs.tolist())
    return out


def fill(seg: Segment, rng: random.Random, nseries: int = 60) -> None:
    """In-order, out-of-order, overwritten and long series over two blocks."""
    for i in range(nseries):
        n = rng.choice([1, 5, 40, 700])
        ts = sorted(rng.sample(range(1, 2 * BLOCK, 997), n))
        put(seg, f"m{i}", ts, [rng.random() for _ in ts])
        if i % 3 == 0:  # out of order and overwrites: more streams
            back = sorted(rng.sample(ts, min(len(ts), 7)))
            put(seg, f"m{i}", back, [-1.0 - k for k in range(len(back))])


def snap_all(seg: Segment, root: Path, seq: int, fs_root: Path) -> Path:
    info = snapshot.write_snapshot(seg, root, NS, range(seg.params.num_shards), seq, fs_root)
    return snapshot.file_path(root, NS, seq, info.shards, empty=info.nseries == 0)


def load_all(seg: Segment, root: Path, fs_root: Path) -> dict[int, int]:
    return {s: v[0] for s, v in snapshot.load_shards(seg, root, NS,
                                                     range(seg.params.num_shards),
                                                     fs_root).items()}


def test_snapshot_round_trip_and_appends_after_load(segs, tmp_path):
    rng = random.Random(5)
    a = segs()
    fill(a, rng)
    want = contents(a)
    snap_all(a, tmp_path / "snap", 77, tmp_path / "fs")
    b = segs()
    assert load_all(b, tmp_path / "snap", tmp_path / "fs") == {0: 77, 1: 77}
    assert contents(b) == want
    # replayed writes after the snapshot: newer than everything loaded, also overwrites
    for name in ("m0", "m1", "m3", "new"):
        for s in (a, b):
            put(s, name, [5 * 997, BLOCK + 10, BLOCK + 20], [9.0, 9.5, 10.0])
    assert contents(b) == contents(a)
    # loaded chunks that were appendable stay appendable: in-order appends add no chunk
    before = sum(x["chunks"] for s in range(2) for x in b.blocks(s))
    for i in range(60):
        put(b, f"m{i}", [2 * BLOCK - 1], [1.0])
    after = sum(x["chunks"] for s in range(2) for x in b.blocks(s))
    assert after - before < 60


def test_flushed_after_snapshot_is_not_loaded(segs, tmp_path):
    """A block flushed after the snapshot is not loaded again: its newer (cold) overwrite in
    the fileset must not be undone by the snapshot's older value."""
    a = segs(1)
    fs = tmp_path / "fs"
    put(a, "x", [1000, 2000], [1.0, 2.0])
    put(a, "x", [BLOCK + 1000], [3.0])
    snap_all(a, tmp_path / "snap", 10, fs)
    assert flush_block(a, fs, NS, BLOCK, 0, 0, WARM) is not None
    put(a, "x", [2000], [22.0])  # cold overwrite, flushed as volume 1
    assert flush_block(a, fs, NS, BLOCK, 0, 0, COLD) is not None
    b = segs(1)
    assert load_all(b, tmp_path / "snap", fs) == {0: 10}
    assert list(contents(b).values()) == [([BLOCK + 1000], [3.0])]
    # a snapshot taken after the flush holds the open block only, and loads it
    snap_all(a, tmp_path / "snap", 20, fs)
    c = segs(1)
    assert load_all(c, tmp_path / "snap", fs) == {0: 20}
    assert contents(c) == contents(a)


def test_corrupt_snapshot_is_named_and_the_older_one_loads(segs, tmp_path, caplog):
    a = segs(2)
    root, fs = tmp_path / "snap", tmp_path / "fs"
    put(a, "x", [1000], [1.0])
    put(a, "y", [1000], [1.0])
    snap_all(a, root, 10, fs)
    put(a, "x", [2000], [2.0])
    p = snap_all(a, root, 20, fs)
    raw = bytearray(p.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    p.write_bytes(bytes(raw))
    b = segs(2)
    assert load_all(b, root, fs) == {0: 10, 1: 10}
    assert str(p) in caplog.text and "corrupt snapshot" in caplog.text
    assert sorted(contents(b).values()) == [([1000], [1.0])] * 2
    assert p.with_name(p.name + ".corrupt").exists()
    assert [f.seq for f in snapshot.listing(root, NS)] == [10]
    # with every snapshot bad, nothing loads (the caller replays the whole commit log)
    p10 = snapshot.file_path(root, NS, 10, range(2))
    p10.write_bytes(p10.read_bytes()[:-3])
    c = segs(2)
    assert load_all(c, root, fs) == {0: 0, 1: 0}
    assert contents(c) == {}


def test_incomplete_snapshot_is_ignored_and_removed(segs, tmp_path):
    a = segs(1)
    root, fs = tmp_path / "snap", tmp_path / "fs"
    put(a, "x", [1000], [1.0])
    p10 = snap_all(a, root, 10, fs)
    put(a, "x", [2000], [2.0])
    p20 = snap_all(a, root, 20, fs)
    p20.rename(p20.with_name(p20.name + ".tmp"))  # killed before the rename
    other = snapshot.file_path(root, NS, 30, range(1, 2))  # another running worker's
    other.with_name(other.name + ".tmp").write_bytes(b"x")
    b = segs(1)
    assert load_all(b, root, fs) == {0: 10}
    snapshot.prune(root, NS, range(1), [range(1), range(1, 2)])
    assert sorted(x.name for x in (root / NS).iterdir()) == sorted(
        [p10.name, other.name + ".tmp"])


def test_two_kept_per_shard_across_worker_layouts_and_version_1(segs, tmp_path, caplog):
    """Files of another worker layout (and version 1's per-shard files) are read for the
    shards they hold, and deleted once every shard they hold has two newer snapshots."""
    a = segs(4)
    root, fs = tmp_path / "snap", tmp_path / "fs"
    for i in range(12):
        put(a, f"m{i}", [1000 + i], [float(i)])
    for s in range(4):
        snapshot.write_shard_v1(a, root, NS, s, 5, fs)
    b = segs(4)
    assert load_all(b, root, fs) == {s: 5 for s in range(4)}
    assert contents(b) == contents(a)
    put(a, "m0", [5000], [5.0])
    snapshot.write_snapshot(a, root, NS, range(0, 2), 10, fs)  # two workers now
    snapshot.write_snapshot(a, root, NS, range(2, 4), 11, fs)
    c = segs(4)
    assert load_all(c, root, fs) == {0: 10, 1: 10, 2: 11, 3: 11}
    assert contents(c) == contents(a)
    ranges = [range(0, 2), range(2, 4)]
    snapshot.prune(root, NS, ranges[0], ranges)
    assert [f.seq for f in snapshot.listing(root, NS)] == [11, 10, 5, 5, 5, 5]
    snapshot.write_snapshot(a, root, NS, range(0, 2), 12, fs)
    snapshot.write_snapshot(a, root, NS, range(2, 4), 13, fs)
    snapshot.prune(root, NS, ranges[1], ranges)
    assert [f.seq for f in snapshot.listing(root, NS)] == [13, 12, 11, 10]
    assert sorted(x.name for x in (root / NS).iterdir()) == sorted(
        f.path.name for f in snapshot.listing(root, NS))  # version-1 directories gone
    # one worker again: its file supersedes both halves once it has two newer ones
    for seq in (20, 21):
        snapshot.write_snapshot(a, root, NS, range(4), seq, fs)
    snapshot.prune(root, NS, range(4), [range(4)])
    assert [f.seq for f in snapshot.listing(root, NS)] == [21, 20]
    d = segs(4)
    assert load_all(d, root, fs) == {s: 21 for s in range(4)}
    assert contents(d) == contents(a)


def test_nothing_open_writes_an_empty_marker(segs, tmp_path):
    a = segs(2)
    root, fs = tmp_path / "snap", tmp_path / "fs"
    put(a, "x", [1000], [1.0])
    snap_all(a, root, 10, fs)
    e = segs(2)
    p = snap_all(e, root, 20, fs)
    assert p.name.endswith("-empty.db") and p.stat().st_size == 0
    b = segs(2)
    assert load_all(b, root, fs) == {0: 20, 1: 20} and contents(b) == {}
    p.write_bytes(b"junk")  # an "empty" snapshot with bytes is corrupt: the older one loads
    c = segs(2)
    assert load_all(c, root, fs) == {0: 10, 1: 10}
    assert contents(c) == contents(a)


def test_loader_refuses_bad_bytes_without_crashing(segs):
    """Bodies that are not snapshots: an error with an offset, never a crash."""
    from m3shm._native import ffi, lib

    a = segs(1)
    put(a, "x", list(range(1000, 60000, 1000)), [1.5] * 59)
    body = bytearray()
    cur, used = ffi.new("uint32_t *"), ffi.new("size_t *")
    ns, nc = ffi.new("uint64_t *"), ffi.new("uint64_t *")
    out = ffi.new("uint8_t[]", 1 << 16)
    assert lib.m3_shard_snapshot(a.base, 0, cur, out, 1 << 16, used, ns, nc) == 0
    body = bytes(ffi.buffer(out, used[0]))
    rng = random.Random(1)
    for trial in range(300):
        b = bytearray(body)
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        if trial % 5 == 0:
            b = b[:rng.randrange(len(b))]
        c = new_seg(1)
        try:
            x, y, z, bad = (ffi.new("uint64_t *"), ffi.new("uint64_t *"),
                            ffi.new("uint64_t *"), ffi.new("size_t *"))
            rc = lib.m3_shard_load_snapshot(c.base, 0, ffi.from_buffer(bytes(b)), len(b),
                                            ffi.NULL, 0, x, y, z, bad)
            assert rc in (0, lib.M3_ECORRUPT, lib.M3_ETRUNC)
            if rc:
                assert bad[0] <= len(b)
            with contextlib.suppress(CorruptError):
                contents(c)  # whatever loaded reads back, or fails with an error
        finally:
            c.unlink()


def test_any_damaged_file_is_set_aside_and_the_older_one_loads(segs, tmp_path, caplog):
    """Flip bytes anywhere in a version-2 file (header, bodies, shard table, trailer) or cut
    it short: the file is named, set aside, and every shard loads the older snapshot."""
    rng = random.Random(3)
    a = segs(3)
    root, fs = tmp_path / "snap", tmp_path / "fs"
    for i in range(30):
        put(a, f"m{i}", [1000 + i], [float(i)])
    snap_all(a, root, 10, fs)
    older = contents(a)
    for i in range(30):
        put(a, f"m{i}", [2000 + i], [float(-i)])
    p = snap_all(a, root, 20, fs)
    good = p.read_bytes()
    table_off = len(good) - snapshot.TRAILER2.size - 3 * snapshot.ENTRY.size
    spots = [0, 9, 30, 70, len(good) // 2, table_off - 8, table_off + 4, table_off + 60,
             len(good) - 30, len(good) - 8, len(good) - 2]
    for trial, at in enumerate(spots + [None]):
        raw = bytearray(good)
        if at is None:
            raw = raw[:rng.randrange(len(raw))]
        else:
            raw[at] ^= 1 << rng.randrange(8)
        p.write_bytes(bytes(raw))
        caplog.clear()
        b = segs(3)
        assert load_all(b, root, fs) == {0: 10, 1: 10, 2: 10}, trial
        assert contents(b) == older, trial
        assert f"corrupt snapshot file {p}" in caplog.text, trial
        aside = p.with_name(p.name + ".corrupt")
        assert aside.exists() and not p.exists()
        aside.unlink()
