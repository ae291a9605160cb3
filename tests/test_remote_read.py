"""Remote read end to end: SAMPLES against the real Prometheus 2.42 (configured with
remote_read to the daemon; its own query API must answer what the daemon holds), and
STREAMED_XOR_CHUNKS with our own client, whose XOR-chunk decoder and frame reader here are
written from Prometheus' format description, independently of the C encoder."""

from __future__ import annotations

import json
import math
import shutil
import struct
import subprocess
import time
import urllib.parse
import urllib.request

import numpy as np
import pytest
import snappy
from promcompare import diff
from test_daemon_harness import Daemon, free_port, now_ms

from m3shm._native import ffi, lib
from m3shm.net import remoteread as rremote
from m3shm.net.remoteread import STREAM_CTYPE
from m3shm.proto import remote_read_pb2 as rr

PROM = shutil.which("prometheus") or "/usr/bin/prometheus"


# -- an independent reader of the streamed format ---------------------------------------------

class Bits:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def bit(self) -> int:
        b = (self.data[self.pos >> 3] >> (7 - (self.pos & 7))) & 1
        self.pos += 1
        return b

    def bits(self, n: int) -> int:
        v = 0
        for _ in range(n):
            v = v << 1 | self.bit()
        return v

    def uvarint(self) -> int:
        v = shift = 0
        while True:
            b = self.bits(8)
            v |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                return v


def signed(v: int, n: int) -> int:
    return v - (1 << n) if v >= 1 << (n - 1) else v


def decode_xor(chunk: bytes) -> list[tuple[int, int]]:
    """(timestamp, float64 bits) pairs of a Prometheus XOR chunk."""
    n = chunk[0] << 8 | chunk[1]
    r = Bits(chunk[2:])
    out: list[tuple[int, int]] = []
    t = delta = vb = 0
    lead = trail = 0
    for i in range(n):
        if i == 0:
            z = r.uvarint()
            t = (z >> 1) ^ -(z & 1)
            vb = r.bits(64)
        else:
            if i == 1:
                delta = r.uvarint()
            else:
                k = 0
                while k < 4 and r.bit():
                    k += 1
                width = {0: 0, 1: 14, 2: 17, 3: 20, 4: 64}[k]
                delta += signed(r.bits(width), width) if width else 0
            t += delta
            if r.bit():
                if r.bit():
                    lead = r.bits(5)
                    sig = r.bits(6) or 64
                    trail = 64 - lead - sig
                vb ^= r.bits(64 - lead - trail) << trail
        out.append((t, vb))
    return out


def read_frames(body: bytes) -> list[rr.ChunkedReadResponse]:
    pos, out = 0, []
    while pos < len(body):
        n = shift = 0
        while True:
            b = body[pos]
            pos += 1
            n |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                break
        (crc,) = struct.unpack_from(">I", body, pos)
        msg = body[pos + 4:pos + 4 + n]
        assert lib.m3_crc32c(0, msg, len(msg)) == crc
        out.append(rr.ChunkedReadResponse.FromString(msg))
        pos += 4 + n
    return out


def bits_of(v: float) -> int:
    return struct.unpack("<Q", struct.pack("<d", v))[0]


# -- tests ----------------------------------------------------------------------------------

