"""Block life cycle of a shard in shared memory (csrc/block.c, arena.c, epoch.c): list, seal,
encode, release, cold chunks, reclamation under readers (also readers killed with SIGKILL),
series expiry with slot reuse, and a steady-state arena under flush and churn."""

from __future__ import annotations

import os
import random
import signal
import time

import numpy as np
import pytest

from m3shm import codec
from m3shm.shm import COLD, WARM, Segment, SegParams, canonical_labels, make_record, parse_labels

pytestmark = pytest.mark.native

BLOCK = 3_600_000


@pytest.fixture
def seg():
    path = f"/dev/shm/m3shm-test-{os.getpid()}-{random.getrandbits(32):08x}"
    s = Segment.create(path, SegParams(num_shards=1, num_producers=1, lane_bytes=1 << 16,
                                       series_per_shard=512, arena_bytes=2 << 20,
                                       block_ms=BLOCK))
    yield s
    s.unlink()


def put(seg: Segment, name: str, ts: list[int], vs: list[float]) -> None:
    for i in range(0, len(ts), 500):
        rec = make_record({"__name__": name}, ts[i:i + 500], vs[i:i + 500], 1)
        assert seg.apply_batch(rec, 1, 0, 1) == 1


def flushed(seg: Segment, bs: int, kind: int = WARM) -> dict[str, tuple[list, list]]:
    """Seal + encode a block: {name: (timestamps, values)} decoded from the encoded parts."""
    seg.seal(0, bs, kind)
    out = {}
    for part in seg.encode_block(0, bs, kind, buf_bytes=4096, max_entries=3):
        for e in part.entries:
            lab = parse_labels(bytes(part.data[e["labels_off"]:e["labels_off"]
                                               + e["labels_len"]]))
            ts, vs = codec.decode(part.data[e["data_off"]:e["data_off"] + e["data_len"]])
            assert len(ts) == e["count"] and ts[0] == e["mint"] and ts[-1] == e["maxt"]
            out[lab["__name__"]] = (ts.tolist(), vs.tolist())
    return out


def test_seal_encode_release_keeps_the_last_write(seg):
    # block 0: in order, then out of order, then an overwrite of t=5000; block 1: in order
    put(seg, "a", [1000 * i for i in range(1, 11)], [float(i) for i in range(1, 11)])
    put(seg, "a", [500, 2500, 5000], [0.5, 2.5, 55.0])
    put(seg, "a", [BLOCK + 1000 * i for i in range(5)], [7.0] * 5)
    for i in range(12):  # more series than one encode part holds
        put(seg, f"s{i}", [100 * j for j in range(1, 300)], [float(i)] * 299)
    blocks = seg.blocks(0)
    assert [(b["block_start"], b["kind"]) for b in blocks] == [(0, WARM), (BLOCK, WARM)]
    assert blocks[0]["nseries"] == 13 and blocks[1]["nseries"] == 1
    before_ts, before_vs = seg.read_series(0, 0, 0, BLOCK - 1)

    got = flushed(seg, 0)
    assert len(got) == 13
    assert got["a"] == (before_ts.tolist(), before_vs.tolist())
    assert dict(zip(*got["a"], strict=True))[5000] == 55.0 and 500 in got["a"][0]
    assert got["s3"] == ([100 * j for j in range(1, 300)], [3.0] * 299)
    assert seg.blocks(0)[0]["sealed"] == seg.blocks(0)[0]["chunks"]

    released = seg.release(0, 0)
    assert released == blocks[0]["chunks"]
    assert [(b["block_start"], b["kind"]) for b in seg.blocks(0)] == [(BLOCK, WARM)]
    ts, _ = seg.read_series(0, 0, 0, 1 << 62)
    assert ts.tolist() == [BLOCK + 1000 * i for i in range(5)]
    st = seg.shard_stats(0)
    assert st["chunks_released"] == released
    assert st["chunks_free"] == released and st["chunks_limbo"] == 0  # nobody was reading
    # release is idempotent; unsealed data is never released
    assert seg.release(0, 0) == 0 and seg.release(0, BLOCK) == 0


def test_late_samples_of_a_sealed_block_go_to_cold_chunks(seg):
    put(seg, "a", [1000, 2000, 3000], [1.0, 2.0, 3.0])
    assert seg.seal(0, 0) == 1
    assert seg.shard_stats(0)["warm_floor"] == BLOCK
    put(seg, "a", [1500, 2000], [1.5, 20.0])   # a late write and an overwrite
    kinds = [(b["block_start"], b["kind"], b["sealed"]) for b in seg.blocks(0)]
    assert kinds == [(0, WARM, 1), (0, COLD, 0)]
    assert flushed(seg, 0, WARM)["a"] == ([1000, 2000, 3000], [1.0, 2.0, 3.0])
    assert seg.release(0, 0, WARM) == 1
    # until the cold flush the reader still sees the cold data; then it is gone
    assert seg.read_series(0, 0, 0, BLOCK)[0].tolist() == [1500, 2000]
    assert flushed(seg, 0, COLD)["a"] == ([1500, 2000], [1.5, 20.0])
    put(seg, "a", [1700], [1.7])                # arrives during the cold flush
    assert seg.release(0, 0, COLD) == 1
    assert seg.read_series(0, 0, 0, BLOCK)[0].tolist() == [1700]
    assert [(b["kind"], b["sealed"]) for b in seg.blocks(0)] == [(COLD, 0)]


