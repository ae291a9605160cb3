"""The commit log (m3shm/storage/commitlog.py): round trip, group commit, torn and corrupt
tails cut with a warning naming the file and offset, replay merged by sequence number, and a
version-1 fixture that stays readable."""

from __future__ import annotations

import logging
import os
import struct
from pathlib import Path

import pytest

from m3shm.storage.commitlog import (
    FILE_HEADER,
    Batch,
    CommitLog,
    file_name,
    list_files,
    next_boot,
    read_file,
    replay,
)

FIXTURE = Path(__file__).parent / "fixtures" / "commitlog_v1.log"


def _batches(seqs, size=40):
    return [Batch(s, 1000 + s, 1, bytes([s % 251]) * size) for s in seqs]


@pytest.mark.parametrize("fsync", ["every_batch", "interval"])
def test_roundtrip_and_group_commit(tmp_path, fsync):
    cl = CommitLog(str(tmp_path), 1, 0, 0, fsync, 50)
    cl.append(_batches([1, 2, 3]))
    cl.append(_batches([7]))
    cl.close()
    got = list(read_file(cl.path))
    assert [(b.seq, b.arrival_ms, bytes(b.payload)) for b in got] == [
        (b.seq, b.arrival_ms, b.payload) for b in _batches([1, 2, 3, 7])]


def test_rotation(tmp_path):
    cl = CommitLog(str(tmp_path), 1, 0, 0, max_segment_bytes=200)
    for s in range(10):
        cl.append(_batches([s], 64))
    cl.close()
    files = list_files(str(tmp_path))
    assert len(files) > 3
    assert [b.seq for b in replay(str(tmp_path), 2)] == list(range(10))


def test_torn_tail_cut_with_warning(tmp_path, caplog):
    cl = CommitLog(str(tmp_path), 1, 0, 0)
    cl.append(_batches([1, 2]))
    cl.close()
    full = os.path.getsize(cl.path)
    with open(cl.path, "r+b") as f:
        f.truncate(full - 5)  # tear the second record
    with caplog.at_level(logging.WARNING):
        got = list(read_file(cl.path, repair=True))
    assert [b.seq for b in got] == [1]
    assert f"commit log {cl.path}: torn or corrupt tail at offset" in caplog.text
    assert os.path.getsize(cl.path) == FILE_HEADER.size + 32 + 40  # cut after record 1
    assert [b.seq for b in read_file(cl.path)] == [1]


def test_crc_mismatch_cut(tmp_path, caplog):
    cl = CommitLog(str(tmp_path), 1, 0, 0)
    cl.append(_batches([1, 2, 3]))
    cl.close()
    with open(cl.path, "r+b") as f:
        f.seek(FILE_HEADER.size + 72 + 32 + 3)  # a payload byte of record 2
        f.write(b"\xee")
    with caplog.at_level(logging.WARNING):
        assert [b.seq for b in read_file(cl.path)] == [1]
    assert "CRC mismatch" in caplog.text


def test_replay_merges_workers_by_seq_and_skips_current_boot(tmp_path):
    d = str(tmp_path)
    a = CommitLog(d, 1, 0, 0)
    b = CommitLog(d, 1, 1, 0)
    a2 = CommitLog(d, 2, 0, 0)
    a.append(_batches([1, 4, 5]))
    b.append(_batches([2, 3, 6]))
    a2.append(_batches([9]))
    for c in (a, b, a2):
        c.close()
    assert [x.seq for x in replay(d, 2)] == [1, 2, 3, 4, 5, 6]
    assert [x.seq for x in replay(d, 3)] == [1, 2, 3, 4, 5, 6, 9]
    assert next_boot(d) == 3
    assert os.path.basename(a.path) == file_name(1, 0, 0, 0)


def test_bad_magic_and_empty_files(tmp_path, caplog):
    p = tmp_path / file_name(1, 0, 0, 0)
    p.write_bytes(b"XXXX" + b"\0" * 40)
    q = tmp_path / file_name(1, 1, 0, 0)
    q.write_bytes(b"M3")
    with caplog.at_level(logging.WARNING):
        assert list(replay(str(tmp_path), 2, repair=True)) == []
    assert "bad magic" in caplog.text and "file header is incomplete" in caplog.text
    assert p.stat().st_size == 0


def test_version1_fixture_stays_readable():
    if not FIXTURE.exists():  # regenerate with: python tests/test_daemon_commitlog.py
        pytest.fail(f"missing fixture {FIXTURE}")
    got = list(read_file(str(FIXTURE)))
    assert [(b.seq, b.arrival_ms, b.nrecords) for b in got] == [(10, 1010, 1), (11, 1011, 1)]
    magic, version, worker, _, boot, _ = FILE_HEADER.unpack_from(FIXTURE.read_bytes())
    assert (magic, version, worker, boot) == (b"M3CL", 1, 3, 7)
    # the payload is a lane record: header fields of the shm format, version 1
    rec = bytes(got[0].payload)
    length, rtype, vtype = struct.unpack_from("<IHH", rec)
    assert (length, rtype, vtype) == (len(rec), 2, 1)


def _make_fixture() -> None:
    from m3shm.shm import make_record

    tmp = FIXTURE.parent / "_cl"
    tmp.mkdir(exist_ok=True)
    cl = CommitLog(str(tmp), 7, 3, 0)
    for s in (10, 11):
        rec = make_record({"__name__": "fixture", "n": str(s)}, [s * 1000], [s / 4], 8)
        cl.append([Batch(s, 1000 + s, 1, rec)])
    cl.close()
    os.replace(cl.path, FIXTURE)
    tmp.rmdir()


if __name__ == "__main__":
    _make_fixture()
