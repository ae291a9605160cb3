"""Prometheus remote read: ``POST /api/v1/read`` and M3's ``/api/v1/prom/remote/read``.

The request is a snappy-compressed ``prometheus.ReadRequest`` (proto/remote_read.proto). The
answer takes the first type the client accepts that we serve, in the client's order of
preference as Prometheus does: ``STREAMED_XOR_CHUNKS`` (frames of ``ChunkedReadResponse``,
each ``uvarint length | CRC-32C big-endian | message``, content type
``application/x-streamed-protobuf; proto=prometheus.ChunkedReadResponse``) or ``SAMPLES`` (one
snappy-compressed ``ReadResponse``). Wire details: docs/formats/remote-read.md.

Series come from the same storage as PromQL (the shards, through the reverse index) under the
same per-query limits, timeout and disconnect cancellation; the per-sample encoding (the
``Sample`` fields, Prometheus XOR chunks, the frame CRC) happens in C (csrc/remote_read.c).
The protobuf framing around it is written here by hand, per series and per chunk.

A streamed answer is sent as it is produced: the selection (compressed blocks, charged to the
limits, so a limit still answers 422 before anything is sent) happens first; then series are
decoded ``SERIES_PER_GROUP`` at a time and sent as frames of one series each (as Prometheus
does), a step of about ``FRAME_BYTES`` at a time on the query pool, and the HTTP layer waits
for a slow client (flow control), so memory is bounded by a step, not the whole response.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING

import cramjam
import numpy as np
import snappy

from m3shm._native import ffi, lib
from m3shm.errors import check
from m3shm.net.http import Request, Response, text
from m3shm.net.promjson import ApiError
from m3shm.proto import remote_read_pb2 as rr
from m3shm.query.blocks import FlatSeries, decode_batch, decode_result
from m3shm.query.context import QueryContext
from m3shm.query.errors import QueryError
from m3shm.query.labels import Labels
from m3shm.query.matchers import Matcher
from m3shm.query.resolution import ResolutionStorage
from m3shm.query.storage import BlockBatch, SelectResult

if TYPE_CHECKING:
    from m3shm.net.promapi import PromApi

READ_PATHS = ("/api/v1/read", "/api/v1/prom/remote/read")
STREAM_CTYPE = "application/x-streamed-protobuf; proto=prometheus.ChunkedReadResponse"
MAX_CHUNK_SAMPLES = 120  # as Prometheus cuts its own chunks
FRAME_BYTES = 1 << 20  # a frame is sent once it holds this many bytes (Prometheus' default)
SERIES_PER_GROUP = 1024  # series decoded at once while streaming
_OPS = {rr.LabelMatcher.EQ: "=", rr.LabelMatcher.NEQ: "!=", rr.LabelMatcher.RE: "=~",
        rr.LabelMatcher.NRE: "!~"}


def uvarint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def field_bytes(tag: int, payload: bytes) -> bytes:
    """A length-delimited field: key (field << 3 | 2), length, payload."""
    return bytes([tag << 3 | 2]) + uvarint(len(payload)) + payload


def labels_bytes(labels: Labels) -> bytes:
    return b"".join(field_bytes(1, field_bytes(1, k.encode()) + field_bytes(2, v.encode()))
                    for k, v in labels)


def samples_bytes(ts: np.ndarray, vals: np.ndarray) -> bytes:
    n = len(ts)
    if not n:
        return b""
    out = np.empty(22 * n, dtype=np.uint8)
    got = lib.m3_pb_samples(ffi.from_buffer("int64_t[]", ts), ffi.from_buffer("double[]", vals),
                            n, ffi.from_buffer("uint8_t[]", out), len(out))
    check(got, "encoding remote read samples")
    return out[:got].tobytes()


def xor_chunks(ts: np.ndarray, vals: np.ndarray) -> list[tuple[int, int, bytes]]:
    """A series' samples as Prometheus XOR chunks of at most 120 samples: (min, max, data)."""
    out = []
    buf = np.empty(lib.m3_promxor_bound(MAX_CHUNK_SAMPLES), dtype=np.uint8)
    pbuf = ffi.from_buffer("uint8_t[]", buf)
    for a in range(0, len(ts), MAX_CHUNK_SAMPLES):
        t, v = ts[a:a + MAX_CHUNK_SAMPLES], vals[a:a + MAX_CHUNK_SAMPLES]
        n = check(lib.m3_promxor_encode(ffi.from_buffer("int64_t[]", t),
                                        ffi.from_buffer("double[]", v), len(t), pbuf,
                                        len(buf)), "encoding an XOR chunk")
        out.append((int(t[0]), int(t[-1]), buf[:n].tobytes()))
    return out


