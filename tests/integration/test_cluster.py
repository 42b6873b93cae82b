"""Cross-worker behaviour on a real `vask run --workers 3`.

A connection's socket id starts with its worker's prefix, so tests can check that the
clients involved really sit on different workers.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Iterator

import pusher
import pytest

from tests.pusher_client import PusherClient, close_all, connect_many
from tests.servers import APP_ID, APP_KEY, APP_SECRET, Server, process_name, run_vask

pytestmark = pytest.mark.timeout(120)

CONFIG = """
[[apps]]
id = "1"
key = "app-key"
secret = "app-secret"
enable_client_messages = true
enable_subscription_count = true

[[apps]]
id = "2"
key = "quota-key"
secret = "quota-secret"
max_connections = 3

[[apps]]
id = "3"
key = "strict-key"
secret = "strict-secret"
enable_user_authentication = true
user_authentication_timeout = 1
"""


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with run_vask(workers=3, config=CONFIG) as srv:
        yield srv


def run(coro: object) -> None:
    asyncio.run(coro)  # type: ignore[arg-type]


def workers_of(clients: list[PusherClient]) -> set[str]:
    return {c.socket_id.split(".")[0] for c in clients}


def sdk(server: Server) -> pusher.Pusher:
    return pusher.Pusher(app_id=APP_ID, key=APP_KEY, secret=APP_SECRET, host="127.0.0.1",
                         port=server.port, ssl=False, timeout=10)


def member_ids(client: PusherClient, event: str, channel: str) -> list[str]:
    return [json.loads(f["data"])["user_id"] for f in client.events(event, channel)]


def test_presence_members_across_workers(server: Server) -> None:
    async def go() -> None:
        channel = "presence-room"
        clients = await connect_many(server.ws_url, 9)
        assert len(workers_of(clients)) >= 2
        for n, client in enumerate(clients):
            ok = await client.subscribe(channel, json.dumps({"user_id": f"u{n}",
                                                             "user_info": {"n": n}}))
            roster = json.loads(ok["data"])["presence"]
            assert roster["count"] == n + 1
            assert sorted(roster["ids"]) == sorted(f"u{i}" for i in range(n + 1))
            assert roster["hash"][f"u{n}"] == {"n": n}
        # everyone saw exactly the users who joined after them, never themselves
        for n, client in enumerate(clients):
            expect = [f"u{i}" for i in range(n + 1, 9)]
            await client.wait(lambda f, c=client, e=expect: sorted(
                member_ids(c, "pusher_internal:member_added", channel)) == sorted(e))
        # a second tab of u0 on (very likely) another worker: no member_added anywhere
        tab = await PusherClient.connect(server.ws_url)
        await tab.subscribe(channel, json.dumps({"user_id": "u0", "user_info": {"n": 0}}))
        # the first tab of u0 leaves: u0 is still present, no member_removed
        await clients[0].close()
        # u8 leaves: everyone remaining sees exactly that
        await clients[8].close()
        for client in [*clients[1:8], tab]:
            await client.wait(lambda f: f.get("event") == "pusher_internal:member_removed")
        await asyncio.sleep(0.5)
        for client in clients[1:8]:
            assert member_ids(client, "pusher_internal:member_removed", channel) == ["u8"]
        # the second tab of u0 added nobody: each saw exactly the later first joins
        for n, client in enumerate(clients[1:8], start=1):
            assert sorted(member_ids(client, "pusher_internal:member_added", channel)) == \
                sorted(f"u{i}" for i in range(n + 1, 9))
        users = sdk(server).users_info(channel)
        assert sorted(u["id"] for u in users["users"]) == sorted(f"u{i}" for i in range(8))
        await close_all([*clients[1:8], tab])

    run(go())


def test_client_events_reach_every_other_worker_once(server: Server) -> None:
    async def go() -> None:
        clients = await connect_many(server.ws_url, 8)
        assert len(workers_of(clients)) >= 2
        for client in clients:
            await client.subscribe("private-chat")
        sender = clients[0]
        await sender.send({"event": "client-typing", "channel": "private-chat",
                           "data": {"on": True}})
        for client in clients[1:]:
            frame = await client.wait_for("client-typing")
            assert frame == {"event": "client-typing", "channel": "private-chat",
                             "data": {"on": True}}
        await asyncio.sleep(0.3)
        assert not sender.events("client-typing")
        assert all(len(c.events("client-typing")) == 1 for c in clients[1:])
        # presence: the server adds the sender's user_id
        for n, client in enumerate(clients[:3]):
            await client.subscribe("presence-chat", json.dumps({"user_id": f"p{n}"}))
        await clients[1].send({"event": "client-x", "channel": "presence-chat", "data": "hi",
                               "user_id": "forged"})
        got = await clients[2].wait_for("client-x")
        assert got["user_id"] == "p1"
        await close_all(clients)

    run(go())


def test_http_trigger_reaches_all_workers_with_exclusion(server: Server) -> None:
    async def go() -> None:
        clients = await connect_many(server.ws_url, 9)
        assert len(workers_of(clients)) >= 2
        for client in clients:
            await client.subscribe("news")
        excluded = clients[4]
        result = await asyncio.to_thread(sdk(server).trigger, "news", "headline",
                                         {"t": "hi"}, excluded.socket_id)
        assert result == {}
        for client in clients:
            if client is not excluded:
                frame = await client.wait_for("headline")
                assert json.loads(frame["data"]) == {"t": "hi"}
        await asyncio.sleep(0.3)
        assert not excluded.events("headline")
        info = await asyncio.to_thread(sdk(server).channel_info, "news",
                                       ["subscription_count"])
        assert info == {"occupied": True, "subscription_count": 9}
        await close_all(clients)

    run(go())


def test_sigkill_of_a_worker_removes_exactly_its_members() -> None:
    with run_vask(workers=3, config=CONFIG) as srv:
        async def go() -> None:
            clients = await connect_many(srv.ws_url, 12)
            by_worker: dict[str, list[PusherClient]] = {}
            for client in clients:
                by_worker.setdefault(client.socket_id.split(".")[0], []).append(client)
            assert len(by_worker) >= 2
            for n, client in enumerate(clients):
                await client.subscribe("presence-k", json.dumps({"user_id": f"k{n}"}))
            victims = [p for p in srv.children() if process_name(p).startswith("vask-worker")]
            os.kill(victims[0], signal.SIGKILL)
            await asyncio.sleep(1.0)
            dead = [c for c in clients if c.closed.done()]
            alive = [c for c in clients if not c.closed.done()]
            assert dead and alive
            gone = sorted(f"k{clients.index(c)}" for c in dead)
            for client in alive:
                await client.wait(lambda f, c=client: sorted(
                    member_ids(c, "pusher_internal:member_removed", "presence-k")) == gone,
                    timeout=15)
            await asyncio.sleep(1.0)
            for client in alive:
                assert sorted(member_ids(client, "pusher_internal:member_removed",
                                         "presence-k")) == gone
            await close_all(alive)

        run(go())


def test_connection_quota_is_exact_across_workers(server: Server) -> None:
    url = f"ws://127.0.0.1:{server.port}/app/quota-key?protocol=7"

    async def go() -> None:
        clients = await connect_many(url, 3, key="quota-key", secret="quota-secret")
        over = await PusherClient.connect(url, established=False)
        code, reason = await asyncio.wait_for(over.closed, 10)
        assert (code, reason) == (4004, "Application is over connection quota")
        assert over.frames == [{"event": "pusher:error", "data": {
            "code": 4004, "message": "Application is over connection quota"}}]
        await clients[0].close()
        await asyncio.sleep(0.3)
        again = await PusherClient.connect(url)
        await close_all([*clients[1:], again])

    run(go())


def test_signin_user_events_terminate_and_watchlist(server: Server) -> None:
    async def go() -> None:
        tabs = await connect_many(server.ws_url, 6)
        watcher, presence_only, *user_tabs = tabs
        ok = await watcher.signin({"id": "w", "watchlist": ["alice"]})
        assert ok["event"] == "pusher:signin_success"
        first = await watcher.wait_for("pusher_internal:watchlist_events")
        assert json.loads(first["data"]) == {"events": [{"name": "offline",
                                                         "user_ids": ["alice"]}]}
        for tab in user_tabs:
            assert (await tab.signin({"id": "alice"}))["event"] == "pusher:signin_success"
            await tab.subscribe("#server-to-user-alice")
        online = await watcher.wait(lambda f: f.get("event") ==
                                    "pusher_internal:watchlist_events" and "online" in f["data"])
        assert json.loads(online["data"])["events"] == [{"name": "online",
                                                         "user_ids": ["alice"]}]
        await presence_only.subscribe("presence-x", json.dumps({"user_id": "alice"}))
        client = sdk(server)
        await asyncio.to_thread(client.send_to_user, "alice", "order", {"id": 7})
        for tab in user_tabs:
            frame = await tab.wait_for("order")
            assert frame["channel"] == "#server-to-user-alice"
        await asyncio.to_thread(client.terminate_user_connections, "alice")
        for tab in user_tabs:
            code, _ = await asyncio.wait_for(tab.closed, 10)
            assert code == 4200
        offline = await watcher.wait(lambda f: f.get("event") ==
                                     "pusher_internal:watchlist_events" and "offline" in f["data"]
                                     and f is not first)
        assert json.loads(offline["data"])["events"][0]["user_ids"] == ["alice"]
        assert not presence_only.closed.done()
        assert len(watcher.events("pusher_internal:watchlist_events")) == 3  # tabs collapse
        await close_all([watcher, presence_only])

    run(go())


def test_cache_channel_across_workers(server: Server) -> None:
    async def go() -> None:
        empty = await PusherClient.connect(server.ws_url)
        await empty.subscribe("cache-empty")
        await empty.wait_for("pusher:cache_miss", "cache-empty")
        await asyncio.to_thread(sdk(server).trigger, "cache-scores", "score", {"goals": 3})
        clients = await connect_many(server.ws_url, 6)
        assert len(workers_of(clients)) >= 2
        for client in clients:
            await client.subscribe("cache-scores")
            frame = await client.wait_for("score", "cache-scores")
            index = client.frames.index(frame)
            assert client.frames[index - 1]["event"] == "pusher_internal:subscription_succeeded"
        await close_all([*clients, empty])

    run(go())


def test_subscription_count_events_across_workers(server: Server) -> None:
    async def go() -> None:
        clients = await connect_many(server.ws_url, 4)
        assert len(workers_of(clients)) >= 2
        for client in clients:
            await client.subscribe("counted")
        for client in clients:
            await client.wait(lambda f: f.get("event") == "pusher_internal:subscription_count"
                              and json.loads(f["data"]) == {"subscription_count": 4})
        await clients[0].close()
        for client in clients[1:]:
            await client.wait(lambda f: f.get("event") == "pusher_internal:subscription_count"
                              and json.loads(f["data"]) == {"subscription_count": 3})
        await close_all(clients[1:])

    run(go())


def test_unauthorized_connections_are_closed_with_4009(server: Server) -> None:
    url = f"ws://127.0.0.1:{server.port}/app/strict-key?protocol=7"

    async def go() -> None:
        idle, signed = await connect_many(url, 2, key="strict-key", secret="strict-secret")
        await signed.signin({"id": "ok"})
        code, _ = await asyncio.wait_for(idle.closed, 10)
        assert code == 4009
        await asyncio.sleep(1.5)
        assert not signed.closed.done()
        await signed.close()

    run(go())


def test_subscription_succeeded_means_routed_cluster_wide(server: Server) -> None:
    """Right after subscription_succeeded, an event published through any other worker
    reaches the new subscriber (no window where the broker does not yet route to it)."""

    async def go() -> None:
        clients = await connect_many(server.ws_url, 6)
        by_worker: dict[str, PusherClient] = {}
        for client in clients:
            by_worker.setdefault(client.socket_id.split(".")[0], client)
        assert len(by_worker) >= 2
        sender, receiver = list(by_worker.values())[:2]
        for n in range(25):
            await asyncio.sleep(0.12)  # stay under the 10 client events/s limit
            channel = f"private-race-{n}"
            await sender.subscribe(channel)
            await receiver.subscribe(channel)
            await sender.send({"event": "client-go", "channel": channel, "data": str(n)})
            frame = await receiver.wait_for("client-go", channel, timeout=5)
            assert frame["data"] == str(n)
        await close_all(clients)

    run(go())
