"""The metadata log (m3shm/storage/metadata.py, docs/formats/metadata.md): entries survive a
reopen; only changes are written; two workers' files merge by (updated_ms, worker); a torn or
corrupt tail of a worker's own file is cut at start with a warning, and another worker's
half-written record is read once it is complete; the known-hash set follows the merged view."""

from __future__ import annotations

import logging
import os

from m3shm.storage.metadata import FILE_HEADER, Entry, MetadataStore, encode_record, file_name
from m3shm.storage.metadata_hashes import Meta, meta_hash


def meta(name: str, type_: int = 1, help_: str = "h", unit: str = "") -> Meta:
    return Meta(name, type_, help_, unit, meta_hash(name, type_, help_, unit))


def test_reopen_and_write_only_changes(tmp_path):
    s = MetadataStore(str(tmp_path), 0)
    assert s.update([meta("a"), meta("b", 2, "gauge é", "bytes")], 1) == 2
    assert s.update([meta("a"), meta("b", 2, "gauge é", "bytes")], 2) == 0
    path = tmp_path / "metadata" / file_name(0)
    size = path.stat().st_size
    assert s.update([meta("a", 1, "new help")], 1) == 1
    assert path.stat().st_size > size
    s.close()
    r = MetadataStore(str(tmp_path))
    got = {n: (e.type, e.help, e.unit) for n, e in r.all().items()}
    assert got == {"a": (1, "new help", ""), "b": (2, "gauge é", "bytes")}
    assert meta_hash("a", 1, "new help", "") in r.known
    assert meta_hash("a", 1, "h", "") not in r.known


def test_two_workers_merge_latest_wins(tmp_path):
    w0, w1 = MetadataStore(str(tmp_path), 0), MetadataStore(str(tmp_path), 1)
    w0.update([meta("x", 1, "old")], 1)
    w1.update([meta("x", 1, "newer")], 1)  # refreshes first, so it is later than w0's
    assert w0.refresh() == 1
    assert w0.get("x").help == "newer" and w0.get("x").worker == 1
    assert meta_hash("x", 1, "old", "") not in w0.known
    # w0 sees "old" again: it is a change against the merged view, so it is written again
    assert w0.update([meta("x", 1, "old")], 1) == 1
    w1.refresh()
    assert w1.get("x").help == "old"


def test_torn_tail_cut_and_partial_record_waits(tmp_path, caplog):
    w0 = MetadataStore(str(tmp_path), 0)
    w0.update([meta("a"), meta("b")], 1)
    w0.close()
    path = tmp_path / "metadata" / file_name(0)
    good = path.stat().st_size
    rec = encode_record(Entry("c", 2, "x", "", 1, 0), 1)
    with open(path, "ab") as f:
        f.write(rec[:-3])  # a torn write
    reader = MetadataStore(str(tmp_path))
    assert sorted(reader.all()) == ["a", "b"]
    with open(path, "ab") as f:  # the writer finishes it: a reader picks it up
        f.write(rec[-3:])
    assert reader.refresh() == 1 and reader.get("c").type == 2
    with open(path, "ab") as f:
        f.write(rec[:-1] + bytes([rec[-1] ^ 0xFF]))  # corrupt
    with caplog.at_level(logging.WARNING, logger="m3shm.metadata"):
        w0 = MetadataStore(str(tmp_path), 0)
    assert "CRC mismatch" in caplog.text and file_name(0) in caplog.text
    assert path.stat().st_size == good + len(rec)
    assert w0.update([meta("d")], 1) == 1
    w0.close()
    assert sorted(MetadataStore(str(tmp_path)).all()) == ["a", "b", "c", "d"]


def test_header_cut_short_is_rewritten(tmp_path):
    os.makedirs(tmp_path / "metadata")
    (tmp_path / "metadata" / file_name(3)).write_bytes(b"M3M")
    s = MetadataStore(str(tmp_path), 3)
    assert s.update([meta("a")], 1) == 1
    s.close()
    assert (tmp_path / "metadata" / file_name(3)).stat().st_size > FILE_HEADER.size
    assert list(MetadataStore(str(tmp_path)).all()) == ["a"]


def test_known_set_grows_and_deletes():
    from m3shm.storage.metadata_hashes import MetaHashSet

    k = MetaHashSet(1024)
    hs = [meta_hash(f"m{i}", 1, "", "") for i in range(3000)]
    for h in hs:
        k.add(h)
    assert k.size >= 4096 and all(h in k for h in hs)
    arr, size = k.state
    for h in hs[::2]:
        k.discard(h)
    live = {arr[i] for i in range(size)} - {0, 1}
    assert live == set(hs[1::2])
