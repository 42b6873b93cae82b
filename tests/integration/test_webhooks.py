"""Webhooks from a real ``vask run``: once per cluster, debounced, retried, durable.

The receiver (tests/webhook_receiver.py) checks every request with pusher-http-python's
``validate_webhook``; a request it refuses is recorded in ``invalid``, which every test
requires to stay empty. Clients are placed on chosen workers (tests/pusher_client.py),
so "once per cluster" is tested with the events' causes spread over three workers.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.pusher_client import PusherClient, close_all, connect_spread
from tests.servers import APP_ID, APP_KEY, APP_SECRET, Server, process_name, run_vask
from tests.webhook_receiver import Receiver, receiving

pytestmark = pytest.mark.timeout(240)


def config(url: str, leave_delay: float = 1.0, extra: str = "", server: str = "") -> str:
    return (
        f"[server]\n{server}\n"
        f'[[apps]]\nid = "{APP_ID}"\nkey = "{APP_KEY}"\nsecret = "{APP_SECRET}"\n'
        "enable_client_messages = true\nenable_subscription_count = true\n"
        f"max_client_events_per_second = 5000\nwebhook_leave_delay = {leave_delay}\n{extra}\n"
        f'[[apps.webhooks]]\nurl = "{url}"\n'
        'event_types = ["channel_occupied", "channel_vacated", "member_added", '
        '"member_removed", "client_event", "cache_miss", "subscription_count"]\n'
        'headers = { X-Test = "yes" }\n'
    )


@pytest.fixture()
def receiver() -> Iterator[Receiver]:
    with receiving() as r:
        yield r
        assert r.invalid == [], f"requests that failed validate_webhook: {r.invalid[:3]}"


def sender_pid(server: Server, timeout: float = 15.0) -> int:
    """The one webhook sender's pid. A freshly forked sender names itself a moment
    after the supervisor logs that it started, so this waits for the name."""
    deadline = time.monotonic() + timeout
    while True:
        pids = [p for p in server.children() if process_name(p) == "vask-webhooks"]
        if len(pids) == 1 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert len(pids) == 1, f"webhook sender processes: {pids}"
    return pids[0]


def of(name: str, channel: str) -> Any:
    return lambda e: e["name"] == name and e["channel"] == channel


def presence(user: str) -> str:
    return f'{{"user_id": "{user}", "user_info": {{"name": "{user}"}}}}'


async def whisper(client: PusherClient, channel: str, count: int, start: int = 0) -> None:
    for n in range(start, start + count):
        await client.send({"event": "client-n", "channel": channel, "data": {"n": n}})


def numbers(receiver: Receiver, channel: str) -> list[int]:
    """The ``n`` of every client_event received on ``channel``, in arrival order."""
    return [json.loads(e["data"])["n"] for e in receiver.events(of("client_event", channel))]


def first_occurrences(values: list[int]) -> list[int]:
    seen: set[int] = set()
    out = []
    for v in values:
        if v not in seen:
            seen.add(v)
            out.append(v)
    return out


def test_each_event_once_per_cluster_signed_and_with_pushers_fields(
        receiver: Receiver) -> None:
    async def story(server: Server) -> None:
        a, b, c = await connect_spread(server.ws_url, 3, 3)
        try:
            # a and b: two tabs of user u1 on two workers; c: user u2 on the third
            for client, user in ((a, "u1"), (b, "u1"), (c, "u2")):
                await client.subscribe("presence-room", presence(user))
                await client.subscribe("news")
                await client.subscribe("cache-scores")
            await a.subscribe("private-chat")
            await a.send({"event": "client-typing", "channel": "private-chat",
                          "data": {"on": True}})
            receiver.wait(of("client_event", "private-chat"))
            receiver.wait(of("member_added", "presence-room"), count=2)
            receiver.wait(of("cache_miss", "cache-scores"))
            receiver.wait(lambda e: e["name"] == "subscription_count"
                          and e.get("subscription_count") == 3)
            left = time.monotonic()
            await close_all([a, b, c])
            receiver.wait(of("channel_vacated", "news"))
            receiver.wait(of("channel_vacated", "presence-room"))
            receiver.wait(of("channel_vacated", "private-chat"))
            receiver.wait(of("channel_vacated", "cache-scores"))
            receiver.wait(of("member_removed", "presence-room"), count=2)
            # the leaves were held for the delay (1 s) before they were sent
            removed_at = [t for t, e in receiver.timed_events()
                          if e["name"] in ("member_removed", "channel_vacated")]
            assert min(removed_at) - left >= 0.9
        finally:
            await close_all([a, b, c])

    with run_vask(workers=3, config=config(receiver.url)) as server:
        asyncio.run(story(server))
        events = receiver.events()
        for channel in ("presence-room", "news", "cache-scores", "private-chat"):
            assert len(receiver.events(of("channel_occupied", channel))) == 1
            assert len(receiver.events(of("channel_vacated", channel))) == 1
        added = receiver.events(of("member_added", "presence-room"))
        assert sorted(e["user_id"] for e in added) == ["u1", "u2"]
        removed = receiver.events(of("member_removed", "presence-room"))
        assert sorted(e["user_id"] for e in removed) == ["u1", "u2"]
        assert receiver.events(of("cache_miss", "cache-scores")) == [
            {"name": "cache_miss", "channel": "cache-scores"}]
        (typing,) = receiver.events(of("client_event", "private-chat"))
        assert typing == {"name": "client_event", "channel": "private-chat",
                          "event": "client-typing", "data": '{"on":true}',
                          "socket_id": typing["socket_id"]}
        # presence channels have no subscription_count webhook
        assert not [e for e in events if e["name"] == "subscription_count"
                    and e["channel"].startswith("presence-")]
        for delivery in receiver.deliveries:
            headers = {k.lower(): v for k, v in delivery.headers.items()}
            assert headers["content-type"] == "application/json"
            assert headers["x-pusher-key"] == APP_KEY
            assert headers["x-test"] == "yes"
            assert headers["user-agent"].startswith("Vask")
        assert "webhook" in server.log() and receiver.url in server.log()


def test_a_quick_reconnect_sends_nothing_and_a_real_leave_one_removal(
        receiver: Receiver) -> None:
    async def story(server: Server) -> None:
        a, b = await connect_spread(server.ws_url, 2, 2)
        try:
            await a.subscribe("presence-room", presence("ada"))
            await b.subscribe("presence-room", presence("bob"))
            receiver.wait(of("member_added", "presence-room"), count=2)
            # bob drops and comes back (on any worker) well within the 2 s delay
            await b.close()
            b = await PusherClient.connect(server.ws_url)
            await b.subscribe("presence-room", presence("bob"))
            # a marker after it: a channel occupied now; once its webhook is in, the
            # removal (held) has not been sent, and no second member_added either
            await b.subscribe("marker-1")
            receiver.wait(of("channel_occupied", "marker-1"))
            time.sleep(3.0)  # past the delay: a removal that was not cancelled is out
            await b.subscribe("marker-2")
            receiver.wait(of("channel_occupied", "marker-2"))
            assert receiver.events(of("member_removed", "presence-room")) == []
            assert len(receiver.events(of("member_added", "presence-room"))) == 2
            left = time.monotonic()
            await b.close()
            (gone,) = receiver.wait(of("member_removed", "presence-room"))
            assert gone["user_id"] == "bob"
            at = [t for t, e in receiver.timed_events() if e["name"] == "member_removed"]
            assert at[0] - left >= 1.9
        finally:
            await close_all([a, b])
        assert receiver.events(of("channel_vacated", "presence-room")) == []

    with run_vask(workers=2, config=config(receiver.url, leave_delay=2.0)) as server:
        asyncio.run(story(server))


def test_a_failing_receiver_gets_everything_in_order_once_it_recovers(
        receiver: Receiver) -> None:
    """500s, then timeouts, then 30 s of refused connections, then healthy: every event
    arrives, and each channel's events arrive in the order they happened."""
    count = 40

    async def story(server: Server) -> None:
        (a,) = await connect_spread(server.ws_url, 1, 1)
        try:
            await a.subscribe("private-one")
            await a.subscribe("private-two")
            receiver.mode = "fail"
            await whisper(a, "private-one", count // 2)
            deadline = time.monotonic() + 30
            while len(receiver.attempts) < 3:  # retried while failing
                assert time.monotonic() < deadline, "no retries while the receiver fails"
                await asyncio.sleep(0.1)
            receiver.mode = "slow"
            await whisper(a, "private-two", count // 2)
            attempts = len(receiver.attempts)
            while len(receiver.attempts) < attempts + 2:  # timed out at least twice
                assert time.monotonic() < deadline + 30, "no attempts while timing out"
                await asyncio.sleep(0.1)
            receiver.mode = "ok"
            receiver.down()
            await whisper(a, "private-one", count // 2, start=count // 2)
            await asyncio.sleep(30)
            receiver.up()
            receiver.wait(of("client_event", "private-one"), count=count, timeout=120)
            receiver.wait(of("client_event", "private-two"), count=count // 2, timeout=60)
        finally:
            await close_all([a])

    settings = "webhook_timeout = 1.0"
    with run_vask(workers=1, config=config(receiver.url, server=settings)) as server:
        receiver.slow_seconds = 3.0
        asyncio.run(story(server))
        # at least once: repeats may come, but first arrivals are complete and in order
        assert first_occurrences(numbers(receiver, "private-one")) == list(range(count))
        assert first_occurrences(numbers(receiver, "private-two")) == list(range(count // 2))
        log = server.log()
        assert "retry" in log.lower()


def test_kill_9_of_the_sender_with_1000_pending_loses_nothing(receiver: Receiver) -> None:
    count = 1000

    async def story(server: Server) -> None:
        (a,) = await connect_spread(server.ws_url, 1, 1)
        try:
            await a.subscribe("private-bulk")
            receiver.down()
            await whisper(a, "private-bulk", count)
            await a.subscribe("private-last")  # its occupied webhook comes after them
            await asyncio.sleep(2.0)  # let the sender store them (if it does not: resent)
            os.kill(sender_pid(server), signal.SIGKILL)
            deadline = time.monotonic() + 30
            while not [p for p in server.children() if process_name(p) == "vask-webhooks"]:
                assert time.monotonic() < deadline, "the sender was not restarted"
                await asyncio.sleep(0.1)
            receiver.up()
            receiver.wait(of("channel_occupied", "private-last"), timeout=90)
            receiver.wait(of("client_event", "private-bulk"), count=count, timeout=90)
        finally:
            await close_all([a])

    with run_vask(workers=2, config=config(receiver.url)) as server:
        asyncio.run(story(server))
        assert first_occurrences(numbers(receiver, "private-bulk")) == list(range(count))


def test_a_full_restart_with_the_receiver_down_loses_nothing(receiver: Receiver,
                                                            tmp_path: Any) -> None:
    count = 300
    env = {"VASK_DATA_DIR": str(tmp_path / "data")}

    async def before(server: Server) -> None:
        (a,) = await connect_spread(server.ws_url, 1, 1)
        try:
            await a.subscribe("private-restart")
            await whisper(a, "private-restart", count)
            await a.subscribe("private-marker")
            await asyncio.sleep(1.0)
        finally:
            await close_all([a])

    receiver.down()
    with run_vask(workers=2, config=config(receiver.url), env=env) as server:
        asyncio.run(before(server))
        port = server.port
    assert list((tmp_path / "data").glob("webhooks-*.sqlite3"))
    with run_vask(workers=2, config=config(receiver.url), env=env, port=port):
        receiver.up()
        receiver.wait(of("client_event", "private-restart"), count=count, timeout=90)
        # the vacated webhooks of the clients closed by the stop came through too
        receiver.wait(of("channel_vacated", "private-restart"), timeout=30)
    assert first_occurrences(numbers(receiver, "private-restart")) == list(range(count))


def test_a_reload_starts_restarts_and_stops_the_sender(receiver: Receiver) -> None:
    """SIGHUP: webhooks added to a running server start the sender; a new URL restarts
    it (the new receiver gets the events from then on); removing them stops it."""
    no_hooks = config(receiver.url).split("[[apps.webhooks]]")[0]

    def reload(server: Server, text: str, wanted: str) -> None:
        before = server.log().count(wanted)
        (server.log_path.parent / "vask.toml").write_text(text)
        server.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while server.log().count(wanted) <= before:
            assert time.monotonic() < deadline, f"no {wanted!r} in the log"
            time.sleep(0.05)

    async def occupy(server: Server, channel: str) -> None:
        client = await PusherClient.connect(server.ws_url)
        try:
            await client.subscribe(channel)
        finally:
            await client.close()

    with receiving() as second, run_vask(workers=2, config=no_hooks) as server:
        assert [p for p in server.children() if process_name(p) == "vask-webhooks"] == []
        reload(server, config(receiver.url), "webhook sender started")
        sender_pid(server)
        asyncio.run(occupy(server, "first"))
        receiver.wait(of("channel_occupied", "first"))
        reload(server, config(second.url), "webhook sender restarted")
        asyncio.run(occupy(server, "second"))
        second.wait(of("channel_occupied", "second"))
        assert receiver.events(of("channel_occupied", "second")) == []
        reload(server, no_hooks, "webhook sender stopped")
        assert [p for p in server.children() if process_name(p) == "vask-webhooks"] == []
        assert second.invalid == []
