"""The lane protocol (csrc/lane.c) and the owner's apply path (csrc/series.c), exercised by
real processes: several forked producers x threads, a consumer checking that every published
record arrives exactly once and in per-producer order, producers and owners killed with
SIGKILL mid-write and restarted. Marked native: `make test` runs them again under ASan/UBSan.
"""

from __future__ import annotations

import os
import random
import signal
import struct
import threading
import time

import pytest
from forking import fork_call

from m3shm.shm import REC_HEADER, Segment, SegParams, make_record, parse_labels

pytestmark = pytest.mark.native

SHARDS = 4


@pytest.fixture
def seg(tmp_path):
    path = f"/dev/shm/m3shm-test-{os.getpid()}-{random.getrandbits(32):08x}"
    s = Segment.create(path, SegParams(num_shards=SHARDS, num_producers=3, lane_bytes=1 << 16,
                                       series_per_shard=256, arena_bytes=4 << 20,
                                       block_ms=3600_000))
    yield s
    s.unlink()


def _batch(producer: int, inc: int, thread: int, counter: int, nrec: int) -> bytes:
    """nrec records; sample values carry (counter + k) so the consumer can check order."""
    out = []
    for k in range(nrec):
        c = counter + k
        labels = {"__name__": f"p{producer}", "inc": str(inc), "t": str(thread)}
        out.append(make_record(labels, [1000 + c], [float(c)], SHARDS, shard=c % SHARDS))
    return b"".join(out)


def _producer(seg: Segment, producer: int, inc: int, threads: int, batches: int,
              stall_after: int | None = None, stall_fd: int = -1) -> None:
    """Child process body. With stall_after, reserve one more batch, never publish it, say so
    on stall_fd and wait to be killed."""
    seg.recover_producer(producer)
    lock = threading.Lock()

    def run(t: int) -> None:
        counter = 0
        for b in range(batches):
            nrec = 1 + (b % 5)
            data = _batch(producer, inc, t, counter, nrec)
            while True:
                with lock:
                    if seg.reserve(producer, data, seg.next_seq()):
                        seg.publish(producer)
                        break
                time.sleep(0.0002)
            counter += nrec
            if stall_after is not None and b + 1 == stall_after:
                with lock:
                    while not seg.reserve(producer, _batch(producer, inc, t, counter, 3), 1):
                        time.sleep(0.0002)
                    os.write(stall_fd, b"x")  # reserved, never published
                    while True:
                        time.sleep(1)

    ths = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
    for th in ths:
        th.start()
    for th in ths:
        th.join()


def _decode(rec: bytes) -> tuple[tuple[int, int, int], int]:
    f = REC_HEADER.unpack_from(rec)
    labels_len, n = f[8], f[7]
    lab = parse_labels(rec[48 : 48 + labels_len])
    off = 48 + labels_len + (-labels_len) % 8
    (v,) = struct.unpack_from("<d", rec, off + 8 * n)
    return (int(lab["__name__"][1:]), int(lab["inc"]), int(lab["t"])), int(v)


def _consume(seg: Segment, seen: dict, pids: set[int], stop_when_idle: bool = True) -> None:
    """Pop every lane until all pids have exited and the lanes are empty."""
    while True:
        got = 0
        for s in range(SHARDS):
            for p in range(3):
                while (rec := seg.pop(s, p)) is not None:
                    key, c = _decode(rec)
                    seen.setdefault(key, []).append(c)
                    got += 1
        for pid in list(pids):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                assert not (os.WIFEXITED(status) and os.WEXITSTATUS(status)), "producer failed"
                pids.discard(pid)
        if not got and not pids:
            return
        if not got:
            time.sleep(0.001)


def _check_exactly_once(seen: dict) -> None:
    for key, cs in seen.items():
        # per (producer, incarnation, thread): counters 0..n-1 exactly once. Records of one
        # thread go to different shards, so order is checked per shard lane below.
        assert sorted(cs) == list(range(len(cs))), f"{key}: gaps or duplicates"


def test_lane_exactly_once_multi_process(seg):
    pids = {fork_call(_producer, seg, p, 0, 2, 400) for p in range(3)}
    seen: dict = {}
    _consume(seg, seen, pids)
    assert len(seen) == 6
    for cs in seen.values():
        assert len(cs) == sum(1 + (b % 5) for b in range(400))
    _check_exactly_once(seen)


