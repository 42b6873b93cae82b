"""The broker's side of its link to the webhook sender (docs/webhooks.md, "The link").

The broker works out webhook events once per cluster and hands them to the sender
process, which stores them durably and delivers them. The broker must never wait for
it: a dead or slow sender costs the broker memory (bounded here), never time.

* One ROUTER socket, bound at a private ``ipc://`` endpoint; the sender connects a
  DEALER and says ``hello`` when it starts.
* Every event gets a sequence number, increasing by one within this broker's epoch.
  Events are sent in one message per loop turn and kept here until the sender
  acknowledges, with ``ack``, that it has committed them to its store.
* After a ``hello`` (a restarted sender), and whenever acknowledgements stall for
  :data:`RESEND_AFTER` seconds, every unacknowledged event is sent again; the sender
  drops the sequence numbers it already has, so a repeat is harmless.
* At most ``webhook_max_queued`` events wait here. Past that the oldest are dropped,
  counted in :attr:`WebhookLink.dropped` and logged at most once per interval.
* The sender reports its counters (``stats``) every second; the broker keeps the last
  report in :attr:`WebhookLink.stats` for the metrics.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any

import orjson
import zmq

log = logging.getLogger("vask.broker.webhooks")

#: seconds without an acknowledgement, while events wait, before they are sent again
RESEND_AFTER = 2.0
#: events per message to the sender
CHUNK = 2_000
#: ZeroMQ messages queued towards the sender at most (each a chunk of events)
SEND_HWM = 1_000
#: seconds between two warnings about dropped events
DROP_LOG_INTERVAL = 10.0
#: webhook outcomes kept for the debug console at most
OUTCOMES_KEPT = 100

Event = tuple[int, str, int, dict[str, Any]]


class WebhookLink:
    """Numbered, acknowledged hand-over of webhook events to the sender process."""

    def __init__(self, context: zmq.Context[zmq.Socket[bytes]], endpoint: str, epoch: int,
                 max_queued: int) -> None:
        self.endpoint = endpoint
        self.epoch = epoch
        self.max_queued = max_queued
        self.socket = context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.socket.setsockopt(zmq.SNDHWM, SEND_HWM)
        self.socket.setsockopt(zmq.MAXMSGSIZE, 1 << 20)
        #: the sender's ZeroMQ identity, once it said hello
        self.peer: bytes | None = None
        self.next_seq = 1
        #: events not yet acknowledged, oldest first
        self.unacked: deque[Event] = deque()
        #: events not sent yet (arrived since the last flush)
        self.fresh: list[Event] = []
        self.last_progress = 0.0
        self.dropped = 0
        self._dropped_logged = 0
        self._next_drop_log = 0.0
        #: the sender's last reported counters (see docs/metrics.md)
        self.stats: dict[str, int] = {}
        #: request outcomes the sender reported since the broker last took them (the
        #: debug console's webhook lines); bounded like the sender's own list
        self.outcomes: deque[dict[str, Any]] = deque(maxlen=OUTCOMES_KEPT)

    def bind(self) -> None:
        self.socket.bind(self.endpoint)

    def close(self) -> None:
        self.socket.close(linger=0)

    # --- events in ----------------------------------------------------------------

    def add(self, events: list[tuple[str, int, dict[str, Any]]], now: float) -> None:
        """Number and queue events from the state (called once per loop turn)."""
        if not self.unacked:
            self.last_progress = now
        seq = self.next_seq
        for app_id, time_ms, event in events:
            item = (seq, app_id, time_ms, event)
            self.unacked.append(item)
            self.fresh.append(item)
            seq += 1
        self.next_seq = seq
        excess = len(self.unacked) - self.max_queued
        if excess > 0:
            for _ in range(excess):
                self.unacked.popleft()
            self.dropped += excess
            if len(self.fresh) > len(self.unacked):
                self.fresh = self.fresh[-len(self.unacked):]
            if now >= self._next_drop_log:
                self._next_drop_log = now + DROP_LOG_INTERVAL
                log.warning("webhook sender is not keeping up: %d events dropped so far "
                            "(webhook_max_queued = %d)", self.dropped, self.max_queued)

    # --- the socket ---------------------------------------------------------------

    def read(self, now: float) -> None:
        """Handle what the sender said (non-blocking; the loop polls the socket)."""
        for _ in range(64):
            try:
                identity, body = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            except ValueError:
                continue  # not two frames: not our sender
            try:
                message = orjson.loads(body)
                kind = message["t"]
            except (orjson.JSONDecodeError, KeyError, TypeError):
                log.warning("malformed message from the webhook sender dropped")
                continue
            if kind == "hello":
                log.info("webhook sender connected; %d events to hand over",
                         len(self.unacked))
                self.peer = identity
                self.fresh = []
                self._send(list(self.unacked))
                self.last_progress = now
            elif kind == "ack":
                self._ack(message, now)
            elif kind == "stats" and isinstance(message.get("counters"), dict):
                self.stats = {k: v for k, v in message["counters"].items()
                              if isinstance(k, str) and isinstance(v, int)}
                recent = message.get("recent")
                if isinstance(recent, list):
                    self.outcomes.extend(r for r in recent[:OUTCOMES_KEPT]
                                         if isinstance(r, dict))
                if self.peer is None:
                    # A sender that was already running when this broker started: it
                    # said hello to the previous one. Everything is new to it anyway.
                    self.peer = identity
                    self._send(list(self.unacked))

    def _ack(self, message: dict[str, Any], now: float) -> None:
        seq = message.get("seq")
        if message.get("epoch") != self.epoch or not isinstance(seq, int):
            return
        unacked = self.unacked
        while unacked and unacked[0][0] <= seq:
            unacked.popleft()
        self.last_progress = now

    def flush(self, now: float) -> None:
        """Send what arrived this turn; re-send everything if acknowledgements stall."""
        if self.peer is None:
            self.fresh = []
            return
        if self.unacked and now - self.last_progress > RESEND_AFTER:
            self.last_progress = now
            self.fresh = []
            self._send(list(self.unacked))
            return
        if self.fresh:
            fresh, self.fresh = self.fresh, []
            self._send(fresh)

    def _send(self, events: list[Event]) -> None:
        if self.peer is None:
            return
        for start in range(0, len(events), CHUNK):
            body = orjson.dumps({"t": "events", "epoch": self.epoch,
                                 "events": events[start:start + CHUNK]})
            try:
                self.socket.send_multipart((self.peer, body), zmq.NOBLOCK)
            except zmq.ZMQError:
                # Gone or full: the events stay unacknowledged and go again after the
                # next hello or when the resend timer fires.
                return
