"""The compact label index (m3shm/storage/compact_index.py) against the brute-force reference
that the dict-of-lists ReverseIndex is tested with, and its label round trip."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_reverse_index import NAMES, check_select, label_sets, matchers

from m3shm.query.labels import from_dict
from m3shm.storage.compact_index import CompactIndex
from m3shm.storage.reverse_index import ReverseIndex


def canonical(labels: dict[str, str]) -> bytes:
    out = bytearray()
    for n, v in sorted((n, v) for n, v in labels.items() if v):
        for s in (n.encode(), v.encode()):
            out += len(s).to_bytes(2, "little") + s
    return bytes(out)


def build(sets: list[dict[str, str]]) -> tuple[CompactIndex, dict[int, tuple]]:
    idx, ref = CompactIndex(), {}
    for labels in sets:
        sid = idx.add_canonical(canonical(labels))
        ref[sid] = from_dict(labels)
    return idx, ref


@given(label_sets, st.lists(matchers, min_size=1, max_size=5))
def test_select_matches_reference(sets, queries) -> None:
    idx, ref = build(sets)
    assert list(idx.all_postings()) == list(range(len(sets)))
    for ms in queries:
        check_select(idx, ref, ms)
    assert idx.label_names() == sorted({k for labels in ref.values() for k, _ in labels})
    for sid, want in ref.items():
        assert idx.labels(sid) == want


@given(st.lists(label_sets, min_size=2, max_size=4), matchers)
def test_queries_between_adds_see_every_series(batches, ms) -> None:
    """Columns are rebuilt after adds that touch their label, as ReverseIndex's are."""
    idx, ref = CompactIndex(), {}
    rev = ReverseIndex()
    for sets in batches:
        for labels in sets:
            sid = idx.add_canonical(canonical(labels))
            rev.add(sid, {k: v for k, v in labels.items() if v})
            ref[sid] = from_dict(labels)
        check_select(idx, ref, ms)
        for name in [*NAMES, "absent"]:
            assert idx.label_values(name) == rev.label_values(name)


def test_pairs_are_interned() -> None:
    idx = CompactIndex()
    for i in range(100):
        idx.add_canonical(canonical({"__name__": "up", "job": "node", "i": str(i % 10)}))
    assert len(idx.pairs) == 12
    a, b = idx.labels(0), idx.labels(10)
    assert a == b and all(x is y for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("raw", [b"\x05", b"\x01\x00a", b"\x01\x00a\x05\x00xy"])
def test_truncated_bytes_are_refused(raw: bytes) -> None:
    with pytest.raises(ValueError, match="canonical labels: truncated"):
        CompactIndex().add_canonical(raw)