def test_lane_per_producer_order(seg):
    pids = {fork_call(_producer, seg, 1, 0, 1, 300)}
    order: dict = {}
    while pids or any(seg.backlog(s) for s in range(SHARDS)):
        for s in range(SHARDS):
            while (rec := seg.pop(s, 1)) is not None:
                key, c = _decode(rec)
                order.setdefault((key, s), []).append(c)
        for pid in list(pids):
            if os.waitpid(pid, os.WNOHANG)[0]:
                pids.discard(pid)
    for (_key, _s), cs in order.items():
        assert cs == sorted(cs), "a lane delivered records out of producer order"


def test_lane_killed_producer_half_written_record_is_skipped(seg):
    # incarnation 0 reserves a batch it never publishes, then is killed
    rfd, wfd = os.pipe()
    pid = fork_call(_producer, seg, 2, 0, 1, 50, 30, wfd)
    assert os.read(rfd, 1) == b"x"  # the unpublished reservation is in place
    os.close(rfd)
    os.close(wfd)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    # incarnation 1 recovers its lanes and produces normally
    pids = {fork_call(_producer, seg, 2, 1, 1, 100)}
    seen: dict = {}
    _consume(seg, seen, pids)
    inc0 = seen[(2, 0, 0)]
    assert sorted(inc0) == list(range(sum(1 + (b % 5) for b in range(30))))
    _check_exactly_once(seen)
    assert len(seen[(2, 1, 0)]) == sum(1 + (b % 5) for b in range(100))


def test_lane_random_sigkill_of_producers(seg):
    rng = random.Random(7)
    seen: dict = {}
    for trial in range(5):
        pids = {fork_call(_producer, seg, p, trial, 2, 100_000) for p in range(3)}
        deadline = time.monotonic() + rng.uniform(0.05, 0.3)
        while time.monotonic() < deadline:
            for s in range(SHARDS):
                for p in range(3):
                    while (rec := seg.pop(s, p)) is not None:
                        key, c = _decode(rec)
                        seen.setdefault(key, []).append(c)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    # final incarnation recovers and finishes cleanly; drain everything
    pids = {fork_call(_producer, seg, p, 99, 1, 20) for p in range(3)}
    _consume(seg, seen, pids)
    _check_exactly_once(seen)
    assert sum(len(v) for v in seen.values()) > 0


# -- the owner's apply path -------------------------------------------------------------------

def _series_producer(seg: Segment, producer: int, nseries: int, points: int) -> None:
    seg.recover_producer(producer)
    for i in range(points):
        recs = []
        for s in range(nseries):
            labels = {"__name__": "m", "p": str(producer), "s": str(s)}
            # every point is sent twice (a resend), the second time with the same value
            ts = [1_000_000 + i * 1000, 1_000_000 + i * 1000]
            recs.append(make_record(labels, ts[:1], [float(i * 7 + s)], SHARDS))
        data = b"".join(recs)
        for _ in range(2):
            while not seg.reserve(producer, data, seg.next_seq()):
                time.sleep(0.0005)
            seg.publish(producer)


def _owner(seg: Segment) -> None:
    for s in range(SHARDS):
        seg.recover_shard(s)
    while True:
        if not seg.drain_range(0, SHARDS, 64):
            time.sleep(0.0005)


def test_owner_killed_mid_apply_loses_nothing(seg):
    nseries, points = 20, 300
    prods = {fork_call(_series_producer, seg, p, nseries, points) for p in range(2)}
    rng = random.Random(3)
    owner = fork_call(_owner, seg)
    kills = 0
    while prods or kills < 6:
        time.sleep(rng.uniform(0.005, 0.05))
        os.kill(owner, signal.SIGKILL)
        os.waitpid(owner, 0)
        kills += 1
        owner = fork_call(_owner, seg)
        for pid in list(prods):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                assert os.WEXITSTATUS(status) == 0
                prods.discard(pid)
    deadline = time.monotonic() + 30
    while any(seg.backlog(s) for s in range(SHARDS)):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(owner, signal.SIGKILL)
    os.waitpid(owner, 0)
    assert kills >= 6
    found = 0
    for shard in range(SHARDS):
        assert seg.shard_stats(shard)["dropped"] == 0
        for slot in range(seg.nseries(shard)):
            lab = parse_labels(seg.series_labels(shard, slot))
            ts, vs = seg.read_series(shard, slot, 0, 1 << 62)
            s = int(lab["s"])
            assert ts.tolist() == [1_000_000 + i * 1000 for i in range(points)]
            assert vs.tolist() == [float(i * 7 + s) for i in range(points)]
            found += 1
    assert found == 2 * nseries


