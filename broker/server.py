"""The broker process: one ZeroMQ ROUTER around :class:`~vask.broker.state.ClusterState`.

A plain blocking poll loop, no asyncio. Each loop turn (:meth:`Broker.turn`):

1. reads what is queued on the ROUTER into one inbox per peer, at most
   :data:`READ_LIMIT` ZeroMQ messages and only while fewer than :data:`BUFFER_LIMIT`
   envelope messages wait in the inboxes (so nothing is buffered without bound);
2. handles the inboxes round-robin, at most :data:`PEER_SHARE` envelope messages per
   peer, and stops early once the turn has taken :data:`TURN_SECONDS`;
3. runs the timers (heartbeats, purge of silent workers, subscription-count flushes,
   cache expiry) and sends what the state answered, one batch per worker.

So a worker that floods the broker gets its share and no more: the other workers'
requests are answered, and heartbeats go out, while its backlog is worked through.

Every message is checked by :func:`vask.envelope.decode`; one that fails is dropped and
counted (:attr:`Broker.dropped_bad`). An unexpected exception while handling one message
is logged and counted (:attr:`Broker.handler_errors`) instead of ending the loop. Both are
logged at most once per :data:`LOG_INTERVAL`, so a flood of bad input cannot flood the log.

SIGHUP makes the broker take the settings the supervisor wrote after a reload
(:meth:`Broker.reload_from_file`, between two loop turns): the apps (subscription
counts, webhooks) and the timers' settings.

Every timer runs on ``time.monotonic()``. Wall-clock time is used only for the broker's
epoch, which is an identity (a restarted broker must get a different one, and it has to
be comparable across hosts), not a duration.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from types import FrameType
from typing import TYPE_CHECKING

import zmq

from vask import curve, envelope
from vask.broker.backpressure import Backpressure
from vask.broker.state import ClusterState, Out
from vask.broker.totals import ClusterTotals, cluster_snapshot
from vask.broker.webhook_link import WebhookLink
from vask.config import Settings
from vask.envelope import (
    Bye,
    Caught,
    ConnClose,
    ConnOpen,
    Debug,
    Deliver,
    Heartbeat,
    Hello,
    Moved,
    Publish,
    Query,
    Reply,
    Resync,
    SignIn,
    Stats,
    Subscribe,
    Synced,
    TerminateUser,
    Unsubscribe,
)
from vask.process import die_with_parent, freeze_startup_objects
from vask.reload import read_settings_file
from vask.zmqsend import send_frames

if TYPE_CHECKING:
    # Loaded only by a broker that serves them: aiohttp (the dashboard, about 10 MiB per
    # process), prometheus_client (/metrics, about 9 MiB), zmq.auth.thread (CURVE; it
    # brings asyncio, about 8 MiB)
    from zmq.auth.thread import ThreadAuthenticator

    from vask.broker.admin import AdminServer
    from vask.broker.metrics import MetricsServer

log = logging.getLogger("vask.broker")

COUNT_FLUSH_INTERVAL = 0.1
#: longest wait for input when there is nothing to do (the timers' resolution)
POLL_MS = 50
_NOBLOCK = int(zmq.NOBLOCK)  # a plain int: enum flags cost a construction per use
#: the answer to a publish whose deliveries could not all be queued
_UNDELIVERABLE = {"ok": False, "error": "A worker of the cluster is overloaded and the event "
                  "may not reach all subscribers; try again shortly."}
#: the answer to a publish while this broker steps down (a worker moved to a broker
#: earlier in its list, see Broker.step_down)
_STEPPING_DOWN = {"ok": False, "error": "The cluster is moving to another broker; retry "
                  "shortly."}
#: the sequence number frame of an unnumbered message (see docs/envelope.md)
NO_SEQ = bytes(8)
QUEUE_LIMIT = 200_000  # ZeroMQ messages per peer, each way
#: ZeroMQ messages (each possibly a batch) read from the ROUTER per loop turn
READ_LIMIT = 256
#: envelope messages waiting in the inboxes above which the ROUTER is not read. With a
#: few hundred bytes per message this is a few MiB; the rest waits in ZeroMQ's queues
#: (bounded by QUEUE_LIMIT), where a flooding worker eventually blocks on its own HWM.
BUFFER_LIMIT = 32_768
#: envelope messages handled per peer per turn before the next peer's turn comes
PEER_SHARE = 256
#: a turn stops handling messages after this long, so timers run at least this often
#: (plus one peer's share) however much is queued
TURN_SECONDS = 0.05
#: ZMQ_MAXMSGSIZE on the ROUTER, in bytes. ZeroMQ applies it to each frame, not to a
#: whole multipart message, and disconnects a peer that sends a larger one (it then
#: reconnects; what it had queued is lost). The largest legitimate frames are a PUB
#: payload (at most about an HTTP body, max_http_body_bytes, 1 MiB by default, or a
#: client event, max_message_bytes), a SUB header with a presence member's user_info,
#: and a batch's frame-count header (2 bytes per message: 64 MiB would take a worker
#: turn of 33 million messages). :func:`max_frame_bytes` raises the limit with the
#: client-supplied size limits in the settings, so large configured bodies still fit.
#: The other frames (watchlists, query arguments) are bounded by app limits that would
#: have to be set in the millions to come near it.
MAX_FRAME_BYTES = 64 * 1024 * 1024
#: at most one log line per this many seconds for each kind of repeated problem
LOG_INTERVAL = 1.0


def max_frame_bytes(settings: Settings) -> int:
    """The ROUTER's MAXMSGSIZE: :data:`MAX_FRAME_BYTES`, or more with large limits
    configured (4x the largest client-supplied size, which covers JSON re-encoding)."""
    largest = max([settings.max_http_body_bytes, settings.max_message_bytes,
                   *(app.max_presence_member_bytes for app in settings.apps)])
    return max(MAX_FRAME_BYTES, 4 * largest + 1024 * 1024)


class RateLimitedLog:
    """One kind of repeated log line, written at most once per ``interval``.

    Lines in between are counted; the next line written says how many were left out,
    and :meth:`tick` (from the loop's timers) reports a count left over after a burst.
    """

    def __init__(self, level: int, what: str, interval: float = LOG_INTERVAL) -> None:
        self.level = level
        self.what = what
        self.interval = interval
        self.next_at = 0.0
        self.suppressed = 0

    def __call__(self, now: float, message: str, *args: object,
                 exc_info: bool = False) -> None:
        if now < self.next_at:
            self.suppressed += 1
            return
        self.next_at = now + self.interval
        if self.suppressed:
            message += " (%d more %s since the last line)"
            args = (*args, self.suppressed, self.what)
            self.suppressed = 0
        log.log(self.level, message, *args, exc_info=exc_info)

    def tick(self, now: float) -> None:
        if self.suppressed and now >= self.next_at:
            self.next_at = now + self.interval
            log.log(self.level, "%d more %s since the last line", self.suppressed, self.what)
            self.suppressed = 0


def _peer(identity: bytes) -> str:
    """A peer's identity for a log line (peers choose them: keep it short)."""
    return repr(identity[:80])


class Broker:
    """Owns the ROUTER socket and the cluster state."""

    def __init__(self, settings: Settings, endpoint: str, control_fd: int = -1,
                 webhook_endpoint: str = "") -> None:
        self.settings = settings
        self.control_fd = control_fd
        self.control_buffer = b""
        self.endpoint = endpoint
        # Wall clock on purpose: the epoch is an identity that must differ after a
        # restart, even on another host; every duration below uses time.monotonic().
        self.epoch = time.time_ns() // 1000
        # The supervisor's own broker knows how many workers will replay into it, so its
        # recovery can end as soon as they have; a standalone one waits for the window.
        self.state = ClusterState(settings, self.epoch,
                                  expected_workers=settings.workers if control_fd >= 0 else 0)
        self.context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self.router = self.context.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.ROUTER_HANDOVER, 1)
        # Report full queues and unknown peers instead of dropping silently.
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # Bounded queues: a stalled worker cannot make the broker buffer without limit.
        self.router.setsockopt(zmq.SNDHWM, QUEUE_LIMIT)
        self.router.setsockopt(zmq.RCVHWM, QUEUE_LIMIT)
        self.max_frame = max_frame_bytes(settings)
        self.router.setsockopt(zmq.MAXMSGSIZE, self.max_frame)
        #: the ZAP handler admitting only authorized workers (CURVE on a TCP link)
        self.auth: ThreadAuthenticator | None = None
        if curve.is_tcp(endpoint) and curve.secure_server(self.router, settings):
            self.auth = curve.start_authenticator(self.context, settings)
        self.poller = zmq.Poller()
        self.poller.register(self.router, zmq.POLLIN)
        if control_fd >= 0:
            self.poller.register(control_fd, zmq.POLLIN)
        #: the hand-over to the webhook sender (None: no app has webhooks)
        self.webhooks: WebhookLink | None = None
        if webhook_endpoint:
            self.webhooks = WebhookLink(self.context, webhook_endpoint, self.epoch,
                                        settings.webhook_max_queued)
            self.poller.register(self.webhooks.socket, zmq.POLLIN)
        self.every_beat: Callable[[], None] | None = None
        #: until this (monotonic) time, publishes are refused: workers are moving from
        #: this broker to a preferred one (see step_down)
        self.stepping_down_until = 0.0
        #: workers that left for a preferred broker (MOVED)
        self.moved = 0
        self.running = True
        self.outboxes: dict[bytes, list[list[bytes]]] = {}
        #: answers to HTTP API publishes: sent after every delivery of the same flush,
        #: and turned into refusals if a delivery could not be queued (see flush)
        self.acks: list[tuple[bytes, Reply, tuple[bytes, ...]]] = []
        #: answers held back while a worker they reach lags (``max_delivery_lag``)
        self.backpressure = Backpressure(settings.max_delivery_lag,
                                         settings.broker_timeout / 2)
        #: sequence numbers (see docs/envelope.md): of the last ZeroMQ message sent to
        #: each known worker, and of the last one received from each peer
        self.sent_seq: dict[bytes, int] = {}
        self.heard_seq: dict[bytes, int] = {}
        #: gaps seen in workers' numbering (each answered with a RESYNC)
        self.link_gaps = 0
        #: per peer, the ZeroMQ messages read but not yet fully handled, in order
        self.inboxes: dict[bytes, deque[envelope.Reader]] = {}
        #: peers with a non-empty inbox, in round-robin order (each at most once)
        self.ready: deque[bytes] = deque()
        #: envelope messages waiting in the inboxes
        self.buffered = 0
        #: the last read stopped at a limit, not because the ROUTER was empty
        self.backlog = False
        #: unknown peers already sent a RESYNC since the last flush (one is enough)
        self.resynced: set[bytes] = set()
        now = time.monotonic()
        self.next_flush = now
        self.next_beat = now
        #: messages dropped because they failed envelope checks, or made no sense here
        self.dropped_bad = 0
        #: messages whose handling raised an unexpected exception (a bug; logged)
        self.handler_errors = 0
        self.bad_log = RateLimitedLog(logging.WARNING, "bad messages dropped")
        self.error_log = RateLimitedLog(logging.ERROR, "messages failed")
        self.send_log = RateLimitedLog(logging.WARNING, "batches to workers dropped")
        #: the file the supervisor writes reloaded settings to ("" = none), and whether
        #: a SIGHUP asked to read it
        self.settings_path = ""
        self.reload_asked = False
        #: the workers' metrics snapshots (STATS), summed for /metrics
        self.totals = ClusterTotals()
        #: workers the supervisor reported dead (it restarts them)
        self.worker_restarts = 0
        #: the /metrics listener, if one was started (see serve)
        self.metrics: MetricsServer | None = None
        #: the admin listener (dashboard), if admin_token is set (see serve)
        self.admin: AdminServer | None = None
        #: worker deaths reported by the supervisor, per slot (the dashboard shows them)
        self.restarts_by_slot: Counter[str] = Counter()

    def bind(self) -> None:
        self.router.bind(self.endpoint)
        if self.webhooks is not None:
            self.webhooks.bind()

    @property
    def webhook_stats(self) -> dict[str, int]:
        """The webhook sender's last reported counters, plus the events this broker
        dropped because the sender did not keep up (see docs/webhooks.md)."""
        if self.webhooks is None:
            return {}
        stats = self.webhooks.stats
        return {**stats, "dropped": stats.get("dropped", 0) + self.webhooks.dropped}

    def stop(self, *_: object) -> None:
        self.running = False

    def reload_from_file(self) -> None:
        """Take the settings the supervisor wrote after a reload, if they differ."""
        self.reload_asked = False
        if not self.settings_path:
            log.warning("SIGHUP: a standalone broker does not reload its configuration; "
                        "restart it to apply a new one")
            return
        try:
            new = read_settings_file(self.settings_path)
        except (OSError, ValueError, TypeError) as exc:
            log.error("cannot read the reloaded settings: %s", exc)
            return
        if new is None or new == self.settings:
            return
        self.settings = new
        # Connections of removed apps stay in the state until their workers close them
        # (they do, on the same reload); lookups of a missing app find nothing.
        self.state.set_apps(new.apps)
        if self.admin is not None:
            self.admin.settings = new  # the token stays the one it started with
        logging.getLogger().setLevel(new.log_level.upper())
        log.info("configuration reloaded (%d apps)", len(new.apps))

    # --- sending --------------------------------------------------------------------

    def send(self, out: Iterable[tuple[bytes, envelope.Verb]]) -> None:
        """Queue messages per worker; :meth:`flush` sends each worker one batch."""
        outboxes = self.outboxes
        for identity, message in out:
            box = outboxes.get(identity)
            if box is None:
                box = outboxes[identity] = []
            box.append(envelope.encode(message))

    def flush(self) -> None:
        """Send each worker its batch; then the publish answers.

        A publish is answered only after its deliveries were handed to ZeroMQ, so an
        acknowledged event is on its way. A batch that cannot be queued (a worker's
        queue is full) is dropped: that worker sees the gap in the numbering and
        resyncs, and every publish answered in this flush is refused instead (503),
        since it may not have reached it.
        """
        full = self._send_boxes(self.outboxes)
        self.outboxes = {}
        ready: list[tuple[bytes, Reply]] = []
        if self.acks:
            acks, self.acks = self.acks, []
            if full:
                acks = [(i, Reply(r.rid, _UNDELIVERABLE) if r.body.get("ok") else r, t)
                        for i, r, t in acks]
            ready = self.backpressure.hold(acks, time.monotonic(), self.state.workers)
        ready += self.backpressure.release(time.monotonic(), self.state.workers)
        if ready:
            self.send(ready)
            self._send_boxes(self.outboxes)
            self.outboxes = {}
        self.resynced.clear()

    def _send_boxes(self, boxes: dict[bytes, list[list[bytes]]]) -> bool:
        """Send each box as one ZeroMQ message; True if a known worker's batch could not
        be queued (its queue was full, or ZeroMQ had no route to it)."""
        router = self.router
        now = time.monotonic()
        workers = self.state.workers
        sent_seq = self.sent_seq
        full = False
        for identity, box in boxes.items():
            # Numbered for known workers, also when dropped: the gap is the signal.
            seq = sent_seq[identity] = sent_seq.get(identity, 0) + 1 \
                if identity in workers else 0
            try:
                send_frames(router,
                            [identity, seq.to_bytes(8, "big"), *envelope.encode_batch(box)],
                            _NOBLOCK)
                if seq:
                    self.backpressure.sent(identity, seq, now)
            except zmq.Again:
                full = True
                self.send_log(now, "dropping %d messages to worker %s: its queue is full",
                              len(box), _peer(identity))
            except zmq.ZMQError as exc:  # EHOSTUNREACH: the worker is gone
                # ZeroMQ also says so for a known worker whose connection is being torn
                # down or replaced: what this flush acknowledges may not reach it either.
                full = full or seq > 0
                self.send_log(now, "dropping %d messages to unreachable worker %s: %s",
                              len(box), _peer(identity), exc.strerror)
        return full

    # --- receiving ------------------------------------------------------------------

    def read(self, now: float) -> bool:
        """Move queued ZeroMQ messages into the per-peer inboxes (bounded, see the
        module docstring). True if it stopped at a limit with more perhaps queued.

        ZeroMQ's ROUTER hands out its peers' messages in turn (fair queuing), so even
        while one peer floods, another peer's message is among the first few read.
        """
        router = self.router
        workers = self.state.workers
        for _ in range(READ_LIMIT):
            if self.buffered >= BUFFER_LIMIT:
                return True
            try:
                frames = router.recv_multipart(_NOBLOCK)
            except zmq.Again:
                return False
            identity = frames[0]
            worker = workers.get(identity)
            if worker is not None:
                # A sign of life as soon as it arrives: a worker whose messages wait
                # behind its own flood is not purged for the wait.
                worker.last_seen = now
            self.receive(identity, frames[1:], now)
        return True

    def receive(self, identity: bytes, frames: list[bytes], now: float) -> None:
        """Queue one ZeroMQ message from ``identity`` (without the identity frame): a
        sequence number, then a batch or a single message."""
        if not frames or len(frames[0]) != 8:
            self._bad(identity, envelope.EnvelopeError("no sequence number frame"), now)
            return
        seq = int.from_bytes(frames[0], "big")
        if seq:
            last = self.heard_seq.get(identity)
            self.heard_seq[identity] = seq
            if last is not None and seq != last + 1 and identity in self.state.workers:
                # Something this worker sent never arrived: rebuild its state from a
                # replay (the same path as after a broker restart).
                self.link_gaps += 1
                self.send_log(now, "worker %s: %d messages lost; asking it to resync",
                              _peer(identity), seq - last - 1)
                self.send([(identity, Resync(self.epoch))])
        try:
            reader = envelope.Reader(frames[1:])
        except envelope.EnvelopeError as exc:
            self._bad(identity, exc, now)
            return
        if not reader.remaining:  # an empty batch
            return
        inbox = self.inboxes.get(identity)
        if inbox is None:
            inbox = self.inboxes[identity] = deque()
            self.ready.append(identity)
        inbox.append(reader)
        self.buffered += reader.remaining

    def work(self, now: float) -> float:
        """Handle the inboxes round-robin, :data:`PEER_SHARE` messages per peer, until
        each ready peer has had one share or :data:`TURN_SECONDS` have passed. Returns
        the time it finished."""
        ready = self.ready
        deadline = now + TURN_SECONDS
        for _ in range(len(ready)):
            identity = ready.popleft()
            inbox = self.inboxes[identity]
            self._take(identity, inbox, PEER_SHARE, now)
            if inbox:
                ready.append(identity)
            else:
                del self.inboxes[identity]
            now = time.monotonic()
            if now >= deadline:
                break
        return now

    def _take(self, identity: bytes, inbox: deque[envelope.Reader], budget: int,
              now: float) -> None:
        """Handle up to ``budget`` messages from the front of ``inbox``."""
        while budget and inbox:
            reader = inbox[0]
            take = min(budget, reader.remaining)
            budget -= take
            self.buffered -= take
            for _ in range(take):
                try:
                    message = reader.next()
                except envelope.EnvelopeError as exc:
                    self._bad(identity, exc, now)
                    continue
                try:
                    self.handle_one(identity, message, now)
                except Exception:
                    # Last line of defence: a bug must not end the broker (all workers
                    # would lose their cluster state at once).
                    self.handler_errors += 1
                    self.error_log(now, "error handling %s from %s", type(message).__name__,
                                   _peer(identity), exc_info=True)
            if not reader.remaining:
                inbox.popleft()

    def handle(self, frames: list[bytes], now: float) -> None:
        """Handle one whole message (identity, then envelope frames, unnumbered) at
        once, outside the loop's shares (tests drive the broker with it)."""
        identity = frames[0]
        self.receive(identity, [NO_SEQ, *frames[1:]], now)
        inbox = self.inboxes.get(identity)
        if inbox is not None:
            self._take(identity, inbox, self.buffered, now)
            if not inbox:
                del self.inboxes[identity]
                self.ready.remove(identity)

    def _bad(self, identity: bytes, exc: Exception, now: float) -> None:
        self.dropped_bad += 1
        self.bad_log(now, "dropped a bad message from %s: %s", _peer(identity), exc)

    def handle_one(self, identity: bytes, message: envelope.Verb, now: float) -> None:
        state = self.state
        state.now = now
        if isinstance(message, Hello):
            self.sent_seq.pop(identity, None)  # its numbering restarts with the welcome
            self.backpressure.forget(identity)
            self.send(state.hello(identity, message, now))
            return
        if not state.seen(identity, now):
            # A worker we do not know: we restarted, or purged it while it was stalled.
            # One RESYNC per flush is enough (it answers with a hello).
            if identity not in self.resynced:
                self.resynced.add(identity)
                self.send([(identity, Resync(self.epoch))])
            return
        out: Out
        if isinstance(message, Publish):
            if message.rid and now < self.stepping_down_until:
                self.send([(identity, Reply(message.rid, _STEPPING_DOWN))])
                return
            out = state.publish(identity, message, now)
            if message.rid:
                self._answer_later(out)
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
            out = state.terminate_user(identity, message)
            if message.rid:
                self._answer_later(out)
        elif isinstance(message, Synced):
            out = state.synced(identity)
        elif isinstance(message, Caught):
            self.backpressure.caught(identity, message.seq)
            out = []
        elif isinstance(message, Heartbeat):
            out = []
        elif isinstance(message, Stats):
            self.totals.update(identity, message.stats)
            out = []
        elif isinstance(message, Bye):
            out = state.purge(identity)
        elif isinstance(message, Moved):
            out = self.step_down(identity, message, now)
        elif isinstance(message, Debug):
            if self.admin is not None:
                self.admin.take_records(message.records)
            out = []
        else:  # a broker -> worker verb
            self._bad(identity, envelope.EnvelopeError(
                f"{type(message).__name__} is not for the broker"), now)
            out = []
        if out:
            self.send(out)

    def step_down(self, identity: bytes, message: Moved, now: float) -> Out:
        """A worker now follows a broker earlier in its list (failover is over, or a
        partition healed). Forget it silently: its clients are still connected, so no
        member_removed goes to anyone and no webhook is generated (the other broker has
        its replay, which generates none either). The other workers here follow within a
        heartbeat (they probe the preferred broker too); until then this broker refuses
        acknowledged publishes, since it no longer reaches every subscriber."""
        before = len(self.state.webhooks)
        self.state.purge(identity)
        del self.state.webhooks[before:]
        self.sent_seq.pop(identity, None)
        self.heard_seq.pop(identity, None)
        self.moved += 1
        self.stepping_down_until = now + self.settings.heartbeat_timeout
        log.warning("worker %s moved to a preferred broker; stepping down (publishes "
                    "refused for %.1fs)", message.worker[:80], self.settings.heartbeat_timeout)
        # the last message it reads from us: everything routed to it before is ahead
        return [(identity, Resync(self.epoch))]

    def _answer_later(self, out: Out) -> None:
        """Move the publish answer out of ``out`` into :attr:`acks` (see flush), with
        the workers its deliveries go to (back-pressure waits for them)."""
        identity, answer = out.pop()
        assert isinstance(answer, Reply)
        targets = tuple({worker for worker, message in out if isinstance(message, Deliver)})
        self.acks.append((identity, answer, targets))

    def read_control(self) -> None:
        data = os.read(self.control_fd, 65536)
        if not data:  # the supervisor is gone
            self.poller.unregister(self.control_fd)
            self.control_fd = -1
            self.running = False
            return
        self.control_buffer += data
        *lines, self.control_buffer = self.control_buffer.split(b"\n")
        for line in lines:
            if line:
                self.worker_restarts += 1
                self.restarts_by_slot[line.decode(errors="replace").rsplit(":", 1)[-1]] += 1
                log.info("worker %s died; purging it", line.decode(errors="replace"))
                self.send(self.state.purge_named(line.decode(errors="replace")))

    # --- the loop -------------------------------------------------------------------

    def timers(self, now: float) -> None:
        interval = self.settings.heartbeat_interval
        state = self.state
        metrics = self.metrics
        if metrics is not None and metrics.wanted.is_set():
            metrics.publish(cluster_snapshot(self))  # a scrape is waiting for it
        if self.admin is not None:
            self.admin.broker_turn(self, now)
        if now >= self.next_flush:
            self.next_flush = now + COUNT_FLUSH_INTERVAL
            self.send(state.flush_counts(now))
            self.send(state.tick(now))
            state.expire_cache(now)
            self.bad_log.tick(now)
            self.error_log.tick(now)
            self.send_log.tick(now)
        if now >= self.next_beat:
            if self.every_beat is not None:
                self.every_beat()
            late = now - self.next_beat > interval
            self.next_beat = now + interval
            beat = Heartbeat(self.epoch)
            self.send([(w, beat) for w in state.workers])
            if late:
                # We stalled ourselves (swapped out, SIGSTOP, one enormous message):
                # silence was ours, not the workers'. Give them a fresh heartbeat window.
                for worker in state.workers.values():
                    worker.last_seen = now
            for identity in state.expired(now, self.settings.heartbeat_timeout):
                log.warning("worker %s stopped heartbeating; purging it", _peer(identity))
                self.send(state.purge(identity))
        if state.webhooks:
            if self.webhooks is not None:
                self.webhooks.add(state.webhooks, now)
            state.webhooks = []

    def turn(self) -> None:
        """One loop turn: wait for input (not at all while work is pending), read a
        bounded amount, handle a bounded share per peer, run the timers, send."""
        now = time.monotonic()
        if self.ready or self.backlog:
            timeout = 0
        else:
            due = min(self.next_flush, self.next_beat) - now
            timeout = max(0, min(POLL_MS, int(due * 1000) + 1))
        events = dict(self.poller.poll(timeout=timeout))
        now = time.monotonic()
        self.state.wall_ms = time.time_ns() // 1_000_000
        if self.control_fd >= 0 and self.control_fd in events:
            self.read_control()
        hooks = self.webhooks
        if hooks is not None and hooks.socket in events:
            hooks.read(now)
        self.backlog = self.read(now)
        # The share's deadline starts after reading: copying a few hundred large
        # batches out of ZeroMQ can itself take tens of milliseconds.
        now = self.work(time.monotonic())
        try:
            self.timers(now)
        except Exception:  # a bug; the next turn tries again
            self.handler_errors += 1
            self.error_log(now, "error in the broker's timers", exc_info=True)
        # Publish answers (acks) wait in flush too: a publish that delivered to nobody
        # leaves the outboxes empty, and must still be answered in this turn.
        if self.outboxes or self.acks or self.backpressure.parked:
            self.flush()
        if hooks is not None:
            hooks.flush(now)

    def run(self) -> None:
        self.next_flush = self.next_beat = time.monotonic()
        while self.running:
            if self.reload_asked:
                self.reload_from_file()
            self.turn()
        self.router.close(linger=0)
        if self.auth is not None:
            self.auth.stop()
        if self.webhooks is not None:
            self._hand_over_webhooks()

    def _hand_over_webhooks(self, limit: float = 2.0) -> None:
        """On the way out: give the sender what it has not acknowledged yet (the
        leaves of the workers that just closed their clients, for example), waiting at
        most ``limit`` seconds for its acknowledgement."""
        hooks = self.webhooks
        assert hooks is not None
        deadline = time.monotonic() + limit
        hooks.flush(time.monotonic())
        while hooks.unacked and hooks.peer is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning("stopping with %d webhook events the sender has not "
                            "acknowledged; they are lost", len(hooks.unacked))
                break
            if hooks.socket.poll(int(left * 1000) + 1):
                hooks.read(time.monotonic())
        hooks.close()


