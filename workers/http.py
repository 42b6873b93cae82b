"""A client connection while it speaks HTTP/1.1: the HTTP API, health, or an upgrade.

:class:`HttpProtocol` parses requests with httptools. A request that upgrades to a
WebSocket is checked (RFC 6455 §4.2.1) and answered here, and the transport is handed to
a :class:`~vask.workers.websocket.PusherConnection` with ``transport.set_protocol``; this
object is then dropped, so an open WebSocket carries none of the HTTP state.

Bounds (each a ``[server]`` setting; see ``docs/security.md``):

* request head (request line and headers) above ``max_request_head_bytes`` -> 431; a
  request target above ``max_url_bytes`` -> 414; more than ``MAX_HEADERS`` headers ->
  431; a body above ``max_http_body_bytes`` -> 413. Each answer closes the connection.
  The head is counted as bytes arrive, so a huge header costs at most one read's worth
  of parsing beyond the limit.
* a request (head and body) must arrive within ``http_request_timeout`` of its first
  byte (or of the accept, for the first request) -> 408 and close; an idle keep-alive
  connection is closed after ``keep_alive_timeout``. The worker's once-a-second sweep
  checks both (no timer per connection).
* pipelined requests are answered in order, one HTTP API call at a time; while any wait,
  the connection is not read from; more than ``MAX_PIPELINED`` waiting -> the ones
  queued are answered, then 503 and close.
* outbound bytes go through :class:`~vask.workers.outbound.Outbound` (pause reading
  above the high-water mark, cut above the hard limit).

A refused request is answered, then the write side is shut and further input is read
and discarded for a moment before the close (a "lingering close"): closing a socket
with unread input makes the kernel send a reset, and the client would lose the answer.
"""

from __future__ import annotations

import asyncio
import binascii
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine
from itertools import chain
from typing import TYPE_CHECKING, Any

import httptools
import orjson
from websockets.utils import accept_key

from vask.workers.admission import PROXY_LINE_MAX
from vask.workers.outbound import PAUSED_BURST, PAUSED_PIPELINE, PAUSED_WRITES, Outbound
from vask.workers.websocket import PusherConnection

if TYPE_CHECKING:
    from vask.workers.server import Worker

log = logging.getLogger("vask.worker")

MAX_HEADERS = 100
MAX_PIPELINED = 32
BURST_REQUESTS = 64  # requests in one read above which others get the loop first
#: A read is parsed this many bytes at a time, and once more than BURST_REQUESTS
#: requests of it are complete, the rest waits for the next loop turn (reading paused).
#: The event loop reads up to 256 KB at once, which pipelined 20-byte requests make
#: about 13 000 answers: all at once they would hold up every other connection of the
#: worker. A large body still parses in one go: it completes no request on the way.
HTTP_SHARE = 4096
LINGER = 2.0  # seconds a refused connection is read from (and discarded) before closing

_JSON = b"application/json"

#: what a route answers: the response now, or a coroutine function producing it
Response = bytes | Callable[[], Coroutine[Any, Any, bytes]]


def http_response(status: int, body: bytes, keep_alive: bool = True,
                  headers: tuple[tuple[str, str], ...] = (),
                  content_type: bytes = _JSON) -> bytes:
    """A complete HTTP/1.1 response."""
    reason = _REASONS.get(status, "Unknown")
    head = [f"HTTP/1.1 {status} {reason}".encode(),
            b"Content-Type: " + content_type,
            f"Content-Length: {len(body)}".encode()]
    if not keep_alive:
        head.append(b"Connection: close")
    for name, value in headers:
        head.append(f"{name}: {value}".encode())
    return b"\r\n".join(head) + b"\r\n\r\n" + body


_REASONS = {
    101: "Switching Protocols", 200: "OK", 204: "No Content", 400: "Bad Request",
    401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
    408: "Request Timeout", 413: "Payload Too Large", 414: "URI Too Long",
    426: "Upgrade Required", 429: "Too Many Requests", 431: "Request Header Fields Too Large",
    500: "Internal Server Error", 503: "Service Unavailable",
}


def json_error(status: int, message: str) -> bytes:
    return orjson.dumps({"error": message, "code": status})