def frame(msg: bytes) -> bytes:
    crc = lib.m3_crc32c(0, msg, len(msg))
    return uvarint(len(msg)) + struct.pack(">I", crc) + msg


def parse_request(body: bytes, max_decompressed: int) -> rr.ReadRequest:
    try:
        n = cramjam.snappy.decompress_raw_len(body)
    except Exception as e:  # noqa: BLE001 - any library error means a bad body
        raise ApiError("bad_data", f"remote read: malformed snappy body: {e}") from None
    if n > max_decompressed:
        raise ApiError("bad_data", f"remote read: decompressed body would be {n} bytes, more "
                                   f"than limits.max_decompressed_bytes={max_decompressed}")
    try:
        return rr.ReadRequest.FromString(snappy.uncompress(body))
    except Exception as e:  # noqa: BLE001
        raise ApiError("bad_data", "remote read: not a prometheus.ReadRequest: "
                                   f"{e or type(e).__name__}") from None


def query_matchers(q: rr.Query) -> list[Matcher]:
    try:
        return [Matcher(m.name, _OPS[m.type], m.value) for m in q.matchers]
    except (KeyError, QueryError) as e:
        raise ApiError("bad_data", f"remote read: bad matcher: {e}") from None


def _select(st: ResolutionStorage, q: rr.Query) -> SelectResult:
    return st.select(query_matchers(q), q.start_timestamp_ms, q.end_timestamp_ms)


def _series(st: ResolutionStorage, q: rr.Query):
    """Every series of one query, decoded at once, sorted by labels: (labels, ts, vals)."""
    mint, maxt = q.start_timestamp_ms, q.end_timestamp_ms
    yield from _flat_series(decode_result(_select(st, q), mint, maxt))


def _flat_series(flat: FlatSeries):
    order = sorted(range(len(flat.labels)), key=lambda i: flat.labels[i])
    for i in order:
        a, b = int(flat.offsets[i]), int(flat.offsets[i + 1])
        if b > a:
            yield flat.labels[i], flat.ts[a:b], flat.vals[a:b]


def sub_batch(b: BlockBatch, series: np.ndarray) -> BlockBatch:
    """The blocks of ``series`` (indices into ``b.labels``), renumbered 0..len(series)-1 in
    that order; each series' blocks keep their order (later wins a timestamp)."""
    rank = np.full(len(b.labels), -1, dtype=np.int64)
    rank[series] = np.arange(len(series))
    brank = rank[b.series]
    idx = np.nonzero(brank >= 0)[0]
    idx = idx[np.argsort(brank[idx], kind="stable")]
    starts = b.offsets[:-1][idx].astype(np.int64)
    lens = (b.offsets[1:][idx] - b.offsets[:-1][idx]).astype(np.int64)
    pos = np.repeat(starts - (np.cumsum(lens) - lens), lens) + np.arange(int(lens.sum()))
    offsets = np.zeros(len(idx) + 1, dtype=np.uint64)
    np.cumsum(lens, out=offsets[1:])
    return BlockBatch([b.labels[i] for i in series.tolist()], np.asarray(b.data)[pos], offsets,
                      brank[idx], b.counts[idx], b.start_ms[idx], b.end_ms[idx],
                      None if b.clip_lo is None else b.clip_lo[idx],
                      None if b.clip_hi is None else b.clip_hi[idx])


def _series_groups(res: SelectResult, mint: int, maxt: int, ctx: QueryContext):
    """The series of a select answer sorted by labels, decoded ``SERIES_PER_GROUP`` at a time
    (the compressed blocks stay as selected; only one group is decoded at once)."""
    if res.series or len(res.batches) != 1:  # not one local batch: decode it all at once
        yield from _flat_series(decode_result(res, mint, maxt))
        return
    (b,) = res.batches
    order = np.array(sorted(range(len(b.labels)), key=lambda i: b.labels[i]), dtype=np.int64)
    for a in range(0, len(order), SERIES_PER_GROUP):
        ctx.check()
        flat = decode_batch(sub_batch(b, order[a:a + SERIES_PER_GROUP]), mint, maxt)
        for i, lbl in enumerate(flat.labels):
            x, y = int(flat.offsets[i]), int(flat.offsets[i + 1])
            if y > x:
                yield lbl, flat.ts[x:y], flat.vals[x:y]


def samples_response(st: ResolutionStorage, req: rr.ReadRequest) -> bytes:
    results = []
    for q in req.queries:
        ts_parts = [field_bytes(1, labels_bytes(lb) + samples_bytes(t, v))
                    for lb, t, v in _series(st, q)]
        results.append(field_bytes(1, b"".join(ts_parts)))
    return snappy.compress(b"".join(results))


