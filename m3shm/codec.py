"""Python face of the M3TSZ-style codec in csrc/codec.c (format: docs/formats/tsz.md).

Whole blocks go between numpy arrays and bytes in one C call each way; the streaming
:class:`Encoder` appends to a growing block whose published prefix always decodes.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from m3shm._native import ffi, lib
from m3shm.errors import BufferFullError, check, error_for

HEADER_BYTES: int = lib.TSZ_HEADER_BYTES
MAX_SAMPLE_BYTES: int = lib.TSZ_MAX_SAMPLE_BYTES
VERSION: int = lib.TSZ_VERSION


def _arrays(timestamps: Any, values: Any) -> tuple[np.ndarray, np.ndarray]:
    ts = np.ascontiguousarray(timestamps, dtype=np.int64)
    vs = np.ascontiguousarray(values, dtype=np.float64)
    if ts.ndim != 1 or vs.ndim != 1 or ts.shape != vs.shape:
        raise ValueError(
            f"timestamps and values must be 1-d and of equal length, got shapes "
            f"{ts.shape} and {vs.shape}"
        )
    return ts, vs


def _order_error(ts: np.ndarray, at: int, prev: int | None) -> str:
    return (
        f"timestamp {int(ts[at])} at index {at} is not greater than the previous one "
        f"({prev}); a block takes strictly increasing timestamps"
    )


def encode(timestamps: Any, values: Any) -> bytes:
    """Encode int64 millisecond timestamps and float64 values into one block."""
    ts, vs = _arrays(timestamps, values)
    n = len(ts)
    cap = lib.tsz_bound(n)
    buf = ffi.new("uint8_t[]", cap)
    size = ffi.new("size_t *")
    rc = lib.tsz_encode(ffi.from_buffer("int64_t[]", ts), ffi.from_buffer("double[]", vs), n,
                        buf, cap, size)
    if rc == lib.M3_EORDER:
        # Find the offending index for the message (cheap: only on the error path).
        bad = int(np.flatnonzero(np.diff(ts) <= 0)[0]) + 1
        raise error_for(rc, _order_error(ts, bad, int(ts[bad - 1])))
    check(rc, f"encoding {n} samples")
    return ffi.buffer(buf, size[0])[:]


def count(data: Any) -> int:
    """The number of samples a block holds (its published count), after a header check."""
    buf = ffi.from_buffer(data)
    return check(lib.tsz_samples(buf, len(buf)), f"tsz block header ({len(buf)} bytes)")


def _decode_error(buf: Any, code: int, what: str) -> Exception:
    n = ffi.new("size_t *")
    bit = ffi.new("uint64_t *")
    lib.tsz_decode_diag(buf, len(buf), n, bit)
    total = lib.tsz_samples(buf, len(buf))
    return error_for(code, f"{what} of {len(buf)} bytes: stopped at stream bit {bit[0]} after "
                           f"{n[0]} of {total} samples")


def decode(data: Any) -> tuple[np.ndarray, np.ndarray]:
    """Decode a block into (int64 timestamps, float64 values)."""
    buf = ffi.from_buffer(data)
    size = len(buf)
    n = lib.tsz_samples(buf, size)
    if n < 0:  # (messages are formatted on the error path only: this is a hot call)
        raise error_for(n, f"tsz block header ({size} bytes)")
    ts = np.empty(n, dtype=np.int64)
    vs = np.empty(n, dtype=np.float64)
    got = lib.tsz_decode(buf, size, ffi.from_buffer("int64_t[]", ts),
                         ffi.from_buffer("double[]", vs), n)
    if got < 0:
        raise _decode_error(buf, got, "tsz block")
    return ts, vs


def decode_many(data: Any, offsets: Any, out: tuple[np.ndarray, np.ndarray] | None = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decode blocks stored back to back in one C call.

    Block ``i`` is ``data[offsets[i]:offsets[i+1]]``. Returns (timestamps, values,
    sample_offsets), where block ``i``'s samples are ``[sample_offsets[i]:sample_offsets[i+1]]``.
    ``out`` may supply reusable (int64, float64) arrays; when they are large enough the results
    are views of them (writing fresh memory costs more than decoding into it).
    """
    buf = ffi.from_buffer(data)
    offs = np.ascontiguousarray(offsets, dtype=np.uint64)
    nblocks = len(offs) - 1
    if nblocks < 0 or (nblocks and int(offs[-1]) > len(buf)):
        raise ValueError(f"block offsets must be non-empty and end within the {len(buf)} bytes")
    sums = np.empty(nblocks + 1, dtype=np.uint64)
    bad = ffi.new("size_t *")
    poffs = ffi.from_buffer("uint64_t[]", offs)
    pout = ffi.from_buffer("uint64_t[]", sums)
    rc = lib.tsz_count_many(buf, poffs, nblocks, pout, bad)
    check(rc, f"block {bad[0]} of {nblocks}: header")
    total = int(sums[-1])
    if (out is not None and len(out[0]) >= total and len(out[1]) >= total
            and out[0].dtype == np.int64 and out[1].dtype == np.float64
            and out[0].flags.c_contiguous and out[1].flags.c_contiguous):
        ts, vs = out[0][:total], out[1][:total]
    else:
        ts = np.empty(total, dtype=np.int64)
        vs = np.empty(total, dtype=np.float64)
    rc = lib.tsz_decode_many(buf, poffs, nblocks, pout, ffi.from_buffer("int64_t[]", ts),
                             ffi.from_buffer("double[]", vs), bad)
    if rc < 0:
        i = bad[0]
        block = ffi.buffer(buf)[int(offs[i]) : int(offs[i + 1])]
        raise _decode_error(ffi.from_buffer(block), rc, f"block {i} of {nblocks}")
    return ts, vs, sums.astype(np.int64)


