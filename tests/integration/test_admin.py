"""The dashboard's admin API and live feed on a real `vask run --workers 3`.

Clients are spread over all three workers (``connect_spread``), so the overview, the
channels view and the debug console can only be right if the broker gathered every
worker's figures and records. The admin API must refuse a missing or wrong token, and
/metrics must still answer on the same listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pusher
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.pusher_client import PusherClient, close_all, connect_spread, worker_of, workers_of
from tests.servers import APP_ID, APP_KEY, APP_SECRET, Server, free_port, run_vask
from tests.webhook_receiver import Receiver, receiving

pytestmark = pytest.mark.timeout(180)

TOKEN = "test-admin-token-0123456789"
DEADLINE = 30.0  # seconds for something to show up (a busy 2-core machine)
CLIENTS = 6


def http(port: int, path: str, token: str | None = None, method: str = "GET",
         body: dict[str, Any] | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, data=data, timeout=10) as response:
            raw = response.read()
            status = response.status
            kind = response.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        raw, status, kind = exc.read(), exc.code, exc.headers.get("Content-Type", "")
    return status, json.loads(raw) if "json" in kind else raw.decode()


class Feed:
    """The dashboard's WebSocket, as the page uses it."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.samples: list[dict[str, Any]] = []
        self.records: list[dict[str, Any]] = []
        self.history: list[dict[str, Any]] = []

    async def pump_until(self, check: Callable[[], bool], what: str,
                         within: float = DEADLINE) -> None:
        deadline = time.monotonic() + within
        while not check():
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{what}: not within {within}s; last sample "
                                     f"{self.samples[-1:]}, records {self.records[-20:]}")
            try:
                message = await self.ws.receive(timeout=min(left, 1.0))
            except TimeoutError:
                continue
            assert message.type == aiohttp.WSMsgType.TEXT, message
            data = json.loads(message.data)
            if data["type"] == "hello":
                self.history = data["history"]
            elif data["type"] == "sample":
                self.samples.append(data["sample"])
            elif data["type"] == "console":
                self.records.extend(data["records"])

    def latest(self) -> dict[str, Any]:
        return self.samples[-1] if self.samples else {}

    def app(self) -> dict[str, int]:
        return self.latest().get("apps", {}).get(APP_ID, {})


def auth_refusals(port: int) -> None:
    for path in ("/admin/api/apps", "/admin/api/overview",
                 f"/admin/api/apps/{APP_ID}/channels"):
        assert http(port, path)[0] == 401, path
        assert http(port, path, token="wrong-token-wrong-token")[0] == 401, path
        assert http(port, path, token=APP_SECRET)[0] == 401, path
    status, _ = http(port, f"/admin/api/apps/{APP_ID}/events", token="nope", method="POST",
                     body={"channel": "news", "event": "x", "data": "{}"})
    assert status == 401


async def feed_refuses_a_wrong_token(port: int) -> None:
    async with aiohttp.ClientSession() as session, \
            session.ws_connect(f"http://127.0.0.1:{port}/admin/ws") as ws:
        await ws.send_str(json.dumps({"type": "auth", "token": "not-the-token-at-all"}))
        message = await ws.receive(timeout=10)
        assert message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        assert ws.close_code == 4401


@contextlib.asynccontextmanager
async def console_feed(server: Server, port: int) -> AsyncIterator[Feed]:
    """The dashboard's feed, signed in, watching the app with the console on, once the
    workers record."""
    async with aiohttp.ClientSession() as session, \
            session.ws_connect(f"http://127.0.0.1:{port}/admin/ws") as ws:
        await ws.send_str(json.dumps({"type": "auth", "token": TOKEN}))
        await ws.send_str(json.dumps({"type": "watch", "app": APP_ID, "console": True}))
        feed = Feed(ws)
        await console_ready(feed, server)
        yield feed


async def console_ready(feed: Feed, server: Server) -> None:
    """Wait until the workers record: the console switches on a moment after the page
    asks (the broker relays it to the workers), so probe with a throwaway client."""
    deadline = time.monotonic() + DEADLINE
    while True:
        probe = await PusherClient.connect(server.ws_url)
        await probe.close()
        socket_id = probe.socket_id
        try:
            await feed.pump_until(lambda sid=socket_id: any(  # type: ignore[misc]
                r.get("socket_id") == sid for r in feed.records), "a probe's record", 2.0)
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise


