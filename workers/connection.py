"""One client TCP connection: HTTP/1.1 until it upgrades, then a Pusher WebSocket.

The HTTP request head is parsed with httptools. A request with ``Upgrade: websocket``
is handed to websockets' sans-I/O :class:`ServerProtocol` for the handshake and the
inbound frame parsing; outbound event frames bypass it (they are built once per publish,
see :mod:`vask.workers.wsframe`). Everything else is the HTTP API, health or 404.

No task and no timer per connection: liveness is a timestamp that the worker's single
periodic sweep inspects (:meth:`Connection.sweep`). Writes are corked: frames queued in
one loop iteration leave in one ``write`` (see :meth:`Worker.queue`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
from typing import TYPE_CHECKING, Any

import httptools
import orjson
from websockets.exceptions import InvalidState
from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.utils import accept_key

from vask import frames
from vask.envelope import Publish
from vask.session import Ask, Bind, Close, PusherSession, Send, Tell
from vask.workers.wsframe import text_frame

if TYPE_CHECKING:
    from vask.workers.server import Worker

log = logging.getLogger("vask.worker")

# Connection phases
HTTP, OPENING, OPEN, CLOSING, CLOSED = range(5)

_JSON = b"application/json"


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
    413: "Payload Too Large", 426: "Upgrade Required", 429: "Too Many Requests",
    431: "Request Header Fields Too Large", 500: "Internal Server Error",
    503: "Service Unavailable",
}


def json_error(status: int, message: str) -> bytes:
    return orjson.dumps({"error": message, "code": status})


class Connection(asyncio.Protocol):
    """Per-connection state; global state lives on :class:`Worker`."""

    __slots__ = (
        "app_id",
        "body",
        "body_size",
        "body_too_large",
        "closing_since",
        "fragments",
        "headers",
        "keep_alive",
        "last_seen",
        "opened_at",
        "out",
        "parser",
        "phase",
        "ping_sent",
        "registered",
        "responses",
        "session",
        "socket_id",
        "transport",
        "url",
        "worker",
        "ws",
    )

    def __init__(self, worker: Worker) -> None:
        # global state
        self.worker = worker
        # per-connection state
        self.transport: asyncio.Transport | None = None
        self.phase = HTTP
        self.parser: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)
        self.ws: ServerProtocol | None = None
        self.session: PusherSession | None = None
        self.socket_id = ""
        self.app_id = ""
        self.out: list[bytes] | None = None
        self.last_seen = worker.clock
        self.opened_at = worker.clock
        self.ping_sent = 0.0
        #: the broker knows this connection (it sent ConnOpen, a subscribe or a sign-in)
        self.registered = False
        self.closing_since = 0.0
        self.fragments: list[bytes] | None = None
        self.responses: list[asyncio.Future[bytes]] | None = None
        # per-request state
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.body_size = 0
        self.body_too_large = False
        self.keep_alive = True

    # --- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.worker.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.phase = CLOSED
        self.worker.connections.discard(self)
        self.worker.forget(self)
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.last_seen = self.worker.clock
        self.ping_sent = 0.0
        if self.phase >= OPENING:
            self._ws_data(data)
            return
        parser = self.parser
        if parser is None:
            return
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            offset = upgrade.args[0] if upgrade.args else len(data)
            self._upgrade(data[offset:])
        except httptools.HttpParserError as exc:
            if self.body_too_large:
                limit = self.worker.settings.max_http_body_bytes
                self._http_fail(413, f"Request body larger than {limit} bytes")
            else:
                self._http_fail(400, f"Malformed HTTP request: {exc}")

    def eof_received(self) -> bool | None:
        if self.phase >= OPENING:
            self.protocol().receive_eof()
            self._flush_ws()
        return None

    # --- httptools callbacks ------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = []
        self.body = []
        self.body_size = 0

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > 16384:
            raise httptools.HttpParserError("URL too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))
        if len(self.headers) > 100:
            raise httptools.HttpParserError("too many headers")

    def on_body(self, body: bytes) -> None:
        self.body.append(body)
        self.body_size += len(body)
        if self.body_size > self.worker.settings.max_http_body_bytes:
            self.body_too_large = True
            raise httptools.HttpParserError("body too large")

    def on_message_complete(self) -> None:
        parser = self.parser
        assert parser is not None
        if parser.should_upgrade():
            return  # handled by HttpParserUpgrade
        self.keep_alive = parser.should_keep_alive()
        method = parser.get_method().decode()
        self.worker.http_request(self, method, self.url, self.headers, b"".join(self.body),
                                 self.keep_alive)

    # --- HTTP ---------------------------------------------------------------------------

    def _http_fail(self, status: int, message: str) -> None:
        self.write_now(http_response(status, json_error(status, message), keep_alive=False))
        self.parser = None
        if self.transport is not None:
            self.transport.close()

    def respond(self, response: bytes | asyncio.Future[bytes], keep_alive: bool) -> None:
        """Answer an HTTP request; pipelined answers leave in request order."""
        if isinstance(response, bytes) and not self.responses:
            self.write_now(response)
            if not keep_alive and self.transport is not None:
                self.transport.close()
            return
        if self.responses is None:
            self.responses = []
        future: asyncio.Future[bytes]
        if isinstance(response, bytes):
            future = self.worker.loop.create_future()
            future.set_result(response)
        else:
            future = response
        self.responses.append(future)
        future.add_done_callback(lambda _: self._drain_responses(keep_alive))

    def _drain_responses(self, keep_alive: bool) -> None:
        pending = self.responses
        while pending and pending[0].done():
            future = pending.pop(0)
            try:
                self.write_now(future.result())
            except Exception:
                log.exception("HTTP API handler failed")
                self.write_now(http_response(500, json_error(500, "internal error")))
            if not pending and not keep_alive and self.transport is not None:
                self.transport.close()

    # --- WebSocket handshake ---------------------------------------------------------------

    def _upgrade(self, rest: bytes) -> None:
        """The opening handshake (RFC 6455 §4.2), answered from httptools' parse.

        websockets' ``ServerProtocol.accept`` does the same checks but builds a Request,
        a Headers mapping, a Date header and a UUID on the way: about 75 µs per
        connection against about 5 µs here (measured), and connect cost is a headline
        figure. The accept key comes from websockets (``accept_key``); the frames that
        follow are parsed by websockets' ``ServerProtocol`` as everywhere else.
        """
        parser = self.parser
        self.parser = None
        assert parser is not None
        headers = {name.lower(): value for name, value in self.headers}
        path = self.url.decode("latin-1")
        self.url = b""
        self.headers = _NO_HEADERS
        self.body = _NO_HEADERS  # type: ignore[assignment]
        problem = _handshake_problem(parser.get_method(), parser.get_http_version(), headers)
        if problem is not None:
            status, message, extra = problem
            self.write_now(http_response(status, json_error(status, message), keep_alive=False,
                                         headers=extra))
            if self.transport is not None:
                self.transport.close()
            return
        accept = accept_key(headers[b"sec-websocket-key"].decode("latin-1").strip())
        # Corked: the 101 response leaves in the same write as connection_established.
        self.worker.queue(self, _SWITCHING + accept.encode() + b"\r\n\r\n")
        self.phase = OPENING
        self.worker.websocket_opened(self, path)
        if rest:
            self._ws_data(rest)

    # --- WebSocket traffic ---------------------------------------------------------------

    def protocol(self) -> ServerProtocol:
        """The websockets protocol parsing this connection's frames.

        A connection holds one only while it is inside a frame (or closing). Between
        complete frames an OPEN protocol holds nothing but its configuration, so it goes
        back to the worker's pool (:meth:`_release`) and the next inbound bytes take one
        from there. An idle connection thus costs no protocol object (about 1.7 KB).
        """
        ws = self.ws
        if ws is None:
            pool = self.worker.ws_pool
            ws = self.ws = pool.pop() if pool else ServerProtocol(
                max_size=self.worker.settings.max_message_bytes, state=State.OPEN)
        return ws

    def _release(self, ws: ServerProtocol) -> None:
        if self.phase == OPEN and self.fragments is None and _between_frames(ws):
            self.ws = None
            pool = self.worker.ws_pool
            if len(pool) < WS_POOL_SIZE:
                pool.append(ws)

    def _ws_data(self, data: bytes) -> None:
        ws = self.protocol()
        ws.receive_data(data)
        for frame in ws.events_received():
            if not isinstance(frame, Frame):  # an OPEN protocol only yields frames
                continue
            opcode = frame.opcode
            if opcode is _TEXT or opcode is _BINARY or opcode is _CONT:
                if opcode is _CONT:
                    if self.fragments is None:
                        continue
                    self.fragments.append(bytes(frame.data))
                    if not frame.fin:
                        continue
                    text = b"".join(self.fragments)
                    binary = self.fragments[0] is _BINARY_MARK
                    self.fragments = None
                    if binary:
                        self._binary()
                        continue
                    self._text(text)
                elif not frame.fin:
                    self.fragments = [bytes(frame.data)] if opcode is _TEXT else [_BINARY_MARK]
                elif opcode is _TEXT:
                    self._text(frame.data)  # orjson reads bytes-like data directly
                else:
                    self._binary()
        self._flush_ws()
        if self.ws is not None:
            self._release(self.ws)

    def _binary(self) -> None:
        self.queue(frames.error(None, "Binary frames are not supported: send JSON text frames"))

    def _text(self, text: bytes | bytearray | memoryview) -> None:
        session = self.session
        if session is None or self.phase != OPEN:
            return  # nothing is accepted before connection_established
        self.apply(session.receive(text, self.worker.wall))

    def apply(self, actions: list[Any]) -> None:
        """Carry out the actions a :class:`PusherSession` decided on."""
        worker = self.worker
        for action in actions:
            if isinstance(action, Send):
                self.queue(action.frame)
            elif isinstance(action, Tell):
                self.registered = True
                message = action.message
                if isinstance(message, Publish) and message.local_first:
                    worker.fan_out(message.app, message.channel, message.exclude,
                                   text_frame(message.payload))
                worker.link.send(message)
            elif isinstance(action, Bind):
                worker.bind(self, action.channel, action.on)
            elif isinstance(action, Ask):
                self.registered = True
                worker.ask_subscribe(self, action.message)
            elif isinstance(action, Close):
                self.close(action.code, action.reason)

    def _flush_ws(self) -> None:
        ws = self.ws
        transport = self.transport
        if ws is None or transport is None:
            return
        for data in ws.data_to_send():
            if data:
                self.write_now(data)
            else:  # websockets signals "close the TCP connection" with b""
                transport.close()
                return
        if self.phase == OPEN and (ws.state is State.CLOSED or ws.close_expected()):
            self._closing()

    # --- writing -------------------------------------------------------------------------

    def queue(self, payload: bytes) -> None:
        """Queue one Pusher message (JSON bytes) as a text frame, corked until the end
        of this loop iteration."""
        self.worker.queue(self, self.worker.frame(payload))

    def write_now(self, data: bytes) -> None:
        transport = self.transport
        if transport is None:
            return
        if self.out:
            transport.write(b"".join(self.out))
            self.out = None
        transport.write(data)

    def close(self, code: int, reason: str) -> None:
        """Send ``pusher:error`` {code, reason}, then a close frame with the same code."""
        if self.phase < OPENING or self.phase >= CLOSING:
            return
        ws = self.protocol()
        self.queue(frames.error(code, reason))
        self.worker.flush_one(self)
        self._closing()
        with contextlib.suppress(InvalidState):
            ws.send_close(code, reason)
        self._flush_ws()

    def _closing(self) -> None:
        """The closing handshake started: no data frame may follow a close frame
        (RFC 6455 §5.5.1), so the connection leaves every channel now."""
        self.phase = CLOSING
        self.closing_since = self.worker.clock
        self.worker.forget(self)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # --- liveness (called by the worker's sweep) ----------------------------------------

    def sweep(self, now: float) -> None:
        phase = self.phase
        worker = self.worker
        if phase == OPEN:
            settings = worker.settings
            if self.ping_sent:
                if now - self.ping_sent > settings.pong_timeout:
                    self.close(4201, "Pong reply not received")
            elif now - self.last_seen > settings.activity_timeout:
                self.ping_sent = now
                self.queue(frames.PING)
            session = self.session
            if session is not None and not session.authorized and \
                    session.app.enable_user_authentication and \
                    now - self.opened_at > session.app.user_authentication_timeout:
                self.close(4009, "Connection not authorized within timeout")
        elif phase == CLOSING:
            if now - self.closing_since > 5.0:
                self.abort()
        elif phase == HTTP:
            # idle keep-alive HTTP connections, or a slow request head
            if now - self.last_seen > 60.0:
                self.abort()
        elif phase == OPENING and now - self.opened_at > worker.settings.broker_timeout + 5:
            self.close(4200, "Could not open the connection in time; reconnect")


_BINARY_MARK = b"\x00binary"
_NO_HEADERS: list[tuple[bytes, bytes]] = []
#: idle websockets protocol objects a worker keeps for reuse
WS_POOL_SIZE = 256


def _between_frames(ws: ServerProtocol) -> bool:
    """True when ``ws`` holds nothing but its configuration: open, not inside a
    fragmented message, no partial frame buffered, nothing left to send. Reads the
    stream reader's buffer; if a websockets release renames it, protocols are simply
    never released."""
    buffer = getattr(getattr(ws, "reader", None), "buffer", None)
    return (buffer is not None and not buffer and ws.state is State.OPEN
            and ws.current_size is None and not ws.writes)
_SWITCHING = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
              b"Connection: Upgrade\r\nSec-WebSocket-Accept: ")


def _tokens(value: bytes) -> list[bytes]:
    return [token.strip().lower() for token in value.split(b",")]


def _handshake_problem(
    method: bytes, version: str, headers: dict[bytes, bytes]
) -> tuple[int, str, tuple[tuple[str, str], ...]] | None:
    """Why this upgrade request is not a valid WebSocket opening handshake, if it is not
    (RFC 6455 §4.2.1): (status, message, extra headers)."""
    if method != b"GET":
        return 405, "WebSocket handshakes must use GET", (("Allow", "GET"),)
    if version != "1.1":
        return 400, "WebSocket handshakes need HTTP/1.1", ()
    if b"websocket" not in _tokens(headers.get(b"upgrade", b"")):
        return 426, "Upgrade: websocket is required", (("Upgrade", "websocket"),)
    if b"upgrade" not in _tokens(headers.get(b"connection", b"")):
        return 400, "Connection: Upgrade is required", ()
    if headers.get(b"sec-websocket-version", b"").strip() != b"13":
        return 426, "Only WebSocket version 13 is supported", (("Sec-WebSocket-Version", "13"),)
    key = headers.get(b"sec-websocket-key", b"").strip()
    try:
        valid = len(base64.b64decode(key, validate=True)) == 16
    except (binascii.Error, ValueError):
        valid = False
    if not valid:
        return 400, "Sec-WebSocket-Key must be 16 bytes in base64", ()
    return None
_TEXT, _BINARY, _CONT = Opcode.TEXT, Opcode.BINARY, Opcode.CONT
