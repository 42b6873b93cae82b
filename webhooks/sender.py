"""The webhook sender process: takes events from the broker, delivers them over HTTP.

One asyncio (uvloop) loop. The path of an event:

1. The broker's ``events`` message arrives (:mod:`vask.webhooks.link`). Events already
   committed (same broker epoch, sequence number not above the last committed one)
   are skipped; a leave that the event cancels is removed with it (the debounce); the
   rest are stored, the batch is committed, and only then acknowledged.
2. :class:`~vask.webhooks.core.Debouncer` releases events in order per channel; each
   becomes one outbox row per endpoint whose filters want it.
3. Each endpoint's :class:`~vask.webhooks.core.EndpointQueue` forms requests (body
   fixed and stored) and says when to send and re-send them.
4. An attempt is one task (:func:`vask.webhooks.delivery.post`); its outcome deletes
   the request, or schedules a retry, or gives it up.

All store writes of one loop turn share one transaction, committed at the end of the
turn; nothing is sent that a crash could lose, only things a crash could repeat
(delivery is at least once). Everything here is bounded: the queue by
``webhook_max_queued``, the work of one turn by the link's read limit and the queues'
scan limit, the log by rate limits.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from vask.config import App, Settings, Webhook
from vask.process import die_with_parent

from . import delivery
from .core import (
    LEAVES,
    Debouncer,
    EndpointQueue,
    Outgoing,
    Pending,
    Request,
    describe,
    parse_retry_after,
    request_body,
    retry_delay,
    retryable,
)
from .store import Store

log = logging.getLogger("vask.webhooks")

STATS_INTERVAL = 1.0
#: outcomes of requests kept for the next stats report (the dashboard's debug console
#: shows them); older ones are dropped, so a flood of failures costs a bounded list
RECENT_OUTCOMES = 50
#: seconds between two log lines about retries of one endpoint
RETRY_LOG_INTERVAL = 5.0
#: seconds between two warnings about events refused because the queue is full
DROP_LOG_INTERVAL = 10.0
#: seconds that in-flight requests get to finish when the sender stops
STOP_GRACE = 2.0

COUNTERS = ("sent", "events_sent", "failed", "retried", "given_up", "dropped", "queued",
            "cancelled")


@dataclass(slots=True)
class Endpoint:
    """One webhook endpoint of one app and its queue."""

    app_id: str
    hook: Webhook
    queue: EndpointQueue
    #: failed attempts not yet logged, and when the next retry line may be logged
    retries_unlogged: int = 0
    last_reason: str = ""
    next_retry_log: float = 0.0
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


class Sender:
    """The sender's state and loop callbacks (the process around it: :func:`run_sender`).

    ``send`` delivers a message to the broker (the link's; tests pass their own).
    """

    def __init__(self, settings: Settings, store: Store,
                 send: Callable[[dict[str, Any]], None] = lambda message: None) -> None:
        self.settings = settings
        self.store = store
        self.send = send
        self.loop = asyncio.get_running_loop()
        self.apps: dict[str, App] = {app.id: app for app in settings.apps}
        self.endpoints: dict[tuple[str, str], Endpoint] = {}
        self.by_app: dict[str, list[Endpoint]] = {}
        for app in settings.apps:
            for hook in app.webhooks:
                key = (app.id, hook.url)
                if key in self.endpoints:
                    log.warning("app %s lists webhook %s twice; only the first is used",
                                app.id, hook.url)
                    continue
                endpoint = Endpoint(app.id, hook, EndpointQueue(
                    app.webhook_batch_max_events, app.webhook_batch_max_wait,
                    settings.webhook_concurrency))
                self.endpoints[key] = endpoint
                self.by_app.setdefault(app.id, []).append(endpoint)
        self.debouncer = Debouncer()
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.epoch, self.seq = store.position()
        self.session: aiohttp.ClientSession | None = None
        self.stopping = False
        self.pump_scheduled = False
        self.commit_scheduled = False
        self.timer: asyncio.TimerHandle | None = None
        self.stats_timer: asyncio.TimerHandle | None = None
        self.next_drop_log = 0.0
        self.dropped_logged = 0
        #: things already warned about once (unknown apps and endpoints in the store)
        self.warned: set[str] = set()
        #: the latest request outcomes, sent with the next stats report
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT_OUTCOMES)

    # --- start and stop ---------------------------------------------------------------

    def load(self) -> int:
        """Take in what the store holds from a previous run; returns the item count.

        Items of apps or endpoint URLs no longer in the configuration are dropped.
        Requests are loaded before the outbox so that their channels block it.
        """
        store = self.store
        for (row_id, app_id, url, channels, body, formed_ms, events,
             attempts) in store.requests():
            endpoint = self.endpoints.get((app_id, url))
            if endpoint is None:
                self._warn_once(f"{app_id} {url}", "dropping stored webhook requests for "
                                "%s of app %s: no such endpoint any more", url, app_id)
                store.delete_request(row_id)
                continue
            endpoint.queue.formed(Request(row_id, channels, body, formed_ms, events,
                                          attempts))
        gone: list[int] = []
        now = self.loop.time()
        for row_id, app_id, url, channel, raw in store.outgoing():
            endpoint = self.endpoints.get((app_id, url))
            if endpoint is None:
                self._warn_once(f"{app_id} {url}", "dropping stored webhook requests for "
                                "%s of app %s: no such endpoint any more", url, app_id)
                gone.append(row_id)
                continue
            endpoint.queue.push(Outgoing(row_id, channel, raw, now))
        store.delete_outgoing(gone)
        gone = []
        for row_id, app_id, time_ms, raw in store.events():
            app = self.apps.get(app_id)
            described = describe(_loads(raw))
            if app is None or described is None:
                self._warn_once(app_id, "dropping stored webhook events of app %s: "
                                "no such app any more", app_id)
                gone.append(row_id)
                continue
            self.debouncer.add(self._pending(row_id, app, time_ms, described, raw))
        store.delete_events(gone)
        store.commit()
        self.schedule_pump()
        return self.queued

    def start(self) -> None:
        self.session = delivery.new_session(self.settings.webhook_timeout)
        self.stats_timer = self.loop.call_later(STATS_INTERVAL, self._stats)

    async def stop(self, grace: float = STOP_GRACE) -> None:
        """Stop forming and starting requests, give those in flight ``grace`` seconds,
        then cancel the rest (they stay in the store and go again after a restart)."""
        self.stopping = True
        if self.timer is not None:
            self.timer.cancel()
        if self.stats_timer is not None:
            self.stats_timer.cancel()
        tasks = [task for endpoint in self.endpoints.values() for task in endpoint.tasks]
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=grace)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late, timeout=1.0)
        self._commit()
        if self.session is not None:
            await self.session.close()

    # --- events from the broker ---------------------------------------------------------

    def on_events(self, epoch: int, entries: list[Any]) -> None:
        """A batch from the broker: store the new events, commit, acknowledge."""
        last = self.seq if epoch == self.epoch else 0
        if epoch != self.epoch:
            log.info("webhook events from broker epoch %d (was %d)", epoch, self.epoch)
        room = self.settings.webhook_max_queued - self.queued
        for entry in entries:
            if not (isinstance(entry, list) and len(entry) == 4):
                continue
            seq, app_id, time_ms, event = entry
            if not isinstance(seq, int) or seq <= last:
                continue
            last = seq
            if not isinstance(app_id, str) or not isinstance(time_ms, int):
                continue
            room += self._admit(app_id, time_ms, event, room)
        self.epoch, self.seq = epoch, last
        self.store.set_position(epoch, last)
        self.store.commit()
        self.send({"t": "ack", "epoch": epoch, "seq": last})
        self.schedule_pump()

    def _admit(self, app_id: str, time_ms: int, event: Any, room: int) -> int:
        """Take one new event; returns the change in free room (-1, 0 or +1)."""
        app = self.apps.get(app_id)
        described = describe(event)
        if app is None or described is None:
            self._warn_once(f"event {app_id}", "webhook event for unknown app %r "
                            "or malformed; dropped", app_id)
            return 0
        name, channel, user_id = described
        cancelled = self.debouncer.cancels(app_id, name, channel, user_id)
        if cancelled is not None:
            self.store.delete_events([cancelled.id])
            self.counters["cancelled"] += 1
            return 1
        if room <= 0:
            self._dropped()
            return 0
        raw = orjson.dumps(event)
        row_id = self.store.add_event(app_id, time_ms, raw)
        self.debouncer.add(self._pending(row_id, app, time_ms, described, raw))
        return -1

    def _pending(self, row_id: int, app: App, time_ms: int,
                 described: tuple[str, str, str | None], raw: bytes) -> Pending:
        name, channel, user_id = described
        release_at = time_ms / 1000 + app.webhook_leave_delay if name in LEAVES else 0.0
        return Pending(row_id, app.id, name, channel, user_id, raw, release_at)

    def _dropped(self) -> None:
        self.counters["dropped"] += 1
        now = time.monotonic()
        if now >= self.next_drop_log:
            self.next_drop_log = now + DROP_LOG_INTERVAL
            count = self.counters["dropped"] - self.dropped_logged
            self.dropped_logged = self.counters["dropped"]
            log.warning("webhook queue full (webhook_max_queued = %d): %d new events "
                        "refused", self.settings.webhook_max_queued, count)

    # --- the pump: release, form, start -------------------------------------------------

    def schedule_pump(self) -> None:
        if not self.pump_scheduled:
            self.pump_scheduled = True
            self.loop.call_soon(self.pump)

    def pump(self) -> None:
        """Move everything that can move now; arm the timer for the next thing due."""
        self.pump_scheduled = False
        if self.stopping:
            return
        wall = time.time()
        now = self.loop.time()
        released = self.debouncer.release(wall)
        if released:
            self._fan_out(released, now)
        wake: float | None = None
        held = self.debouncer.next_release()
        if held is not None:
            wake = now + max(0.0, held - wall)
        for endpoint in self.endpoints.values():
            queue = endpoint.queue
            while True:
                batch, later = queue.next_batch(now)
                if not batch:
                    break
                self._form(endpoint, batch)
            for request in queue.start_due(now):
                self._start(endpoint, request)
            for when in (later, queue.next_due()):
                if when is not None and (wake is None or when < wake):
                    wake = when
        if self.store.in_transaction:
            self._schedule_commit()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if wake is not None:
            self.timer = self.loop.call_at(max(wake, now), self.pump)

    def _fan_out(self, released: list[Pending], now: float) -> None:
        store = self.store
        store.delete_events([item.id for item in released])
        for item in released:
            for endpoint in self.by_app.get(item.app_id, ()):
                if endpoint.hook.wants(item.name, item.channel):
                    row_id = store.add_outgoing(item.app_id, endpoint.hook.url,
                                                item.channel, item.raw)
                    endpoint.queue.push(Outgoing(row_id, item.channel, item.raw, now))

    def _form(self, endpoint: Endpoint, batch: list[Outgoing]) -> None:
        formed_ms = time.time_ns() // 1_000_000
        body = request_body(formed_ms, [item.raw for item in batch])
        channels = tuple(dict.fromkeys(item.channel for item in batch))
        row_id = self.store.form_request(endpoint.app_id, endpoint.hook.url, channels, body,
                                         formed_ms, len(batch), [item.id for item in batch])
        endpoint.queue.formed(Request(row_id, channels, body, formed_ms, len(batch)))

    def _start(self, endpoint: Endpoint, request: Request) -> None:
        task = self.loop.create_task(self._attempt(endpoint, request))
        endpoint.tasks.add(task)
        task.add_done_callback(endpoint.tasks.discard)

    async def _attempt(self, endpoint: Endpoint, request: Request) -> None:
        app = self.apps[endpoint.app_id]
        session = self.session
        assert session is not None
        headers = delivery.headers_for(app, endpoint.hook, request.body)
        outcome = await delivery.post(session, endpoint.hook.url, request.body, headers,
                                      self.settings.webhook_timeout)
        self._settle(endpoint, request, outcome)

    def _settle(self, endpoint: Endpoint, request: Request, outcome: delivery.Outcome) -> None:
        """Act on an attempt's outcome: done, retry later, or give up."""
        request.attempts += 1
        queue = endpoint.queue
        counters = self.counters
        recent: dict[str, Any] = {
            "app": endpoint.app_id, "url": endpoint.hook.url, "channels": list(request.channels),
            "events": request.events, "attempts": request.attempts,
            "status": outcome.status, "time_ms": time.time_ns() // 1_000_000,
            "outcome": "sent", "reason": "" if outcome.ok else outcome.reason()}
        self.recent.append(recent)
        if outcome.ok:
            counters["sent"] += 1
            counters["events_sent"] += request.events
            self.store.delete_request(request.id)
            queue.finish(request)
            self.schedule_pump()
            return
        counters["failed"] += 1
        wall = time.time()
        delay: float | None = None
        if outcome.status is None or retryable(outcome.status):
            delay = retry_delay(
                request.attempts, outcome.status,
                parse_retry_after(outcome.retry_after, wall), request.formed_ms / 1000, wall,
                self.settings.webhook_retry_window)
        recent["outcome"] = "given_up" if delay is None else "retry"
        if delay is None:
            counters["given_up"] += 1
            log.warning("webhook to %s (app %s) given up after %d attempt%s over %.1fs: %s",
                        endpoint.hook.url, endpoint.app_id, request.attempts,
                        "" if request.attempts == 1 else "s",
                        max(0.0, wall - request.formed_ms / 1000), outcome.reason())
            self.store.delete_request(request.id)
            queue.finish(request)
        else:
            counters["retried"] += 1
            self.store.record_attempts(request.id, request.attempts)
            queue.retry_later(request, self.loop.time() + delay)
            self._log_retry(endpoint, outcome.reason())
        self.schedule_pump()

    def _log_retry(self, endpoint: Endpoint, reason: str) -> None:
        endpoint.retries_unlogged += 1
        endpoint.last_reason = reason
        now = time.monotonic()
        if now >= endpoint.next_retry_log:
            endpoint.next_retry_log = now + RETRY_LOG_INTERVAL
            log.info("webhook to %s (app %s): %d failed attempt%s to retry (last: %s)",
                     endpoint.hook.url, endpoint.app_id, endpoint.retries_unlogged,
                     "" if endpoint.retries_unlogged == 1 else "s", reason)
            endpoint.retries_unlogged = 0

    # --- bookkeeping --------------------------------------------------------------------

    def _schedule_commit(self) -> None:
        if not self.commit_scheduled:
            self.commit_scheduled = True
            self.loop.call_soon(self._commit)

    def _commit(self) -> None:
        self.commit_scheduled = False
        self.store.commit()

    @property
    def queued(self) -> int:
        """Events and requests waiting now (held, queued for an endpoint, unfinished)."""
        return self.debouncer.size + sum(e.queue.queued for e in self.endpoints.values())

    def stats(self) -> dict[str, int]:
        counters = dict(self.counters)
        counters["queued"] = self.queued
        return counters

    def _stats(self) -> None:
        message: dict[str, Any] = {"t": "stats", "counters": self.stats()}
        if self.recent:
            message["recent"] = list(self.recent)
            self.recent.clear()
        self.send(message)
        if not self.stopping:
            self.stats_timer = self.loop.call_later(STATS_INTERVAL, self._stats)

    def _warn_once(self, key: str, message: str, *args: object) -> None:
        if key not in self.warned:
            self.warned.add(key)
            log.warning(message, *args)


def _loads(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None


def run_sender(settings: Settings, endpoint: str, store_path: Path,
               parent_pid: int = 0) -> None:
    """Process entry point: run until SIGTERM/SIGINT (or until ``parent_pid`` dies)."""
    import uvloop

    if parent_pid:
        die_with_parent(parent_pid)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await serve(settings, endpoint, store_path, stop)

    uvloop.run(main())


async def serve(settings: Settings, endpoint: str, store_path: Path,
                stop: asyncio.Event) -> None:
    """Run the sender on the current loop until ``stop`` is set, then stop taking
    events, give requests in flight :data:`STOP_GRACE` seconds and close the store."""
    from .link import BrokerLink

    store = Store(store_path)
    link: BrokerLink | None = None
    try:
        sender = Sender(settings, store)
        loaded = sender.load()
        for app in settings.apps:
            if app.webhooks:
                log.info("webhooks of app %s: %s (queue %s)", app.id,
                         ", ".join(hook.url for hook in app.webhooks), store_path)
        log.info("webhook queue %s: %d queued items loaded", store_path, loaded)
        link = BrokerLink(endpoint, sender.on_events)
        sender.send = link.send
        sender.start()
        link.start()
        await stop.wait()
        log.info("webhook sender stopping")
        link.pause()
        await sender.stop()
    finally:
        if link is not None:
            link.close()
        store.close()
