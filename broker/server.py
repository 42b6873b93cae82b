"""The broker process: one ZeroMQ ROUTER around :class:`~vask.broker.state.ClusterState`.

A plain blocking poll loop, no asyncio: each wake-up drains every queued message
(so a burst of publishes costs one poll), hands each to the state, and sends what the
state answers. Timers (heartbeats, purge of silent workers, subscription-count flushes,
cache expiry) run from the same loop between polls.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from types import FrameType

import zmq

from vask import envelope
from vask.broker.state import ClusterState, Out
from vask.config import Settings
from vask.envelope import (
    Bye,
    ConnClose,
    ConnOpen,
    Heartbeat,
    Hello,
    Publish,
    Query,
    Resync,
    SignIn,
    Subscribe,
    TerminateUser,
    Unsubscribe,
)
from vask.process import die_with_parent

log = logging.getLogger("vask.broker")

COUNT_FLUSH_INTERVAL = 0.1
FLUSH_EVERY = 64  # inbound messages (each may be a batch) between outbound flushes
_NOBLOCK = int(zmq.NOBLOCK)  # a plain int: enum flags cost a construction per use
QUEUE_LIMIT = 200_000  # messages per peer


class Broker:
    """Owns the ROUTER socket and the cluster state."""

    def __init__(self, settings: Settings, endpoint: str, control_fd: int = -1) -> None:
        self.settings = settings
        self.control_fd = control_fd
        self.control_buffer = b""
        self.endpoint = endpoint
        self.epoch = time.time_ns() // 1000
        self.state = ClusterState(settings, self.epoch)
        self.context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self.router = self.context.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.ROUTER_HANDOVER, 1)
        # Report full queues and unknown peers instead of dropping silently.
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # Bounded queues: a stalled worker cannot make the broker buffer without limit.
        self.router.setsockopt(zmq.SNDHWM, QUEUE_LIMIT)
        self.router.setsockopt(zmq.RCVHWM, QUEUE_LIMIT)
        self.running = True
        self.outboxes: dict[bytes, list[list[bytes]]] = {}

    def bind(self) -> None:
        self.router.bind(self.endpoint)

    def stop(self, *_: object) -> None:
        self.running = False

    def send(self, out: Out) -> None:
        """Queue messages per worker; :meth:`flush` sends each worker one batch."""
        outboxes = self.outboxes
        for identity, message in out:
            box = outboxes.get(identity)
            if box is None:
                box = outboxes[identity] = []
            box.append(envelope.encode(message))

    def flush(self) -> None:
        router = self.router
        for identity, box in self.outboxes.items():
            try:
                router.send_multipart([identity, *envelope.encode_batch(box)], _NOBLOCK)
            except zmq.Again:
                log.warning("dropping %d messages to a worker whose queue is full", len(box))
            except zmq.ZMQError as exc:  # EHOSTUNREACH: the worker is gone
                log.info("dropping %d messages to unreachable worker %r: %s",
                         len(box), identity, exc.strerror)
        self.outboxes = {}

    def handle(self, frames: list[bytes], now: float) -> None:
        identity = frames[0]
        try:
            messages = envelope.decode_many(frames[1:])
        except envelope.EnvelopeError as exc:
            log.warning("bad message from %r: %s", identity, exc)
            return
        for message in messages:
            self.handle_one(identity, message, now)

    def handle_one(self, identity: bytes, message: envelope.Verb, now: float) -> None:
        state = self.state
        state.now = now
        if isinstance(message, Hello):
            self.send(state.hello(identity, message, now))
            return
        if not state.seen(identity, now):
            # A worker we do not know: we restarted, or purged it while it was stalled.
            self.send([(identity, Resync(self.epoch))])
            return
        out: Out
        if isinstance(message, Publish):
            out = state.publish(identity, message, now)
        elif isinstance(message, Subscribe):
            out = state.subscribe(identity, message)
        elif isinstance(message, Unsubscribe):
            out = state.unsubscribe(identity, message)
        elif isinstance(message, ConnOpen):
            out = state.conn_open(identity, message)
        elif isinstance(message, ConnClose):
            out = state.conn_close(identity, message)
        elif isinstance(message, SignIn):
            out = state.sign_in(identity, message)
        elif isinstance(message, Query):
            out = state.query(identity, message, now)
        elif isinstance(message, TerminateUser):
            out = state.terminate_user(message)
        elif isinstance(message, Heartbeat):
            out = []
        elif isinstance(message, Bye):
            out = state.purge(identity)
        else:
            log.warning("unexpected %s from a worker", type(message).__name__)
            out = []
        if out:
            self.send(out)

    def read_control(self) -> None:
        data = os.read(self.control_fd, 65536)
        if not data:  # the supervisor is gone
            self.control_fd = -1
            self.running = False
            return
        self.control_buffer += data
        *lines, self.control_buffer = self.control_buffer.split(b"\n")
        for line in lines:
            if line:
                log.info("worker %s died; purging it", line.decode(errors="replace"))
                self.send(self.state.purge_named(line.decode(errors="replace")))

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        if self.control_fd >= 0:
            poller.register(self.control_fd, zmq.POLLIN)
        interval = self.settings.heartbeat_interval
        next_beat = 0.0
        next_flush = 0.0
        router = self.router
        while self.running:
            events = dict(poller.poll(timeout=50))
            now = time.time()
            if self.control_fd in events:
                self.read_control()
            if self.router in events:
                # Drain everything queued, bounded so timers still run under load;
                # answers leave in batches, at least every FLUSH_EVERY inbound messages.
                for n in range(1, 10_001):
                    try:
                        frames = router.recv_multipart(_NOBLOCK)
                    except zmq.Again:
                        break
                    self.handle(frames, now)
                    if n % FLUSH_EVERY == 0:
                        self.flush()
            if now >= next_flush:
                next_flush = now + COUNT_FLUSH_INTERVAL
                self.send(self.state.flush_counts(now))
                self.state.expire_cache(now)
            if now >= next_beat:
                late = now - next_beat > interval
                next_beat = now + interval
                beat = Heartbeat(self.epoch)
                self.send([(w, beat) for w in self.state.workers])
                if late:
                    # We stalled ourselves (swapped out, SIGSTOP, huge burst): silence was
                    # ours, not the workers'. Give them a fresh heartbeat window.
                    for worker in self.state.workers.values():
                        worker.last_seen = now
                for identity in self.state.expired(now, self.settings.heartbeat_timeout):
                    log.warning("worker %r stopped heartbeating; purging it", identity)
                    self.send(self.state.purge(identity))
            if self.state.webhooks:
                # Webhook delivery is not built yet (its own issue); keep memory bounded.
                self.state.webhooks.clear()
            if self.outboxes:
                self.flush()
        router.close(linger=0)


def serve(settings: Settings, endpoint: str, parent_pid: int = 0,
          control_fd: int = -1) -> None:
    """Run a broker until SIGTERM/SIGINT (or until ``parent_pid`` disappears).

    ``control_fd`` is the read end of the supervisor's pipe: one dead worker's
    identity per line, purged at once instead of after the heartbeat timeout.
    """
    broker = Broker(settings, endpoint, control_fd)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        broker.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    broker.bind()
    log.info("broker listening on %s (pid %d)", endpoint, os.getpid())
    if parent_pid:
        die_with_parent(parent_pid)
    broker.run()