def serve(settings: Settings, endpoint: str, parent_pid: int = 0,
          control_fd: int = -1, webhook_endpoint: str = "",
          every_beat: Callable[[], None] | None = None,
          settings_path: str = "") -> None:
    """Run a broker until SIGTERM/SIGINT (or until ``parent_pid`` disappears).

    ``control_fd`` is the read end of the supervisor's pipe: one dead worker's
    identity per line, purged at once instead of after the heartbeat timeout.
    ``every_beat`` runs once per heartbeat interval (a standalone broker keeps its
    webhook sender alive with it).
    """
    broker = Broker(settings, endpoint, control_fd, webhook_endpoint)
    broker.every_beat = every_beat
    broker.settings_path = settings_path
    freeze_startup_objects()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        broker.stop()

    def on_hup(signum: int, frame: FrameType | None) -> None:
        broker.reload_asked = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_hup)
    if settings_path:  # a reload between the fork and now sent its SIGHUP in vain
        broker.reload_from_file()
    broker.bind()
    log.info("broker listening on %s (pid %d)%s", endpoint, os.getpid(),
             ", CURVE" if broker.auth is not None else "")
    if settings.metrics_port:  # (imported here: see the TYPE_CHECKING block)
        from vask.broker.metrics import MetricsServer
    if settings.metrics_port and settings.admin_token:
        # One listener for /metrics and the dashboard (docs/dashboard.md)
        from vask.broker.admin import AdminServer

        broker.metrics = MetricsServer()
        broker.admin = AdminServer(settings, broker.metrics)
        if not broker.admin.start(settings.metrics_host, settings.metrics_port):
            broker.metrics = broker.admin = None
    elif settings.metrics_port:
        broker.metrics = MetricsServer()
        if not broker.metrics.start(settings.metrics_host, settings.metrics_port):
            broker.metrics = None
    if parent_pid:
        die_with_parent(parent_pid)
    try:
        broker.run()
    finally:
        if broker.admin is not None:
            broker.admin.stop()
        elif broker.metrics is not None:
            broker.metrics.stop()
