"""Remote write 1.0 bodies -> a batch of lane records, decoded in C (csrc/rw_decode.c).

No Python object is made per series or sample: the decompressed protobuf goes to C whole and
comes back as one buffer of records (the bytes that go to the commit log and then the lanes).
The call releases the GIL, so workers run it on their thread pool.
"""

from __future__ import annotations

from dataclasses import dataclass

from m3shm._native import ffi, lib
from m3shm.errors import CorruptError, check

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
}


@dataclass(frozen=True)
class Limits:
    min_ts: int
    max_ts: int
    num_shards: int
    max_labels: int = 64
    max_name_bytes: int = 256
    max_value_bytes: int = 4096


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


class MalformedError(CorruptError):
    """The body is not a valid protobuf WriteRequest (the message says where)."""


def decode_rw1(body: bytes, lim: Limits) -> Decoded:
    """Decode a decompressed WriteRequest. Raises MalformedError for malformed protobuf."""
    c_lim = ffi.new("m3_rw_limits *")
    c_lim.min_ts, c_lim.max_ts = lim.min_ts, lim.max_ts
    c_lim.num_shards = lim.num_shards
    c_lim.max_labels = lim.max_labels
    c_lim.max_name_bytes = lim.max_name_bytes
    c_lim.max_value_bytes = lim.max_value_bytes
    res = ffi.new("m3_rw_result *")
    src = ffi.from_buffer(body)
    cap = 3 * len(body) + 4096
    while True:
        out = bytearray(cap)
        rc = lib.m3_rw1_decode(src, len(body), c_lim, ffi.from_buffer(out), cap, res)
        if rc == lib.M3_ENOSPC:
            cap *= 2
            continue
        if rc in (lib.M3_ECORRUPT, lib.M3_ETRUNC):
            raise MalformedError(ffi.string(res.msg).decode("utf-8", "replace"))
        check(rc, "decoding a remote write request")
        break
    reason = REASONS.get(res.first_reason) if res.first_reason else None
    return Decoded(out, int(res.out_len), int(res.series_ok), int(res.samples_ok),
                   int(res.series_bad), int(res.samples_bad), int(res.records), reason,
                   ffi.string(res.msg).decode("utf-8", "replace"))
