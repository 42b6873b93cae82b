"""Connects the HTTP API (:mod:`vask.workers.http_api`) to a worker process.

:class:`ApiAdapter` is the worker's :class:`~vask.workers.http_api.ApiContext`: publishes
and other casts go straight to the broker link, queries become request/reply exchanges
with a timeout, and the raw request pieces from the connection become an
:class:`~vask.workers.http_api.ApiRequest`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING, Any

from vask.config import Settings
from vask.envelope import Publish, Query, Verb
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

    @property
    def settings(self) -> Settings:
        return self.worker.settings

    def publish(self, msg: Publish) -> None:
        self.worker.link.send(msg)

    def send(self, msg: Verb) -> None:
        self.worker.link.send(msg)

    async def query(self, app_id: str, kind: str, args: dict[str, Any]) -> dict[str, Any]:
        link = self.worker.link
        if not link.up:
            raise BrokerUnavailable("the broker is unreachable")
        return await link.ask(lambda rid: Query(rid, app_id, kind, args))

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
        accepted = accept_api(request, self)
        if isinstance(accepted, ApiResponse):
            response = accepted
        else:
            caught_up = self.worker.link.caught_up
            if accepted.publishes and not caught_up.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(caught_up.wait(), BACKPRESSURE_WAIT)
            response = await accepted.run()
        return http_response(response.status, response.body, keep_alive, response.headers)
