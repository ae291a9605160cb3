"""The block stream: proto round trips, framing, and the engine reading through it."""

from __future__ import annotations

import numpy as np
import pytest

from m3shm.proto import blockstream_pb2 as pb
from m3shm.query.blocks import decode_series
from m3shm.query.blockstream import (
    StreamStorage,
    collect,
    frames,
    read_delimited,
    serve,
    write_delimited,
)
from m3shm.query.engine import Engine
from m3shm.query.errors import QueryError
from m3shm.query.matchers import Matcher
from m3shm.query.storage import Encoding, MemoryStore, SelectResult


def _store(encoding: Encoding = Encoding.TSZ) -> MemoryStore:
    store = MemoryStore(block_ms=3_600_000, encoding=encoding)
    ts = np.arange(0, 4 * 3_600_000, 15_000, dtype=np.int64)
    for i in range(20):
        store.add({"__name__": "x", "i": str(i), "job": "a" if i % 2 else "b"}, ts,
                  np.cumsum(np.full(len(ts), float(i + 1))))
    return store


@pytest.mark.parametrize("encoding", [Encoding.TSZ, Encoding.RAW])
def test_engine_through_stream_matches_direct(encoding: Encoding) -> None:
    store = _store(encoding)
    remote = StreamStorage(lambda req: serve(store, req))
    for q in ['sum by (job) (rate(x[5m]))', 'x{i=~"1.*"}', 'topk(3, x)']:
        a = Engine(store).range(q, 3_600_000, 10_800_000, 60_000)
        b = Engine(remote).range(q, 3_600_000, 10_800_000, 60_000)
        assert [s.labels for s in a.matrix] == [s.labels for s in b.matrix]
        for sa, sb in zip(a.matrix, b.matrix, strict=True):
            assert np.array_equal(sa.ts, sb.ts) and np.array_equal(sa.values, sb.values)


def test_select_decodes_only_needed_blocks() -> None:
    store = _store()
    res = store.select([Matcher("i", "=", "3")], 3_700_000, 3_800_000)
    assert len(res.series) == 1 and len(res.series[0].blocks) == 1
    flat = decode_series(res.series, 3_700_000, 3_800_000)
    assert flat.ts[0] >= 3_700_000 and flat.ts[-1] <= 3_800_000


def test_frames_carry_partial_and_warnings() -> None:
    store = _store()
    res = store.select([Matcher("__name__", "=", "x")], 0, 10**9)
    res.partial, res.warnings = True, ["region eu did not answer"]
    fs = list(frames(res, series_per_frame=6))
    assert len(fs) == 4 and fs[-1].last and not fs[0].last
    back = collect(pb.SelectFrame.FromString(b) for b in
                   read_delimited(b"".join(write_delimited(f) for f in fs)))
    assert back.partial and back.warnings == ["region eu did not answer"]
    assert [s.labels for s in back.series] == [s.labels for s in res.series]


def test_missing_last_frame_is_partial() -> None:
    res = SelectResult([])
    fs = list(frames(_store().select([Matcher("i", "=~", "1|2")], 0, 10**9), 1))[:-1]
    res = collect(fs)
    assert res.partial and len(res.series) == 1


def test_error_frame_raises() -> None:
    frame = pb.SelectFrame(error="too many series", last=True)
    with pytest.raises(QueryError, match="too many series"):
        collect([frame])


@pytest.mark.parametrize("data", [b"\x80", b"\x05abc", b"\xff" * 11])
def test_bad_framing_is_an_error(data: bytes) -> None:
    with pytest.raises(QueryError):
        list(read_delimited(data))
