"""The remote write 2.0 decoder in C (csrc/rw2_decode.c): requests built with the official
schema become exactly the records the 1.0 decoder makes for the same series; symbol tables in
any order, packed or unpacked references; metadata handed over once; bad references, histograms
and exemplars rejected by name; malformed bodies fail whole."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_daemon_harness import write_request
from test_rw2_harness import request_v2, write_request_v2
from test_rw_decode import records

from m3shm.net.rwdecode import Limits, MalformedError, decode_rw1, decode_rw2
from m3shm.proto import remote_pb2, types_pb2
from m3shm.storage.metadata_hashes import MetaHashSet, meta_hash

pytestmark = pytest.mark.native

LIM = Limits(min_ts=0, max_ts=10**13, num_shards=16)


def test_simple_and_same_records_as_v1():
    series = [([("job", "a"), ("__name__", "up")], [(1000, 1.0), (2000, 0.5)]),
              ([("__name__", "x"), ("e", "")], [(5, -3.25)])]
    d2 = decode_rw2(write_request_v2(series), LIM)
    d1 = decode_rw1(write_request(series), LIM)
    assert (d2.series_ok, d2.samples_ok, d2.series_bad, d2.reason) == (2, 3, 0, None)
    assert bytes(d2.batch[:d2.length]) == bytes(d1.batch[:d1.length])
    assert records(d2)[0][:3] == ({"__name__": "up", "job": "a"}, [1000, 2000], [1.0, 0.5])


def test_symbols_after_series_and_unpacked_refs():
    req = request_v2([([("__name__", "m"), ("a", "b")], [(7, 7.0)])])
    # re-encode by hand: series first, then symbols; labels_refs unpacked (one varint each)
    ts = req.timeseries[0]
    body = b"".join(b"\x08" + bytes([r]) for r in ts.labels_refs)
    smp = ts.samples[0].SerializeToString()
    body += b"\x12" + bytes([len(smp)]) + smp
    raw = b"\x2a" + bytes([len(body)]) + body
    for s in req.symbols:
        raw += b"\x22" + bytes([len(s)]) + s.encode()
    d = decode_rw2(raw, LIM)
    assert records(d)[0][:3] == ({"__name__": "m", "a": "b"}, [7], [7.0])


def test_empty_packed_refs_is_not_malformed():
    raw = b"\x22\x00" + b"\x2a\x02\x0a\x00"  # symbols [""], one series with labels_refs = []
    d = decode_rw2(raw, LIM)
    assert d.series_ok == 0 and d.reason is None


def test_v1_body_reads_as_empty_v2():
    d = decode_rw2(write_request([([("__name__", "m")], [(1, 1.0)])]), LIM)
    assert (d.series_ok, d.series_bad, d.nseries, d.reason) == (0, 0, 0, None)


def test_metadata_once_and_known_set():
    series = [({"__name__": "a_total", "i": str(i)}, [(10, 1.0)], (1, "A counter.", "seconds"))
              for i in range(5)]
    series.append(({"__name__": "g"}, [(10, 1.0)], (2, "", "")))
    series.append(({"__name__": "nometa"}, [(10, 1.0)], (0, "", "")))  # all default = absent
    known = MetaHashSet()
    d = decode_rw2(write_request_v2(series), LIM, known)
    got = [(m.name, m.type, m.help, m.unit) for m in d.metadata]
    assert got == [("a_total", 1, "A counter.", "seconds"), ("g", 2, "", "")]
    assert d.metadata[0].hash == meta_hash("a_total", 1, "A counter.", "seconds")
    for m in d.metadata:
        known.add(m.hash)
    d = decode_rw2(write_request_v2(series), LIM, known)
    assert d.metadata == [] and d.samples_ok == 7
    known.discard(meta_hash("g", 2, "", ""))
    d = decode_rw2(write_request_v2(series), LIM, known)
    assert [m.name for m in d.metadata] == ["g"]


def test_v1_metadata():
    w = remote_pb2.WriteRequest()
    for name, typ, help_, unit in (("up", 2, "Up.", ""), ("req_total", 1, "Requests.", "")):
        m = w.metadata.add()
        m.type, m.metric_family_name, m.help, m.unit = typ, name, help_, unit
    bad = w.metadata.add()
    bad.type, bad.metric_family_name = types_pb2.MetricMetadata.COUNTER, ""
    d = decode_rw1(w.SerializeToString(), LIM)
    assert [(m.name, m.type, m.help) for m in d.metadata] == [("up", 2, "Up."),
                                                              ("req_total", 1, "Requests.")]
    assert d.reason == "bad_metadata" and "metadata #2" in d.message and d.meta_bad == 1


def test_many_metadata_entries_grow_the_buffer():
    series = [({"__name__": f"m{i}"}, [(10, 1.0)], (1, f"help {i}", "")) for i in range(300)]
    d = decode_rw2(write_request_v2(series), LIM)
    assert len(d.metadata) == 300 and d.samples_ok == 300


def test_many_symbols_grow_the_scratch():
    series = [({"__name__": "m", "i": str(i)}, [(10, float(i))]) for i in range(3000)]
    d = decode_rw2(write_request_v2(series), LIM)
    assert d.series_ok == 3000


@pytest.mark.parametrize("refs,needle", [
    ([0, 1, 99, 1], "symbol reference 99 is out of range"),
    ([1, 2, 3], "odd number (3) of references"),
])
def test_bad_refs_reject_the_series(refs, needle):
    req = request_v2([({"__name__": "good"}, [(10, 1.0)]), ({"__name__": "bad"}, [(10, 2.0)])])
    del req.timeseries[1].labels_refs[:]
    req.timeseries[1].labels_refs.extend(refs)
    d = decode_rw2(req.SerializeToString(), LIM)
    assert d.reason == "bad_symbol_ref" and needle in d.message and "series #1" in d.message
    assert (d.series_ok, d.samples_ok, d.series_bad, d.samples_bad) == (1, 1, 1, 1)


def test_bad_metadata_ref():
    req = request_v2([({"__name__": "m"}, [(10, 1.0)], (1, "h", ""))])
    req.timeseries[0].metadata.help_ref = 1000
    d = decode_rw2(req.SerializeToString(), LIM)
    assert d.reason == "bad_symbol_ref" and "1000" in d.message and d.samples_ok == 0


def test_histograms_and_exemplars():
    d = decode_rw2(write_request_v2([({"__name__": "h"}, [])], histograms=2), LIM)
    assert d.reason == "histogram" and "native histograms" in d.message
    assert d.histograms_bad == 2 and 'series #0 {__name__="h"}' in d.message
    d = decode_rw2(write_request_v2([({"__name__": "e"}, [(10, 1.0)])], exemplars=3), LIM)
    assert d.reason == "exemplars" and "3 exemplars not stored" in d.message
    assert d.samples_ok == 1 and d.exemplars_bad == 3 and 'series #0 {__name__="e"}' in d.message


@pytest.mark.parametrize("labels,reason,needle", [
    ([("__name__", "m"), ("1bad", "x")], "bad_label_name", 'invalid label name "1bad"'),
    ([("__name__", "m"), ("a", "x"), ("a", "y")], "duplicate_label", 'duplicate label name "a"'),
    ([("job", "x")], "no_metric_name", "no __name__"),
    ([("__name__", "m")] + [(f"l{i}", "v") for i in range(70)], "too_many_labels",
     "limits.max_labels=64"),
    ([("__name__", "m"), ("a", "v" * 5000)], "label_too_long",
     "limits.max_label_value_bytes=4096"),
    ([("__name__", "m"), ("a" * 300, "v")], "label_too_long", "limits.max_label_name_bytes=256"),
])
def test_validation_same_as_v1(labels, reason, needle):
    good = ([("__name__", "good")], [(10, 1.0)])
    d = decode_rw2(write_request_v2([good, (labels, [(10, 2.0)]), good]), LIM)
    assert d.reason == reason and needle in d.message and "series #1" in d.message
    assert (d.series_ok, d.samples_ok, d.series_bad, d.samples_bad) == (2, 2, 1, 1)


def test_max_series_per_request():
    lim = Limits(min_ts=0, max_ts=10**13, num_shards=16, max_series=3)
    series = [({"__name__": "m", "i": str(i)}, [(10, 1.0)]) for i in range(4)]
    for dec, body in ((decode_rw2, write_request_v2(series)), (decode_rw1, write_request(series))):
        d = dec(body, lim)
        assert d.reason == "too_many_series" and d.length == 0 and d.samples_ok == 0
        assert "limits.max_series_per_request=3" in d.message and "has 4 series" in d.message
        assert dec(body, Limits(min_ts=0, max_ts=10**13, num_shards=16, max_series=4)).reason \
            is None


@pytest.mark.parametrize("raw", [
    b"\x22\x05ab", b"\x2a", b"\x2b\x00", b"\x20\x01",
    b"\x22\x00\x2a\x03\x0a\x01\x80", b"\x22\x00\x2a\x02\x2a\x01",
    b"\x22\x00\x2a\x04\x12\x02\x09\x00"])
def test_malformed(raw):
    with pytest.raises(MalformedError, match="malformed protobuf at byte"):
        decode_rw2(raw, LIM)


names = st.from_regex(r"[a-zA-Z_][a-zA-Z0-9_]{0,10}", fullmatch=True)
values = st.text(min_size=0, max_size=12)
metas = st.none() | st.tuples(st.integers(0, 7), st.text(max_size=30), st.text(max_size=8))


@given(st.lists(st.tuples(st.dictionaries(names, values, max_size=5),
                          st.lists(st.tuples(st.integers(0, 10**12),
                                             st.floats(allow_nan=True, allow_infinity=True)),
                                   max_size=20),
                          metas),
                max_size=10))
def test_roundtrip_property_equals_v1(series):
    req = [([("__name__", "p")] + [(k, v) for k, v in lab.items() if k != "__name__"], smp, md)
           for lab, smp, md in series]
    d2 = decode_rw2(write_request_v2(req), LIM)
    d1 = decode_rw1(write_request([(lab, smp) for lab, smp, _ in req]), LIM)
    assert bytes(d2.batch[:d2.length]) == bytes(d1.batch[:d1.length])
    want = [({k: v for k, v in lab if v}, [t for t, _ in smp],
             [struct.pack("<d", v) for _, v in smp]) for lab, smp, _ in req if smp]
    got = [(r[0], r[1], [struct.pack("<d", v) for v in r[2]]) for r in records(d2)]
    assert got == want
    want_meta = []
    for _, _, md in req:
        if md is not None and (md[0] or md[1] or md[2]) and ("p",) + md not in want_meta:
            want_meta.append(("p",) + md)
    assert [(m.name, m.type, m.help, m.unit) for m in d2.metadata] == want_meta
