"""The fileset fixtures of every version (tests/fixtures/fileset_v<N>/, written once by
tests/fixtures/make_fileset_v<N>.py) stay readable: every series read back bit for bit through
the fileset reader (iteration and bloom -> summaries -> index -> data lookups), its reverse
index, and a daemon started on a data directory holding it."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from test_daemon_harness import Daemon

from m3shm import codec
from m3shm.shm import canonical_labels, labels_hash
from m3shm.storage.fileset import Fileset, FilesetId, list_filesets
from m3shm.storage.flushed import FlushedStore

FIX = Path(__file__).resolve().parent / "fixtures"
VERSIONS = (1, 2, 3, 4)


def doc(version: int) -> dict:
    d = json.loads((FIX / f"fileset_v{version}.json").read_text())
    assert d["version"] == version
    return d


def fixture_id(version: int) -> FilesetId:
    d = doc(version)
    return FilesetId(d["namespace"], d["shard"], d["block_start"], d["volume"])


def expected(version: int) -> dict[bytes, tuple[list[int], list[int]]]:
    """{canonical labels: (timestamps, value bit patterns)}"""
    return {canonical_labels(s["labels"]): (
        s["timestamps"], [struct.unpack(">Q", bytes.fromhex(h))[0] for h in s["values_hex"]])
        for s in doc(version)["series"]}


def bits(vs: np.ndarray) -> list[int]:
    return np.asarray(vs, dtype=np.float64).view(np.uint64).tolist()


@pytest.mark.parametrize("version", VERSIONS)
def test_fixture_reads_back_exactly(version: int) -> None:
    root = FIX / f"fileset_v{version}"
    DOC, FID = doc(version), fixture_id(version)
    assert list_filesets(root) == [FID]
    want = expected(version)
    with Fileset(root, FID) as fs:
        assert fs.version == version
        fs.verify()
        assert fs.info.block_start == DOC["block_start"]
        assert fs.info.block_size == DOC["block_size"] and fs.info.volume == FID.volume
        assert fs.info.num_series == len(want)
        got = {}
        for sid, h, block in fs:
            assert h == labels_hash(sid)
            ts, vs = codec.decode(block)
            got[sid] = (ts.tolist(), bits(vs))
        assert got == want
        for sid, (ts, vb) in want.items():  # point lookups through the bloom filter
            block = fs.get(sid, labels_hash(sid))
            assert block is not None, sid
            t2, v2 = codec.decode(block)
            assert (t2.tolist(), bits(v2)) == (ts, vb)
        missing = canonical_labels({"__name__": "absent"})
        assert fs.get(missing, labels_hash(missing)) is None
    store = FlushedStore(root)
    try:
        ids = [sid for sid, _h, _b in store.open(FID)]
        with store.reverse_index(FID) as ri:
            hosts = ri.select([("__name__", "=", "up"), ("instance", "=~", "host-1.*")])
            assert sorted(hosts.tolist()) == [
                i for i, sid in enumerate(ids)
                if b"host-1" in sid and sid.startswith(b"\x08\x00__name__\x02\x00up")]
            assert len(hosts) == 10
            odd = ri.select([("unit", "=", "µs")])
            assert [ids[i] for i in odd.tolist()] == [canonical_labels(
                {"__name__": "odd", "unit": "µs", "le": "+Inf"})]
    finally:
        store.close()


@pytest.mark.parametrize("version", VERSIONS)
def test_daemon_reads_fixture(tmp_path, version: int) -> None:
    d = Daemon(tmp_path, extra="""
namespaces:
  - {name: default, retention: 10y, blockSize: 2h}
""")
    shutil.copytree(FIX / f"fileset_v{version}", d.data / "filesets")
    d.start()
    try:
        rows = d.export('{__name__=~".+"}', start="0")
        got = {canonical_labels(r["metric"]): r for r in rows}
        want = expected(version)
        assert got.keys() == want.keys()
        for sid, (ts, vb) in want.items():  # export is JSON text: compare values, not bits
            assert got[sid]["timestamps"] == ts
            vs = np.array(vb, dtype=np.uint64).view(np.float64)
            assert np.array_equal(np.array(got[sid]["values"], dtype=np.float64), vs,
                                  equal_nan=True), sid
    finally:
        assert d.stop() == 0
