"""The block stream on the wire: storage.py's Python objects <-> proto/blockstream.proto.

A select is one ``SelectRequest``; the answer is a sequence of ``SelectFrame`` messages, each
written as ``uvarint length`` + message bytes (docs/formats/blockstream.md). Blocks travel
compressed and are decoded only when the engine reads them. :class:`StreamStorage` makes any
transport that carries these bytes a :class:`~m3shm.query.storage.Storage`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from m3shm.proto import blockstream_pb2 as pb
from m3shm.query.errors import QueryError
from m3shm.query.matchers import Matcher
from m3shm.query.storage import Block, Encoding, SelectResult, SeriesBlocks, Storage

_OP_TO_PB = {"=": pb.LabelMatcher.EQ, "!=": pb.LabelMatcher.NEQ, "=~": pb.LabelMatcher.RE,
             "!~": pb.LabelMatcher.NRE}
_PB_TO_OP = {v: k for k, v in _OP_TO_PB.items()}
MAX_FRAME_BYTES = 64 << 20


def build_request(matchers: list[Matcher], mint: int, maxt: int) -> pb.SelectRequest:
    req = pb.SelectRequest(start_ms=mint, end_ms=maxt)
    for m in matchers:
        req.matchers.add(type=_OP_TO_PB[m.op], name=m.name, value=m.value)
    return req


def parse_request(req: pb.SelectRequest) -> tuple[list[Matcher], int, int]:
    return ([Matcher(m.name, _PB_TO_OP[m.type], m.value) for m in req.matchers],
            req.start_ms, req.end_ms)


def frames(result: SelectResult, series_per_frame: int = 256) -> Iterator[pb.SelectFrame]:
    """The frames of one answer; partial and warnings ride on the last frame."""
    series = result.all_series()
    chunks = [series[i:i + series_per_frame]
              for i in range(0, len(series), series_per_frame)] or [[]]
    for i, chunk in enumerate(chunks):
        frame = pb.SelectFrame(last=i == len(chunks) - 1)
        for s in chunk:
            ps = frame.series.add()
            for name, value in s.labels:
                ps.labels.add(name=name, value=value)
            for b in s.blocks:
                ps.blocks.add(start_ms=b.start_ms, end_ms=b.end_ms, encoding=int(b.encoding),
                              data=b.data)
        if frame.last:
            frame.partial = result.partial
            frame.warnings.extend(result.warnings)
        yield frame


def collect(stream: Iterable[pb.SelectFrame]) -> SelectResult:
    """Frames back into one SelectResult; an error frame raises QueryError."""
    out = SelectResult([])
    for frame in stream:
        if frame.error:
            raise QueryError(f"remote select failed: {frame.error}")
        for ps in frame.series:
            labels = tuple((lb.name, lb.value) for lb in ps.labels)
            blocks = [Block(b.start_ms, b.end_ms, b.data, Encoding(b.encoding))
                      for b in ps.blocks]
            out.series.append(SeriesBlocks(labels, blocks))
        out.partial |= frame.partial
        out.warnings.extend(frame.warnings)
        if frame.last:
            return out
    out.partial = True
    out.warnings.append("block stream ended without its last frame")
    return out


def write_delimited(msg: pb.SelectFrame | pb.SelectRequest) -> bytes:
    body = msg.SerializeToString()
    n, head = len(body), bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        head.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(head) + body


def read_delimited(data: bytes) -> Iterator[bytes]:
    """The message bodies of a byte string of length-delimited messages."""
    pos = 0
    while pos < len(data):
        n = shift = 0
        while True:
            if pos >= len(data) or shift > 63:
                raise QueryError(f"block stream: truncated length at offset {pos}")
            byte = data[pos]
            pos += 1
            n |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        if n > MAX_FRAME_BYTES or pos + n > len(data):
            raise QueryError(f"block stream: frame of {n} bytes at offset {pos} exceeds the "
                             "data or the frame limit")
        yield data[pos:pos + n]
        pos += n


def serve(storage: Storage, request: bytes) -> bytes:
    """The server side in one call: request bytes in, delimited frames out."""
    req = pb.SelectRequest.FromString(request)
    try:
        result = storage.select(*parse_request(req))
    except QueryError as e:
        return write_delimited(pb.SelectFrame(error=str(e), last=True))
    return b"".join(write_delimited(f) for f in frames(result))


class StreamStorage:
    """A Storage over any transport: ``transport(request bytes) -> delimited frame bytes``."""

    def __init__(self, transport: Callable[[bytes], bytes]) -> None:
        self.transport = transport

    def select(self, matchers: list[Matcher], mint: int, maxt: int) -> SelectResult:
        raw = self.transport(build_request(matchers, mint, maxt).SerializeToString())
        return collect(pb.SelectFrame.FromString(body) for body in read_delimited(raw))
