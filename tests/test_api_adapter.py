"""The worker side of the HTTP API: queries are never held back by back-pressure.

(That an authenticated publish waits, and an unauthenticated one does not, is tested in
``tests/test_http_api.py``.)
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from vask.config import load_settings
from vask.metrics import WorkerMetrics
from vask.workers.api_adapter import ApiAdapter


def make_adapter() -> tuple[ApiAdapter, asyncio.Event]:
    caught_up = asyncio.Event()
    link = SimpleNamespace(caught_up=caught_up, up=True, send=lambda message: None)
    settings = load_settings(env={})
    worker: Any = SimpleNamespace(settings=settings, link=link,
                                  metrics=WorkerMetrics([app.id for app in settings.apps]))
    return ApiAdapter(worker), caught_up


def test_queries_are_not_held_back() -> None:
    async def go() -> None:
        adapter, _ = make_adapter()
        response = await asyncio.wait_for(
            adapter.handle("GET", "/apps/1/channels", "", [], b"", True), 5)
        assert response.startswith(b"HTTP/1.1 401")

    asyncio.run(go())
