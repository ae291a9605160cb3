"""Filesets: round trip, lookups through bloom/summaries/index, corruption named per section
(versions 3-4) and per file (version 2), incomplete filesets invisible and removed."""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from m3shm import codec
from m3shm.shm import canonical_labels
from m3shm.storage.fileset import (
    DIGESTED,
    HEADER,
    SECTION,
    SECTIONS,
    CorruptFilesetError,
    Fileset,
    FilesetId,
    Kind,
    list_filesets,
    remove_incomplete,
    write_fileset,
)
from m3shm.storage.flushed import FlushedStore
from m3shm.storage.shard_flush import revindex_bytes

BLOCK = 2 * 3600 * 1000
START = 1_700_000_000_000 - 1_700_000_000_000 % BLOCK


def sid_hash(sid: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(sid, digest_size=8).digest(), "little")


def make_series(n: int, seed: int = 0) -> list[tuple[bytes, int, bytes]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        sid = canonical_labels({"__name__": f"m{i % 7}", "instance": f"host-{i}"})
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


def sections(path: Path) -> dict[Kind, tuple[int, int]]:
    """{section kind: (offset, length)} from a version-3 content or version-4 file's table."""
    raw = path.read_bytes()
    (n,) = struct.unpack_from("<I", raw, HEADER.size)
    out = {}
    for i in range(n):
        kind, _f, _r, _crc, off, length = SECTION.unpack_from(raw, HEADER.size + 4 +
                                                              SECTION.size * i)
        out[Kind(kind)] = (off, length)
    return out


def read_all(root: Path, fid: FilesetId, series: list) -> None:
    """Open, look every series up, verify, and open the reverse index."""
    store = FlushedStore(root)
    try:
        fs = store.open(fid)
        for sid, h, _ in series:  # data corruption shows up when the series is read
            fs.get(sid, h)
        fs.verify()
        with store.reverse_index(fid) as ri:
            ri.select([("__name__", "=", "m1")])
    finally:
        store.close()


@pytest.mark.parametrize("version,where", [
    *[(4, w) for w in ("table", "table_crc", *[k.name.lower() for k in SECTIONS])],
    *[(3, w) for w in ("table", *[k.name.lower() for k in SECTIONS], "checkpoint")]])
def test_a_flipped_byte_in_any_section_is_named(tmp_path: Path, version: int,
                                                where: str) -> None:
    series = make_series(200)
    fid = FilesetId("default", 0, START, 0)
    write_fileset(tmp_path, fid, BLOCK, series, summary_every=8, revindex=revindex_bytes,
                  version=version)
    content = fid.path(tmp_path, Kind.CONTENT if version == 3 else Kind.SEALED)
    path, at = content, HEADER.size + 4 + 3  # the table: a section's reserved bytes
    if where == "table_crc":  # version 4: right after the table
        at = HEADER.size + 4 + SECTION.size * len(sections(content)) + 1
    if where == "checkpoint":
        path = fid.path(tmp_path, Kind.CHECKPOINT)
        at = path.stat().st_size - 2
    elif where not in ("table", "table_crc"):
        off, length = sections(content)[Kind[where.upper()]]
        assert length > 0
        at = off + length // 2
    raw = bytearray(path.read_bytes())
    raw[at] ^= 0x40
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptFilesetError) as err:
        read_all(tmp_path, fid, series)
    msg = str(err.value)
    if version == 4 and where.startswith("table"):
        assert str(content) in msg and "CRC32 of the header and section table" in msg, msg
    elif where in ("table", "checkpoint"):  # the checkpoint holds the table's CRC: both named
        assert str(content) in msg and str(fid.path(tmp_path, Kind.CHECKPOINT)) in msg, msg
    else:
        assert f"{content} (section {where})" in msg, msg


@pytest.mark.parametrize("kind", [*DIGESTED, Kind.DIGESTS, Kind.CHECKPOINT])
def test_version2_a_flipped_byte_in_any_file_is_named(tmp_path: Path, kind: Kind) -> None:
    series = make_series(50)
    fid = FilesetId("default", 0, START, 0)
    write_fileset(tmp_path, fid, BLOCK, series, summary_every=8, version=2)
    path = fid.path(tmp_path, kind)
    raw = bytearray(path.read_bytes())
    at = len(raw) - 3 if len(raw) > 12 else 2
    raw[at] ^= 0x40
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptFilesetError) as err, Fileset(tmp_path, fid) as fs:
        assert fs.version == 2
        for sid, h, _ in series:  # data corruption shows up when the series is read
            fs.get(sid, h)
        fs.verify()
    assert str(path) in str(err.value) or (
        kind == Kind.CHECKPOINT and str(fid.path(tmp_path, Kind.DIGESTS)) in str(err.value))


def test_data_corruption_spares_other_groups(tmp_path: Path) -> None:
    """Versions 2-4 compress each summary group's blocks as one zstd frame: a flipped byte
    costs that group's series (a clear error naming the file and section), never another
    group's."""
    kind = Kind.DATA
    series = make_series(20)
    fid = FilesetId("default", 0, START, 0)
    write_fileset(tmp_path, fid, BLOCK, series, summary_every=4)
    path = fid.path(tmp_path, Kind.SEALED)
    raw = bytearray(path.read_bytes())
    raw[sections(path)[kind][0] + 12] ^= 0x01  # inside the first frame (the first 4 series)
    path.write_bytes(bytes(raw))
    errors = 0
    with Fileset(tmp_path, fid) as fs:
        for sid, h, block in sorted(series)[:4]:  # each is an error or exactly right
            try:
                assert bytes(fs.get(sid, h)) == block
            except CorruptFilesetError as e:
                assert f"{path} (section {kind.name.lower()})" in str(e)
                errors += 1
        assert errors
        for sid, h, block in sorted(series)[4:]:
            assert bytes(fs.get(sid, h)) == block


