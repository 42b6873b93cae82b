"""Back-pressure on HTTP API publishers from the slowest worker they reach.

The broker routes an event as soon as it is published; a saturated worker then holds
it in its queue (ZeroMQ's, then its own drain) before its clients' connections get it.
Without a bound, publishers that are answered at once keep adding events faster than
the workers deliver them, and each event waits longer than the last: seconds, under a
sustained flood.

:class:`Backpressure` bounds that wait. The broker numbers every batch it sends a
worker (``docs/envelope.md``); a worker reports with ``CAUGHT seq`` when everything up
to a batch is handled and written to its clients' transports. A worker's *lag* is the
age of the oldest batch it has not reported yet. An HTTP API publish is acknowledged
(its ``Reply`` sent, so the API answers 200) only when no worker it was routed to lags
more than ``max_delivery_lag``; until then the answer is *parked*. A publisher that
waits for its answers before sending more (every HTTP client with a bounded number of
requests in flight) therefore slows down to the pace of the slowest worker that must
deliver its events, whichever worker it is connected to, and queueing delay stays near
the bound instead of growing.

An answer is never parked longer than ``max_hold`` (half the workers' request
timeout): the event is routed either way, and a late 200 is better than a timeout.
Workers that left, or whose numbering restarted, are forgotten. All of this is O(1)
per batch and per report, plus one pass over the parked answers per broker turn while
any are parked.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Container

from vask.envelope import Reply

#: unreported batches remembered per worker at most (a worker that stopped reporting
#: is bounded in memory; its lag then counts from the oldest batch still remembered)
MAX_TRACKED = 100_000

#: a parked answer: when it was parked, to whom, the reply, the workers it waits for
Parked = tuple[float, bytes, Reply, tuple[bytes, ...]]


class Backpressure:
    """Per-worker lag and the publish answers parked behind it."""

    __slots__ = ("bound", "max_hold", "parked", "pending", "released_late")

    def __init__(self, bound: float, max_hold: float) -> None:
        #: seconds; 0 turns it all off (nothing is tracked, nothing parked)
        self.bound = bound
        self.max_hold = max_hold
        #: worker -> (seq, sent at) of batches it has not reported as handled
        self.pending: dict[bytes, deque[tuple[int, float]]] = {}
        self.parked: list[Parked] = []
        #: answers released by ``max_hold`` rather than by the workers catching up
        self.released_late = 0

    def sent(self, worker: bytes, seq: int, now: float) -> None:
        """The broker sent ``worker`` its batch ``seq``."""
        if not self.bound:
            return
        batches = self.pending.get(worker)
        if batches is None:
            batches = self.pending[worker] = deque()
        batches.append((seq, now))
        if len(batches) > MAX_TRACKED:
            batches.popleft()

    def caught(self, worker: bytes, seq: int) -> None:
        """``worker`` handled every batch up to ``seq``."""
        batches = self.pending.get(worker)
        if batches is None:
            return
        while batches and batches[0][0] <= seq:
            batches.popleft()

    def forget(self, worker: bytes) -> None:
        """``worker`` is gone, or its numbering restarts (a new hello)."""
        self.pending.pop(worker, None)

    def lag(self, worker: bytes, now: float) -> float:
        """Seconds since the oldest batch ``worker`` has not handled yet (0: none)."""
        batches = self.pending.get(worker)
        return now - batches[0][1] if batches else 0.0

    def _waits(self, targets: tuple[bytes, ...], now: float, alive: Container[bytes]) -> bool:
        bound = self.bound
        pending = self.pending
        for worker in targets:
            batches = pending.get(worker)
            if batches and now - batches[0][1] > bound:
                if worker in alive:
                    return True
                self.forget(worker)  # purged: it will never report
        return False

    def hold(self, acks: list[tuple[bytes, Reply, tuple[bytes, ...]]], now: float,
             alive: Container[bytes]) -> list[tuple[bytes, Reply]]:
        """The answers that may leave now; the others are parked. Refusals (not ok)
        always leave at once."""
        if not self.bound:
            return [(identity, reply) for identity, reply, _ in acks]
        ready: list[tuple[bytes, Reply]] = []
        for identity, reply, targets in acks:
            if targets and reply.body.get("ok") and self._waits(targets, now, alive):
                self.parked.append((now, identity, reply, targets))
            else:
                ready.append((identity, reply))
        return ready

    def release(self, now: float, alive: Container[bytes]) -> list[tuple[bytes, Reply]]:
        """Parked answers whose workers caught up (or that waited ``max_hold``)."""
        if not self.parked:
            return []
        ready: list[tuple[bytes, Reply]] = []
        keep: list[Parked] = []
        for entry in self.parked:
            since, identity, reply, targets = entry
            if not self._waits(targets, now, alive):
                ready.append((identity, reply))
            elif now - since >= self.max_hold:
                self.released_late += 1
                ready.append((identity, reply))
            else:
                keep.append(entry)
        self.parked = keep
        return ready
