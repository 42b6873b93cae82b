"""The webhook sender's scheduling logic, free of I/O so that it can be tested alone.

Nothing here reads a clock, touches a socket or the store: callers pass ``now`` and act
on what comes back. Two stages:

* :class:`Debouncer` holds ``member_removed`` and ``channel_vacated`` for the app's
  ``webhook_leave_delay`` and cancels such an event together with the matching
  ``member_added`` / ``channel_occupied`` that arrives while it is held, so that a
  page reload does not fire a leave and a join a second apart. Events of one
  ``(app, channel)`` leave it strictly in arrival order: an event queued behind a held
  one waits for it, because a receiver that saw ``member_added`` before the
  ``member_removed`` that preceded it would get the membership wrong.
* :class:`EndpointQueue` turns released events into requests for one endpoint: up to
  ``max_events`` per request, waiting at most ``max_wait`` for a batch to fill, with
  at most ``concurrency`` requests in flight. Two requests of one endpoint never share
  a channel while either is unfinished (in flight or waiting to be retried), so a
  receiver sees each channel's events in order even when requests fail and are
  retried.

The retry policy (which answers are retried, how long to wait) is at the end.
"""

from __future__ import annotations

import heapq
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

#: events held back for the leave delay, and the arrival that cancels each
LEAVES = frozenset(("member_removed", "channel_vacated"))
_CANCELS = {"member_added": "member_removed", "channel_occupied": "channel_vacated"}

#: entries of an endpoint's queue looked at when forming one request: a queue whose
#: head is blocked behind a failing channel costs a bounded amount of work per look
SCAN_LIMIT = 1_000
#: requests formed but unfinished per endpoint at most, as a multiple of its
#: concurrency: the rest of a backlog stays in the queue as events, so a dead endpoint
#: does not turn the whole queue into requests each retrying on its own
UNFINISHED_FACTOR = 4

ChannelKey = tuple[str, str]


@dataclass(slots=True)
class Pending:
    """An event received from the broker and not yet released to the endpoints."""

    id: int  # the store's row id: increases with arrival
    app_id: str
    name: str
    channel: str
    user_id: str | None
    #: the event object's JSON, exactly as it goes into request bodies
    raw: bytes
    #: wall-clock seconds before which it is not released (0: at once)
    release_at: float = 0.0


def describe(event: Any) -> tuple[str, str, str | None] | None:
    """``(name, channel, user_id)`` of an event object from the broker, or None if it
    is not shaped like one."""
    if not isinstance(event, dict):
        return None
    name = event.get("name")
    channel = event.get("channel")
    if not isinstance(name, str) or not isinstance(channel, str):
        return None
    user_id = event.get("user_id")
    return name, channel, user_id if isinstance(user_id, str) else None


