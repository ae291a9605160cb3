"""A small HTTP/1.1 server: httptools parsing on a uvloop protocol, no framework.

One :class:`HttpProtocol` per connection, as a state machine: it parses requests with
httptools, enforces the body limit while the body arrives (a request over the limit is answered
400 and the connection closed), and runs one handler at a time per connection so pipelined
responses keep their order. Handlers are ``async def handler(req) -> Response``; an exception in
a handler becomes a 500 with its message (httptools callbacks are wrapped: an exception there
would silently kill the connection). Responses may stream (an async iterator of bytes, sent
with chunked transfer encoding).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

import httptools

log = logging.getLogger("m3shm.http")

REASONS = {200: "OK", 204: "No Content", 400: "Bad Request", 404: "Not Found",
           405: "Method Not Allowed", 409: "Conflict", 413: "Payload Too Large",
           415: "Unsupported Media Type", 422: "Unprocessable Entity", 499: "Client Closed Request",
           500: "Internal Server Error", 503: "Service Unavailable",
           507: "Insufficient Storage"}


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    too_large: bool = False
    closed: asyncio.Event | None = None  # set when the client's connection is lost


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)
    stream: AsyncIterator[bytes] | None = None


Handler = Callable[[Request], Awaitable[Response]]


def text(status: int, msg: str, **headers: str) -> Response:
    return Response(status, (msg.rstrip("\n") + "\n").encode(), headers=headers)


class HttpProtocol(asyncio.Protocol):
    def __init__(self, router: Callable[[Request], Handler], max_body: Callable[[], int],
                 tracker: set[asyncio.Task]) -> None:
        self.router = router
        self.max_body = max_body
        self.tracker = tracker
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self._url = b""
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._size = 0
        self._too_large = False
        self._limit = 0
        self._prev: asyncio.Task | None = None
        self._closed = asyncio.Event()
        self._writable = asyncio.Event()  # cleared while the transport's buffer is full
        self._writable.set()
        self.closing = False

    # -- asyncio.Protocol --------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(400, "upgrades are not supported")
        except httptools.HttpParserError as e:
            self._fail(400, f"malformed HTTP request: {e}")

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._closed.set()  # handlers waiting on req.closed stop their work (queries cancel)
        self._writable.set()  # a stream waiting for room wakes and sees the transport gone

    def pause_writing(self) -> None:
        self._writable.clear()  # streams wait: a slow client bounds what a stream buffers

    def resume_writing(self) -> None:
        self._writable.set()

    # -- httptools callbacks (never raise out of these) ---------------------------------------
    def on_message_begin(self) -> None:
        self._url, self._headers, self._body, self._size = b"", {}, [], 0
        self._too_large = False
        self._limit = self.max_body()  # read per request: a config reload applies at once

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        try:
            n = int(self._headers.get("content-length", "0"))
        except ValueError:
            n = 0
        if n > self._limit:
            self._too_large = True

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > self._limit:
            self._too_large = True
            self._body = []
        elif not self._too_large:
            self._body.append(body)

    def on_message_complete(self) -> None:
        try:
            u = urlsplit(self._url.decode("latin-1"))
            req = Request(self.parser.get_method().decode(), u.path,
                          parse_qs(u.query, keep_blank_values=True), self._headers,
                          b"".join(self._body), self._too_large, self._closed)
            keep = self.parser.should_keep_alive() and not self._too_large
            prev = self._prev
            task = asyncio.get_running_loop().create_task(self._run(req, keep, prev))
            self._prev = task
            self.tracker.add(task)
            task.add_done_callback(self.tracker.discard)
        except Exception as e:  # noqa: BLE001 - a callback must not raise
            self._fail(400, f"bad request: {e}")

    # -- responses ---------------------------------------------------------------------------
    async def _run(self, req: Request, keep: bool, prev: asyncio.Task | None) -> None:
        if prev is not None:
            await asyncio.wait([prev])
        try:
            resp = await self.router(req)(req)
        except Exception as e:  # noqa: BLE001
            log.exception("handler failed: %s %s", req.method, req.path)
            resp = text(500, f"internal error: {e}")
        await self._send(resp, keep and not self.closing)

    async def _send(self, resp: Response, keep: bool) -> None:
        t = self.transport
        if t is None or t.is_closing():
            return
        head = [f"HTTP/1.1 {resp.status} {REASONS.get(resp.status, 'Status')}",
                f"Content-Type: {resp.content_type}"]
        for k, v in resp.headers.items():
            head.append(f"{k}: {v}")
        if not keep:
            head.append("Connection: close")
        if resp.stream is None:
            head.append(f"Content-Length: {len(resp.body)}")
            t.write(("\r\n".join(head) + "\r\n\r\n").encode() + resp.body)
        else:
            head.append("Transfer-Encoding: chunked")
            t.write(("\r\n".join(head) + "\r\n\r\n").encode())
            try:
                async for chunk in resp.stream:
                    if self.transport is None:
                        return  # the client went away: stop producing
                    if chunk:
                        t.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                        await self._writable.wait()
            except Exception:  # noqa: BLE001 - the status is sent: cut the body short
                log.exception("stream failed: the response is cut off without its last chunk")
                t.abort()  # the client sees an incomplete body, never a short complete one
                return
            if self.transport is None:
                return
            t.write(b"0\r\n\r\n")
        if not keep:
            t.close()

    def _fail(self, status: int, msg: str) -> None:
        t = self.transport
        if t is not None and not t.is_closing():
            body = (msg + "\n").encode()
            t.write(f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\nContent-Type: "
                    f"text/plain\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                    .encode() + body)
            t.close()
