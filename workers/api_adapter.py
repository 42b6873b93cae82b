"""Connects the HTTP API (:mod:`vask.workers.http_api`) to a worker process.

:class:`ApiAdapter` is the worker's :class:`~vask.workers.http_api.ApiContext`: publishes,
terminations and queries become request/reply exchanges with the broker (with a
timeout), and the raw request pieces from the connection become an
:class:`~vask.workers.http_api.ApiRequest`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from vask.config import Settings
from vask.envelope import Publish, Query, TerminateUser
from vask.metrics import AppStats
from vask.workers.broker_link import BrokerUnavailable
from vask.workers.http import http_response
from vask.workers.http_api import ApiRequest, ApiResponse, accept_api

if TYPE_CHECKING:
    from vask.workers.server import Worker


BACKPRESSURE_WAIT = 5.0  # seconds


class ApiAdapter:
    """The worker seen from the HTTP API."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        metrics = worker.metrics
        #: the path segment of /apps/{app}/... (an app's id or key) -> its counters;
        #: requests naming no configured app are not counted per app (no label for
        #: whatever a client puts in the path)
        self.stats_by_segment: dict[str, AppStats] = {}
        for app in worker.settings.apps:
            self.stats_by_segment[app.id] = self.stats_by_segment[app.key] = \
                metrics.app(app.id)

    @property
    def settings(self) -> Settings:
        return self.worker.settings

    async def publish(self, messages: Sequence[Publish]) -> None:
        """Each publish is a request: the broker answers once it has queued the
        deliveries (or refuses while it recovers from a restart). All of one API call's
        publishes leave in one batch, and their answers come back in one."""
        console = self.worker.metrics.app(messages[0].app).console if messages else None
        if console is not None:
            console.api_publishes(messages)
        if len(messages) == 1:
            await self._acked(messages[0])  # the usual trigger: no task, no gather
        else:
            await asyncio.gather(*(self._acked(msg) for msg in messages))

    async def send(self, msg: TerminateUser) -> None:
        await self._acked(msg)

    async def _acked(self, msg: Publish | TerminateUser) -> None:
        link = self.worker.link
        if not link.up:
            raise BrokerUnavailable("The cluster's broker is unreachable; try again shortly.")
        reply = await link.ask(msg)
        if not reply.get("ok"):
            raise BrokerUnavailable(str(reply.get("error") or "The broker refused the event."))

    async def query(self, app_id: str, kind: str, args: dict[str, Any]) -> dict[str, Any]:
        link = self.worker.link
        if not link.up:
            raise BrokerUnavailable("the broker is unreachable")
        return await link.ask(Query(0, app_id, kind, args))

    def now(self) -> float:
        return time.time()

    async def handle(self, method: str, path: str, query: str,
                     headers: list[tuple[bytes, bytes]], body: bytes,
                     keep_alive: bool) -> bytes:
        """Run one API request; the complete HTTP response bytes.

        The request is checked first (route, app, signature, body, rate limit), at once.
        Only then may an accepted publish (any POST) wait while this worker is behind on
        deliveries, up to ``BACKPRESSURE_WAIT`` seconds: publishers slow down to what
        subscribers can take instead of filling queues (and latency) without bound. An
        unauthenticated or invalid request is answered without waiting, so it cannot
        park here and hold a connection and a task for those seconds.
        """
        request = ApiRequest(
            method=method,
            path=path,
            query=query,
            headers={k.decode("latin-1").lower(): v.decode("latin-1") for k, v in headers},
            body=body,
        )
        began = time.monotonic()
        accepted = accept_api(request, self)
        if isinstance(accepted, ApiResponse):
            response = accepted
        else:
            caught_up = self.worker.link.caught_up
            if accepted.publishes and not caught_up.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(caught_up.wait(), BACKPRESSURE_WAIT)
            response = await accepted.run()
            if response.status == 200 and path.endswith("events"):
                # The broker sends a publish's deliveries before its answer, so they
                # came in the same drain or an earlier one; that drain's corked writes
                # are flushed by a callback already queued, so this one runs after
                # them: it sees the event written to this worker's own subscribers.
                asyncio.get_running_loop().call_soon(self._written, began)
        out = http_response(response.status, response.body, keep_alive, response.headers)
        self._count(path, headers, query, body, out)
        return out

    def _written(self, began: float) -> None:
        self.worker.metrics.publish_write.observe(time.monotonic() - began)

    def _count(self, path: str, headers: list[tuple[bytes, bytes]], query: str, body: bytes,
               out: bytes) -> None:
        """Count one call into its app's HTTP figures (request bytes: target, headers
        and body as parsed, which is the request less its framing)."""
        parts = path.split("/", 3)
        if len(parts) < 3 or parts[1] != "apps":
            return
        stats = self.stats_by_segment.get(parts[2])
        if stats is None:
            return
        stats.http_calls += 1
        stats.http_bytes_in += len(path) + len(query) + len(body) + \
            sum(len(name) + len(value) + 4 for name, value in headers)
        stats.http_bytes_out += len(out)
