"""SIGKILL of a shard's owner at random points while it ingests, seals, encodes, "persists",
releases and expires (so also mid-release and mid-flush), with a reader process decoding every
series all along: after recovery and a finishing flush, every acknowledged sample is in the
persisted blocks or still in memory, and the reader never crashed nor saw a wrong value."""

from __future__ import annotations

import os
import pickle
import random
import signal
import time

import pytest
from forking import fork_call

from m3shm import codec
from m3shm.shm import WARM, Segment, SegParams, make_record, parse_labels

pytestmark = pytest.mark.native

BLOCK = 100_000
WINDOW, CHURN, PER = 60, 20, 50


def value(i: int, t: int) -> float:
    return float(t + i * (1 << 32))


def flush_block(seg: Segment, bs: int, kind: int, out_dir: str) -> None:
    """Seal, encode, persist (atomic rename), release: what the flush side does."""
    seg.seal(0, bs, kind)
    got: dict[int, list[tuple[int, float]]] = {}
    for part in seg.encode_block(0, bs, kind, buf_bytes=8192, max_entries=8):
        for e in part.entries:
            name = parse_labels(bytes(part.data[e["labels_off"]:e["labels_off"]
                                                + e["labels_len"]]))["__name__"]
            ts, vs = codec.decode(part.data[e["data_off"]:e["data_off"] + e["data_len"]])
            got[int(name[1:])] = list(zip(ts.tolist(), vs.tolist(), strict=True))
    path = os.path.join(out_dir, f"{bs}-{kind}-{time.monotonic_ns()}.pkl")
    with open(path + ".tmp", "wb") as f:
        pickle.dump(got, f)
    os.replace(path + ".tmp", path)
    seg.release(0, bs, kind)


def owner(path: str, out_dir: str, ack_fd: int) -> None:
    seg = Segment.open(path)
    for k in range(10_000):
        bs = k * BLOCK
        ids = range(k * CHURN, k * CHURN + WINDOW)
        ts = [bs + 100 * j for j in range(PER)]
        batch = b"".join(make_record({"__name__": f"s{i}"}, ts, [value(i, t) for t in ts], 1)
                         for i in ids)
        seg.apply_batch(batch, 1, 0, 1)
        os.write(ack_fd, b"%d\n" % k)   # acknowledged once applied
        if k:
            flush_block(seg, bs - BLOCK, WARM, out_dir)
            seg.expire_series(0, bs)


def reader(path: str) -> None:
    seg = Segment.open(path)
    stop = False

    def on_term(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    while not stop:
        with seg.reading():
            for info in seg.live_series(0):
                i = int(parse_labels(info.labels)["__name__"][1:])
                ts, vs = seg.read_series(0, info.slot, 0, 1 << 62)
                for t, v in zip(ts.tolist(), vs.tolist(), strict=True):
                    if v != value(i, t):
                        os._exit(3)


@pytest.mark.parametrize("trial", range(4))
def test_owner_killed_mid_flush_loses_nothing(tmp_path, trial):
    path = f"/dev/shm/m3shm-test-{os.getpid()}-{random.getrandbits(32):08x}"
    seg = Segment.create(path, SegParams(num_shards=1, num_producers=1, lane_bytes=1 << 16,
                                         series_per_shard=512, arena_bytes=1 << 20,
                                         block_ms=BLOCK))
    try:
        out = str(tmp_path)
        rd = fork_call(reader, path)
        r, w = os.pipe()  # after forking the reader, which must not hold the write end
        own = fork_call(owner, path, out, w)
        os.close(w)
        time.sleep(random.Random(trial).uniform(0.3, 1.2))
        os.kill(own, signal.SIGKILL)
        os.waitpid(own, 0)
        acked = _acked(r)
        assert acked, "the owner acknowledged nothing before the kill"
        # a new owner: recover, then flush everything that is left
        seg.recover_shard(0)
        for b in seg.blocks(0):
            flush_block(seg, b["block_start"], b["kind"], out)
        assert seg.blocks(0) == []
        os.kill(rd, signal.SIGTERM)
        _, status = os.waitpid(rd, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
        stored: dict[int, set] = {}
        for name in os.listdir(out):
            if name.endswith(".pkl"):
                with open(os.path.join(out, name), "rb") as f:
                    for i, pairs in pickle.load(f).items():
                        stored.setdefault(i, set()).update(pairs)
        for k in acked:
            bs = k * BLOCK
            for i in range(k * CHURN, k * CHURN + WINDOW):
                want = {(bs + 100 * j, value(i, bs + 100 * j)) for j in range(PER)}
                assert want <= stored.get(i, set()), (k, i)
        st = seg.shard_stats(0)
        assert st["dropped"] == 0 and st["chunks_released"] > 0
    finally:
        seg.unlink()


def _acked(fd: int) -> list[int]:
    data = b""
    while chunk := os.read(fd, 65536):
        data += chunk
    os.close(fd)
    return [int(line) for line in data.split(b"\n") if line]
