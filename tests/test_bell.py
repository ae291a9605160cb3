"""Owner doorbells (csrc/bell.c): an idle owner sleeps on its bell and a producer's publish,
from another process and into another segment, wakes exactly the owners it published to.
Marked native: `make test` runs them again under ASan/UBSan."""

from __future__ import annotations

import os
import random
import select
import signal
import struct

import pytest
from forking import fork_call

from m3shm._native import lib
from m3shm.shm import Segment, SegParams, make_record
from m3shm.workers.worker import shard_range

pytestmark = pytest.mark.native

SHARDS, PRODUCERS = 4, 3  # owners: 0 -> [0, 1), 1 -> [1, 2), 2 -> [2, 4)
BELLS_OFF, BELL_STRIDE = 20480, 16  # docs/formats/shm.md "Doorbells"
HANG_GUARD_S = 30  # only a lost wake-up takes this long (the owner sleeps up to 120 s)


def _make() -> Segment:
    path = f"/dev/shm/m3shm-test-{os.getpid()}-{random.getrandbits(32):08x}"
    return Segment.create(path, SegParams(num_shards=SHARDS, num_producers=PRODUCERS,
                                          lane_bytes=1 << 16, series_per_shard=64,
                                          arena_bytes=1 << 20, block_ms=3600_000))


@pytest.fixture
def segs():
    a, b = _make(), _make()
    yield a, b
    a.unlink()
    b.unlink()


def _bell(seg: Segment, owner: int) -> int:
    return struct.unpack_from("<I", seg._mm, BELLS_OFF + owner * BELL_STRIDE)[0]


def _publish(seg: Segment, shard: int, bells: Segment | None = None) -> None:
    rec = make_record({"__name__": "x", "s": str(shard)}, [1000], [1.0], SHARDS, shard=shard)
    assert seg.reserve(1, rec, seg.next_seq())
    seg.publish(1, bells)


def test_shard_owner_matches_shard_range() -> None:
    for nshards in [*range(1, 40), 64, 100, 4096]:
        for nprod in [*range(1, 12), 31, 64, 256]:
            for i in range(nprod):
                lo, hi = shard_range(i, nprod, nshards)
                for s in range(lo, hi):
                    assert lib.m3_shard_owner(s, nshards, nprod) == i, (nshards, nprod, s)


def test_wait_does_not_sleep_with_work_waiting(segs) -> None:
    a, b = segs
    _publish(b, 3, bells=a)
    bases = Segment.bases([a, b])
    # owner 2 drains shards [2, 4): a record for shard 3 waits in b, so no sleep at all
    assert a.wait_for_work(2, bases, 2, 2, 4, 120_000) is True
    assert _bell(a, 2) & 1 == 0
    # owner 0's shards hold nothing: a zero timeout answers "no work" without sleeping
    assert a.wait_for_work(0, bases, 2, 0, 1, 0) is False


def _sleeper(a: Segment, b: Segment, owner: int, lo: int, hi: int, fd: int) -> None:
    worked = a.wait_for_work(owner, Segment.bases([a, b]), 2, lo, hi, 120_000)
    os.write(fd, b"1" if worked else b"0")


def _await_sleeping(seg: Segment, owner: int, pid: int) -> int:
    while not _bell(seg, owner) & 1:  # the child sets bit 0 just before it sleeps
        assert os.waitpid(pid, os.WNOHANG) == (0, 0), "the sleeper exited early"
    return _bell(seg, owner)


def _woken(fd: int) -> bytes:
    ready, _, _ = select.select([fd], [], [], HANG_GUARD_S)
    assert ready, "the sleeping owner was not woken"
    return os.read(fd, 1)


@pytest.mark.parametrize("via", ["publish", "ring"])
def test_other_process_wakes_sleeping_owner(segs, via: str) -> None:
    a, b = segs
    r, w = os.pipe()
    pid = fork_call(_sleeper, a, b, 2, 2, 4, w)
    try:
        before = _await_sleeping(a, 2, pid)
        _publish(b, 0, bells=a)  # shard 0 is owner 0's: owner 2 is left alone
        assert _bell(a, 2) == before
        if via == "publish":
            _publish(b, 3, bells=a)  # into the other segment, ringing a's bells
        else:
            a.ring(2)
        assert _woken(r) == b"0"  # it slept and was woken (the records wait for its pass)
        _, status = os.waitpid(pid, 0)
        pid = 0
        assert status == 0
        assert _bell(a, 2) & 1 == 0
    finally:
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(r)
        os.close(w)