async def scenario(server: Server, port: int) -> None:
    await feed_refuses_a_wrong_token(port)
    async with console_feed(server, port) as feed:
        clients = await connect_spread(server.ws_url, CLIENTS, 3)
        try:
            assert len(workers_of(clients)) == 3
            # the overview: every worker's connections, per worker and per app
            await feed.pump_until(
                lambda: feed.app().get("connections") == CLIENTS
                and len(feed.latest()["workers"]) == 3
                and all(w["connections"] == 2 for w in feed.latest()["workers"]),
                "connections per app and per worker")
            for w in feed.latest()["workers"]:
                assert w["rss"] > 1_000_000 and w["cpu_ms"] > 0 and w["restarts"] == 0
            broker = feed.latest()["broker"]
            assert broker["rss"] > 1_000_000 and broker["queue_depth"] >= 0
            # the console: a connect record for every client, naming its socket
            connected = {c.socket_id for c in clients}
            await feed.pump_until(
                lambda: connected <= {r.get("socket_id") for r in feed.records
                                      if r["type"] == "connect"}, "connect records")
            slots = {r["worker"] for r in feed.records if r["type"] == "connect"}
            assert len(slots) == 3  # from every worker
            for i, client in enumerate(clients):
                await client.subscribe("news" if i % 2 else "presence-room",
                                       json.dumps({"user_id": f"u{i}", "user_info": {"n": i}})
                                       if i % 2 == 0 else None)
            await feed.pump_until(
                lambda: sum(1 for r in feed.records if r["type"] == "subscribe") >= CLIENTS,
                "subscribe records")
            # the channels view, from the broker's state
            status, page = await asyncio.to_thread(
                http, port, f"/admin/api/apps/{APP_ID}/channels", TOKEN)
            assert status == 200
            assert page == {"matched": 2, "channels": [
                {"name": "news", "subscriptions": 3},
                {"name": "presence-room", "subscriptions": 3, "users": 3}]}
            status, page = await asyncio.to_thread(
                http, port, f"/admin/api/apps/{APP_ID}/channels?prefix=pres&limit=1", TOKEN)
            assert status == 200 and [c["name"] for c in page["channels"]] == ["presence-room"]
            status, room = await asyncio.to_thread(
                http, port, f"/admin/api/apps/{APP_ID}/channel?name=presence-room", TOKEN)
            assert status == 200 and room["users"] == 3 and room["subscriptions"] == 3
            assert sorted(m["id"] for m in room["members"]) == ["u0", "u2", "u4"]
            assert sum(room["per_worker"].values()) == 3
            # an HTTP API publish shows in the console
            api = pusher.Pusher(app_id=APP_ID, key=APP_KEY, secret=APP_SECRET,
                                host="127.0.0.1", port=server.port, ssl=False, timeout=10)
            await asyncio.to_thread(api.trigger, "news", "api-hello", {"n": 1})
            await feed.pump_until(
                lambda: any(r["type"] == "api_message" and r.get("event") == "api-hello"
                            and r.get("channel") == "news" for r in feed.records),
                "the API publish in the console")
            # the event creator goes through the HTTP API to every subscriber
            status, answer = await asyncio.to_thread(
                http, port, f"/admin/api/apps/{APP_ID}/events", TOKEN, "POST",
                {"channel": "news", "event": "from-dashboard", "data": '{"x":1}'})
            assert status == 200 and answer["status"] == 200, answer
            for client in clients[1::2]:
                frame = await client.wait_for("from-dashboard", "news")
                assert frame["data"] == '{"x":1}'
            await feed.pump_until(
                lambda: any(r["type"] == "api_message" and r.get("event") == "from-dashboard"
                            for r in feed.records), "the creator's event in the console")
            # messages counted per app (cumulative: the page makes rates of them)
            await feed.pump_until(
                lambda: feed.app().get("vask_http_calls_received", 0) >= 2
                and feed.app().get("channels") == 2 and feed.app().get("members") == 3,
                "API calls, channels and members in the overview")
            gone = clients.pop()
            await gone.close()
            await feed.pump_until(
                lambda: any(r["type"] == "disconnect" and r.get("socket_id") == gone.socket_id
                            for r in feed.records), "the disconnect record")
            assert worker_of(gone) in gone.socket_id
        finally:
            await close_all(clients)


