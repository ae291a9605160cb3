"""Size of series in Prometheus' XOR chunk encoding (the Gorilla scheme with millisecond
timestamps, as Prometheus' tsdb/docs/format/chunks.md describes it): the baseline that
perf/codec.py compares m3shm's codec against. Sizes only; nothing is decoded.

Per chunk: a 2-byte sample count, then a bit stream: t0 as a signed varint, v0 as 64 bits,
t1 - t0 as an unsigned varint, then every later timestamp as a delta-of-delta in buckets
'0' | '10'+14 | '110'+17 | '1110'+20 | '1111'+64 bits, and every value from the second on
XOR'd with its predecessor: '0' same | '10' + bits in the previous window | '11' + 5 bits of
leading zeros (capped at 31) + 6 bits of length + the meaningful bits.
"""

from __future__ import annotations

import numpy as np


def _varint_bytes(u: int) -> int:
    n = 1
    while u >= 0x80:
        u >>= 7
        n += 1
    return n


def _timestamp_bits(ts: np.ndarray) -> int:
    t0 = int(ts[0])
    bits = 8 * _varint_bytes(t0 << 1 if t0 >= 0 else -2 * t0 - 1)  # zigzag
    if len(ts) > 1:
        bits += 8 * _varint_bytes(int(ts[1] - ts[0]))
    if len(ts) > 2:
        dod = np.diff(ts, 2)
        cost = np.full(dod.shape, 68, dtype=np.int64)
        for nbits, width in ((20, 24), (17, 20), (14, 16)):
            ok = (dod >= -((1 << (nbits - 1)) - 1)) & (dod <= 1 << (nbits - 1))
            cost[ok] = width
        cost[dod == 0] = 1
        bits += int(cost.sum())
    return bits


def _value_bits(values: np.ndarray) -> int:
    u = values.view(np.uint64)
    bits = 64
    lead_prev, trail_prev = 0xFF, 0
    prev = int(u[0])
    for cur in u[1:].tolist():
        x = prev ^ cur
        prev = cur
        if x == 0:
            bits += 1
            continue
        lead = 64 - x.bit_length()
        trail = (x & -x).bit_length() - 1
        lead = min(lead, 31)
        if lead_prev != 0xFF and lead >= lead_prev and trail >= trail_prev:
            bits += 2 + 64 - lead_prev - trail_prev
        else:
            lead_prev, trail_prev = lead, trail
            bits += 2 + 5 + 6 + 64 - lead - trail
    return bits


def xor_chunk_bytes(ts: np.ndarray, values: np.ndarray) -> int:
    """Bytes of one Prometheus XOR chunk holding these samples (header + bit stream)."""
    if len(ts) == 0:
        return 2
    return 2 + (_timestamp_bits(ts) + _value_bits(values) + 7) // 8