def test_crc32c_and_xor_encoder_against_reference():
    assert lib.m3_crc32c(0, b"123456789", 9) == 0xE3069283
    rnd = np.random.default_rng(3)
    for case in range(200):
        n = int(rnd.integers(1, 121))
        steps = rnd.choice([1, 15_000, 15_001, 14_999, 1 << 13, 70_000, 600_000, 1 << 40], n)
        ts = np.cumsum(steps).astype(np.int64) + int(rnd.integers(-1 << 40, 1 << 40))
        vals = rnd.choice([0.0, 1.0, -2.5, 1e300, math.inf, math.nan, 3.14159, 1e-300], n)
        if case % 3 == 0:
            vals = rnd.normal(size=n)
        buf = np.empty(lib.m3_promxor_bound(n), dtype=np.uint8)
        k = lib.m3_promxor_encode(ffi.from_buffer("int64_t[]", ts),
                                  ffi.from_buffer("double[]", vals), n,
                                  ffi.from_buffer("uint8_t[]", buf), len(buf))
        assert k > 0
        got = decode_xor(buf[:k].tobytes())
        assert got == [(int(t), bits_of(v)) for t, v in zip(ts, vals, strict=True)]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = Daemon(tmp_path_factory.mktemp("rread")).start()
    t0 = (now_ms() - 9 * 60_000) // 1000 * 1000
    series = []
    for h in range(4):
        series.append(({"__name__": "cpu", "instance": f"h{h}", "mode": "idle"},
                       [(t0 + i * 15_000 + h, float(i) * 0.5 + h) for i in range(36)]))
    series.append(({"__name__": "odd", "x": "y"},
                   [(t0, math.nan), (t0 + 1000, -0.0), (t0 + 2000, 1e-7), (t0 + 3000, math.inf)]))
    assert d.write(series)[0] == 204
    yield d, t0, series
    d.stop()


def read(d: Daemon, queries: list[rr.Query], types: list[int]) -> tuple[int, bytes, dict]:
    req = rr.ReadRequest(queries=queries, accepted_response_types=types)
    return d.post("/api/v1/read", snappy.compress(req.SerializeToString()),
                  {"X-Prometheus-Remote-Read-Version": "0.1.0"})


def q(start: int, end: int, *matchers: tuple[int, str, str]) -> rr.Query:
    return rr.Query(start_timestamp_ms=start, end_timestamp_ms=end,
                    matchers=[rr.LabelMatcher(type=t, name=n, value=v) for t, n, v in matchers])


def test_streamed_xor_chunks(daemon):
    d, t0, series = daemon
    code, body, headers = read(d, [q(t0, t0 + 3_600_000, (2, "__name__", "cpu|odd")),
                                   q(t0 + 30_000, t0 + 60_000, (0, "instance", "h1"))],
                               [rr.ReadRequest.STREAMED_XOR_CHUNKS, rr.ReadRequest.SAMPLES])
    assert code == 200 and headers["Content-Type"] == STREAM_CTYPE
    got: dict[int, dict] = {0: {}, 1: {}}
    for fr in read_frames(body):
        for cs in fr.chunked_series:
            key = tuple((lb.name, lb.value) for lb in cs.labels)
            pts = [p for c in cs.chunks for p in decode_xor(c.data)]
            for c in cs.chunks:
                assert c.type == rr.Chunk.XOR and len(decode_xor(c.data)) <= 120
                assert decode_xor(c.data)[0][0] == c.min_time_ms
            got[fr.query_index][key] = pts
    want = {tuple(sorted(lb.items())): [(t, bits_of(v)) for t, v in pts] for lb, pts in series}
    assert got[0] == want
    (key,) = got[1]
    assert dict(key)["instance"] == "h1"
    assert [p[0] for p in got[1][key]] == [t for t, _ in want[key]
                                          if t0 + 30_000 <= t <= t0 + 60_000]


def test_streamed_frame_per_series_over_many_groups(daemon):
    """More series than one decode group: one series per frame, in label order, each whole,
    and the frames of both queries tagged with their query index."""
    d, t0, _ = daemon
    n = rremote.SERIES_PER_GROUP * 2 + 7
    many = [({"__name__": "many", "i": f"{i:05d}"}, [(t0 + k * 1000, float(i + k))
                                                     for k in range(3)]) for i in range(n)]
    assert d.write(many[::-1])[0] == 204
    code, body, _ = read(d, [q(t0, t0 + 60_000, (0, "__name__", "many")),
                             q(t0, t0 + 1000, (0, "i", "00001"))],
                         [rr.ReadRequest.STREAMED_XOR_CHUNKS])
    assert code == 200
    frames = read_frames(body)
    assert all(len(fr.chunked_series) == 1 for fr in frames)
    first = [fr.chunked_series[0] for fr in frames if fr.query_index == 0]
    assert [dict((lb.name, lb.value) for lb in cs.labels)["i"] for cs in first] == \
        [f"{i:05d}" for i in range(n)]
    for i, cs in enumerate(first):
        assert [p for c in cs.chunks for p in decode_xor(c.data)] == \
            [(t0 + k * 1000, bits_of(float(i + k))) for k in range(3)]
    (second,) = [fr for fr in frames if fr.query_index == 1]
    assert [p for c in second.chunked_series[0].chunks for p in decode_xor(c.data)] == \
        [(t0, bits_of(1.0)), (t0 + 1000, bits_of(2.0))]


