"""Chunk sizes in shared memory (csrc/series.c, arena.c): a series' first chunk of a block is
small (192 bytes), its later chunks of the block full (512); released chunks of each size are
reused by the next chunks of that size, so the arena stops growing."""

from __future__ import annotations

import os
import random

import pytest

from m3shm.shm import Segment, SegParams, make_record

pytestmark = pytest.mark.native

BLOCK = 3_600_000
FIRST, FULL = 192, 512


@pytest.fixture
def seg():
    path = f"/dev/shm/m3shm-test-{os.getpid()}-{random.getrandbits(32):08x}"
    s = Segment.create(path, SegParams(num_shards=1, num_producers=1, lane_bytes=1 << 16,
                                       series_per_shard=64, arena_bytes=1 << 20,
                                       block_ms=BLOCK))
    yield s
    s.unlink()


def put(seg: Segment, name: str, ts: list[int]) -> None:
    rec = make_record({"__name__": name}, ts, [float(t % 977) * 1.37 for t in ts], 1)
    assert seg.apply_batch(rec, 1, 0, 1) == 1


def bump(seg: Segment) -> int:
    return seg.shard_stats(0)["arena_bump"]


def test_first_chunk_of_a_block_is_small(seg):
    put(seg, "warmup", [1])  # allocates the label blocks' first class page, if any
    b0 = bump(seg)
    put(seg, "b", [1000])  # labels {__name__="b"} take 32 bytes
    assert bump(seg) - b0 == 32 + FIRST
    b1 = bump(seg)
    put(seg, "b", [1000 + 1000 * i for i in range(1, 400)])  # overflows the first chunk
    chunks = seg.blocks(0)[0]["chunks"]
    assert chunks >= 3
    assert bump(seg) - b1 == (chunks - 2) * FULL  # "warmup" has one, "b" one small
    b2 = bump(seg)
    put(seg, "b", [BLOCK + 5])  # a new block starts small again
    assert bump(seg) - b2 == FIRST
    ts, _ = seg.read_series(0, 1, 0, 1 << 62)
    assert ts.tolist() == [1000 * i for i in range(1, 401)] + [BLOCK + 5]


def test_released_chunks_of_both_sizes_are_reused(seg):
    bumps = []
    for k in range(8):
        bs = k * BLOCK
        put(seg, "small", [bs + 1])
        put(seg, "big", [bs + 1000 * i for i in range(1, 300)])
        if k:
            seg.seal(0, bs - BLOCK)
            assert seg.release(0, bs - BLOCK) >= 3
        bumps.append(bump(seg))
    assert bumps[-1] == bumps[2], bumps
    st = seg.shard_stats(0)
    assert st["dropped"] == 0 and st["chunks_free"] > 0