def series_frames(labels: Labels, ts: np.ndarray, vals: np.ndarray, tail: bytes
                  ) -> Iterator[bytes]:
    """One series as frames, as Prometheus streams them: a frame holds this series' chunks
    only, and a new frame (repeating the labels) starts once one reached FRAME_BYTES."""
    lb = labels_bytes(labels)
    parts: list[bytes] = []
    size = 0
    for lo, hi, data in xor_chunks(ts, vals):
        chunk = field_bytes(2, b"\x08" + uvarint(lo & (2**64 - 1)) + b"\x10" +
                            uvarint(hi & (2**64 - 1)) + b"\x18\x01" + field_bytes(4, data))
        parts.append(chunk)
        size += len(chunk)
        if size >= FRAME_BYTES:
            yield frame(field_bytes(1, lb + b"".join(parts)) + tail)
            parts, size = [], 0
    if parts:
        yield frame(field_bytes(1, lb + b"".join(parts)) + tail)


def streamed_frames(selected: list[SelectResult], req: rr.ReadRequest, ctx: QueryContext
                    ) -> Iterator[list[bytes]]:
    """The streamed response, a few frames at a time (about FRAME_BYTES per step), so the
    decoded samples and the response bytes held at once stay bounded whatever the answer's
    size. Each step runs on the query pool (``next`` from an executor)."""
    out: list[bytes] = []
    size = 0
    for qi, (q, res) in enumerate(zip(req.queries, selected, strict=True)):
        tail = b"\x10" + uvarint(qi) if qi else b""
        for lb, t, v in _series_groups(res, q.start_timestamp_ms, q.end_timestamp_ms, ctx):
            for f in series_frames(lb, t, v, tail):
                out.append(f)
                size += len(f)
            if size >= FRAME_BYTES:
                yield out
                out, size = [], 0
                ctx.check()
    if out:
        yield out


def streamed_response(st: ResolutionStorage, req: rr.ReadRequest) -> bytes:
    """The whole streamed response as one buffer (tests and tools)."""
    selected = [_select(st, q) for q in req.queries]
    return b"".join(f for fs in streamed_frames(selected, req, st.ctx) for f in fs)


async def _pump(api: PromApi, steps: Iterator[list[bytes]]) -> AsyncIterator[bytes]:
    """Frames of a streamed response, each step computed on the query pool."""
    loop = asyncio.get_running_loop()
    while True:
        frames = await loop.run_in_executor(api.pool, next, steps, None)
        if frames is None:
            return
        for f in frames:
            yield f


async def remote_read(api: PromApi, req: Request) -> Response:
    if req.method != "POST":
        return text(405, "remote read takes POST")
    lim = api.w.cfg.limits
    if req.too_large:
        return text(400, f"request body is larger than limits.max_body_bytes="
                         f"{lim.max_body_bytes}")
    loop = asyncio.get_running_loop()
    try:
        rq = await loop.run_in_executor(api.pool, parse_request, req.body,
                                        lim.max_decompressed_bytes)
        for q in rq.queries:
            query_matchers(q)
    except ApiError as e:
        return text(400, str(e))
    streamed = False
    for t in rq.accepted_response_types:
        if t in (rr.ReadRequest.SAMPLES, rr.ReadRequest.STREAMED_XOR_CHUNKS):
            streamed = t == rr.ReadRequest.STREAMED_XOR_CHUNKS
            break
    else:
        if rq.accepted_response_types:
            return text(400, "remote read: none of the accepted response types is served "
                             "(SAMPLES, STREAMED_XOR_CHUNKS)")
    ctx: QueryContext = api._ctx({}, f"remote read ({len(rq.queries)} queries)")

    from m3shm.net.promapi import NAMESPACES_HEADER

    def work(ctx: QueryContext) -> Response:
        st = api.storage(ctx)
        # the namespaces that answered (chosen by the selection, before any byte is sent)
        if streamed:  # select (and charge the limits) now; decode and send frame by frame
            selected = [_select(st, q) for q in rq.queries]
            return Response(200, b"", STREAM_CTYPE, {NAMESPACES_HEADER: st.header()},
                            stream=_pump(api, streamed_frames(selected, rq, ctx)))
        body = samples_response(st, rq)
        return Response(200, body, "application/x-protobuf",
                        {"Content-Encoding": "snappy", NAMESPACES_HEADER: st.header()})

    resp = await api.run(req, ctx, work)
    if resp.status != 200:  # remote read answers errors as plain text, as Prometheus does
        import json

        msg = json.loads(resp.body).get("error", "")
        return text(resp.status if resp.status != 499 else 499, msg)
    return resp
