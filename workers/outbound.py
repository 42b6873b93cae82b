"""Everything a worker writes to a client, and the flow control around it.

:class:`Outbound` is the base of both connection protocols (:mod:`vask.workers.http`
and :mod:`vask.workers.websocket`). It owns the one rule for outbound bytes, whatever
produced them (events, pongs, error frames, HTTP responses to pipelined requests):

* the transport's write buffer has a high-water mark (``write_buffer_high``) and a
  low-water mark (``write_buffer_low``); above high, asyncio calls
  :meth:`Outbound.pause_writing` and the worker **stops reading** from that client, so a
  client that sends without reading what it is sent (pings whose pongs it never reads,
  pipelined requests whose answers it never reads) stalls itself, not the worker;
  below low it reads again;
* above the hard limit (``write_buffer_limit``) after a write, the connection is cut
  (``abort``): a slow consumer never makes the worker buffer without bound.

Reading may also be paused for reasons of the protocol on top (an HTTP connection
with requests waiting to be answered): :attr:`Outbound.paused` is a bit set of reasons,
and reading resumes only when none is left.

:class:`Corker` batches writes: frames queued during one loop turn leave in one
``write`` per connection at the end of the turn (``call_soon``); during a broker drain
nothing is written until it ends.
"""

from __future__ import annotations

import asyncio
from collections import deque
from operator import attrgetter, methodcaller
from typing import TYPE_CHECKING, Any

from vask.workers.wsframe import text_frame

if TYPE_CHECKING:
    from vask.workers.server import Worker

#: reasons reading from a client is paused (bits of Outbound.paused)
PAUSED_WRITES = 1  # its outbound buffer is above the high-water mark
PAUSED_PIPELINE = 2  # it has HTTP requests waiting to be answered
PAUSED_BURST = 4  # one read held a burst of requests or messages: others go first
#: frames one connection may have corked before they are written at once
MAX_CORKED_FRAMES = 256

_transport_of = attrgetter("transport")
_paused = attrgetter("paused")


class Outbound(asyncio.Protocol):
    """A client connection seen as a byte sink with a bounded buffer."""

    __slots__ = ("out", "paused", "transport", "worker")

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.transport: asyncio.Transport | None = None
        #: frames corked until the end of this loop turn (see Corker), or None
        self.out: list[bytes] | None = None
        self.paused = 0

    def take_transport(self, transport: asyncio.Transport, paused: int) -> None:
        """Adopt a transport (on accept, or from the HTTP protocol on upgrade)."""
        self.transport = transport
        self.paused = paused

    # --- flow control (asyncio calls these on the transport's water marks) ---------------

    def pause_writing(self) -> None:
        self.pause(PAUSED_WRITES)

    def resume_writing(self) -> None:
        self.resume(PAUSED_WRITES)

    def pause(self, reason: int) -> None:
        if not self.paused and self.transport is not None:
            self.transport.pause_reading()
        self.paused |= reason

    def pause_for_a_turn(self) -> None:
        """Stop reading until the next loop turn (after a read that held a burst)."""
        if not self.paused & PAUSED_BURST:
            self.pause(PAUSED_BURST)
            self.worker.loop.call_soon(self.resume, PAUSED_BURST)

    def hold(self, rest: Any) -> None:
        """Keep what is left of a long read and stop reading: everyone else gets the
        loop before :meth:`take_up` handles the next share. One read can carry thousands
        of small frames or pipelined requests (the event loop reads up to 256 KB at a
        time), and handling them all at once would stall every other connection of the
        worker for as long. The worker keeps it (``Worker.held``), so a connection
        without a burst pays no slot for it."""
        worker = self.worker
        worker.held[self] = rest
        self.pause(PAUSED_BURST)
        worker.loop.call_soon(self._go_on)

    def _go_on(self) -> None:
        rest = self.worker.held.pop(self, None)
        if rest is None or self.transport is None:
            return  # the connection was lost (or handed on) meanwhile
        self.take_up(rest)
        if self not in self.worker.held:
            self.resume(PAUSED_BURST)

    def take_up(self, rest: Any) -> None:
        """Handle the next share of what :meth:`hold` kept."""
        raise NotImplementedError

    def resume(self, reason: int) -> None:
        if not self.paused & reason:
            return
        self.paused &= ~reason
        if not self.paused and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    # --- writing ----------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Write now (after anything corked for this connection, to keep order)."""
        transport = self.transport
        if transport is None:
            return
        corker = self.worker.corker
        shared = corker.shared
        if shared is not None and self in shared:
            corker.spill()  # a held fan-out to this connection goes first
        out = self.out
        if out:
            out.append(data)
            data = b"".join(out)
            self.out = None
        transport.write(data)
        # Above the hard limit means above the high-water mark, and the transport calls
        # pause_writing before its write returns: only a paused connection can be over.
        if self.paused and \
                transport.get_write_buffer_size() > self.worker.settings.write_buffer_limit:
            self.cut()

    def queue(self, data: bytes) -> None:
        """Write at the end of this loop turn, together with whatever else is queued."""
        corker = self.worker.corker
        shared = corker.shared
        if shared is not None and self in shared:
            corker.spill()
        out = self.out
        if out is None:
            self.out = [data]
            corker.dirty(self)
        else:
            out.append(data)
            if len(out) >= MAX_CORKED_FRAMES:
                # One connection's own burst (pongs to a flood of pings read in one
                # wake-up): write it now, so the transport's flow control sees it.
                self.flush()
        corker.held += len(data)
        if corker.held > corker.limit:
            corker.flush()

    def flush(self) -> None:
        """Write what is corked now."""
        out = self.out
        if out is not None:
            self.out = None
            self.write(out[0] if len(out) == 1 else b"".join(out))

    def cut(self) -> None:
        """Drop the connection without a goodbye: it would not read one anyway."""
        transport = self.transport
        if transport is not None and not transport.is_closing():
            self.worker.counters["slow_consumers_cut"] += 1
            transport.abort()


