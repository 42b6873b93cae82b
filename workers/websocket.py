"""A client connection after the upgrade: one Pusher WebSocket connection.

:class:`PusherConnection` takes over the transport from the HTTP protocol
(``transport.set_protocol``). Inbound frames are parsed by websockets' sans-I/O
:class:`ServerProtocol`; each complete text message goes to the connection's pure
:class:`~vask.session.PusherSession`, and the actions it answers with are carried out
here. Outbound event frames bypass websockets (they are built once per publish, see
:mod:`vask.workers.wsframe`) and go through :class:`~vask.workers.outbound.Outbound`,
which owns flow control.

No task and no timer per connection: liveness is a timestamp that the worker's single
periodic sweep inspects (:meth:`PusherConnection.sweep`).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any

from websockets.exceptions import InvalidState
from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.server import ServerProtocol

try:
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - websockets built without its C extension
    from websockets.utils import apply_mask

from vask import frames
from vask.envelope import Publish
from vask.metrics import AppStats
from vask.session import Ask, Bind, Close, PusherSession, Send, Tell
from vask.workers.outbound import Outbound
from vask.workers.wsframe import text_frame

if TYPE_CHECKING:
    from vask.workers.server import Worker

# phases
OPENING, OPEN, CLOSING, CLOSED = range(4)
CLOSE_WAIT = 5.0  # seconds a started closing handshake may take before the abort

#: frames of one connection handled in one loop turn; the rest of its read waits a turn
BURST_FRAMES = 256
#: idle websockets protocol objects a worker keeps for reuse
WS_POOL_SIZE = 256


class PusherConnection(Outbound):
    """Per-connection state of an upgraded client; global state lives on the worker."""

    __slots__ = (
        "app_id",
        "closing_since",
        "fragments",
        "fragments_size",
        "last_seen",
        "opened_at",
        "peer",
        "phase",
        "ping_sent",
        "registered",
        "session",
        "socket_id",
        "stats",
        "unparsed",
        "ws",
    )

    def __init__(self, worker: Worker, transport: asyncio.Transport, paused: int,
                 peer: str | None) -> None:
        super().__init__(worker)
        self.take_transport(transport, paused)
        self.peer = peer
        self.phase = OPENING
        self.ws: ServerProtocol | None = None
        #: bytes given to ``ws`` that are not yet part of a parsed frame
        self.unparsed = 0
        self.session: PusherSession | None = None
        self.socket_id = ""
        self.app_id = ""
        self.last_seen = self.opened_at = worker.clock
        self.ping_sent = 0.0
        #: the broker knows this connection (it sent ConnOpen, a subscribe or a sign-in)
        self.registered = False
        self.closing_since = 0.0
        self.fragments: list[bytes] | None = None
        self.fragments_size = 0
        #: the app's counters on this worker (set on admission; until then a slot that
        #: is not exported), so counting traffic is an attribute increment
        self.stats: AppStats = worker.metrics.unknown

    # --- asyncio.Protocol ---------------------------------------------------------------

    def connection_lost(self, exc: Exception | None) -> None:
        self.phase = CLOSED
        worker = self.worker
        worker.connections.discard(self)
        worker.held.pop(self, None)
        worker.admission.tcp_closed(self.peer)
        worker.sync.connection_ended(self)
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.stats.ws_bytes_in += len(data)
        self.last_seen = self.worker.clock
        self.ping_sent = 0.0
        self._ingest(data)

    def _ingest(self, data: bytes) -> None:
        """Handle at most :data:`BURST_FRAMES` frames of ``data`` now; hold the rest for
        the next loop turn (:meth:`Outbound.hold`)."""
        budget = BURST_FRAMES
        if self.ws is None and self.phase == OPEN and self.fragments is None:
            fast, rest = self._fast_frames(data)
            if not rest:
                if fast >= BURST_FRAMES:
                    # A full share and nothing left: still let the others go first, or
                    # the event loop may read up to 32 more buffers from us in one go.
                    self.pause_for_a_turn()
                return
            if fast >= BURST_FRAMES:
                self.hold(rest)
                return
            data = rest
            budget -= fast
        ws = self.protocol()
        self.unparsed += len(data)
        ws.receive_data(data)
        self._frames(ws, ws.events_received(), budget)

    def take_up(self, rest: bytes | list[Any]) -> None:
        """The rest of a burst (see :meth:`Outbound.hold`): raw bytes, or frames
        websockets already parsed."""
        if isinstance(rest, list):
            # held frames keep ``unparsed`` above zero, so ws was not released
            assert self.ws is not None
            self._frames(self.ws, rest, BURST_FRAMES)
        else:
            self._ingest(rest)

    def eof_received(self) -> bool | None:
        self.protocol().receive_eof()
        self._flush_ws()
        return None

    # --- inbound frames ----------------------------------------------------------------

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
        # Its reader's buffer can be empty while its parser is half-way through a frame
        # header it already consumed (a read that ended inside the header): only when
        # every byte given to it belongs to a parsed frame is it at a frame boundary, and
        # fit for another connection.
        if self.unparsed == 0 and self.phase == OPEN and self.fragments is None \
                and _between_frames(ws):
            self.ws = None
            pool = self.worker.ws_pool
            if len(pool) < WS_POOL_SIZE:
                pool.append(ws)

    def _fast_frames(self, data: bytes) -> tuple[int, bytes]:
        """Handle the leading complete, unfragmented, masked text frames of ``data``
        without websockets (at most :data:`BURST_FRAMES`); return how many, and the
        bytes left.

        Nearly every client message (a subscribe, a client event, a pong) is one small
        text frame in one read. For those, building and parsing through websockets'
        protocol object (a generator-based reader, a Frame, UTF-8 decoding) costs more
        than the rest of handling the message. Anything else (control frames,
        fragments, RSV bits, an unmasked or oversized or partial frame) stops the fast
        path at that frame: websockets gets it, fresh at a frame boundary, and applies
        its rules as before (close codes included). Text is not checked for UTF-8 here,
        as websockets' sans-I/O layer does not check it either: the session's JSON
        decoding refuses invalid UTF-8 with a ``pusher:error``.
        """
        n = len(data)
        if 6 <= n < 132 and data[0] == 0x81 and data[1] ^ 0x80 == n - 6:
            # the commonest read of all: exactly one short frame (a subscribe, a pong;
            # max_message_bytes is at least 1024, so it is within the limit)
            self._text(apply_mask(data[6:], data[2:6]))
            return 1, b""
        pos = count = 0
        limit = self.worker.settings.max_message_bytes
        while count < BURST_FRAMES and self.phase == OPEN and self.ws is None:
            if n - pos < 6 or data[pos] != 0x81:  # FIN, no RSV, text
                break
            length = data[pos + 1] ^ 0x80  # the mask bit must be set
            if length < 126:
                head = pos + 2
            elif length == 126 and n - pos >= 8:
                length = int.from_bytes(data[pos + 2:pos + 4], "big")
                head = pos + 4
            else:
                break  # unmasked, 64-bit length, or the length is not all here yet
            end = head + 4 + length
            if length > limit or end > n:
                break
            payload = apply_mask(data[head + 4:end], data[head:head + 4])
            pos = end
            count += 1
            self._text(payload)
        return count, data[pos:] if pos else data

    def _frames(self, ws: ServerProtocol, events: list[Any], budget: int) -> None:
        """Handle up to ``budget`` of the frames websockets parsed; hold the rest."""
        for done, frame in enumerate(events):
            if done == budget:
                self.hold(events[done:])
                break
            if not isinstance(frame, Frame):  # an OPEN protocol only yields frames
                continue
            self.unparsed -= _wire_size(len(frame.data))
            opcode = frame.opcode
            if opcode is _TEXT or opcode is _BINARY or opcode is _CONT:
                if opcode is _CONT:
                    if self.fragments is None:
                        continue
                    self.fragments.append(bytes(frame.data))
                    self.fragments_size += len(frame.data)
                    if self.fragments_size > self.worker.settings.max_message_bytes:
                        # Each frame is within max_size, but the message they make is
                        # not (RFC 6455 §7.4.1: 1009).
                        self.fragments = None
                        with contextlib.suppress(InvalidState):
                            ws.fail(1009, "message too big")
                        break
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
                    self.fragments_size = len(frame.data)
                elif opcode is _TEXT:
                    self._text(frame.data)  # orjson reads bytes-like data directly
                else:
                    self._binary()
        self._flush_ws()
        if self.ws is not None:
            self._release(self.ws)

    def _binary(self) -> None:
        self.send(frames.error(None, "Binary frames are not supported: send JSON text frames"))

    def _text(self, text: bytes | bytearray | memoryview) -> None:
        self.stats.ws_messages_in += 1
        session = self.session
        if session is None or self.phase != OPEN:
            return  # nothing is accepted before connection_established
        self.apply(session.receive(text, self.worker.wall))

    def apply(self, actions: list[Any]) -> None:
        """Carry out the actions a :class:`PusherSession` decided on."""
        worker = self.worker
        console = self.stats.console
        if console is not None:
            console.actions(self, actions)
        for action in actions:
            kind = type(action)  # (the action classes are final: no subclasses)
            if kind is Send:
                self.send(action.frame)
            elif kind is Bind:
                worker.index.bind(self, action.channel, action.on)
            elif kind is Ask:
                self.registered = True
                worker.sync.subscribe(self, action.message)
            elif isinstance(action, Tell):
                self.registered = True
                message = action.message
                if isinstance(message, Publish) and message.local_first:
                    self.stats.client_events += 1
                    worker.index.fan_out(message.app, message.channel, message.exclude,
                                         text_frame(message.payload))
                    siblings = worker.siblings
                    if siblings is not None and siblings.send(
                            message.app, message.channel, message.exclude, message.payload):
                        continue  # the other workers have it; the broker needs nothing
                worker.link.send(message)
            elif isinstance(action, Close):
                self.close(action.code, action.reason)

    def _flush_ws(self) -> None:
        """Write what websockets wants sent (pongs, close frames)."""
        ws = self.ws
        transport = self.transport
        if ws is None or transport is None:
            return
        for data in ws.data_to_send():
            if data:
                self.write(data)
            else:  # websockets signals "close the TCP connection" with b""
                transport.close()
                return
        if self.phase == OPEN and (ws.state is State.CLOSED or ws.close_expected()):
            self._closing()

    # --- writing -------------------------------------------------------------------------

    def send(self, payload: bytes) -> None:
        """Queue one Pusher message (JSON bytes) as a text frame, corked until the end
        of this loop turn."""
        frame = self.worker.corker.frame(payload)
        stats = self.stats
        stats.ws_messages_out += 1
        stats.ws_bytes_out += len(frame)
        self.queue(frame)

    def close(self, code: int, reason: str) -> None:
        """Send ``pusher:error`` {code, reason}, then a close frame with the same code."""
        if self.phase >= CLOSING:
            return
        ws = self.protocol()
        self.send(frames.error(code, reason))
        console = self.stats.console
        if console is not None:
            console.error(self, code, reason)
        self.flush()
        self._closing()
        with contextlib.suppress(InvalidState):
            ws.send_close(code, reason)
        self._flush_ws()

    def _closing(self) -> None:
        """The closing handshake started: no data frame may follow a close frame
        (RFC 6455 §5.5.1), so the connection leaves every channel now."""
        self.phase = CLOSING
        self.closing_since = self.worker.clock
        self.worker.sync.connection_ended(self)

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
                self.send(frames.PING)
            session = self.session
            if session is not None and not session.authorized and \
                    session.app.enable_user_authentication and \
                    now - self.opened_at > session.app.user_authentication_timeout:
                self.close(4009, "Connection not authorized within timeout")
        elif phase == CLOSING:
            if now - self.closing_since > CLOSE_WAIT:
                self.abort()
        elif phase == OPENING and now - self.opened_at > worker.settings.broker_timeout + 5:
            self.close(4200, "Could not open the connection in time; reconnect")


_BINARY_MARK = b"\x00binary"


def _wire_size(payload: int) -> int:
    """Bytes a client frame with a ``payload``-byte payload took on the wire: 2 header
    bytes, the extended length, the 4-byte mask (client frames are always masked; no
    extension changes payload sizes, as permessage-deflate is not offered)."""
    return payload + (6 if payload < 126 else 8 if payload < 65536 else 14)


def _between_frames(ws: ServerProtocol) -> bool:
    """True when ``ws`` holds nothing but its configuration: open, not inside a
    fragmented message, no partial frame buffered, nothing left to send. Reads the
    stream reader's buffer; if a websockets release renames it, protocols are simply
    never released."""
    buffer = getattr(getattr(ws, "reader", None), "buffer", None)
    return (buffer is not None and not buffer and ws.state is State.OPEN
            and ws.current_size is None and not ws.writes)


_TEXT, _BINARY, _CONT = Opcode.TEXT, Opcode.BINARY, Opcode.CONT
