"""Round trips, edge cases, errors and the version-1 fixture of the block codec."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from m3shm import codec
from m3shm.dataset import default_dataset, read_export
from m3shm.errors import CorruptError, OutOfOrderError, TruncatedError, VersionError

pytestmark = pytest.mark.native

FIXTURES = Path(__file__).resolve().parent / "fixtures"
STALE_NAN = 0x7FF0000000000002
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def from_bits(*patterns: int) -> np.ndarray:
    return np.array(patterns, dtype=np.uint64).view(np.float64)


def assert_same(block: bytes, ts: np.ndarray, vs: np.ndarray) -> None:
    got_ts, got_vs = codec.decode(block)
    np.testing.assert_array_equal(got_ts, np.asarray(ts, dtype=np.int64))
    np.testing.assert_array_equal(got_vs.view(np.uint64),
                                  np.asarray(vs, dtype=np.float64).view(np.uint64))


def roundtrip(ts, vs) -> bytes:
    ts = np.asarray(ts, dtype=np.int64)
    vs = np.asarray(vs, dtype=np.float64)
    block = codec.encode(ts, vs)
    assert_same(block, ts, vs)
    return block


EDGE_BITS = [
    0x0000000000000000,  # +0.0
    0x8000000000000000,  # -0.0
    STALE_NAN,  # Prometheus' stale marker
    0x7FF8000000000000,  # quiet NaN
    0xFFF8000000000001,  # negative NaN with payload
    0x7FF0000000000001,  # signalling NaN
    0x7FF0000000000000,  # +Inf
    0xFFF0000000000000,  # -Inf
    0x0000000000000001,  # smallest subnormal
    0x000FFFFFFFFFFFFF,  # largest subnormal
    0x8000000000000001,  # negative subnormal
    0x7FEFFFFFFFFFFFFF,  # largest finite
    0x4340000000000000,  # 2^53
    0x433FFFFFFFFFFFFF,  # 2^53 - 1
    0xC33FFFFFFFFFFFFF,  # -(2^53 - 1)
    0x3FB999999999999A,  # 0.1
    0x3FB999999999999B,  # 0.1 + 1 ulp: not a decimal, must go through XOR
]


def test_edge_values_each_alone_and_together() -> None:
    for b in EDGE_BITS:
        roundtrip([1000], from_bits(b))
        roundtrip([1, 2, 3], from_bits(b, b, 0x4045000000000000))
    vs = from_bits(*EDGE_BITS)
    roundtrip(np.arange(len(vs)) * 15_000, vs)
    roundtrip(np.arange(len(vs)) * 15_000, vs[::-1].copy())


def test_stale_marker_between_integers_keeps_its_payload() -> None:
    vs = np.array([1.0, 2.0, 3.0, 4.0])
    vs = np.insert(vs, 2, from_bits(STALE_NAN))
    roundtrip(np.arange(5) * 10_000, vs)


def test_extreme_timestamps() -> None:
    roundtrip([INT64_MIN, INT64_MIN + 1, 0, INT64_MAX - 1, INT64_MAX], np.zeros(5))
    roundtrip([INT64_MIN, INT64_MAX], [1.0, 2.0])
    roundtrip([-5, -4, -2, 1, 1 << 40], np.ones(5))


def test_empty_and_single() -> None:
    block = roundtrip([], [])
    assert len(block) == codec.HEADER_BYTES
    assert codec.count(block) == 0
    roundtrip([123], [4.5])


def test_regular_counter_costs_few_bits() -> None:
    n = 10_000
    ts = 1_700_000_000_000 + np.arange(n) * 10_000
    vs = np.cumsum(np.random.default_rng(1).integers(0, 50, n)).astype(np.float64)
    block = roundtrip(ts, vs)
    # timestamp '0' (1 bit) + an integer delta below 64 ('10' + sign + 6 bits = 9 bits)
    assert len(block) * 8 / n < 11


def test_decimal_gauge_uses_integer_mode() -> None:
    n = 5_000
    rng = np.random.default_rng(2)
    vs = np.round(20 + np.cumsum(rng.normal(0, 0.1, n)), 2)
    block = roundtrip(np.arange(n) * 15_000, vs)
    # XOR of such values costs ~40+ bits; integer deltas of a few hundredths cost ~10
    assert len(block) * 8 / n < 16


def test_constant_series_costs_two_bits_a_sample() -> None:
    n = 4_000
    block = roundtrip(np.arange(n) * 60_000, np.full(n, 0.000123456789))
    assert len(block) * 8 / n < 2.1


def test_mode_switching_sequences() -> None:
    vals = [1.0, 2.5, 2.5, 3.0, float("nan"), 4.0, 1e-9, 5.0, 5.25, 5.125, 1e20, 7.0, -0.0,
            0.0, 1.5, 2**52 + 0.5, 2.0**53, 3.0]
    roundtrip(np.arange(len(vals)) * 1000, vals)


def test_multiplier_change_after_a_huge_integer() -> None:
    # regression (found by the fuzzer): rescaling a large previous integer to a new decimal
    # exponent overflowed int64
    vals = [2.0**52, 0.1234567, -(2.0**52), 1.5, 2.0**53 - 1, 0.0000001]
    roundtrip(np.arange(len(vals)) * 1000, vals)


def test_non_increasing_timestamp_is_rejected_with_index() -> None:
    with pytest.raises(OutOfOrderError, match="index 2"):
        codec.encode([10, 20, 20], [1.0, 2.0, 3.0])
    with pytest.raises(OutOfOrderError, match="index 1"):
        codec.encode([10, 5], [1.0, 2.0])


def test_mismatched_arrays() -> None:
    with pytest.raises(ValueError, match="equal length"):
        codec.encode([1, 2], [1.0])


increasing_ts = st.lists(st.integers(INT64_MIN, INT64_MAX), min_size=0, max_size=200,
                         unique=True).map(sorted)
any_bits = st.integers(0, 2**64 - 1)


@given(increasing_ts, st.data())
def test_roundtrip_arbitrary_bits(ts: list[int], data: st.DataObject) -> None:
    bits = data.draw(st.lists(any_bits, min_size=len(ts), max_size=len(ts)))
    roundtrip(ts, from_bits(*bits) if bits else np.array([], dtype=np.float64))


realistic_value = st.one_of(
    st.integers(-(2**53) + 1, 2**53 - 1).map(float),
    st.integers(-10**9, 10**9).map(lambda n: n / 100),
    st.integers(-10**6, 10**6).flatmap(lambda n: st.integers(0, 9).map(lambda k: n / 10**k)),
    st.sampled_from([0.0, -0.0, 1.0, float("inf"), float("-inf"), float("nan")]),
    st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=True),
)


@given(st.lists(st.tuples(st.integers(1, 100_000), realistic_value), max_size=300),
       st.integers(INT64_MIN // 2, INT64_MAX // 2))
def test_roundtrip_realistic(steps: list[tuple[int, float]], t0: int) -> None:
    ts = t0 + np.cumsum([s for s, _ in steps], dtype=np.int64)
    roundtrip(ts, [v for _, v in steps])


@given(st.lists(st.tuples(st.integers(1, 10**7), realistic_value), min_size=1, max_size=120))
def test_streaming_prefix_decodes_at_every_step(steps: list[tuple[int, float]]) -> None:
    enc = codec.Encoder(capacity=16)  # tiny, so growing is exercised too
    ts = np.cumsum([s for s, _ in steps], dtype=np.int64)
    vs = np.array([v for _, v in steps], dtype=np.float64)
    prev = enc.getvalue()
    for i in range(len(ts)):
        enc.append(int(ts[i]), float(vs[i]))
        cur = enc.getvalue()
        assert_same(cur, ts[: i + 1], vs[: i + 1])
        # Appending never changes a published bit: the old count over the new bytes still
        # decodes to the old prefix, and every whole old byte is unchanged.
        assert cur[8 : len(prev) - 1] == prev[8 : len(prev) - 1]
        reread = bytearray(cur)
        reread[4:8] = struct.pack("<I", i)
        assert_same(bytes(reread), ts[:i], vs[:i])
        prev = cur


@given(st.lists(st.tuples(st.integers(1, 10**6), realistic_value), min_size=2, max_size=200),
       st.integers(0, 10**6))
def test_extend_equals_append_and_resume_continues(steps, cut: int) -> None:
    ts = np.cumsum([s for s, _ in steps], dtype=np.int64)
    vs = np.array([v for _, v in steps], dtype=np.float64)
    cut = cut % len(ts)
    one = codec.Encoder()
    one.extend(ts, vs)
    many = codec.Encoder()
    for t, v in zip(ts.tolist(), vs.tolist(), strict=True):
        many.append(t, v)
    assert one.getvalue() == many.getvalue() == codec.encode(ts, vs)
    first = codec.Encoder()
    first.extend(ts[:cut], vs[:cut])
    resumed = codec.Encoder.resume(first.getvalue())
    resumed.extend(ts[cut:], vs[cut:])
    assert_same(resumed.getvalue(), ts, vs)


def test_error_leaves_encoder_usable() -> None:
    enc = codec.Encoder()
    enc.extend([10, 20, 30], [1.0, 2.0, 3.0])
    with pytest.raises(OutOfOrderError, match="previous one \\(30\\)"):
        enc.append(30, 4.0)
    with pytest.raises(OutOfOrderError):
        enc.extend([40, 35], [1.0, 1.0])  # 40 is appended, 35 is refused
    enc.append(50, 5.0)
    assert_same(enc.getvalue(), [10, 20, 30, 40, 50], [1.0, 2.0, 3.0, 1.0, 5.0])


def test_fixture_v1_decodes_forever() -> None:
    doc = json.loads((FIXTURES / "tsz_v1.json").read_text())
    block = (FIXTURES / "tsz_v1.bin").read_bytes()
    assert block[:4] == b"TZ\x01\x00"
    want = np.array([int(h, 16) for h in doc["values_hex"]], dtype=np.uint64).view(np.float64)
    assert_same(block, np.array(doc["timestamps"]), want)


def test_corrupt_headers_are_named() -> None:
    good = codec.encode([1, 2, 3], [1.0, 2.0, 3.0])
    with pytest.raises(TruncatedError):
        codec.decode(good[:5])
    with pytest.raises(CorruptError):
        codec.decode(b"XZ" + good[2:])
    with pytest.raises(VersionError):
        codec.decode(good[:2] + b"\x02" + good[3:])
    with pytest.raises(CorruptError):
        codec.decode(good[:3] + b"\x01" + good[4:])  # reserved flags
    with pytest.raises(CorruptError):
        codec.decode(good[:4] + struct.pack("<I", 2**31) + good[8:])  # absurd count


def test_truncated_stream_says_where() -> None:
    ts = np.arange(100) * 10_000
    block = codec.encode(ts, np.sin(np.arange(100)))
    with pytest.raises(CorruptError, match=r"after \d+ of 100 samples"):
        codec.decode(block[:-20])


@given(st.binary(max_size=300))
def test_arbitrary_bytes_give_samples_or_a_clean_error(data: bytes) -> None:
    for blob in (data, b"TZ\x01\x00" + data):
        try:
            ts, vs = codec.decode(blob)
        except CorruptError:
            continue
        assert len(ts) == len(vs) == codec.count(blob)
        assert np.all(np.diff(ts) > 0)


def test_real_dataset_roundtrips() -> None:
    path = default_dataset()
    if not path.exists():
        pytest.skip(f"{path} not present")
    n = 0
    for s in read_export(path):
        roundtrip(s.timestamps, s.values)
        n += len(s.timestamps)
    assert n == 422_715


def test_the_requested_core_is_the_one_loaded() -> None:
    # `make test-asan` points M3SHM_CORE_LIB at the sanitizer build: prove it is in use.
    import os

    from m3shm import _native

    want = os.environ.get("M3SHM_CORE_LIB")
    if want:
        assert os.path.samefile(_native._core.__file__, want)
    else:
        assert "_core" in _native._core.__file__


@given(st.lists(st.lists(st.tuples(st.integers(1, 10**6), realistic_value), max_size=40),
                max_size=12))
def test_decode_many_equals_decode_each(blocks: list[list[tuple[int, float]]]) -> None:
    encoded, want_ts, want_vs = [], [], []
    for steps in blocks:
        ts = np.cumsum([s for s, _ in steps], dtype=np.int64)
        vs = np.array([v for _, v in steps], dtype=np.float64)
        encoded.append(codec.encode(ts, vs))
        want_ts.append(ts)
        want_vs.append(vs)
    offsets = np.cumsum([0] + [len(b) for b in encoded])
    ts, vs, so = codec.decode_many(b"".join(encoded), offsets)
    assert len(so) == len(blocks) + 1
    for i in range(len(blocks)):
        np.testing.assert_array_equal(ts[so[i] : so[i + 1]], want_ts[i])
        np.testing.assert_array_equal(vs[so[i] : so[i + 1]].view(np.uint64),
                                      want_vs[i].view(np.uint64))


def test_decode_many_names_the_bad_block() -> None:
    a = codec.encode([1, 2], [1.0, 2.0])
    b = codec.encode(np.arange(50) * 1000, np.sin(np.arange(50)))
    data = a + b[:-10] + a
    offs = [0, len(a), len(a) + len(b) - 10, len(data)]
    with pytest.raises(CorruptError, match="block 1 of 3"):
        codec.decode_many(data, offs)
    with pytest.raises(CorruptError, match="block 2 of 3: header"):
        codec.decode_many(a + a + b"XZ" + a[2:], [0, len(a), 2 * len(a), 3 * len(a)])


def test_decode_many_into_reused_arrays() -> None:
    blocks = [codec.encode(np.arange(n) * 1000 + 1, np.arange(n) * 0.5) for n in (3, 0, 7)]
    data = b"".join(blocks)
    offs = np.cumsum([0] + [len(b) for b in blocks])
    bufs = (np.full(20, -1, dtype=np.int64), np.full(20, -1.0))
    ts, vs, so = codec.decode_many(data, offs, out=bufs)
    assert ts.base is bufs[0] and len(ts) == 10 and list(so) == [0, 3, 3, 10]
    np.testing.assert_array_equal(vs[3:], np.arange(7) * 0.5)
    small = (np.empty(2, dtype=np.int64), np.empty(2))  # too small: fresh arrays instead
    ts2, _, _ = codec.decode_many(data, offs, out=small)
    assert ts2.base is not small[0] and np.array_equal(ts2, ts)