def test_release_waits_for_readers_in_a_section(seg):
    put(seg, "a", list(range(1, 2000)), [1.0] * 1999)
    seg.seal(0, 0)
    with seg.reading():
        n = seg.release(0, 0)
        assert n > 1
        st = seg.shard_stats(0)
        assert st["chunks_limbo"] == n and st["chunks_free"] == 0
        assert seg.reclaim(0) == 0
    assert seg.reclaim(0) == n
    assert seg.shard_stats(0)["chunks_free"] == n


def _hold_section(path: str, w: int) -> None:
    s = Segment.open(path)
    with s.reading():
        os.write(w, b"x")
        time.sleep(60)


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def test_a_killed_reader_does_not_block_reclamation(seg):
    put(seg, "a", list(range(1, 2000)), [1.0] * 1999)
    seg.seal(0, 0)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            _hold_section(seg.path, w)
        finally:
            os._exit(0)
    assert os.read(r, 1) == b"x"
    n = seg.release(0, 0)
    assert seg.reclaim(0) == 0                 # the child is inside its section
    os.kill(pid, signal.SIGKILL)
    while _state(pid) != "Z":
        time.sleep(0.001)                      # dead, not yet waited for: a zombie
    assert seg.reclaim(0) == n                 # a zombie holds nothing
    os.waitpid(pid, 0)
    assert seg.shard_stats(0)["chunks_free"] == n


def test_expired_series_slot_is_reused_with_a_new_generation(seg):
    put(seg, "old", [1000, 2000], [1.0, 2.0])
    put(seg, "keep", [1000, BLOCK + 1], [1.0, 2.0])
    info = seg.series_info(0, 0)
    assert info.gen == 1 and info.max_ts == 2000
    seg.seal(0, 0)
    seg.release(0, 0)
    assert seg.expire_series(0, idle_before_ms=2000) == 0   # not idle long enough
    assert seg.expire_series(0, idle_before_ms=2001) == 1   # "keep" still has a chunk
    assert seg.series_info(0, 0) is None
    assert seg.shard_stats(0)["nseries"] == 1
    put(seg, "new", [BLOCK + 5], [5.0])
    info = seg.series_info(0, 0)
    assert (info.gen, parse_labels(info.labels)) == (2, {"__name__": "new"})
    put(seg, "old", [BLOCK + 6], [6.0])                     # comes back in a fresh slot
    assert parse_labels(seg.series_info(0, 2).labels) == {"__name__": "old"}
    put(seg, "keep", [BLOCK + 7], [7.0])                    # still found in the table
    assert seg.shard_stats(0)["nseries"] == 3
    assert seg.read_series(0, 1, 0, 1 << 62)[0].tolist() == [BLOCK + 1, BLOCK + 7]


def test_arena_reaches_a_steady_state_under_flush_and_churn(seg):
    """Each block, 150 series of which a third are new (churn), 120 samples each; every
    block is flushed, released and idle series expire. The bump pointer stops growing."""
    bumps = []
    names = [f"s{i}" for i in range(150)]
    for k in range(30):
        bs = k * BLOCK
        names = names[50:] + [f"s{k}-{i}" for i in range(50)]
        batch = b"".join(make_record({"__name__": n, "job": "churn"},
                                     [bs + 1000 * j for j in range(120)],
                                     [float(j) for j in range(120)], 1) for n in names)
        assert seg.apply_batch(batch, 1, 0, 1) == len(names)
        if k:
            got = flushed(seg, bs - BLOCK)
            assert len(got) == 150
            assert seg.release(0, bs - BLOCK) > 0
            seg.expire_series(0, idle_before_ms=bs)
        bumps.append(seg.shard_stats(0)["arena_bump"])
    st = seg.shard_stats(0)
    assert st["dropped"] == 0 and st["nseries"] == 150
    assert st["series_removed"] == 50 * 29
    assert bumps[-1] == bumps[10], bumps
    # every live series is still found by its labels (the table survived 1400 deletions)
    for info in seg.live_series(0):
        assert seg.apply_batch(make_record(parse_labels(info.labels), [bs + 999_999], [1.0],
                                           1), 1, 0, 1) == 1
    assert seg.shard_stats(0)["nseries"] == 150


def test_labels_larger_than_a_chunk_are_reused(seg):
    big = {"__name__": "big", "v": "x" * 3000}
    for k in range(6):
        lab = dict(big, k=str(k))
        seg.apply_batch(make_record(lab, [k * BLOCK + 1], [1.0], 1), 1, 0, 1)
        seg.seal(0, k * BLOCK)
        seg.release(0, k * BLOCK)
        seg.expire_series(0, idle_before_ms=(k + 1) * BLOCK)
        if k == 1:
            bump = seg.shard_stats(0)["arena_bump"]
    assert seg.shard_stats(0)["arena_bump"] == bump
    assert len(canonical_labels(big)) > 512


def test_encode_part_too_small_for_one_series_grows(seg):
    put(seg, "a", list(range(1, 5000)), list(np.random.default_rng(1).random(4999)))
    seg.seal(0, 0)
    parts = list(seg.encode_block(0, 0, WARM, buf_bytes=64, max_entries=1))
    assert len(parts) == 1 and parts[0].entries[0]["count"] == 4999