def frames(raw: bytes) -> list[bytes]:
    import zstandard

    out = []
    while raw:
        obj = zstandard.ZstdDecompressor().decompressobj()
        out.append(obj.decompress(raw))
        raw = obj.unused_data
    return out


@pytest.mark.parametrize("version", [3, 4])
def test_v3_v4_files_with_zstd_frames_per_summary_group(tmp_path: Path, version: int) -> None:
    series = make_series(10)
    fid = FilesetId("default", 0, START, 0)
    write_fileset(tmp_path, fid, BLOCK, series, summary_every=4, revindex=revindex_bytes,
                  version=version)
    kind = Kind.CONTENT if version == 3 else Kind.SEALED
    assert sorted(p.name for p in (tmp_path / "default" / "0000").iterdir()) == (
        [f"fileset-{START}-0-checkpoint.db", f"fileset-{START}-0-content.db"] if version == 3
        else [f"fileset-{START}-0-sealed.db"])
    content = fid.path(tmp_path, kind).read_bytes()
    assert content[:8] == b"M3FS" + bytes([kind, version, 0, 0])
    where = sections(fid.path(tmp_path, kind))
    assert list(where) == list(SECTIONS)
    blocks = [b for _, _, b in sorted(series)]
    off, length = where[Kind.DATA]
    assert frames(content[off:off + length]) == [b"".join(blocks[i:i + 4]) for i in (0, 4, 8)]
    off, length = where[Kind.INDEX]
    groups = frames(content[off:off + length])
    assert len(groups) == 3
    for g, ids in zip(groups, ([s for s, _, _ in sorted(series)][i:i + 4] for i in (0, 4, 8)),
                      strict=True):
        assert all(sid in g for sid in ids)


def test_v2_data_is_one_zstd_frame_per_summary_group(tmp_path: Path) -> None:
    series = make_series(10)
    fid = FilesetId("default", 0, START, 0)
    write_fileset(tmp_path, fid, BLOCK, series, summary_every=4, version=2)
    data = fid.path(tmp_path, Kind.DATA).read_bytes()
    assert data[:8] == b"M3FS\x05\x02\x00\x00"
    blocks = [b for _, _, b in sorted(series)]
    assert frames(data[8:]) == [b"".join(blocks[i:i + 4]) for i in (0, 4, 8)]


@pytest.mark.parametrize("version", [3, 4])
def test_incomplete_fileset_is_invisible_and_removed(tmp_path: Path, version: int) -> None:
    a = FilesetId("default", 0, START, 0)
    b = FilesetId("default", 0, START + BLOCK, 0)
    write_fileset(tmp_path, a, BLOCK, make_series(5), version=version)
    write_fileset(tmp_path, b, BLOCK, make_series(5), version=version)
    if version == 3:
        b.path(tmp_path, Kind.CHECKPOINT).unlink()  # the flush died before its checkpoint
    else:  # the flush died before the rename
        p = b.path(tmp_path, Kind.SEALED)
        p.rename(p.with_name(p.name + ".tmp"))
    assert list_filesets(tmp_path) == [a]
    removed = remove_incomplete(tmp_path)
    assert len(removed) == 1 and all(f"-{START + BLOCK}-" in p.name for p in removed)
    assert list_filesets(tmp_path) == [a]


@settings(max_examples=30)
@given(st.lists(st.binary(min_size=0, max_size=30), unique=True, max_size=80),
       st.integers(1, 9), st.sampled_from([1, 2, 3, 4]))
def test_any_ids_any_summary_spacing(tmp_path_factory, ids: list[bytes], every: int,
                                     version: int) -> None:
    root = tmp_path_factory.mktemp("fs")
    block = codec.encode([1, 2], [0.5, 1.5])
    fid = FilesetId("ns", 0, 0, 0)
    write_fileset(root, fid, BLOCK, [(s, sid_hash(s), block) for s in ids], summary_every=every,
                  version=version)
    with Fileset(root, fid) as fs:
        for s in ids:
            assert fs.get(s, sid_hash(s)) is not None
        assert [s for s, _, _ in fs] == sorted(ids)


@pytest.mark.parametrize("version", [1, 2, 3, 4])
def test_deleting_a_volume_removes_every_file_of_its_version(tmp_path: Path,
                                                             version: int) -> None:
    """A cold-write flush deletes volume N (any version) after writing volume N+1 (version 4):
    nothing of volume N may stay behind, its reverse index included."""
    from m3shm.storage.shard_flush import delete_volume, write_block

    old, new = FilesetId("default", 0, START, 0), FilesetId("default", 0, START, 1)
    series = make_series(30)
    write_block(tmp_path, old, BLOCK, series, version=version)
    with Fileset(tmp_path, old) as fs:
        write_block(tmp_path, new, BLOCK, [(s, h, bytes(b)) for s, h, b in fs])
    delete_volume(tmp_path, old)
    assert sorted(p.name for p in (tmp_path / "default" / "0000").iterdir()) == [
        f"fileset-{START}-1-sealed.db"]
    read_all(tmp_path, new, series)
