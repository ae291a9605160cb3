"""The reverse index (in memory and as a persisted segment) against a brute-force reference."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from m3shm.errors import CorruptError
from m3shm.query.labels import from_dict, get
from m3shm.query.matchers import Matcher
from m3shm.storage.index_matchers import plan_regex
from m3shm.storage.index_segment import (
    CorruptIndexError,
    IndexVersionError,
    SegmentReader,
    write_segment,
)
from m3shm.storage.reverse_index import ReverseIndex

NAMES = ["__name__", "a", "b", "job"]
VALUES = ["", "x", "y", "xy", "host-1", "host-12", "host-2", "ho", "a\nb", "é", "\U0010ffff", "X"]
PATTERNS = [".*", ".+", "x|y", "x|", "host-1.*", "host-.*", "host-1[0-9]+", "ho.*2", "x*",
            "(?i:x).*", "[a-z]+", "é|X", "a.*", "", "a\\nb", "host\\-1.*", "\U0010ffff.*", "x?y"]

label_sets = st.lists(st.fixed_dictionaries({}, optional={n: st.sampled_from(VALUES)
                                                            for n in NAMES}),
                      max_size=30)
matchers = st.lists(st.one_of(
    st.tuples(st.sampled_from([*NAMES, "absent"]), st.sampled_from(["=", "!="]),
              st.sampled_from(VALUES)),
    st.tuples(st.sampled_from([*NAMES, "absent"]), st.sampled_from(["=~", "!~"]),
              st.sampled_from(PATTERNS)),
), min_size=1, max_size=4)


def build(sets: list[dict[str, str]], seed: int) -> tuple[ReverseIndex, dict[int, tuple]]:
    ids = np.random.default_rng(seed).permutation(len(sets) * 3)[: len(sets)]
    idx, ref = ReverseIndex(), {}
    for sid, labels in zip(ids.tolist(), sets, strict=True):
        idx.add(sid, labels)
        ref[sid] = from_dict(labels)
    return idx, ref


def expected(ref: dict[int, tuple], ms: list[tuple[str, str, str]]) -> list[int] | None:
    engine = [Matcher(*m) for m in ms]
    if all(m.matches("") for m in engine):
        return None
    return sorted(sid for sid, labels in ref.items()
                  if all(m.matches(get(labels, m.name)) for m in engine))


def check_select(reader, ref, ms) -> None:
    want = expected(ref, ms)
    if want is None:
        with pytest.raises(ValueError, match="does not match the empty string"):
            reader.select(ms)
        return
    got = reader.select(ms)
    assert got.tolist() == want, ms
    assert reader.label_names(got) == sorted({k for s in want for k, _ in ref[s]})
    for name in NAMES:
        assert reader.label_values(name, got) == sorted(
            {get(ref[s], name) for s in want} - {""})


@given(label_sets, st.lists(matchers, min_size=1, max_size=5), st.integers(0, 2**32 - 1))
def test_select_matches_reference(sets, queries, seed) -> None:
    idx, ref = build(sets, seed)
    for ms in queries:
        check_select(idx, ref, ms)
    assert idx.label_names() == sorted({k for labels in ref.values() for k, _ in labels})


@settings(max_examples=50)
@given(label_sets, st.lists(matchers, min_size=1, max_size=5), st.integers(0, 2**32 - 1))
def test_segment_matches_reference(tmp_path_factory, sets, queries, seed) -> None:
    idx, ref = build(sets, seed)
    path = tmp_path_factory.mktemp("seg") / "index.seg"
    write_segment(path, idx)
    with SegmentReader(path) as seg:
        assert seg.all_postings().tolist() == sorted(ref)
        assert seg.label_names() == idx.label_names()
        for name in NAMES:
            assert seg.label_values(name) == idx.label_values(name)
        for ms in queries:
            check_select(seg, ref, ms)


def small_index() -> ReverseIndex:
    idx = ReverseIndex()
    idx.add(0, {"job": "x", "instance": "host-1"})
    idx.add(1, {"job": "x", "instance": "host-12"})
    idx.add(2, {"job": "y", "instance": "host-2", "env": ""})
    idx.add(3, [("job", "y")])
    return idx


def test_empty_value_semantics() -> None:
    idx = small_index()
    assert idx.select([("job", "=~", ".+"), ("instance", "=", "")]).tolist() == [3]
    assert idx.select([("job", "=", "y"), ("env", "=", "")]).tolist() == [2, 3]
    assert idx.select([("job", "=", "y"), ("env", "!=", "")]).tolist() == []
    assert idx.select([("job", "=", "y"), ("instance", "=~", "host-2|")]).tolist() == [2, 3]
    assert idx.select([("job", "=", "x"), ("instance", "!~", "host-1.*")]).tolist() == []
    assert idx.select([("instance", "!=", "")]).tolist() == [0, 1, 2]
    assert "env" not in idx.label_names()
    for bad in ([("job", "=~", ".*")], [("job", "!=", "x")], [("nope", "=", "")]):
        with pytest.raises(ValueError, match="at least one matcher"):
            idx.select(bad)


def test_engine_matchers_and_bad_input() -> None:
    idx = small_index()
    got = idx.select([Matcher("job", "=", "x"), Matcher("instance", "=~", "host-1.*")])
    assert got.tolist() == [0, 1]
    with pytest.raises(ValueError, match="invalid regular expression"):
        idx.select([("job", "=~", "(")])
    with pytest.raises(ValueError, match="already indexed"):
        idx.add(1, {"job": "z"})
    with pytest.raises(ValueError, match="outside"):
        idx.add(-1, {"job": "z"})


def test_regex_plans() -> None:
    assert plan_regex("a|b|c").literals == frozenset("abc")
    assert plan_regex("10\\.0\\.0\\.1").literals == frozenset(["10.0.0.1"])
    p = plan_regex("host-1.*")
    assert (p.literals, p.prefix, p.dot_star_rest) == (None, "host-1", True)
    assert plan_regex("host-1+").prefix == "host-"
    assert plan_regex("a.*|b").prefix == ""


def test_query_after_more_adds() -> None:
    idx = small_index()
    assert idx.select([("job", "=", "x")]).tolist() == [0, 1]
    idx.add(7, {"job": "x"})
    idx.add(5, {"job": "x"})
    assert idx.select([("job", "=", "x")]).tolist() == [0, 1, 5, 7]


def written(tmp_path: Path) -> Path:
    path = tmp_path / "index.seg"
    write_segment(path, small_index())
    return path


def read_everything(path: Path) -> None:
    with SegmentReader(path) as seg:
        for name in seg.label_names():
            seg.select([(name, "=~", ".+")])
            seg.label_values(name)


def test_every_flipped_byte_is_a_corrupt_error(tmp_path: Path) -> None:
    path = written(tmp_path)
    good = path.read_bytes()
    read_everything(path)
    for at in range(len(good)):
        bad = bytearray(good)
        bad[at] ^= 0x40
        path.write_bytes(bytes(bad))
        with pytest.raises(CorruptIndexError) as info:
            read_everything(path)
        assert isinstance(info.value, CorruptError)
        assert str(path) in str(info.value) and "expected" in str(info.value)
        assert info.value.path == path


def test_truncated_and_version(tmp_path: Path) -> None:
    path = written(tmp_path)
    good = path.read_bytes()
    for cut in (0, 10, 40, len(good) - 1):
        path.write_bytes(good[:cut])
        with pytest.raises(CorruptIndexError):
            read_everything(path)
    path.write_bytes(good + b"\0\0\0\0")
    with pytest.raises(CorruptIndexError, match="toc"):
        read_everything(path)


def test_empty_index_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "empty.seg"
    write_segment(path, ReverseIndex())
    with SegmentReader(path) as seg:
        assert seg.label_names() == [] and seg.select([("a", "=", "b")]).tolist() == []


def test_unknown_version_is_a_version_error(tmp_path: Path) -> None:
    path = written(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[4] = 2
    raw[28:32] = zlib.crc32(bytes(raw[:28])).to_bytes(4, "little")
    path.write_bytes(bytes(raw))
    with pytest.raises(IndexVersionError, match="version 1"):
        SegmentReader(path)