def test_series_larger_than_a_frame_is_split(monkeypatch):
    """As Prometheus: a series whose chunks pass FRAME_BYTES continues in the next frame,
    which repeats its labels; chunks stay in order and whole."""
    monkeypatch.setattr(rremote, "FRAME_BYTES", 300)
    ts = np.arange(1000, dtype=np.int64) * 15_000
    vals = np.sin(np.arange(1000, dtype=np.float64))
    frames = read_frames(b"".join(rremote.series_frames((("__name__", "big"),), ts, vals, b"")))
    assert len(frames) > 2
    pts = []
    for fr in frames:
        (cs,) = fr.chunked_series
        assert [(lb.name, lb.value) for lb in cs.labels] == [("__name__", "big")]
        pts += [p for c in cs.chunks for p in decode_xor(c.data)]
    assert pts == [(int(t), bits_of(v)) for t, v in zip(ts, vals, strict=True)]


def test_samples_and_bad_requests(daemon):
    d, t0, series = daemon
    code, body, headers = read(d, [q(t0, t0 + 3_600_000, (0, "__name__", "odd"))], [])
    assert code == 200 and headers.get("Content-Encoding") == "snappy"
    resp = rr.ReadResponse.FromString(snappy.uncompress(body))
    (ts,) = resp.results[0].timeseries
    assert [(s.timestamp, bits_of(s.value)) for s in ts.samples] == \
        [(t, bits_of(v)) for t, v in series[-1][1]]
    code, body, _ = d.post("/api/v1/prom/remote/read", b"not snappy")
    assert code == 400 and b"remote read: " in body
    code, body, _ = read(d, [q(0, 1, (2, "a", "("))], [])
    assert code == 400 and b"matcher" in body


@pytest.mark.skipif(not shutil.which("prometheus") and not
                    __import__("os").path.exists(PROM), reason="prometheus not installed")
def test_real_prometheus_reads_through_remote_read(daemon, tmp_path):
    d, t0, series = daemon
    port = free_port()
    cfg = tmp_path / "prom.yml"
    cfg.write_text(f"""
global: {{scrape_interval: 1h}}
remote_read:
  - url: {d.url}/api/v1/read
    read_recent: true
""")
    proc = subprocess.Popen([PROM, f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path}/db",
                             f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(base + "/-/ready", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.2)

        def prom(query: str, **kw) -> list:
            u = base + "/api/v1/query_range?" + urllib.parse.urlencode({"query": query, **kw})
            with urllib.request.urlopen(u, timeout=30) as r:
                return json.load(r)["data"]["result"]

        def ours(query: str, **kw) -> list:
            u = d.url + "/api/v1/query_range?" + urllib.parse.urlencode({"query": query, **kw})
            with urllib.request.urlopen(u, timeout=30) as r:
                return json.load(r)["data"]["result"]

        rng = {"start": t0 / 1000, "end": (t0 + 540_000) / 1000, "step": "15"}
        for query in ["cpu", 'sum by (mode) (rate(cpu{instance=~"h[0-2]"}[2m]))', "odd"]:
            a, b = prom(query, **rng), ours(query, **rng)
            assert diff(a, b) is None, (query, diff(a, b))
            assert a, query
    finally:
        proc.terminate()
        proc.wait(30)
