"""The sender's side of its link to the broker: one DEALER socket on the event loop.

Every message either way is one frame of JSON. The sender says ``hello`` once when it
starts; the broker answers by (re)sending every event it holds unacknowledged, as
``{"t": "events", "epoch": E, "events": [[seq, app_id, time_ms, event], ...]}``. The
sender acknowledges with ``{"t": "ack", "epoch": E, "seq": N}`` once every event up to
``N`` is committed to its store, and reports its counters with ``{"t": "stats",
"counters": {...}}`` every second (which also introduces it to a broker that restarted
after the hello). ZeroMQ reconnects by itself, so a restarted broker needs nothing
more from this side.

The socket's file descriptor is edge-triggered: it signals "something changed", and
the pending messages are read until ZeroMQ says none is left. A send can consume such
a signal, so every send is followed by a scheduled read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import orjson
import zmq

log = logging.getLogger("vask.webhooks")

#: ZeroMQ messages read per loop turn at most (each may hold thousands of events)
READ_LIMIT = 8
#: messages queued towards the broker at most (acks and stats; older ones are moot)
SEND_HWM = 100
_NOBLOCK, _EVENTS, _POLLIN = int(zmq.NOBLOCK), int(zmq.EVENTS), int(zmq.POLLIN)

OnEvents = Callable[[int, list[Any]], None]


class BrokerLink:
    """Receives event batches from the broker and sends it acks and stats."""

    def __init__(self, endpoint: str, on_events: OnEvents) -> None:
        self.endpoint = endpoint
        self.on_events = on_events
        self.loop = asyncio.get_running_loop()
        self.context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self.sock = self.context.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, SEND_HWM)
        self.sock.setsockopt(zmq.RECONNECT_IVL, 100)
        self.sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        self.sock.connect(endpoint)
        self.fd: int = self.sock.fileno()
        self.read_scheduled = False
        self.reading = True
        self.closed = False
        self.bad_messages = 0
        self.loop.add_reader(self.fd, self.read)

    def start(self) -> None:
        self.send({"t": "hello"})

    def send(self, message: dict[str, Any]) -> None:
        if self.closed:
            return
        # Not connected yet, or the queue is full: an unsent ack is repeated by the
        # next one (the broker re-sends unacknowledged events), stats every second.
        with contextlib.suppress(zmq.ZMQError):
            self.sock.send(orjson.dumps(message), _NOBLOCK)
        self._schedule_read()

    def pause(self) -> None:
        """Stop taking events (shutting down): what is not acknowledged stays with the
        broker, which hands it to the next sender."""
        self.reading = False
        if not self.closed:
            self.loop.remove_reader(self.fd)

    def close(self) -> None:
        if self.closed:
            return
        if self.reading:
            self.loop.remove_reader(self.fd)
        self.closed = True
        self.sock.close(linger=0)

    def _schedule_read(self) -> None:
        if not self.read_scheduled and self.reading:
            self.read_scheduled = True
            self.loop.call_soon(self.read)

    def read(self) -> None:
        self.read_scheduled = False
        if self.closed or not self.reading:
            return
        sock = self.sock
        for _ in range(READ_LIMIT):
            if not int(sock.getsockopt(_EVENTS)) & _POLLIN:
                return
            try:
                body = sock.recv(_NOBLOCK)
            except zmq.Again:
                return
            self._handle(body)
            if self.closed or not self.reading:
                return
        # More may be waiting: continue next turn, after other work had its go.
        self._schedule_read()

    def _handle(self, body: bytes) -> None:
        try:
            message = orjson.loads(body)
            kind = message["t"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            self._bad("not a JSON object with 't'")
            return
        if kind != "events":
            return  # nothing else is expected; ignore for forward compatibility
        epoch = message.get("epoch")
        events = message.get("events")
        if not isinstance(epoch, int) or not isinstance(events, list):
            self._bad("an events message without an int epoch and an events list")
            return
        self.on_events(epoch, events)

    def _bad(self, why: str) -> None:
        self.bad_messages += 1
        if self.bad_messages == 1 or self.bad_messages % 1000 == 0:
            log.warning("malformed message from the broker dropped (%s; %d so far)",
                        why, self.bad_messages)