def error_response(status: int, message: str, keep_alive: bool = False,
                   headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    return http_response(status, json_error(status, message), keep_alive, headers)


class _Refused(Exception):
    """Raised from a parser callback to stop parsing and answer with this status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class HttpProtocol(Outbound):
    """One client connection until it upgrades (or closes)."""

    __slots__ = (
        "began",
        "body",
        "body_size",
        "head_bytes",
        "headers",
        "idle_since",
        "in_head",
        "in_request",
        "lingering",
        "overflow",
        "parser",
        "peer",
        "pipeline",
        "proxy_line",
        "refusal",
        "requests",
        "running",
        "started",
        "url",
    )

    def __init__(self, worker: Worker) -> None:
        super().__init__(worker)
        self.parser: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)
        self.peer: str | None = None
        #: bytes of a PROXY protocol line still expected before the first request (set
        #: by the admission for a trusted proxy when proxy_protocol is on), else None
        self.proxy_line: bytes | None = None
        #: the time the current request began (or the accept, before the first one)
        self.started = time.monotonic()
        #: when the last request completed (0: none yet)
        self.idle_since = 0.0
        self.in_request = False
        self.in_head = False
        self.began = False
        self.head_bytes = 0
        self.lingering = False
        self.overflow = False
        #: responses not yet written, in request order, with their keep-alive flag
        self.pipeline: deque[tuple[Response, bool]] | None = None
        self.running: asyncio.Task[None] | None = None
        self.refusal: _Refused | None = None
        #: requests completed in the current read
        self.requests = 0
        # per-request state
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.body_size = 0

    # --- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        worker = self.worker
        settings = worker.settings
        self.take_transport(transport, 0)  # type: ignore[arg-type]
        transport.set_write_buffer_limits(  # type: ignore[attr-defined]
            settings.write_buffer_high, settings.write_buffer_low)
        worker.connections.add(self)
        refusal = worker.admission.tcp_opened(self)
        if refusal is not None:
            self.refuse(*refusal)

    def connection_lost(self, exc: Exception | None) -> None:
        self.worker.connections.discard(self)
        self.worker.held.pop(self, None)
        self.worker.admission.tcp_closed(self.peer)
        self.transport = None
        self.parser = None

    def data_received(self, data: bytes) -> None:
        parser = self.parser
        if parser is None:
            return  # lingering after a refusal: discard
        if self.proxy_line is not None:
            data = self._proxy_header(data)
            if not data or self.parser is None:
                return
        self.began = False
        self.requests = 0
        rest = data
        fed = 0
        try:
            while rest:
                share, rest = rest[:HTTP_SHARE], rest[HTTP_SHARE:]
                try:
                    parser.feed_data(share)
                except httptools.HttpParserUpgrade as upgrade:
                    offset = upgrade.args[0] if upgrade.args else len(share)
                    self._upgrade(share[offset:] + rest)
                    return
                fed += len(share)
                if self.requests > BURST_REQUESTS or self.parser is None:
                    break
        except httptools.HttpParserError as exc:
            refusal = self.refusal
            if refusal is not None:
                self.refuse(refusal.status, refusal.message)
            else:
                self.refuse(400, f"Malformed HTTP request: {exc}")
            return
        if rest and self.parser is not None:
            self.hold(rest)  # a read full of pipelined requests: others first
        elif self.requests > BURST_REQUESTS:
            self.pause_for_a_turn()  # the same, with nothing left over
        if self.in_head and not self.began:
            # The head started in an earlier read and is still incomplete: all of this
            # read belongs to it. (A head that starts in this read is measured exactly
            # when it completes, in on_headers_complete.)
            self.head_bytes += fed
            limit = self.worker.settings.max_request_head_bytes
            if self.head_bytes > limit:
                self.refuse(431, f"Request head larger than {limit} bytes")

    def take_up(self, rest: bytes) -> None:
        """The rest of a read that was held (see HTTP_SHARE)."""
        if self.parser is not None:  # else answered for good meanwhile
            self.data_received(rest)

    def eof_received(self) -> bool | None:
        return None  # close our side too (answers already queued are still sent)

    def _proxy_header(self, data: bytes) -> bytes:
        """Take the PROXY protocol line off the front of the stream; what follows it
        (b"" while the line is incomplete or when it was refused)."""
        assert self.proxy_line is not None
        buffered = self.proxy_line + data
        end = buffered.find(b"\r\n", 0, PROXY_LINE_MAX)
        if end < 0:
            if len(buffered) >= PROXY_LINE_MAX:
                self.proxy_line = None
                self.refuse(400, "Malformed PROXY protocol header")
            else:
                self.proxy_line = buffered
            return b""
        self.proxy_line = None
        refusal = self.worker.admission.proxied(self, buffered[:end])
        if refusal is not None:
            self.refuse(*refusal)
            return b""
        return buffered[end + 2:]

    # --- httptools callbacks ---------------------------------------------------------

    def _stop(self, status: int, message: str) -> None:
        self.refusal = _Refused(status, message)
        raise self.refusal

    def on_message_begin(self) -> None:
        self.in_request = self.in_head = self.began = True
        # the fine clock: the worker's coarse one may be a second old, and a deadline
        # counted from it would fire up to a second early
        self.started = time.monotonic()
        self.head_bytes = 0
        self.url = b""
        self.headers = []
        self.body = []
        self.body_size = 0

    def on_url(self, url: bytes) -> None:
        self.url += url
        limit = self.worker.settings.max_url_bytes
        if len(self.url) > limit:
            self._stop(414, f"Request target longer than {limit} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        # names are kept in lower case: every reader compares them so
        headers = self.headers
        headers.append((name.lower(), value))
        if len(headers) > MAX_HEADERS:
            self._stop(431, f"More than {MAX_HEADERS} request headers")

    def on_headers_complete(self) -> None:
        self.in_head = False
        headers = self.headers
        # each header line: name, ": ", value, CRLF
        size = len(self.url) + sum(map(len, chain.from_iterable(headers))) + 4 * len(headers)
        limit = self.worker.settings.max_request_head_bytes
        if size > limit:
            self._stop(431, f"Request head larger than {limit} bytes")

    def on_body(self, body: bytes) -> None:
        self.body.append(body)
        self.body_size += len(body)
        limit = self.worker.settings.max_http_body_bytes
        if self.body_size > limit:
            self._stop(413, f"Request body larger than {limit} bytes")

    def on_message_complete(self) -> None:
        parser = self.parser
        assert parser is not None
        self.in_request = False
        self.requests += 1
        self.idle_since = time.monotonic()
        if parser.should_upgrade():
            return  # handled by HttpParserUpgrade
        # a stopping worker answers what it was asked, then closes the connection
        keep_alive = parser.should_keep_alive() and not self.worker.stopping
        method = parser.get_method().decode()
        body = b"".join(self.body)
        self.body = []
        self.respond(self.worker.http_route(method, self.url, self.headers, body, keep_alive),
                     keep_alive)

    # --- answering --------------------------------------------------------------------

    def respond(self, response: Response, keep_alive: bool) -> None:
        """Answer a request; pipelined answers leave in request order."""
        if self.overflow or self.lingering:
            return
        if self.pipeline is None and isinstance(response, bytes):
            self.write(response)
            if not keep_alive:
                self._finish()
            return
        if self.pipeline is None:
            self.pipeline = deque()
            self.pause(PAUSED_PIPELINE)
        if len(self.pipeline) >= MAX_PIPELINED:
            self.overflow = True  # answered with 503 once those queued are done
            return
        self.pipeline.append((response, keep_alive))
        self._next()

    def _next(self) -> None:
        pipeline = self.pipeline
        while pipeline and self.running is None:
            response, keep_alive = pipeline[0]
            if not isinstance(response, bytes):
                self.running = self.worker.loop.create_task(self._answer(response))
                return
            pipeline.popleft()
            self.write(response)
            if not keep_alive:
                self._finish()
                return
        if not pipeline and self.running is None:
            self.pipeline = None
            if self.overflow:
                self.refuse(503, f"More than {MAX_PIPELINED} pipelined requests")
                return
            self.resume(PAUSED_PIPELINE)

    async def _answer(self, response: Callable[[], Coroutine[Any, Any, bytes]]) -> None:
        """Run one HTTP API call and write its answer in the same task step that gets
        the result (a done callback would wait one more loop turn, behind whatever
        fan-out that turn writes)."""
        assert self.pipeline is not None
        keep_alive = self.pipeline[0][1]  # the request being answered heads the pipeline
        try:
            data = await response()
        except Exception:
            log.exception("HTTP API handler failed")
            data = error_response(500, "internal error", keep_alive)
        self.running = None
        pipeline = self.pipeline
        if pipeline is None or self.transport is None:
            return
        pipeline.popleft()
        self.write(data)
        if not keep_alive:
            self._finish()
            return
        self._next()

    def _finish(self) -> None:
        """The last answer is written: close once it has left."""
        self.parser = None
        self.pipeline = None
        if self.transport is not None:
            self.transport.close()

    def refuse(self, status: int, message: str,
               headers: tuple[tuple[str, str], ...] = ()) -> None:
        """Answer ``status`` and close, lingering so the client can read the answer."""
        self.worker.counters[f"http_{status}"] += 1
        self.parser = None
        self.pipeline = None
        self.lingering = True
        self.started = self.worker.clock
        transport = self.transport
        if transport is None:
            return
        self.write(error_response(status, message, headers=headers))
        if transport.is_closing():
            return
        if transport.can_write_eof():
            transport.write_eof()
            self.resume(PAUSED_PIPELINE | PAUSED_WRITES)
        else:
            transport.close()

    # --- WebSocket handshake --------------------------------------------------------

    def _upgrade(self, rest: bytes) -> None:
        """The opening handshake (RFC 6455 §4.2), answered from httptools' parse.

        websockets' ``ServerProtocol.accept`` does the same checks but builds a Request,
        a Headers mapping, a Date header and a UUID on the way: about 75 µs per
        connection against about 5 µs here (measured), and connect cost is a headline
        figure. The accept key comes from websockets (``accept_key``); the frames that
        follow are parsed by websockets' ``ServerProtocol``.
        """
        parser = self.parser
        transport = self.transport
        assert parser is not None and transport is not None
        if self.pipeline is not None:
            self.refuse(400, "An upgrade must not follow pipelined requests")
            return
        headers = dict(self.headers)  # names are in lower case (on_header)
        problem = handshake_problem(parser.get_method(), parser.get_http_version(), headers)
        if problem is not None:
            self.refuse(*problem)
            return
        path = self.url.decode("latin-1")
        refusal = self.worker.admission.handshake(self, path, self.headers)
        if refusal is not None:
            self.refuse(*refusal)
            return
        accept = accept_key(headers[b"sec-websocket-key"].decode("latin-1").strip())
        # From here on the connection is a PusherConnection; this object is dropped.
        self.parser = None
        self.url = b""
        self.headers = []
        worker = self.worker
        conn = PusherConnection(worker, transport, self.paused & PAUSED_WRITES, self.peer)
        self.transport = None
        transport.set_protocol(conn)
        if self.paused & PAUSED_BURST and not conn.paused:
            # reading was paused to hold a long read's rest, which conn gets below
            transport.resume_reading()
        worker.connections.discard(self)
        worker.connections.add(conn)
        # Corked: the 101 response leaves in the same write as connection_established.
        conn.queue(_SWITCHING + accept.encode() + b"\r\n\r\n")
        worker.admission.open(conn, path)
        if rest:
            conn.data_received(rest)

    # --- deadlines (called by the worker's sweep) -----------------------------------

    def sweep(self, now: float) -> None:
        settings = self.worker.settings
        transport = self.transport
        if transport is None:
            return
        if self.lingering:
            if now - self.started > LINGER:
                transport.abort()
        elif self.in_request:
            if now - self.started > settings.http_request_timeout:
                self.refuse(408, f"Request not complete within "
                                 f"{settings.http_request_timeout:g} s")
        elif self.pipeline is None:
            if self.idle_since:
                if now - self.idle_since > settings.keep_alive_timeout:
                    transport.close()
            elif now - self.started > settings.http_request_timeout:
                transport.close()  # connected, sent nothing


_SWITCHING = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
              b"Connection: Upgrade\r\nSec-WebSocket-Accept: ")


def _tokens(value: bytes) -> list[bytes]:
    return [token.strip().lower() for token in value.split(b",")]


def handshake_problem(
    method: bytes, version: str, headers: dict[bytes, bytes]
) -> tuple[int, str, tuple[tuple[str, str], ...]] | None:
    """Why this upgrade request is not a valid WebSocket opening handshake, if it is not
    (RFC 6455 §4.2.1): (status, message, extra headers)."""
    if method != b"GET":
        return 405, "WebSocket handshakes must use GET", (("Allow", "GET"),)
    if version != "1.1":
        return 400, "WebSocket handshakes need HTTP/1.1", ()
    # (the usual single-token values are checked without splitting the list)
    upgrade = headers.get(b"upgrade", b"")
    if upgrade.lower() != b"websocket" and b"websocket" not in _tokens(upgrade):
        return 426, "Upgrade: websocket is required", (("Upgrade", "websocket"),)
    connection = headers.get(b"connection", b"")
    if connection.lower() != b"upgrade" and b"upgrade" not in _tokens(connection):
        return 400, "Connection: Upgrade is required", ()
    if headers.get(b"sec-websocket-version", b"").strip() != b"13":
        return 426, "Only WebSocket version 13 is supported", (("Sec-WebSocket-Version", "13"),)
    key = headers.get(b"sec-websocket-key", b"").strip()
    try:
        # strict: only the base64 alphabet, with correct padding
        valid = len(binascii.a2b_base64(key, strict_mode=True)) == 16
    except binascii.Error:
        valid = False
    if not valid:
        return 400, "Sec-WebSocket-Key must be 16 bytes in base64", ()
    return None
