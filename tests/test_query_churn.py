"""Queries while series expire and their slots are reused (shm layout v2: slot gen + 1).

Every series written here carries its identity in its values (label ``id`` = every value), and
its samples lie in the block of the round that wrote it. A round writes fresh series, then the
owner seals and releases the round's block and expires its series, so the next round's series
land in the same slots with the next generation. A query must never return one series' samples
under another's labels, must not list expired series, and must find the new ones.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal

import numpy as np
import pytest

from m3shm._native import ffi, lib
from m3shm.query.blocks import decode_result
from m3shm.query.context import QueryContext
from m3shm.query.local import LocalStorage, ShmSource
from m3shm.query.matchers import Matcher
from m3shm.shm import Segment, SegParams, make_record
from m3shm.storage.shm_index import ShmIndex

pytestmark = pytest.mark.native

SHARDS = 4
BLOCK_MS = 10_000
PER_ROUND = 40
CHURN = [Matcher("__name__", "=", "churn")]


def new_segment() -> Segment:
    path = f"/dev/shm/m3shm-test-churn-{os.getpid()}-{random.getrandbits(32):08x}"
    return Segment.create(path, SegParams(num_shards=SHARDS, num_producers=1,
                                          lane_bytes=1 << 16, series_per_shard=64,
                                          arena_bytes=4 << 20, block_ms=BLOCK_MS))


def write_round(seg: Segment, r: int, n_samples: int = 30) -> None:
    """Series r*PER_ROUND .. +PER_ROUND-1, samples in block r, value = id."""
    for k in range(PER_ROUND):
        sid = r * PER_ROUND + k
        ts = [r * BLOCK_MS + 1 + j * (BLOCK_MS // (n_samples + 1)) for j in range(n_samples)]
        rec = make_record({"__name__": "churn", "id": str(sid), "host": f"h{sid % 7}"}, ts,
                          [float(sid)] * n_samples, SHARDS)
        buf = ffi.from_buffer(rec)
        assert lib.m3_shard_apply(seg.base, ffi.cast("const m3_rec *", buf)) == 0


def retire_round(seg: Segment, r: int) -> int:
    """Owner: flush-like release of block r, then expire its (now empty) series."""
    removed = 0
    for shard in range(SHARDS):
        seg.seal(shard, r * BLOCK_MS)
        seg.release(shard, r * BLOCK_MS)
        removed += seg.expire_series(shard, (r + 1) * BLOCK_MS)
        seg.reclaim(shard)
    return removed


def check_result(index: ShmIndex, mint: int = 0, maxt: int = 1 << 40) -> set[int]:
    """Query every churn series; each must hold only its own samples. Returns the ids."""
    st = LocalStorage([ShmSource(index)], QueryContext())
    flat = decode_result(st.select(CHURN, mint, maxt), mint, maxt)
    ids = set()
    for i, lb in enumerate(flat.labels):
        sid = int(dict(lb)["id"])
        a, b = flat.offsets[i], flat.offsets[i + 1]
        vals, ts = flat.vals[a:b], flat.ts[a:b]
        assert np.all(vals == sid), f"series id={sid} returned values of {set(vals.tolist())}"
        r = sid // PER_ROUND
        assert np.all((ts >= r * BLOCK_MS) & (ts < (r + 1) * BLOCK_MS)), (sid, ts)
        ids.add(sid)
    return ids


def live_ids(seg: Segment) -> set[int]:
    from m3shm.shm import parse_labels

    return {int(parse_labels(info.labels)["id"]) for s in range(SHARDS)
            for info in seg.live_series(s)}


def test_reused_slot_is_not_read_as_its_old_series():
    seg = new_segment()
    try:
        index = ShmIndex(seg)
        write_round(seg, 0)
        assert check_result(index) == set(range(PER_ROUND))
        assert retire_round(seg, 0) == PER_ROUND
        write_round(seg, 1)  # every slot of round 0 is reused with the next generation
        gens = [info.gen for s in range(SHARDS) for info in seg.live_series(s)]
        assert max(gens) == 2  # slots did change hands
        got = check_result(index)
        assert got == set(range(PER_ROUND, 2 * PER_ROUND))
        assert len(index) == PER_ROUND and index.dead == PER_ROUND
        st = LocalStorage([ShmSource(index)], QueryContext())
        assert {dict(lb)["id"] for lb in st.series([CHURN], None, None)} == \
            {str(i) for i in range(PER_ROUND, 2 * PER_ROUND)}
        assert st.label_values("id", None, None, None) == \
            sorted(str(i) for i in range(PER_ROUND, 2 * PER_ROUND))
    finally:
        seg.unlink()


def test_selection_taken_before_reuse_reads_nothing_of_the_new_series():
    seg = new_segment()
    try:
        index = ShmIndex(seg)
        write_round(seg, 0)
        index.refresh()
        sel = index.select(CHURN)  # taken, then the slots change hands before it is read
        retire_round(seg, 0)
        write_round(seg, 1)
        for shard, _pos, slots, gens in sel.by_shard():
            chunks, samples = index.extent(shard, slots, gens, 0, 1 << 40)
            assert not chunks.any() and not samples.any()
            ch = index.chunks(shard, slots, gens, 0, 1 << 40)
            assert len(ch.refs) == 0
    finally:
        seg.unlink()


def test_many_rounds_rebuild_the_index():
    seg = new_segment()
    try:
        index = ShmIndex(seg)
        for r in range(40):
            write_round(seg, r, n_samples=3)
            assert check_result(index) == set(range(r * PER_ROUND, (r + 1) * PER_ROUND))
            retire_round(seg, r)
        # dead ids were dropped by rebuilds, not kept for ever
        assert index.dead <= max(4096, len(index))
        assert check_result(index) == set()
    finally:
        seg.unlink()


def test_queries_while_another_process_churns():
    """The owner (a forked process) churns series as fast as it can; the queries here must
    stay exact all along, and see exactly the survivors at the end."""
    seg = new_segment()
    rounds = 150
    # Pacing: after writing each round the owner waits for one query to have finished before
    # it retires the round and writes the next (on an idle machine it would otherwise finish
    # all 150 rounds before the queries saw two); the retire and the next write then run
    # while the following query does.
    paced_r, paced_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the owner
        code = 1
        try:
            os.close(paced_w)
            for r in range(rounds):
                write_round(seg, r, n_samples=5)
                os.read(paced_r, 1)  # a query has finished since: retire r under the next one
                if r < rounds - 1:
                    retire_round(seg, r)
            code = 0
        finally:
            os._exit(code)
    os.close(paced_r)
    try:
        index = ShmIndex(seg)
        queries = 0
        seen: set[int] = set()
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            seen |= check_result(index)
            queries += 1
            if done:
                break
            with contextlib.suppress(BrokenPipeError):
                os.write(paced_w, b"q")
        pid = 0
        assert os.waitstatus_to_exitcode(status) == 0
        last = set(range((rounds - 1) * PER_ROUND, rounds * PER_ROUND))
        assert live_ids(seg) == last
        assert check_result(index) == last
        assert queries > 3 and len(seen) > 2 * PER_ROUND  # the queries did overlap the churn
    finally:
        os.close(paced_w)
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        seg.unlink()
