"""Remote write 1.0 / 2.0 bodies -> a batch of lane records and new metadata, decoded in C
(csrc/rw_decode.c, csrc/rw2_decode.c, csrc/rw_series.c).

No Python object is made per series or sample: the decompressed protobuf goes to C whole and
comes back as one buffer of records (the bytes that go to the commit log and then the lanes)
plus the metadata entries the caller has not stored yet (``MetaHashSet``: in the steady state
there are none). The call releases the GIL, so workers run it on their thread pool.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from m3shm._native import ffi, lib
from m3shm.errors import CorruptError, check
from m3shm.storage.metadata_hashes import Meta, MetaHashSet

REASONS = {
    lib.M3_RW_BAD_LABEL_NAME: "bad_label_name",
    lib.M3_RW_DUP_LABEL: "duplicate_label",
    lib.M3_RW_NO_LABELS: "no_labels",
    lib.M3_RW_NO_NAME: "no_metric_name",
    lib.M3_RW_TOO_MANY_LABELS: "too_many_labels",
    lib.M3_RW_LABEL_TOO_LONG: "label_too_long",
    lib.M3_RW_TOO_OLD: "too_old",
    lib.M3_RW_TOO_NEW: "too_new",
    lib.M3_RW_HISTOGRAM: "histogram",
    lib.M3_RW_MALFORMED: "malformed",
    lib.M3_RW_BAD_UTF8: "bad_utf8",
    lib.M3_RW_EXEMPLARS: "exemplars",
    lib.M3_RW_BAD_REF: "bad_symbol_ref",
    lib.M3_RW_TOO_MANY_SERIES: "too_many_series",
    lib.M3_RW_BAD_METADATA: "bad_metadata",
}

@dataclass(frozen=True)
class Limits:
    min_ts: int
    max_ts: int
    num_shards: int
    max_labels: int = 64
    max_name_bytes: int = 256
    max_value_bytes: int = 4096
    max_series: int = 100_000


@dataclass
class Decoded:
    batch: bytearray        # records; valid bytes are batch[:length]
    length: int
    series_ok: int
    samples_ok: int
    series_bad: int
    samples_bad: int
    records: int
    reason: str | None      # first rejection, if any
    message: str
    histograms_bad: int = 0
    exemplars_bad: int = 0
    meta_bad: int = 0
    nseries: int = 0
    metadata: list[Meta] = field(default_factory=list)


class MalformedError(CorruptError):
    """The body is not a valid protobuf request (the message says where)."""


_scratch = threading.local()


def _c_limits(lim: Limits):
    c = ffi.new("m3_rw_limits *")
    c.min_ts, c.max_ts = lim.min_ts, lim.max_ts
    c.num_shards = lim.num_shards
    c.max_labels = lim.max_labels
    c.max_name_bytes = lim.max_name_bytes
    c.max_value_bytes = lim.max_value_bytes
    c.max_series = lim.max_series
    return c


def _decode(fn, body: bytes, lim: Limits, known: MetaHashSet | None, ratio: int) -> Decoded:
    c_lim = _c_limits(lim)
    res = ffi.new("m3_rw_result *")
    src = ffi.from_buffer(body)
    o = ffi.new("m3_rw_out *")
    karr, ksize = known.state if known is not None else (ffi.NULL, 0)  # alive for the call
    o.known, o.known_size = karr, ksize
    sc = _scratch.__dict__
    meta = sc.setdefault("meta", ffi.new("m3_rw_meta[]", 64))
    syms = sc.setdefault("syms", ffi.new("uint64_t[]", 2 * 1024))
    cap = ratio * len(body) + 4096  # a first guess; a retry gets exactly what is needed
    while True:
        out = bytearray(cap)
        o.records, o.records_cap = ffi.from_buffer(out), cap
        o.meta, o.meta_cap = meta, len(meta)
        o.symbols, o.symbols_cap = syms, len(syms) // 2
        rc = fn(src, len(body), c_lim, o, res)
        if rc == lib.M3_ENOSPC:
            if res.nsymbols > len(syms) // 2:
                syms = sc["syms"] = ffi.new("uint64_t[]", 2 * int(res.nsymbols))
            elif res.nmeta > len(meta):
                meta = sc["meta"] = ffi.new("m3_rw_meta[]", 2 * int(res.nmeta))
            else:
                cap = max(int(res.out_needed), cap + 1)
            continue
        if rc in (lib.M3_ECORRUPT, lib.M3_ETRUNC):
            raise MalformedError(ffi.string(res.msg).decode("utf-8", "replace"))
        check(rc, "decoding a remote write request")
        break
    del karr
    mv = memoryview(body)
    metas = []
    for i in range(int(res.nmeta)):  # only entries not stored yet: none in the steady state
        m = meta[i]
        metas.append(Meta(
            bytes(mv[m.name_off:m.name_off + m.name_len]).decode(), int(m.type),
            bytes(mv[m.help_off:m.help_off + m.help_len]).decode(),
            bytes(mv[m.unit_off:m.unit_off + m.unit_len]).decode(), int(m.hash)))
    reason = REASONS.get(res.first_reason) if res.first_reason else None
    return Decoded(out, int(res.out_len), int(res.series_ok), int(res.samples_ok),
                   int(res.series_bad), int(res.samples_bad), int(res.records), reason,
                   ffi.string(res.msg).decode("utf-8", "replace"), int(res.histograms_bad),
                   int(res.exemplars_bad), int(res.meta_bad), int(res.nseries), metas)


def decode_rw1(body: bytes, lim: Limits, known: MetaHashSet | None = None) -> Decoded:
    """Decode a decompressed 1.0 WriteRequest. Raises MalformedError for malformed protobuf."""
    return _decode(lib.m3_rw1_decode, body, lim, known, 3)


def decode_rw2(body: bytes, lim: Limits, known: MetaHashSet | None = None) -> Decoded:
    """Decode a decompressed 2.0 io.prometheus.write.v2.Request. Raises MalformedError for
    malformed protobuf."""
    return _decode(lib.m3_rw2_decode, body, lim, known, 6)  # symbols: denser bodies
