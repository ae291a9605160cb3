"""The streaming encoder survives SIGKILL: a child process appends to a block in a shared file
and is killed at random points; the block's published prefix always decodes to exactly the
samples appended in order, and a new process resumes the stream where the dead one stopped."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from m3shm import codec
from m3shm._native import ffi, lib

pytestmark = pytest.mark.native

SIZE = 8 << 20
STATE_BYTES = 64  # the tsz_enc struct sits at offset 0, the block at offset 64

CHILD = r"""
import mmap, os, sys, time
sys.path.insert(0, {tests!r})
from test_codec_crash import STATE_BYTES, SIZE, sample
from m3shm._native import ffi, lib
fd = os.open(sys.argv[1], os.O_RDWR)
m = mmap.mmap(fd, SIZE)
base = ffi.from_buffer(m)
st = ffi.cast("tsz_enc *", base)
buf = base + STATE_BYTES
cap = SIZE - STATE_BYTES
if sys.argv[2] == "init":
    assert lib.tsz_enc_init(st, buf, cap) == 0
else:
    assert lib.tsz_enc_resume(st, buf, cap) == 0
i = st.count
print("ready", i, flush=True)
while True:
    t, v = sample(i)
    rc = lib.tsz_enc_append(st, buf, cap, t, v)
    if rc == lib.M3_ENOSPC:
        time.sleep(10)
    assert rc == 0, rc
    i += 1
"""


def sample(i: int) -> tuple[int, float]:
    """The i-th sample of the deterministic stream: jittered times, mixed value kinds."""
    t = 1_700_000_000_000 + i * 10_000 + (i * 7919) % 9 - 4
    kind = i % 9
    if kind < 4:
        v = float(i // 3)  # a slow counter
    elif kind < 6:
        v = round(i * 0.01, 2)  # a decimal gauge
    elif kind == 6:
        v = float(np.sin(i))  # full-entropy float
    elif kind == 7:
        v = float(np.array([0x7FF0000000000002], dtype=np.uint64).view(np.float64)[0])
    else:
        v = -0.0
    return t, v


def check_prefix(path: Path) -> int:
    data = path.read_bytes()[STATE_BYTES:]
    ts, vs = codec.decode(data)
    want = [sample(i) for i in range(len(ts))]
    np.testing.assert_array_equal(ts, np.array([t for t, _ in want], dtype=np.int64))
    np.testing.assert_array_equal(vs.view(np.uint64),
                                  np.array([v for _, v in want]).view(np.uint64))
    return len(ts)


def test_sigkill_mid_append_then_resume(tmp_path: Path) -> None:
    assert ffi.sizeof("tsz_enc") <= STATE_BYTES
    path = tmp_path / "block"
    path.write_bytes(b"\0" * SIZE)
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests=str(Path(__file__).resolve().parent)))
    rng = random.Random(7)
    published = 0
    for trial in range(6):
        mode = "init" if trial == 0 else "resume"
        child = subprocess.Popen([sys.executable, str(script), str(path), mode],
                                 stdout=subprocess.PIPE, text=True)
        assert child.stdout is not None
        line = child.stdout.readline().split()
        assert line and line[0] == "ready", line
        assert int(line[1]) == published  # resumed exactly at the published count
        time.sleep(rng.uniform(0.02, 0.3))
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
        count = check_prefix(path)
        assert count >= published, "a published sample was lost"
        published = count
    assert published > 1000


def test_torn_state_is_rebuilt_from_the_published_block() -> None:
    cap = 4096
    buf = ffi.new("uint8_t[]", cap)
    st = ffi.new("tsz_enc *")
    assert lib.tsz_enc_init(st, buf, cap) == 0
    samples = [sample(i) for i in range(200)]
    for t, v in samples[:100]:
        assert lib.tsz_enc_append(st, buf, cap, t, v) == 0
    good = ffi.buffer(buf, lib.tsz_enc_size(st))[:]
    # A dead appender: stray bits past the published ones (in the last used byte too), then
    # an odd seq and scribbled fields.
    nbits = st.nbits
    last = 8 + nbits // 8
    if nbits % 8:
        buf[last] = buf[last] | ((1 << (8 - nbits % 8)) - 1)
        last += 1
    for k in range(last, last + 30):
        buf[k] = 0x5A
    st.seq += 1
    st.prev_ts = 12345
    st.mode = 1
    st.sig = 63
    assert lib.tsz_enc_resume(st, buf, cap) == 0
    assert st.count == 100 and st.seq % 2 == 0
    for t, v in samples[100:]:
        assert lib.tsz_enc_append(st, buf, cap, t, v) == 0
    block = ffi.buffer(buf, lib.tsz_enc_size(st))[:]
    ts, vs = codec.decode(block)
    assert block[8 : len(good) - 1] == good[8 : len(good) - 1]
    np.testing.assert_array_equal(ts, [t for t, _ in samples])
    np.testing.assert_array_equal(vs.view(np.uint64),
                                  np.array([v for _, v in samples]).view(np.uint64))


def test_state_ahead_of_the_published_count_is_rolled_back() -> None:
    cap = 4096
    buf = ffi.new("uint8_t[]", cap)
    st = ffi.new("tsz_enc *")
    assert lib.tsz_enc_init(st, buf, cap) == 0
    for i in range(50):
        assert lib.tsz_enc_append(st, buf, cap, *sample(i)) == 0
    # Died after committing the state of sample 50 but before publishing its count.
    assert lib.tsz_enc_append(st, buf, cap, *sample(50)) == 0
    buf[4] = 50  # the count as it was published before
    assert lib.tsz_enc_resume(st, buf, cap) == 0
    assert st.count == 50
    assert lib.tsz_enc_append(st, buf, cap, *sample(50)) == 0
    ts, _ = codec.decode(ffi.buffer(buf, lib.tsz_enc_size(st))[:])
    assert len(ts) == 51 and ts[-1] == sample(50)[0]