def test_admin_api_auth_overview_channels_console_and_creator_across_workers() -> None:
    port = free_port()
    env = {"VASK_METRICS_PORT": str(port), "VASK_ADMIN_TOKEN": TOKEN}
    with run_vask(workers=3, env=env) as server:
        auth_refusals(port)
        asyncio.run(scenario(server, port))
        # /metrics is still there, without a token, in the exposition format
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            names = {f.name for f in text_string_to_metric_families(r.read().decode())}
        assert "vask_new_connections" in names and "vask_workers" in names
        # the page itself is served, with a policy that keeps it to its own assets
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/dashboard/", timeout=10) as r:
            assert b"dashboard.js" in r.read()
            assert "default-src 'self'" in r.headers["Content-Security-Policy"]
        status, listing = http(port, "/admin/api/apps", TOKEN)
        assert status == 200 and [a["id"] for a in listing["apps"]] == [APP_ID]
        assert "secret" not in json.dumps(listing)


def test_no_admin_token_means_no_dashboard() -> None:
    port = free_port()
    with run_vask(workers=1, env={"VASK_METRICS_PORT": str(port)}):
        # the plain Prometheus server answers every path with the exposition
        _, body = http(port, "/admin/api/apps", TOKEN)
        assert isinstance(body, str) and "vask_workers" in body
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            assert b"vask_workers" in r.read()


def webhook_config(url: str) -> str:
    return (
        f'[[apps]]\nid = "{APP_ID}"\nkey = "{APP_KEY}"\nsecret = "{APP_SECRET}"\n'
        "enable_client_messages = true\nwebhook_leave_delay = 0.5\n"
        f'[[apps.webhooks]]\nurl = "{url}"\nevent_types = ["channel_occupied"]\n'
    )


async def console_of_client_events_errors_and_webhooks(server: Server, port: int,
                                                      receiver: Receiver) -> None:
    async with console_feed(server, port) as feed:
        a = await PusherClient.connect(server.ws_url)
        b = await PusherClient.connect(server.ws_url)
        try:
            await a.subscribe("private-chat")
            await b.subscribe("private-chat")
            await a.send({"event": "client-typing", "channel": "private-chat",
                          "data": {"who": "a"}})
            await b.wait_for("client-typing", "private-chat")
            await feed.pump_until(
                lambda: any(r["type"] == "client_event" and r.get("event") == "client-typing"
                            and r.get("socket_id") == a.socket_id
                            and r.get("channel") == "private-chat" for r in feed.records),
                "the client event")
            # a refused subscription is an error sent to the client
            await a.send({"event": "pusher:subscribe",
                          "data": {"channel": "private-bad", "auth": f"{APP_KEY}:00"}})
            await a.wait_for("pusher:subscription_error", "private-bad")
            await feed.pump_until(
                lambda: any(r["type"] == "error" and r.get("channel") == "private-bad"
                            and r.get("socket_id") == a.socket_id for r in feed.records),
                "the error sent to the client")
            # webhook outcomes: delivered, then refused by the receiver (to be retried)
            await feed.pump_until(
                lambda: any(r["type"] == "webhook" and r.get("outcome") == "sent"
                            and r.get("channels") == ["private-chat"] and r.get("status") == 200
                            for r in feed.records), "the delivered webhook")
            receiver.mode = "fail"
            await b.subscribe("private-other")
            await feed.pump_until(
                lambda: any(r["type"] == "webhook" and r.get("outcome") == "retry"
                            and r.get("channels") == ["private-other"]
                            and r.get("reason") == "HTTP 500" for r in feed.records),
                "the failed webhook")
        finally:
            receiver.mode = "ok"
            await close_all([a, b])


def test_console_shows_client_events_errors_and_webhook_outcomes() -> None:
    port = free_port()
    env = {"VASK_METRICS_PORT": str(port), "VASK_ADMIN_TOKEN": TOKEN}
    with receiving() as receiver, \
            run_vask(workers=2, config=webhook_config(receiver.url), env=env) as server:
        asyncio.run(console_of_client_events_errors_and_webhooks(server, port, receiver))
