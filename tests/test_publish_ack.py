"""An HTTP API publish is answered 2xx only once the broker has routed it."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from types import SimpleNamespace
from typing import Any

import orjson

from tests.test_http_api import EVENT, SETTINGS, request
from vask.envelope import Publish, TerminateUser, Verb
from vask.metrics import WorkerMetrics
from vask.workers.api_adapter import ApiAdapter
from vask.workers.broker_link import BrokerUnavailable


def adapter(answer: dict[str, Any] | None, up: bool = True) -> tuple[ApiAdapter, list[Verb]]:
    asked: list[Verb] = []

    async def ask(message: Verb) -> dict[str, Any]:
        # sent with a fresh request id, as BrokerLink.ask does
        asked.append(dataclasses.replace(message, rid=len(asked) + 1))
        if answer is None:
            raise BrokerUnavailable("the broker did not answer in time")
        return answer

    caught_up = asyncio.Event()
    caught_up.set()
    link = SimpleNamespace(caught_up=caught_up, up=up, ask=ask)
    metrics = WorkerMetrics([app.id for app in SETTINGS.apps])
    worker = SimpleNamespace(settings=SETTINGS, link=link, metrics=metrics)
    return ApiAdapter(worker), asked  # type: ignore[arg-type]


def post(api: ApiAdapter, path: str, body: Any) -> bytes:
    req = request("POST", path, body, ts=time.time())
    headers = [(k.encode(), v.encode()) for k, v in req.headers.items()]
    return asyncio.run(api.handle(req.method, req.path, req.query, headers, req.body, True))


def test_a_routed_publish_is_a_request_and_answered_200() -> None:
    api, asked = adapter({"ok": True})
    response = post(api, "/apps/3/events", {**EVENT, "channels": ["a", "b"]})
    assert response.startswith(b"HTTP/1.1 200 ")
    assert [(type(m), m.channel, m.rid) for m in asked if isinstance(m, Publish)] == [
        (Publish, "a", 1), (Publish, "b", 2)]


def test_a_publish_the_broker_refuses_is_503_with_its_reason() -> None:
    api, _ = adapter({"ok": False, "error": "The cluster is recovering; retry shortly."})
    response = post(api, "/apps/3/events", EVENT)
    assert response.startswith(b"HTTP/1.1 503 ")
    body = orjson.loads(response.split(b"\r\n\r\n", 1)[1])
    assert body["error"] == "The cluster is recovering; retry shortly."


def test_a_publish_without_an_answer_is_503() -> None:
    api, _ = adapter(None)
    assert post(api, "/apps/3/events", EVENT).startswith(b"HTTP/1.1 503 ")


def test_with_the_broker_unreachable_nothing_is_sent_and_the_answer_is_503() -> None:
    api, asked = adapter({"ok": True}, up=False)
    assert post(api, "/apps/3/events", EVENT).startswith(b"HTTP/1.1 503 ")
    assert asked == []


def test_terminate_connections_waits_for_the_broker_too() -> None:
    api, asked = adapter({"ok": False, "error": "recovering"})
    response = post(api, "/apps/3/users/u1/terminate_connections", {})
    assert response.startswith(b"HTTP/1.1 503 ")
    assert asked == [TerminateUser("3", "u1", 1)]