class Debouncer:
    """Per-channel FIFO queues of :class:`Pending` events, with leaves held back."""

    def __init__(self) -> None:
        self.queues: dict[ChannelKey, deque[Pending]] = {}
        #: channels whose head may be releasable (new head since the last release)
        self.ready: set[ChannelKey] = set()
        #: (release_at, id, channel) of held heads; stale entries are skipped
        self.held: list[tuple[float, int, ChannelKey]] = []
        self.size = 0

    def cancels(self, app_id: str, name: str, channel: str,
                user_id: str | None) -> Pending | None:
        """If the arriving event ``name`` cancels a queued leave, remove that leave and
        return it (the caller drops both); otherwise None."""
        target = _CANCELS.get(name)
        if target is None:
            return None
        key = (app_id, channel)
        queue = self.queues.get(key)
        if not queue:
            return None
        # The newest matching leave: an older one was already answered by a join,
        # which would have cancelled it.
        for i in range(len(queue) - 1, -1, -1):
            item = queue[i]
            if item.name == target and (target == "channel_vacated" or item.user_id == user_id):
                del queue[i]
                self.size -= 1
                if not queue:
                    del self.queues[key]
                    self.ready.discard(key)
                elif i == 0:
                    self.ready.add(key)
                return item
        return None

    def add(self, item: Pending) -> None:
        key = (item.app_id, item.channel)
        queue = self.queues.get(key)
        if queue is None:
            queue = self.queues[key] = deque()
            self.ready.add(key)
        queue.append(item)
        self.size += 1

    def release(self, now: float) -> list[Pending]:
        """Every event that may go now (``now`` in wall-clock seconds), oldest first."""
        held = self.held
        while held and held[0][0] <= now:
            _, item_id, key = heapq.heappop(held)
            queue = self.queues.get(key)
            if queue and queue[0].id == item_id:
                self.ready.add(key)
        if not self.ready:
            return []
        out: list[Pending] = []
        for key in self.ready:
            queue = self.queues.get(key)
            if queue is None:
                continue
            while queue:
                head = queue[0]
                if head.release_at > now:
                    heapq.heappush(held, (head.release_at, head.id, key))
                    break
                out.append(queue.popleft())
            if not queue:
                del self.queues[key]
        self.ready.clear()
        self.size -= len(out)
        if len(out) > 1:
            out.sort(key=lambda item: item.id)
        return out

    def next_release(self) -> float | None:
        """The earliest wall-clock time at which :meth:`release` may return more (it may
        be early: a head cancelled since is still counted)."""
        if self.ready:
            return 0.0
        return self.held[0][0] if self.held else None


@dataclass(slots=True)
class Outgoing:
    """A released event waiting to become part of a request to one endpoint."""

    id: int  # the store's row id
    channel: str
    raw: bytes
    #: loop-clock time it was released (0: at once, e.g. loaded after a restart)
    released_at: float = 0.0


@dataclass(slots=True)
class Request:
    """One webhook request: its body is fixed when it is formed, so that a retry sends
    the same bytes (and a receiver may de-duplicate on them)."""

    id: int  # the store's row id
    channels: tuple[str, ...]
    body: bytes
    formed_ms: int  # wall clock, also the body's time_ms
    events: int
    attempts: int = 0
    #: loop-clock time of the next attempt
    due: float = 0.0


def request_body(time_ms: int, raws: list[bytes]) -> bytes:
    """``{"time_ms":...,"events":[...]}`` from the events' JSON, without re-encoding."""
    return b'{"time_ms":%d,"events":[%b]}' % (time_ms, b",".join(raws))


