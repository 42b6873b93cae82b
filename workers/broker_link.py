"""The worker's one DEALER socket to the broker, driven from the event loop.

No task sits on the socket: the ZeroMQ file descriptor is registered with
``loop.add_reader`` and every wake-up drains all queued messages. ZeroMQ's descriptor is
edge-triggered and sends can consume the edge, so every send also schedules one extra
drain for the current loop iteration.

Requests (subscribe answers, HTTP API queries and publishes, quota checks) carry a
request id and a callback and a deadline; the link's once-a-heartbeat timer expires
overdue requests (no timer object per request).

Loss is detected, never assumed away: every ZeroMQ message on the link starts with a
sequence number frame (8 bytes, big-endian; 0 = unsequenced). A gap in what the broker
sends, or a message this side had to drop because its queue was full, sends the worker
through a resync: the same path as a broker restart (hello, replay, ``SYNCED``), after
which the broker sends ``RECOVERED`` and presence rosters are compared. Requests still
waiting when a resync starts are answered ``None`` at once (the API answers 503): the
broker that would have answered them is gone, or forgot them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from typing import Any

import zmq

from vask import curve, envelope
from vask.config import Settings
from vask.envelope import (
    ENVELOPE_VERSION,
    Bye,
    Caught,
    ConnClose,
    Console,
    Heartbeat,
    Hello,
    Moved,
    Recovered,
    Reply,
    Resync,
    Stats,
    Subscribe,
    Synced,
    Unsubscribe,
    Verb,
    Welcome,
)
from vask.metrics import WorkerMetrics
from vask.zmqsend import send_frames

log = logging.getLogger("vask.worker")

# plain ints: pyzmq's enum flags cost an enum construction per use on the hot path
_NOBLOCK, _EVENTS, _POLLIN = int(zmq.NOBLOCK), int(zmq.EVENTS), int(zmq.POLLIN)
QUEUE_LIMIT = 200_000  # messages
#: envelope messages per ZeroMQ message at most (the broker reads in shares of 256)
BATCH_LIMIT = 1024
DRAIN_LIMIT = 64  # ZeroMQ messages (each possibly a batch) handled per loop turn
BYE_LINGER_MS = 500
_CONTROL = (Reply, Heartbeat, Welcome, Resync, Recovered, Console)
NO_SEQ = bytes(8)
#: Connection churn (subscribes, unsubscribes, closes) is what a connect or reconnect
#: storm is made of. A round trip on the link wakes six threads (each end's ZeroMQ I/O
#: thread twice, the broker, the worker), and measured on a 2-core VM the broker alone
#: spends about 400 us of CPU on a round trip that carries one subscribe, and 2.4 ms on
#: one that carries 64 (``vask bench broker``, docs/benchmarks.md, fourth pass). So churn
#: waits up to ``churn_linger`` (a setting, 10 ms by default) for more of its kind while
#: the link is busy, i.e. when something was sent within that time: a storm's
#: subscribes then travel and are answered dozens at a time. On a quiet link churn
#: leaves at the end of its loop turn, so a lone subscribe is not delayed. Anything
#: else queued (a publish, a client event, a query) sends the batch at the end of the
#: current turn, churn included, so nothing else waits and order is kept.
_CHURN = (Subscribe, Unsubscribe, ConnClose)
ReplyCallback = Callable[[dict[str, Any] | None], None]


class BrokerUnavailable(Exception):
    """The broker did not answer in time (or the link is down)."""


class BrokerLink:
    """Sends envelope messages to the broker and dispatches what comes back."""

    def __init__(
        self,
        settings: Settings,
        endpoint: str,
        slot: int,
        on_message: Callable[[list[Verb]], None],
        on_welcome: Callable[[bool], None],
        on_batch: Callable[[bool], None] = lambda corked: None,
        on_recovered: Callable[[], None] = lambda: None,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.endpoint = endpoint
        self.epoch = time.time_ns() // 1000
        # host:pid:slot for people and the supervisor, plus the epoch so that equal
        # host names and pids on different machines (containers) never collide.
        self.name = f"{socket.gethostname()}:{os.getpid()}:{slot}:{self.epoch}"
        self.prefix = secrets.randbelow(899_999_999) + 100_000_000
        self.on_message = on_message
        self.on_welcome = on_welcome
        #: called with True before a drain's messages are handled and False after
        self.on_batch = on_batch
        #: the broker rebuilt its state: compare what clients were told with it
        self.on_recovered = on_recovered
        #: sequence numbers: of our last ZeroMQ message, and of the broker's last one
        #: (0: none since our hello)
        self.sent_seq = 0
        self.heard_seq = 0
        #: the last ``heard_seq`` reported in a :class:`Caught` (back-pressure; only
        #: reported when ``max_delivery_lag`` > 0)
        self.caught_seq = 0
        #: the worker's metrics registry: the link counts its gaps, drops and resyncs
        #: (``counters``) and the round trip of every request (``round_trips``)
        self.metrics = metrics if metrics is not None else WorkerMetrics([])
        self.counters: dict[str, int] = self.metrics.link
        #: clear while messages from the broker wait beyond one loop turn's share
        #: (the worker is behind on deliveries); the HTTP API waits on it before
        #: accepting more publishes, which is the publishers' back-pressure
        self.caught_up = asyncio.Event()
        self.caught_up.set()
        self.loop = asyncio.get_running_loop()
        self.context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        #: the brokers to follow, in order of preference (failover; see _move)
        self.endpoints = curve.endpoints(endpoint) or [endpoint]
        #: the index in ``endpoints`` of the broker this link talks to
        self.current = 0
        self.endpoint = self.endpoints[0]
        #: a socket asking a preferred broker whether it is back (see _probe)
        self.probe: zmq.Socket[bytes] | None = None
        self.probe_index = 0
        self.probe_since = 0.0
        #: the socket to the broker this worker just left, read until it is done
        self.leaving: zmq.Socket[bytes] | None = None
        self.leaving_until = 0.0
        self.counters["broker_moves"] = 0
        self.last_heard = 0.0
        self.sock = self._open(self.endpoint, self.name)
        self.last_heard = time.monotonic()  # a fresh link gets a full heartbeat window
        self.welcomed = False
        #: the broker has every worker's state (RECOVERED since our last hello): until
        #: then it refuses HTTP API publishes, and this worker reports not ready
        self.recovered = False
        self.broker_epoch = 0
        self.next_rid = 1
        #: rid -> (callback, deadline, time sent), both on the monotonic clock
        self.pending: dict[int, tuple[ReplyCallback, float, float]] = {}
        self.drain_scheduled = False
        self.outbox: list[list[bytes]] = []
        #: a flush of the outbox is due at the end of this loop turn
        self.flush_now = False
        #: a flush up to churn_linger away (only churn is queued, on a busy link)
        self.flush_timer: asyncio.TimerHandle | None = None
        #: loop time of the last flush that sent something (a busy link lingers churn)
        self.last_flush = -1.0
        self.closed = False
        self.beat_handle: asyncio.TimerHandle | None = None
        self.fd: int = self.sock.fileno()
        #: called with the apps of a CONSOLE message (the worker's debug recorder)
        self.on_console: Callable[[list[str]], None] | None = None
        self.loop.add_reader(self.fd, self.drain)

    # --- state ----------------------------------------------------------------------

    @property
    def up(self) -> bool:
        """Welcomed, and heard from within the heartbeat timeout."""
        return self.welcomed and (
            time.monotonic() - self.last_heard < self.settings.heartbeat_timeout
        )

    def start(self) -> None:
        self.say_hello()
        self._beat()

    def say_hello(self) -> None:
        self.welcomed = False
        self.recovered = False
        self.heard_seq = self.caught_seq = 0
        self._fail_pending()
        self.send(Hello(ENVELOPE_VERSION, self.name, self.epoch, self.prefix, os.getpid()))

    def resync(self, why: str) -> None:
        """Start over with the broker: hello, then replay everything (one mechanism for a
        broker restart, a lost message and a dropped one)."""
        log.warning("resyncing with the broker: %s", why)
        self.counters["resyncs"] += 1
        self.say_hello()

    def _fail_pending(self) -> None:
        pending, self.pending = self.pending, {}
        for callback, _, _ in pending.values():
            callback(None)

    def _beat(self) -> None:
        now = time.monotonic()
        silent = now - self.last_heard > self.settings.heartbeat_timeout
        if silent and len(self.endpoints) > 1:
            nxt = (self.current + 1) % len(self.endpoints)
            self._move(nxt, f"no heartbeat from {self.endpoint} for "
                            f"{self.settings.heartbeat_timeout:.1f}s", moved=False)
        self.send(Heartbeat(self.epoch))
        if self.welcomed:
            # cumulative figures: one lost on the way is made good by the next
            self.metrics.depth = len(self.pending) + len(self.outbox)
            self.send(Stats(self.epoch, self.metrics.snapshot()))
        if not self.welcomed:
            self.say_hello()  # also retries a hello the broker never got
        elif silent:
            log.warning("no heartbeat from the broker for %.1fs", self.settings.heartbeat_timeout)
        if self.current:
            self._probe(now)
        if self.leaving is not None:
            self._drain_leaving()
        self._expire_overdue(time.monotonic())
        self.beat_handle = self.loop.call_later(self.settings.heartbeat_interval, self._beat)

    # --- failover -------------------------------------------------------------------

    def _open(self, endpoint: str, identity: str) -> zmq.Socket[bytes]:
        """A DEALER to ``endpoint``, with CURVE when the keys are configured."""
        sock = self.context.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, identity.encode())
        sock.setsockopt(zmq.LINGER, 0)
        # Bounded: while the broker is away nothing piles up without limit (a restarted
        # broker gets this worker's state by replay anyway).
        sock.setsockopt(zmq.SNDHWM, QUEUE_LIMIT)
        sock.setsockopt(zmq.RCVHWM, QUEUE_LIMIT)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        if curve.is_tcp(endpoint):
            curve.secure_client(sock, self.settings)
        sock.connect(endpoint)
        return sock

    def _move(self, index: int, why: str, moved: bool) -> None:
        """Follow the broker ``endpoints[index]`` from now on: a new socket, a hello and
        (once welcomed, since the broker's epoch differs) the replay of this worker's
        state, as after a broker restart.

        ``moved``: the broker we leave is alive (a preferred one came back); it is told
        MOVED so that it forgets us without events and steps down.
        """
        log.warning("moving to broker %s: %s", self.endpoints[index], why)
        self.counters["broker_moves"] += 1
        self.outbox = []  # meant for the broker we leave; the replay supersedes it
        old = self.sock
        with contextlib.suppress(ValueError, OSError, zmq.ZMQError):
            self.loop.remove_reader(self.fd)
        self._close_leaving()
        if moved:
            self.sent_seq += 1
            with contextlib.suppress(zmq.ZMQError):
                old.send_multipart([self.sent_seq.to_bytes(8, "big"),
                                    *envelope.encode(Moved(self.name))], _NOBLOCK)
            # What the old broker routed here before it read MOVED is still on its way:
            # keep reading that socket until its last word (a RESYNC: it forgot us), or
            # a heartbeat timeout, so no event it acknowledged is dropped here.
            self.leaving = old
            self.leaving_until = time.monotonic() + self.settings.heartbeat_timeout
            self.loop.add_reader(old.fileno(), self._drain_leaving)
            self.loop.call_soon(self._drain_leaving)
        else:
            old.close(linger=0)
        self._close_probe()
        self.current = index
        self.endpoint = self.endpoints[index]
        self.sock = self._open(self.endpoint, self.name)
        self.fd = self.sock.fileno()
        self.loop.add_reader(self.fd, self.drain)
        self.last_heard = time.monotonic()
        self.say_hello()

    def _probe(self, now: float) -> None:
        """While following a broker other than the first, ask the preferred ones (in
        order, each for one heartbeat timeout) whether they are back: a heartbeat from
        a second identity, which a live broker answers with RESYNC (it does not know
        that identity). An answer moves this worker there."""
        probe = self.probe
        if probe is not None:
            try:
                probe.recv_multipart(_NOBLOCK)
            except zmq.Again:
                if now - self.probe_since < self.settings.heartbeat_timeout:
                    with contextlib.suppress(zmq.Again):
                        probe.send_multipart(
                            [NO_SEQ, *envelope.encode(Heartbeat(self.epoch))], _NOBLOCK)
                    return
                self._close_probe()
                self.probe_index = (self.probe_index + 1) % self.current
            else:
                self._move(self.probe_index, "a preferred broker answers again", moved=True)
                return
        self.probe_index = min(self.probe_index, self.current - 1)
        self.probe = self._open(self.endpoints[self.probe_index], f"{self.name}:probe")
        self.probe_since = now
        with contextlib.suppress(zmq.Again):
            self.probe.send_multipart([NO_SEQ, *envelope.encode(Heartbeat(self.epoch))],
                                      _NOBLOCK)

    def _drain_leaving(self) -> None:
        """Deliver what the broker we left still sends (see _move)."""
        sock = self.leaving
        if sock is None:
            return
        done = False
        self.on_batch(True)
        try:
            while int(sock.getsockopt(_EVENTS)) & _POLLIN:
                try:
                    messages = envelope.decode_many(sock.recv_multipart(_NOBLOCK)[1:])
                except (zmq.Again, envelope.EnvelopeError, IndexError):
                    break
                traffic = [m for m in messages if not isinstance(m, _CONTROL)]
                if traffic:
                    self.on_message(traffic)
                done = done or any(isinstance(m, Resync) for m in messages)
        finally:
            self.on_batch(False)
        if done or time.monotonic() > self.leaving_until:
            self._close_leaving()

    def _close_leaving(self) -> None:
        if self.leaving is not None:
            with contextlib.suppress(ValueError, OSError, zmq.ZMQError):
                self.loop.remove_reader(self.leaving.fileno())
            self.leaving.close(linger=0)
            self.leaving = None

    def _close_probe(self) -> None:
        if self.probe is not None:
            self.probe.close(linger=0)
            self.probe = None

    def close(self) -> None:
        """Say goodbye (the broker purges our connections at once) and close."""
        if self.welcomed and not self.closed:
            self.send(Stats(self.epoch, self.metrics.snapshot()))  # the final figures
            self.send(Bye(self.name))
            self.flush()
        self.closed = True
        if self.beat_handle is not None:
            self.beat_handle.cancel()
        self.pending.clear()
        with contextlib.suppress(ValueError, OSError, zmq.ZMQError):
            self.loop.remove_reader(self.fd)
        self._close_probe()
        self._close_leaving()
        self.sock.close(linger=BYE_LINGER_MS)

    # --- sending --------------------------------------------------------------------

    def send(self, message: Verb) -> None:
        """Queue ``message``; what is queued leaves as one batch at the end of this loop
        turn, or up to ``churn_linger`` later while only connection churn is queued and
        the link is busy."""
        if self.closed:
            return
        self._queue(envelope.encode(message), type(message))

    def _queue(self, frames: list[bytes], verb: type[Verb]) -> None:
        self.outbox.append(frames)
        if self.flush_now:
            return
        timer = self.flush_timer
        if verb in _CHURN:
            if timer is None:
                linger = self.settings.churn_linger
                if linger > 0 and self.loop.time() - self.last_flush < linger:
                    self.flush_timer = self.loop.call_later(linger, self.flush)
                else:  # a quiet link: nothing to wait for
                    self.flush_now = True
                    self.loop.call_soon(self.flush)
            return
        if timer is not None:
            timer.cancel()
            self.flush_timer = None
        self.flush_now = True
        self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self.flush_now = False
        timer = self.flush_timer
        if timer is not None:
            timer.cancel()
            self.flush_timer = None
        outbox = self.outbox
        if not outbox or self.closed:
            return
        self.outbox = []
        self.last_flush = self.loop.time()
        # A huge turn (the replay of thousands of connections) leaves in several
        # batches, so the broker can interleave other workers' traffic between them.
        for start in range(0, len(outbox), BATCH_LIMIT):
            chunk = outbox[start:start + BATCH_LIMIT]
            self.sent_seq += 1
            try:
                send_frames(self.sock,
                            [self.sent_seq.to_bytes(8, "big"), *envelope.encode_batch(chunk)],
                            _NOBLOCK)
            except zmq.Again:
                # The broker will see the gap in our numbers; do not wait for it to say so.
                self.counters["link_drops"] += 1
                self.resync(f"the queue to the broker is full; dropped {len(chunk)} messages")
                break
        if not self.drain_scheduled:
            self.drain_scheduled = True
            self.loop.call_soon(self.drain)

    def request(self, message: Verb, callback: ReplyCallback,
                timeout: float | None = None) -> None:
        """Send ``message`` with a fresh request id in its ``rid`` field (whatever the
        message holds there is ignored; see ``envelope.encode_request``); call
        ``callback(body)``, or ``callback(None)`` on timeout."""
        if not self.welcomed:
            callback(None)
            return
        rid = self.next_rid
        self.next_rid += 1
        wait = timeout if timeout is not None else self.settings.broker_timeout
        now = time.monotonic()
        self.pending[rid] = (callback, now + wait, now)
        if not self.closed:
            self._queue(envelope.encode_request(message, rid), type(message))

    async def ask(self, message: Verb, timeout: float | None = None) -> dict[str, Any]:
        """Awaitable :meth:`request`; raises :class:`BrokerUnavailable` on timeout."""
        future: asyncio.Future[dict[str, Any] | None] = self.loop.create_future()

        def done(body: dict[str, Any] | None) -> None:
            if not future.done():
                future.set_result(body)

        self.request(message, done, timeout)
        body = await future
        if body is None:
            raise BrokerUnavailable("the broker did not answer in time")
        return body

    def _expire_overdue(self, now: float) -> None:
        """Answer ``None`` to requests past their deadline (checked once a heartbeat
        interval, so a timeout may fire up to that much late)."""
        overdue = [rid for rid, (_, deadline, _) in self.pending.items() if deadline <= now]
        for rid in overdue:
            callback = self.pending.pop(rid)[0]
            callback(None)

    # --- receiving ------------------------------------------------------------------

    def drain(self) -> None:
        self.drain_scheduled = False
        if self.closed:
            return
        # Everything one drain delivers is corked and leaves in one write per
        # connection at its end: a burst of events (a busy channel, a saturated worker)
        # costs one syscall per subscriber per drain, not one per event.
        self.on_batch(True)
        try:
            self._drain()
        finally:
            self.on_batch(False)
        # What this drain delivered is now written to the clients' transports: tell the
        # broker how far we are, so it can hold back publishers while we lag behind.
        if self.heard_seq != self.caught_seq and self.welcomed and \
                self.settings.max_delivery_lag > 0:
            self.caught_seq = self.heard_seq
            self.send(Caught(self.heard_seq))

    def _drain(self) -> None:
        sock = self.sock
        on_message = self.on_message
        taken = 0
        while int(sock.getsockopt(_EVENTS)) & _POLLIN:
            if taken == DRAIN_LIMIT:
                # Give the loop back (timers, heartbeats, client I/O) and continue on
                # the next turn; a worker that drained forever under a flood would stop
                # heartbeating and be purged by the broker.
                if not self.drain_scheduled:
                    self.drain_scheduled = True
                    self.loop.call_soon(self.drain)
                self.caught_up.clear()
                return
            try:
                frames = sock.recv_multipart(_NOBLOCK)
            except zmq.Again:
                break
            taken += 1
            try:
                seq = int.from_bytes(frames[0], "big") if len(frames[0]) == 8 else -1
                if seq < 0:
                    raise envelope.EnvelopeError("no sequence number frame")
                messages = envelope.decode_many(frames[1:])
            except envelope.EnvelopeError as exc:
                log.warning("bad message from the broker: %s", exc)
                continue
            self.last_heard = time.monotonic()
            if seq:
                expected = self.heard_seq + 1
                self.heard_seq = seq
                if expected > 1 and seq != expected:
                    self.counters["link_gaps"] += 1
                    # what did arrive is still good: handle it below
                    self.resync(f"lost {seq - expected} messages from the broker")
            # In order: runs of traffic go to the worker together (so it can join
            # deliveries), link-level messages are handled where they stand.
            traffic: list[Verb] = []
            for message in messages:
                if isinstance(message, _CONTROL):
                    if traffic:
                        on_message(traffic)
                        traffic = []
                    self._control(message)
                else:
                    traffic.append(message)
            if traffic:
                on_message(traffic)
        self.caught_up.set()

    def _control(self, message: Verb) -> None:
        """Handle a link-level message: reply, heartbeat, welcome or resync."""
        if isinstance(message, Reply):
            entry = self.pending.pop(message.rid, None)
            if entry is not None:
                self.metrics.round_trips.observe(time.monotonic() - entry[2])
                entry[0](message.body)
        elif isinstance(message, Heartbeat):
            if self.welcomed and message.epoch != self.broker_epoch:
                self.resync("the broker restarted")
        elif isinstance(message, Welcome):
            self._welcomed(message)
        elif isinstance(message, Resync) and self.welcomed:
            self.resync("the broker does not know this worker (it restarted, or it saw a "
                        "gap in this worker's messages)")
        elif isinstance(message, Console):
            if self.on_console is not None:
                self.on_console(message.apps)
        elif isinstance(message, Recovered) and self.welcomed \
                and message.broker_epoch == self.broker_epoch:
            self.recovered = True
            self.on_recovered()

    def _welcomed(self, message: Welcome) -> None:
        if self.welcomed:
            return
        if not message.ok:
            if "prefix" in message.reason:
                self.prefix = secrets.randbelow(899_999_999) + 100_000_000
                self.say_hello()
                return
            log.error("the broker refused this worker: %s", message.reason)
            return
        replay = self.broker_epoch != 0
        self.welcomed = True
        self.broker_epoch = message.broker_epoch
        self.on_welcome(replay)
        self.send(Synced(self.epoch))  # after the replay, in the same batch
