"""Arena pages are committed a step at a time (csrc/arena.c arena_commit, MADV_POPULATE_WRITE):
when the file cannot give the arena a page (here the segment file is cut short under its
shard's arena, which is what a full /dev/shm does to a sparse file), the shard refuses samples
with a clear message instead of its owner dying of SIGBUS at the first touch. A real process
does the writing, so a SIGBUS would show as its death. Marked native (ASan/UBSan run too)."""

from __future__ import annotations

import os
import random

import pytest
from forking import fork_call

from m3shm._native import ffi, lib
from m3shm.shm import Segment, SegParams, make_record

pytestmark = pytest.mark.native

ARENA = 8 << 20
STEP = 1 << 20  # csrc/seg_int.h ARENA_COMMIT_STEP


def _record(i: int) -> bytes:
    return make_record({"__name__": "m", "instance": f"host-{i:06d}"}, [1000], [1.0], 1)


def _fill(seg: Segment, fd: int) -> None:
    """New series until the shard refuses one; report how many and the code."""
    for i in range(100_000):
        rec = _record(i)
        rc = lib.m3_shard_apply(seg.base, ffi.cast("const m3_rec *", ffi.from_buffer(rec)))
        if rc:
            break
    os.write(fd, f"{i} {rc}".encode())


def test_full_dev_shm_refuses_samples_instead_of_sigbus() -> None:
    path = f"/dev/shm/m3shm-test-{os.getpid()}-{random.getrandbits(32):08x}"
    seg = Segment.create(path, SegParams(num_shards=1, num_producers=1, lane_bytes=1 << 16,
                                         series_per_shard=50_000, arena_bytes=ARENA,
                                         block_ms=3600_000))
    try:
        # the arena ends the file: leave it one commit step and a page of the next
        os.truncate(path, os.path.getsize(path) - ARENA + STEP + 4096)
        r, w = os.pipe()
        pid = fork_call(_fill, seg, w)
        _, status = os.waitpid(pid, 0)
        assert not os.WIFSIGNALED(status), f"owner died of signal {os.WTERMSIG(status)}"
        assert os.WEXITSTATUS(status) == 0
        n, rc = map(int, os.read(r, 64).split())
        os.close(r)
        os.close(w)
        assert rc == lib.M3_ENOSPC
        assert 1000 < n < STEP * 2 // 64  # the first step was used, the cut-off one never
        batch = bytearray(_record(n + 1))
        length, rejected, _, msg = seg.admit(batch, len(batch))
        assert (length, rejected) == (0, 1)
        assert "/dev/shm is full" in msg, msg
        # series already stored take samples in their chunks as before
        rec = make_record({"__name__": "m", "instance": "host-000000"}, [2000], [2.0], 1)
        assert lib.m3_shard_apply(seg.base, ffi.cast("const m3_rec *",
                                                     ffi.from_buffer(rec))) == 0
    finally:
        seg.unlink()
