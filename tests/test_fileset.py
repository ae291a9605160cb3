"""Filesets: round trip, lookups through bloom/summaries/index, corruption named per file,
incomplete filesets invisible and removed."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from m3shm import codec
from m3shm.storage.fileset import (
    CorruptFilesetError,
    Fileset,
    FilesetId,
    Kind,
    list_filesets,
    remove_incomplete,
    write_fileset,
)

BLOCK = 2 * 3600 * 1000
START = 1_700_000_000_000 - 1_700_000_000_000 % BLOCK


def sid_hash(sid: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(sid, digest_size=8).digest(), "little")


def make_series(n: int, seed: int = 0) -> list[tuple[bytes, int, bytes]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        sid = b"__name__\xffm%d\xffinstance\xffhost-%d" % (i % 7, i)
        k = int(rng.integers(1, 50))
        ts = START + np.cumsum(rng.integers(1, 20_000, k))
        vs = np.round(rng.normal(0, 100, k), int(rng.integers(0, 4)))
        out.append((sid, sid_hash(sid), codec.encode(ts, vs)))
    return out


def test_roundtrip_and_lookups(tmp_path: Path) -> None:
    series = make_series(500)
    fid = FilesetId("default", 3, START, 0)
    info = write_fileset(tmp_path, fid, BLOCK, reversed(series), summary_every=16)
    assert info.num_series == 500
    assert info.num_samples == sum(codec.count(b) for _, _, b in series)
    assert list_filesets(tmp_path) == [fid]
    with Fileset(tmp_path, fid) as fs:
        assert len(fs) == 500 and fs.info.block_size == BLOCK
        fs.verify()
        for sid, h, block in series:
            assert bytes(fs.get(sid, h)) == block
        assert [s for s, _, _ in fs] == sorted(s for s, _, _ in series)
        # absent ids: before the first, after the last, between two
        assert fs.get(b"", sid_hash(b"")) is None
        assert fs.get(b"\xff" * 40, sid_hash(b"\xff" * 40)) is None
        missing = series[10][0] + b"x"
        assert fs.get(missing, sid_hash(missing)) is None


def test_bloom_filter_rejects_most_absent_series(tmp_path: Path) -> None:
    series = make_series(2000, seed=1)
    fid = FilesetId("default", 0, START, 0)
    write_fileset(tmp_path, fid, BLOCK, series)
    with Fileset(tmp_path, fid) as fs:
        assert all(fs.may_contain(h) for _, h, _ in series)
        false_pos = sum(fs.may_contain(sid_hash(b"absent-%d" % i)) for i in range(5000))
        assert false_pos < 5000 * 0.03  # ~1% expected at 10 bits and 7 probes per series


def test_empty_fileset(tmp_path: Path) -> None:
    fid = FilesetId("agg_1m", 1, START, 2)
    write_fileset(tmp_path, fid, BLOCK, [])
    with Fileset(tmp_path, fid) as fs:
        assert len(fs) == 0 and list(fs) == []
        assert fs.get(b"x", 1) is None


def test_duplicate_ids_are_refused(tmp_path: Path) -> None:
    s = make_series(3)
    with pytest.raises(ValueError, match="appears twice"):
        write_fileset(tmp_path, FilesetId("default", 0, START, 0), BLOCK, s + s[:1])


@pytest.mark.parametrize("kind", list(Kind))
def test_a_flipped_byte_in_any_file_is_named(tmp_path: Path, kind: Kind) -> None:
    series = make_series(50)
    fid = FilesetId("default", 0, START, 0)
    write_fileset(tmp_path, fid, BLOCK, series, summary_every=8)
    path = fid.path(tmp_path, kind)
    raw = bytearray(path.read_bytes())
    at = len(raw) - 3 if len(raw) > 12 else 2
    raw[at] ^= 0x40
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptFilesetError) as err, Fileset(tmp_path, fid) as fs:
        for sid, h, _ in series:  # data corruption shows up when the series is read
            fs.get(sid, h)
        fs.verify()
    assert str(path) in str(err.value) or (
        kind == Kind.CHECKPOINT and str(fid.path(tmp_path, Kind.DIGESTS)) in str(err.value))


def test_data_corruption_spares_other_groups(tmp_path: Path) -> None:
    """Version 2 compresses each summary group of the data as one zstd frame: a flipped byte
    costs that group's series (a clear error naming the file), never another group's."""
    series = make_series(20)
    fid = FilesetId("default", 0, START, 0)
    write_fileset(tmp_path, fid, BLOCK, series, summary_every=4)
    path = fid.path(tmp_path, Kind.DATA)
    raw = bytearray(path.read_bytes())
    raw[20] ^= 0x01  # inside the first frame (the first 4 series in id order)
    path.write_bytes(bytes(raw))
    errors = 0
    with Fileset(tmp_path, fid) as fs:
        for sid, h, block in sorted(series)[:4]:  # each is an error or exactly right
            try:
                assert bytes(fs.get(sid, h)) == block
            except CorruptFilesetError as e:
                assert str(path) in str(e)
                errors += 1
        assert errors
        for sid, h, block in sorted(series)[4:]:
            assert bytes(fs.get(sid, h)) == block


def test_v2_data_is_one_zstd_frame_per_summary_group(tmp_path: Path) -> None:
    import zstandard

    series = make_series(10)
    fid = FilesetId("default", 0, START, 0)
    write_fileset(tmp_path, fid, BLOCK, series, summary_every=4)
    data = fid.path(tmp_path, Kind.DATA).read_bytes()
    assert data[:8] == b"M3FS\x05\x02\x00\x00"
    frames, rest = [], data[8:]
    while rest:
        obj = zstandard.ZstdDecompressor().decompressobj()
        frames.append(obj.decompress(rest))
        rest = obj.unused_data
    blocks = [b for _, _, b in sorted(series)]
    assert frames == [b"".join(blocks[i:i + 4]) for i in (0, 4, 8)]


def test_incomplete_fileset_is_invisible_and_removed(tmp_path: Path) -> None:
    a = FilesetId("default", 0, START, 0)
    b = FilesetId("default", 0, START + BLOCK, 0)
    write_fileset(tmp_path, a, BLOCK, make_series(5))
    write_fileset(tmp_path, b, BLOCK, make_series(5))
    b.path(tmp_path, Kind.CHECKPOINT).unlink()  # as if the flush died before its checkpoint
    assert list_filesets(tmp_path) == [a]
    removed = remove_incomplete(tmp_path)
    assert len(removed) == 6 and all(f"-{START + BLOCK}-" in p.name for p in removed)
    assert list_filesets(tmp_path) == [a]


@settings(max_examples=30)
@given(st.lists(st.binary(min_size=0, max_size=30), unique=True, max_size=80),
       st.integers(1, 9))
def test_any_ids_any_summary_spacing(tmp_path_factory, ids: list[bytes], every: int) -> None:
    root = tmp_path_factory.mktemp("fs")
    block = codec.encode([1, 2], [0.5, 1.5])
    fid = FilesetId("ns", 0, 0, 0)
    write_fileset(root, fid, BLOCK, [(s, sid_hash(s), block) for s in ids], summary_every=every)
    with Fileset(root, fid) as fs:
        for s in ids:
            assert fs.get(s, sid_hash(s)) is not None
        assert [s for s, _, _ in fs] == sorted(ids)