class Corker:
    """Writes queued during one loop turn leave in one ``write`` per connection."""

    __slots__ = ("_frame_cache", "_scheduled", "corked", "held", "limit", "loop", "pending",
                 "shared", "shared_data")

    def __init__(self, loop: asyncio.AbstractEventLoop, limit: int) -> None:
        self.loop = loop
        self.pending: list[Outbound] = []
        #: a corked fan-out held whole: its subscribers (a copy of the channel's set)
        #: and the frames for all of them (``shared_data``), written in one pass by the
        #: flush. Held only while it is all that is corked: a write or queue to one of
        #: its connections, or a fan-out to other subscribers, first spills it into
        #: per-connection output (:meth:`spill`), so every connection's order is kept.
        self.shared: set[Outbound] | None = None
        self.shared_data: list[bytes] = []
        #: bytes held in corked lists; past ``limit`` everything is written at once, so
        #: what a loop turn produces (pongs to a burst of pings read in one wake-up,
        #: answers to a burst of requests) meets the transports' flow control instead
        #: of piling up here
        self.held = 0
        self.limit = limit
        self._scheduled = False
        #: True while a broker drain is handled: everything is held and leaves after
        #: it, so a subscriber gets one write per drain
        self.corked = False
        self._frame_cache: tuple[bytes, bytes] = (b"", b"")

    def dirty(self, conn: Outbound) -> None:
        self.pending.append(conn)
        if not self._scheduled and not self.corked:
            self._scheduled = True
            self.loop.call_soon(self.flush)

    def cork(self, on: bool) -> None:
        """Start or end a corked broker drain. What it queued is written by the flush
        scheduled for this loop turn: after the callbacks the drain made ready (HTTP API
        calls whose broker answer came in it), so their answers do not wait for it."""
        if on:
            self.corked = True
        elif self.corked:
            self.corked = False
            if (self.pending or self.shared is not None) and not self._scheduled:
                self._scheduled = True
                self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        self.held = 0
        if self.shared is not None:
            self.write_shared()
        pending = self.pending
        self.pending = []
        if not pending:
            return
        # Outbound.flush and Outbound.write, inline: this runs once per subscriber per
        # broker drain, the hot path of every fan-out
        limit = pending[0].worker.settings.write_buffer_limit
        for conn in pending:
            out = conn.out
            if out is None:
                continue  # written meanwhile (MAX_CORKED_FRAMES)
            conn.out = None
            transport = conn.transport
            if transport is None:
                continue
            transport.write(out[0] if len(out) == 1 else b"".join(out))
            if conn.paused and transport.get_write_buffer_size() > limit:
                conn.cut()

    def share(self, targets: set[Any], data: bytes) -> bool:
        """Hold a corked fan-out of ``data`` to ``targets`` (a channel's subscribers)
        whole, if it can be: nothing else is corked, or the held one goes to the same
        connections (the next event of a busy channel in the same drain: its frame is
        added, and each subscriber still gets one write). False when it cannot; the
        caller then queues it per connection."""
        shared = self.shared
        if shared is None:
            if self.pending:
                return False  # their corked output would have to go first
            self.shared = set(targets)
            self.shared_data = [data]
            return True
        if shared != targets:
            return False
        shared_data = self.shared_data
        shared_data.append(data)
        if len(shared_data) >= MAX_CORKED_FRAMES:
            self.write_shared()  # a long burst: let the transports' flow control see it
        return True

    def spill(self) -> None:
        """Turn the held fan-out into per-connection corked output, before anything
        else is corked for its connections."""
        shared = self.shared
        if shared is None:
            return
        self.shared = None
        shared_data = self.shared_data
        pending = self.pending
        for conn in shared:
            out = conn.out
            if out is None:
                pending.append(conn)
                conn.out = shared_data.copy()
            else:  # (not expected: nothing was corked for them when it was held)
                conn.out = shared_data + out
        self.shared_data = []

    def write_shared(self) -> None:
        """Write the held fan-out: the same bytes to each of its connections, with the
        hard limit of :meth:`Outbound.write`."""
        shared = self.shared
        if shared is None:
            return
        self.shared = None
        shared_data = self.shared_data
        self.shared_data = []
        data = shared_data[0] if len(shared_data) == 1 else b"".join(shared_data)
        # One pass in C, no bytecode per subscriber: every connection not lost during
        # the drain gets the same bytes.
        deque(map(methodcaller("write", data), filter(None, map(_transport_of, shared))), 0)
        # Then the hard limit, for the few a transport has paused (above the limit is
        # above the high-water mark, and the transport pauses before write returns).
        paused = [conn for conn in filter(_paused, shared) if conn.transport is not None]
        if paused:
            limit = paused[0].worker.settings.write_buffer_limit
            for conn in paused:
                if conn.transport.get_write_buffer_size() > limit:  # type: ignore[union-attr]
                    conn.cut()

    def frame(self, payload: bytes) -> bytes:
        """The text frame for ``payload``; consecutive sends of the same payload (one
        message to many connections) reuse one frame."""
        cached = self._frame_cache
        if cached[0] is payload:
            return cached[1]
        frame = text_frame(payload)
        self._frame_cache = (payload, frame)
        return frame
