"""The worker side of the HTTP API: publishers wait while the worker is behind."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from vask.config import load_settings
from vask.workers.api_adapter import ApiAdapter


def make_adapter() -> tuple[ApiAdapter, asyncio.Event]:
    caught_up = asyncio.Event()
    link = SimpleNamespace(caught_up=caught_up, up=True, send=lambda message: None)
    worker: Any = SimpleNamespace(settings=load_settings(env={}), link=link)
    return ApiAdapter(worker), caught_up


def test_a_publish_waits_until_the_worker_caught_up() -> None:
    async def go() -> None:
        adapter, caught_up = make_adapter()
        task = asyncio.ensure_future(adapter.handle("POST", "/apps/1/events", "", [], b"{}", True))
        await asyncio.sleep(0.2)
        assert not task.done()  # held back: the worker is behind on deliveries
        caught_up.set()
        response = await asyncio.wait_for(task, 5)
        assert response.startswith(b"HTTP/1.1 401")  # then handled (unsigned: 401)

    asyncio.run(go())


def test_queries_are_not_held_back() -> None:
    async def go() -> None:
        adapter, _ = make_adapter()
        response = await asyncio.wait_for(
            adapter.handle("GET", "/apps/1/channels", "", [], b"", True), 5)
        assert response.startswith(b"HTTP/1.1 401")

    asyncio.run(go())
