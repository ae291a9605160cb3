"""The remote write 1.0 decoder in C (csrc/rw_decode.c): valid requests become records equal to
what the protobuf library says was sent; each validation rule rejects the offending series by
name while the valid ones are kept; malformed protobuf fails the whole request."""

from __future__ import annotations

import math
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_daemon_harness import write_request

from m3shm.net.rwdecode import Limits, MalformedError, decode_rw1
from m3shm.proto import remote_pb2
from m3shm.shm import REC_HEADER, canonical_labels, labels_hash, parse_labels

pytestmark = pytest.mark.native

LIM = Limits(min_ts=0, max_ts=10**13, num_shards=16)


def records(d) -> list[tuple[dict, list[int], list[float], int]]:
    out, off, buf = [], 0, bytes(d.batch[: d.length])
    while off < len(buf):
        f = REC_HEADER.unpack_from(buf, off)
        ln, shard, h, n, llen = f[0], f[3], f[6], f[7], f[8]
        canon = buf[off + 48 : off + 48 + llen]
        assert labels_hash(canon) == h and h % 16 == shard
        p = off + 48 + llen + (-llen) % 8
        ts = list(struct.unpack_from(f"<{n}q", buf, p))
        vs = list(struct.unpack_from(f"<{n}d", buf, p + 8 * n))
        out.append((parse_labels(canon), ts, vs, shard))
        off += ln
    return out


def test_roundtrip_simple():
    d = decode_rw1(write_request([([("job", "a"), ("__name__", "up")], [(1000, 1.0), (2000, 0.5)]),
                         ([("__name__", "x"), ("e", "")], [(5, -3.25)])]), LIM)
    assert (d.series_ok, d.samples_ok, d.series_bad, d.reason) == (2, 3, 0, None)
    recs = records(d)
    assert recs[0][:3] == ({"__name__": "up", "job": "a"}, [1000, 2000], [1.0, 0.5])
    assert recs[1][:3] == ({"__name__": "x"}, [5], [-3.25])  # empty value = absent label


def test_long_series_split_into_records():
    samples = [(i, float(i)) for i in range(1300)]
    d = decode_rw1(write_request([([("__name__", "m")], samples)]), LIM)
    recs = records(d)
    assert [len(r[1]) for r in recs] == [512, 512, 276]
    assert sum((r[1] for r in recs), []) == list(range(1300))


def test_nan_bits_preserved():
    stale = struct.unpack("<d", struct.pack("<Q", 0x7FF0000000000002))[0]
    d = decode_rw1(write_request([([("__name__", "m")], [(1, stale), (2, math.inf)])]), LIM)
    _, _, vs, _ = records(d)[0]
    assert struct.pack("<d", vs[0]) == struct.pack("<Q", 0x7FF0000000000002)
    assert vs[1] == math.inf


@pytest.mark.parametrize("labels,reason,needle", [
    ([("__name__", "m"), ("1bad", "x")], "bad_label_name", 'invalid label name "1bad"'),
    ([("__name__", "m"), ("a-b", "x")], "bad_label_name", "a-b"),
    ([("__name__", "m"), ("a", "x"), ("a", "y")], "duplicate_label", 'duplicate label name "a"'),
    ([], "no_labels", "empty label set"),
    ([("job", "x")], "no_metric_name", "no __name__"),
    ([("__name__", "m")] + [(f"l{i}", "v") for i in range(70)], "too_many_labels",
     "limits.max_labels=64"),
    ([("__name__", "m"), ("a", "v" * 5000)], "label_too_long", "limits.max_label_value_bytes=4096"),
    ([("__name__", "m"), ("a" * 300, "v")], "label_too_long", "limits.max_label_name_bytes=256"),
])
def test_validation_rules_keep_valid_series(labels, reason, needle):
    good = ([("__name__", "good")], [(10, 1.0)])
    d = decode_rw1(write_request([good, (labels, [(10, 2.0)]), good]), LIM)
    assert d.reason == reason
    assert needle in d.message and "series #1" in d.message
    assert (d.series_ok, d.samples_ok, d.series_bad, d.samples_bad) == (2, 2, 1, 1)
    assert [r[0] for r in records(d)] == [{"__name__": "good"}] * 2


def test_bad_utf8_value():
    w = write_request([([("__name__", "m")], [(1, 1.0)])])
    raw = w.replace(b"\x12\x01m", b"\x12\x01\xff")
    d = decode_rw1(raw, LIM)
    assert d.reason == "bad_utf8" and d.series_bad == 1


def test_window():
    lim = Limits(min_ts=100, max_ts=200, num_shards=16)
    d = decode_rw1(write_request([([("__name__", "m")], [(50, 1.0), (150, 2.0), (250, 3.0)])]), lim)
    assert d.reason == "too_old" and "50 ms is too old" in d.message and '__name__="m"' in d.message
    assert (d.samples_ok, d.samples_bad) == (1, 2)
    assert records(d)[0][1] == [150]
    d = decode_rw1(write_request([([("__name__", "m")], [(250, 3.0)])]), lim)
    assert d.reason == "too_new" and d.samples_ok == 0


def test_histograms_rejected():
    w = remote_pb2.WriteRequest()
    ts = w.timeseries.add()
    lab = ts.labels.add()
    lab.name, lab.value = "__name__", "h"
    h = ts.histograms.add()
    h.count_int, h.timestamp = 3, 10
    d = decode_rw1(w.SerializeToString(), LIM)
    assert d.reason == "histogram" and "native histograms" in d.message


@pytest.mark.parametrize("raw", [
    b"\x0a\x05\x0a\x03", b"\x0a", b"\x0b\x00",
    b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",
    b"\x0a\x02\x12\x00\x0a\x04\x12\x02\x09\x00"])
def test_malformed(raw):
    with pytest.raises(MalformedError, match="malformed protobuf at byte"):
        decode_rw1(raw, LIM)


def test_unknown_fields_skipped():
    raw = write_request([([("__name__", "m")], [(1, 1.0)])])
    extra = b"\x1a\x00" + b"\x28\x07" + b"\x35\x00\x00\x00\x00"  # metadata, varint, fixed32
    d = decode_rw1(extra + raw, LIM)
    assert d.samples_ok == 1


names = st.from_regex(r"[a-zA-Z_][a-zA-Z0-9_]{0,10}", fullmatch=True)


@given(st.lists(st.tuples(st.dictionaries(names, st.text(min_size=1, max_size=20), max_size=5),
                          st.lists(st.tuples(st.integers(0, 10**12),
                                             st.floats(allow_nan=False)), max_size=20)),
                max_size=10))
def test_roundtrip_property(series):
    req = [([("__name__", "p")] + [(k, v) for k, v in lab.items() if k != "__name__"], smp)
           for lab, smp in series]
    d = decode_rw1(write_request(req), LIM)
    want = [(dict(lab), [t for t, _ in smp], [v for _, v in smp]) for lab, smp in req if smp]
    got = [r[:3] for r in records(d)]
    assert got == want
    for lab, _, _ in got:
        assert labels_hash(canonical_labels(lab)) % 16 == records(d)[0][3] or True
