"""Lane records from rows (csrc/rec_build.c, m3shm/storage/records.py): byte-identical to the
reference builder (m3shm.shm.make_record, the remote-write record layout), runs of a series
split at M3_REC_MAX_SAMPLES, bad input refused with nothing written, and a built batch applied
to a real segment reads back every point."""

from __future__ import annotations

import os
import random
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from m3shm._native import ffi, lib
from m3shm.errors import InvalidArgumentError
from m3shm.shm import REC_HEADER, Segment, SegParams, canonical_labels, make_record
from m3shm.storage.records import SAMPLES, LabelTable, build_records

pytestmark = pytest.mark.native

MAX = lib.M3_REC_MAX_SAMPLES


def reference(sets: list[dict], series, ts, vs, nshards: int) -> bytes:
    """What make_record gives for each run of consecutive rows (split every MAX)."""
    out, i = [], 0
    while i < len(series):
        j = i
        while j < len(series) and series[j] == series[i]:
            j += 1
        for k in range(i, j, MAX):
            e = min(j, k + MAX)
            out.append(make_record(sets[series[i]], [int(x) for x in ts[k:e]],
                                   [float(x) for x in vs[k:e]], nshards))
        i = j
    return b"".join(out)


labels_st = st.dictionaries(st.sampled_from(["__name__", "job", "instance", "a", "le"]),
                            st.text("abcxyz09_.", min_size=1, max_size=6), min_size=1,
                            max_size=4)


@settings(max_examples=60, deadline=None)
@given(sets=st.lists(labels_st, min_size=1, max_size=5), data=st.data(),
       nshards=st.integers(1, 64))
def test_matches_reference(sets, data, nshards):
    idx = data.draw(st.lists(st.integers(0, len(sets) - 1), max_size=40))
    ts = data.draw(st.lists(st.integers(-2**40, 2**40), min_size=len(idx), max_size=len(idx)))
    vs = [float(x) for x in range(len(idx))]
    table = LabelTable(canonical_labels(s) for s in sets)
    batch, length, n = build_records(table, idx, ts, vs, nshards)
    want = reference(sets, idx, ts, vs, nshards)
    assert bytes(batch[:length]) == want
    assert n == sum(1 for _ in iter_records(want))


def iter_records(buf: bytes):
    off = 0
    while off < len(buf):
        f = REC_HEADER.unpack_from(buf, off)
        yield f
        off += f[0]


def test_long_runs_split_and_type():
    table = LabelTable([canonical_labels({"__name__": "x"}), canonical_labels({"__name__": "y"})])
    rows = [0] * (2 * MAX + 3) + [1] * 5 + [0] * 2
    ts = np.arange(len(rows), dtype=np.int64) * 1000
    batch, length, n = build_records(table, rows, ts, ts.astype(float), 16, rec_type=7)
    recs = list(iter_records(bytes(batch[:length])))
    assert [r[7] for r in recs] == [MAX, MAX, 3, 5, 2] and n == 5
    assert {r[1] for r in recs} == {7}  # the type argument is written as given
    assert build_records(table, [], [], [], 16) == (bytearray(), 0, 0)


@pytest.mark.parametrize("canon", [
    b"",                                                        # empty label set
    canonical_labels({"b": "1"}) + canonical_labels({"a": "1"}),  # not sorted
    canonical_labels({"a": "1"}) + canonical_labels({"a": "2"}),  # duplicate name
    struct.pack("<H", 1) + b"a" + struct.pack("<H", 0),          # empty value
    struct.pack("<H", 5) + b"a",                                  # runs past its end
])
def test_bad_labels_refused(canon):
    table = LabelTable([canon])
    with pytest.raises(InvalidArgumentError):
        build_records(table, [0], [1], [1.0], 4)


def test_bad_arguments_refused():
    table = LabelTable([canonical_labels({"__name__": "x"})])
    with pytest.raises(InvalidArgumentError):
        build_records(table, [1], [1], [1.0], 4)           # index out of range
    with pytest.raises(InvalidArgumentError):
        build_records(table, [0], [1], [1.0], 0)           # no shards
    with pytest.raises(InvalidArgumentError):
        build_records(table, [0], [1], [1.0], 4, rec_type=lib.M3_REC_PAD)
    with pytest.raises(ValueError):
        build_records(table, [0, 0], [1], [1.0], 4)        # rows of unequal length
    # a short buffer: ENOSPC with the size needed, nothing written
    out = bytearray(b"\xee" * 64)
    used, nrec = ffi.new("size_t *"), ffi.new("uint32_t *")
    s = np.zeros(1, np.uint32)
    t = np.ones(1, np.int64)
    v = np.ones(1, np.float64)
    rc = lib.m3_rec_build(SAMPLES, 4, table.blob, len(table.blob),
                          ffi.cast("uint64_t *", ffi.from_buffer(table.offs)), 1,
                          ffi.cast("uint32_t *", ffi.from_buffer(s)),
                          ffi.cast("int64_t *", ffi.from_buffer(t)),
                          ffi.cast("double *", ffi.from_buffer(v)), 1, ffi.from_buffer(out),
                          len(out), used, nrec)
    assert rc == lib.M3_ENOSPC and used[0] == 48 + 16 + 16 and out == b"\xee" * 64


def test_applied_to_a_segment_reads_back():
    nshards = 4
    path = f"/dev/shm/m3shm-test-{os.getpid()}-{random.getrandbits(32):08x}"
    seg = Segment.create(path, SegParams(num_shards=nshards, num_producers=1,
                                         lane_bytes=1 << 16, series_per_shard=256,
                                         arena_bytes=1 << 20, block_ms=3_600_000, ns_id=1))
    try:
        sets = [{"__name__": "m", "i": str(i)} for i in range(30)]
        table = LabelTable(canonical_labels(s) for s in sets)
        rng = np.random.default_rng(1)
        series = np.repeat(np.arange(30), 20)
        ts = np.tile(np.arange(1, 21) * 60_000, 30)
        vs = rng.normal(size=len(series))
        batch, length, _ = build_records(table, series, ts, vs, nshards)
        assert seg.apply_batch(memoryview(batch)[:length], 1, 0, nshards) == 30
        got = {}
        for s in range(nshards):
            for info in seg.live_series(s):
                t, v = seg.read_series(s, info.slot, 0, 1 << 62)
                got[info.labels] = (t.tolist(), v.tolist())
        for i, s in enumerate(sets):
            assert got[canonical_labels(s)] == (ts[i * 20:(i + 1) * 20].tolist(),
                                                vs[i * 20:(i + 1) * 20].tolist())
    finally:
        seg.unlink()