def test_out_of_order_and_overwrite(seg):
    labels = {"__name__": "ooo"}
    writes = [([10, 20, 30], [1.0, 2.0, 3.0]), ([15, 25], [1.5, 2.5]), ([20], [9.0]),
              ([20], [10.0]), ([5, 40], [0.5, 4.0]), ([30], [3.0])]
    seq = 1
    for ts, vs in writes:
        assert seg.reserve(0, make_record(labels, ts, vs, SHARDS), seq)
        seq += 1
    seg.publish(0)
    rec = make_record(labels, [1], [1.0], SHARDS)
    shard = REC_HEADER.unpack_from(rec)[3]
    while seg.drain(shard):
        pass
    ts, vs = seg.read_series(shard, 0, 0, 100)
    assert ts.tolist() == [5, 10, 15, 20, 25, 30, 40]
    assert vs.tolist() == [0.5, 1.0, 1.5, 10.0, 2.5, 3.0, 4.0]
    ts, vs = seg.read_series(shard, 0, 12, 26)
    assert ts.tolist() == [15, 20, 25]


def test_owner_applies_in_seq_order_across_producers(seg):
    """A batch drawn earlier but still unpublished (its commit-log write is slow) holds back
    later batches of other producers on the same shard, so the live apply order is the seq
    order replay uses: two workers writing one series and timestamp, the larger seq wins."""
    labels = {"__name__": "race"}
    rec0 = make_record(labels, [100], [1.0], SHARDS)
    rec1 = make_record(labels, [100], [2.0], SHARDS)
    shard = REC_HEADER.unpack_from(rec0)[3]
    s0 = seg.reserve_next(0, rec0)        # producer 0 draws first, publishes last
    s1 = seg.reserve_next(1, rec1)
    assert s0 is not None and s1 is not None and s0 < s1
    seg.publish(1)
    assert seg.drain(shard) == 0          # s1 waits for s0 although only s1 is visible
    other = make_record({"__name__": "other"}, [1], [1.0], SHARDS, shard=(shard + 1) % SHARDS)
    s2 = seg.reserve_next(1, other)
    seg.publish(1)
    assert seg.drain((shard + 1) % SHARDS) == 0  # any shard: s2 > s0 as well
    seg.publish(0)
    assert seg.drain(shard) == 2 and seg.drain((shard + 1) % SHARDS) == 1 and s2 > s1
    ts, vs = seg.read_series(shard, 0, 0, 1000)
    assert ts.tolist() == [100] and vs.tolist() == [2.0]


def test_restarted_producer_releases_what_it_held_back(seg):
    labels = {"__name__": "dead"}
    rec = make_record(labels, [5], [1.0], SHARDS)
    shard = REC_HEADER.unpack_from(rec)[3]
    assert seg.reserve_next(0, make_record(labels, [5], [9.0], SHARDS)) is not None
    assert seg.reserve_next(1, rec) is not None  # producer 0 "dies" before publishing
    seg.publish(1)
    assert seg.drain(shard) == 0
    seg.recover_producer(0)                      # its next incarnation drops the reservation
    assert seg.drain(shard) == 1
    assert seg.read_series(shard, 0, 0, 10)[1].tolist() == [1.0]


def test_lane_full_is_all_or_nothing(seg):
    big = b"".join(make_record({"__name__": "x", "i": str(i)}, list(range(400)),
                               [0.0] * 400, SHARDS, shard=0) for i in range(3))
    ok = 0
    while seg.reserve(0, big, 1):
        ok += 1
        assert ok < 100
    seg.publish(0)
    n = 0
    while seg.pop(0, 0, 1 << 17) is not None:
        n += 1
    assert n == 3 * ok


def test_segment_full_refuses_new_series_only(tmp_path):
    path = f"/dev/shm/m3shm-test-full-{os.getpid()}"
    seg = Segment.create(path, SegParams(num_shards=1, num_producers=1, lane_bytes=1 << 16,
                                         series_per_shard=4, arena_bytes=1 << 16))
    try:
        for i in range(4):
            seg.reserve(0, make_record({"__name__": "s", "i": str(i)}, [1], [1.0], 1), i)
        seg.publish(0)
        seg.drain(0)
        batch = bytearray(make_record({"__name__": "s", "i": "0"}, [2], [2.0], 1) +
                          make_record({"__name__": "s", "i": "new"}, [2], [2.0], 1))
        n, rej, rej_s, msg = seg.admit(batch, len(batch))
        assert rej == 1 and rej_s == 1 and n == len(batch) // 2 and n > 0
        assert "series_per_shard=4" in msg and 'i="new"' in msg
    finally:
        seg.unlink()