class EndpointQueue:
    """Scheduling for one endpoint: released events, formed requests, retries."""

    def __init__(self, max_events: int, max_wait: float, concurrency: int) -> None:
        self.max_events = max_events
        self.max_wait = max_wait
        self.concurrency = concurrency
        self.max_unfinished = concurrency * UNFINISHED_FACTOR
        self.pending: deque[Outgoing] = deque()
        #: formed requests not in flight (new ones and those waiting to be retried)
        self.waiting: list[Request] = []
        self.in_flight = 0
        #: channel -> unfinished requests that hold it
        self.busy: dict[str, int] = {}

    @property
    def unfinished(self) -> int:
        return len(self.waiting) + self.in_flight

    @property
    def queued(self) -> int:
        """Events waiting plus unfinished requests (the sender's ``queued`` gauge)."""
        return len(self.pending) + self.unfinished

    def push(self, item: Outgoing) -> None:
        self.pending.append(item)

    def next_batch(self, now: float) -> tuple[list[Outgoing], float | None]:
        """The events of the next request if one should be formed now (removed from the
        queue), else ``([], when to look again or None)``.

        Events of channels held by unfinished requests are skipped, and so is every
        later event of those channels (they are looked at in order). A batch is formed
        when it is full or when its oldest event has waited ``max_wait``.
        """
        pending = self.pending
        if not pending or self.unfinished >= self.max_unfinished:
            return [], None
        busy = self.busy
        batch: list[Outgoing] = []
        scanned = 0
        for item in pending:
            if scanned == SCAN_LIMIT:
                break
            scanned += 1
            if item.channel in busy:
                continue
            batch.append(item)
            if len(batch) == self.max_events:
                break
        if not batch:
            return [], None  # everything looked at waits for a request to finish
        oldest = min(item.released_at for item in batch)
        if len(batch) < self.max_events and now < oldest + self.max_wait:
            return [], oldest + self.max_wait
        if len(batch) == scanned:
            for _ in range(scanned):
                pending.popleft()
        else:
            taken = {id(item) for item in batch}
            kept = [pending.popleft() for _ in range(scanned)]
            pending.extendleft(reversed([item for item in kept if id(item) not in taken]))
        return batch, None

    def formed(self, request: Request) -> None:
        """Take in a newly formed (or reloaded) request; it is due at ``request.due``."""
        self.waiting.append(request)
        busy = self.busy
        for channel in request.channels:
            busy[channel] = busy.get(channel, 0) + 1

    def start_due(self, now: float) -> list[Request]:
        """The waiting requests to send now, oldest formed first, within concurrency."""
        room = self.concurrency - self.in_flight
        if room <= 0 or not self.waiting:
            return []
        due = [r for r in self.waiting if r.due <= now]
        if not due:
            return []
        due.sort(key=lambda r: r.id)
        started = due[:room]
        if len(started) == len(self.waiting):
            self.waiting = []
        else:
            ids = {r.id for r in started}
            self.waiting = [r for r in self.waiting if r.id not in ids]
        self.in_flight += len(started)
        return started

    def retry_later(self, request: Request, due: float) -> None:
        """An attempt failed and the request goes again at ``due`` (it keeps its
        channels)."""
        self.in_flight -= 1
        request.due = due
        self.waiting.append(request)

    def finish(self, request: Request) -> None:
        """The request is done (delivered or given up): its channels are free."""
        self.in_flight -= 1
        busy = self.busy
        for channel in request.channels:
            left = busy[channel] - 1
            if left:
                busy[channel] = left
            else:
                del busy[channel]

    def next_due(self) -> float | None:
        """When the earliest waiting request is due (loop clock), if any."""
        if not self.waiting or self.in_flight >= self.concurrency:
            return None
        return min(r.due for r in self.waiting)


# --- retries ----------------------------------------------------------------------------

BACKOFF_BASE = 1.0
BACKOFF_CAP = 60.0
#: answers that mean "try again later"; any other non-2xx is final
RETRY_STATUSES = frozenset((408, 429))
#: statuses whose Retry-After header is honoured
RETRY_AFTER_STATUSES = frozenset((429, 503))


def retryable(status: int) -> bool:
    return status in RETRY_STATUSES or 500 <= status <= 599


def backoff(attempts: int, uniform: Callable[[float, float], float] = random.uniform) -> float:
    """Full-jitter exponential backoff after ``attempts`` failed attempts (>= 1): a
    uniform draw below ``base * 2**(attempts-1)``, capped. The jitter spreads the
    retries of many requests that failed together."""
    ceiling = min(BACKOFF_CAP, BACKOFF_BASE * 2.0 ** min(attempts - 1, 32))
    return uniform(0.0, ceiling)


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delay-seconds or an HTTP date;
    ``now`` is the wall clock), or None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - now)


def retry_delay(attempts: int, status: int | None, retry_after: float | None,
                formed: float, now: float, window: float,
                uniform: Callable[[float, float], float] = random.uniform) -> float | None:
    """Seconds until the next attempt of a request that just failed retryably, or None
    to give up. ``formed`` and ``now`` are wall-clock seconds.

    Retries continue until ``window`` seconds after the request was formed; the last
    one may be cut short to land inside the window. A ``Retry-After`` on 429/503 is
    obeyed when it fits in the window; when it does not, the request is given up
    rather than sent early against the receiver's wish.
    """
    left = formed + window - now
    if left <= 0:
        return None
    if retry_after is not None and status in RETRY_AFTER_STATUSES:
        return retry_after if retry_after <= left else None
    return min(backoff(attempts, uniform), left)