class Encoder:
    """A growing block, appended to one sample or one array at a time.

    ``getvalue()`` returns the published prefix, which always decodes to every sample appended
    so far. ``Encoder.resume(data)`` continues a block, e.g. one left by a process that died.
    """

    __slots__ = ("_state", "_buf", "_cap")

    def __init__(self, capacity: int = 256) -> None:
        self._cap = max(int(capacity), HEADER_BYTES + MAX_SAMPLE_BYTES)
        self._buf = ffi.new("uint8_t[]", self._cap)
        self._state = ffi.new("tsz_enc *")
        check(lib.tsz_enc_init(self._state, self._buf, self._cap), "starting a block")

    @classmethod
    def resume(cls, data: Any) -> Encoder:
        """An encoder that appends after the samples already in ``data``."""
        src = ffi.from_buffer(data)
        enc = cls(len(src) + 4 * MAX_SAMPLE_BYTES)
        ffi.memmove(enc._buf, src, len(src))
        enc._state[0] = ffi.new("tsz_enc *")[0]
        check(lib.tsz_enc_resume(enc._state, enc._buf, enc._cap),
              f"resuming a block of {len(src)} bytes")
        return enc

    def _grow(self) -> None:
        cap = self._cap * 2
        buf = ffi.new("uint8_t[]", cap)
        ffi.memmove(buf, self._buf, lib.tsz_enc_size(self._state))
        self._buf, self._cap = buf, cap

    def append(self, timestamp: int, value: float) -> None:
        """Append one sample; the timestamp must exceed the previous one."""
        while True:
            rc = lib.tsz_enc_append(self._state, self._buf, self._cap, timestamp, value)
            if rc != lib.M3_ENOSPC:
                break
            self._grow()
        if rc == lib.M3_EORDER:
            raise error_for(rc, f"timestamp {timestamp} is not greater than the previous one "
                                f"({self.last_timestamp}); a block takes increasing timestamps")
        check(rc, "appending a sample")

    def extend(self, timestamps: Any, values: Any) -> None:
        """Append arrays of samples in one C call (growing the buffer as needed)."""
        ts, vs = _arrays(timestamps, values)
        pts, pvs = ffi.from_buffer("int64_t[]", ts), ffi.from_buffer("double[]", vs)
        done = ffi.new("size_t *")
        off = 0
        while off < len(ts):
            rc = lib.tsz_enc_append_many(self._state, self._buf, self._cap, pts + off,
                                         pvs + off, len(ts) - off, done)
            off += done[0]
            if rc == lib.M3_ENOSPC:
                self._grow()
                continue
            if rc == lib.M3_EORDER:
                raise error_for(rc, _order_error(ts, off, self.last_timestamp))
            check(rc, f"appending {len(ts)} samples")

    @property
    def count(self) -> int:
        return int(self._state.count)

    @property
    def nbytes(self) -> int:
        return int(lib.tsz_enc_size(self._state))

    @property
    def last_timestamp(self) -> int | None:
        if not self._state.count:
            return None
        return int(ffi.cast("int64_t", self._state.prev_ts))

    def getvalue(self) -> bytes:
        """The block so far: every appended sample, published."""
        return ffi.buffer(self._buf, lib.tsz_enc_size(self._state))[:]


__all__ = ["Encoder", "encode", "decode", "decode_many", "count", "BufferFullError",
           "HEADER_BYTES", "VERSION"]
