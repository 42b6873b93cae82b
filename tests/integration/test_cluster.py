"""Cross-worker behaviour on a real `vask run --workers 3`.

A connection's socket id starts with its worker's prefix, so tests place the clients
involved on chosen workers (``connect_spread`` / ``connect_on_worker``) instead of hoping
that SO_REUSEPORT spreads them. Checks that something did *not* arrive wait for a marker
event that the test causes afterwards on an ordered path (``PusherClient.absent``),
never for a fixed time.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Callable, Collection, Iterator

import pusher
import pytest

from tests.pusher_client import (
    Frame,
    PusherClient,
    close_all,
    connect_many,
    connect_on_worker,
    connect_spread,
    worker_of,
    workers_of,
)
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


def sdk(server: Server) -> pusher.Pusher:
    return pusher.Pusher(app_id=APP_ID, key=APP_KEY, secret=APP_SECRET, host="127.0.0.1",
                         port=server.port, ssl=False, timeout=10)


def member_ids(client: PusherClient, event: str, channel: str) -> list[str]:
    return [json.loads(f["data"])["user_id"] for f in client.events(event, channel)]


def member_event(event: str, channel: str, user: str | None = None,
                 but: Collection[str] = ()) -> Callable[[Frame], bool]:
    """A predicate: ``event`` on ``channel`` (for ``user``, or for anyone not in ``but``)."""
    def match(f: Frame) -> bool:
        if f.get("event") != event or f.get("channel") != channel:
            return False
        uid = json.loads(f["data"])["user_id"]
        return uid == user if user is not None else uid not in but
    return match


def test_presence_members_across_workers(server: Server) -> None:
    async def go() -> None:
        channel = "presence-room"
        # u0..u7 over all three workers; u8 on u0's worker (see the leaving below)
        clients = await connect_spread(server.ws_url, 8, 3)
        clients.append(await connect_on_worker(server.ws_url, want=worker_of(clients[0])))
        assert len(workers_of(clients)) == 3
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
        # a second tab of u0 on another worker: no member_added anywhere
        tab = await connect_on_worker(server.ws_url, avoid={worker_of(clients[0])})
        await tab.subscribe(channel, json.dumps({"user_id": "u0", "user_info": {"n": 0}}))
        # The first tab of u0 leaves: u0 is still present, so no member_removed. Then u8,
        # on the same worker, leaves: that worker tells the broker in this order, and the
        # broker tells every worker in order, so a wrong member_removed(u0) (or any other)
        # would reach each client before member_removed(u8), the marker.
        await clients[0].close()
        await clients[8].close()
        removed = "pusher_internal:member_removed"
        for client in [*clients[1:8], tab]:
            await client.absent(member_event(removed, channel, but={"u8"}),
                                marker=member_event(removed, channel, "u8"))
        for client in clients[1:8]:
            assert member_ids(client, removed, channel) == ["u8"]
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
        clients = await connect_spread(server.ws_url, 8, 3)
        for client in clients:
            await client.subscribe("private-chat")
        sender = clients[0]
        await sender.send({"event": "client-typing", "channel": "private-chat",
                           "data": {"on": True}})
        for client in clients[1:]:
            frame = await client.wait_for("client-typing")
            assert frame == {"event": "client-typing", "channel": "private-chat",
                             "data": {"on": True}}
        # Every receiver has it. The sender's worker delivered it locally and sent it to
        # each other worker (straight, workers/siblings.py) in the same loop turn, so
        # anything else that event produced (an echo to the sender, a duplicate) was on
        # its way before the marker, which is published only now.
        await asyncio.to_thread(sdk(server).trigger, "private-chat", "marker", {})
        await sender.absent(lambda f: f.get("event") == "client-typing",
                            marker=lambda f: f.get("event") == "marker")
        for client in clients[1:]:
            await client.wait_for("marker")
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
        # three clients per worker: the excluded one shares its worker with two others
        clients = await connect_spread(server.ws_url, 9, 3)
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
        # the broker has handled the headline (everyone else has it): a later marker
        # reaches the excluded client's worker after the headline would have
        await asyncio.to_thread(sdk(server).trigger, "news", "marker", {})
        await excluded.absent(lambda f: f.get("event") == "headline",
                              marker=lambda f: f.get("event") == "marker")
        info = await asyncio.to_thread(sdk(server).channel_info, "news",
                                       ["subscription_count"])
        assert info == {"occupied": True, "subscription_count": 9}
        await close_all(clients)

    run(go())


def test_sigkill_of_a_worker_removes_exactly_its_members() -> None:
    with run_vask(workers=3, config=CONFIG) as srv:
        async def go() -> None:
            # four clients on each of the three workers, so whichever worker is killed,
            # it holds members and others survive
            clients = await connect_spread(srv.ws_url, 12, 3)
            for n, client in enumerate(clients):
                await client.subscribe("presence-k", json.dumps({"user_id": f"k{n}"}))
            victims = [p for p in srv.children() if process_name(p).startswith("vask-worker")]
            assert len(victims) == 3
            os.kill(victims[0], signal.SIGKILL)
            # the worker's clients lose their connection: exactly one worker's four
            first, _ = await asyncio.wait([c.closed for c in clients], timeout=15,
                                          return_when=asyncio.FIRST_COMPLETED)
            assert first, "no client was disconnected by the SIGKILL"
            dead_worker = worker_of(next(c for c in clients if c.closed.done()))
            dead = [c for c in clients if worker_of(c) == dead_worker]
            alive = [c for c in clients if worker_of(c) != dead_worker]
            await asyncio.wait_for(asyncio.gather(*(c.closed for c in dead)), 15)
            assert (len(dead), len(alive)) == (4, 8)
            assert not any(c.closed.done() for c in alive)
            gone = sorted(f"k{clients.index(c)}" for c in dead)
            removed = "pusher_internal:member_removed"
            for client in alive:
                await client.wait(lambda f, c=client: sorted(
                    member_ids(c, removed, "presence-k")) == gone, timeout=15)
            # Marker: a new member joins through the restarted worker (a prefix none of
            # the first clients had). That worker accepts connections only after the
            # broker welcomed it, so the broker handles the newcomer's subscribe after
            # the purge and after the successor's hello: a wrong member_removed caused
            # by either reaches each client before member_added(k-new).
            newcomer = await connect_on_worker(srv.ws_url, avoid=workers_of(clients))
            await newcomer.subscribe("presence-k", json.dumps({"user_id": "k-new"}))
            for client in alive:
                await client.absent(
                    member_event(removed, "presence-k", but=gone),
                    marker=member_event("pusher_internal:member_added", "presence-k",
                                        "k-new"), timeout=15)
                assert sorted(member_ids(client, removed, "presence-k")) == gone
            await close_all([*alive, newcomer])

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
        # the slot is free once the broker has handled the close: until then a new
        # connection may still be refused, so retry (bounded) instead of sleeping
        deadline = asyncio.get_running_loop().time() + 15
        while True:
            again = await PusherClient.connect(url, established=False)
            first = await again.wait(lambda f: f.get("event") in (
                "pusher:connection_established", "pusher:error"))
            if first["event"] == "pusher:connection_established":
                break
            assert first["data"]["code"] == 4004, first
            assert asyncio.get_running_loop().time() < deadline, "the slot never came free"
            await again.close()
            await asyncio.sleep(0.05)
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
        clients = await connect_spread(server.ws_url, 6, 3)
        for client in clients:
            await client.subscribe("cache-scores")
            frame = await client.wait_for("score", "cache-scores")
            index = client.frames.index(frame)
            assert client.frames[index - 1]["event"] == "pusher_internal:subscription_succeeded"
        await close_all([*clients, empty])

    run(go())


def test_subscription_count_events_across_workers(server: Server) -> None:
    async def go() -> None:
        clients = await connect_spread(server.ws_url, 4, 3)
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
        signed = await PusherClient.connect(url, key="strict-key", secret="strict-secret")
        assert (await signed.signin({"id": "ok"}))["event"] == "pusher:signin_success"
        # an unsigned connection on the same worker, opened later: by the time its
        # deadline closes it, the signed one's deadline has passed too (same sweep)
        idle = await connect_on_worker(url, want=worker_of(signed), key="strict-key",
                                       secret="strict-secret")
        code, _ = await asyncio.wait_for(idle.closed, 10)
        assert code == 4009
        # a ping answered after that shows the signed connection is still open (a close
        # frame would have come before the pong)
        await signed.send({"event": "pusher:ping", "data": {}})
        await signed.wait_for("pusher:pong")
        assert not signed.closed.done()
        await signed.close()

    run(go())


def test_subscription_succeeded_means_routed_cluster_wide(server: Server) -> None:
    """Right after subscription_succeeded, an event published through any other worker
    reaches the new subscriber (no window where the broker does not yet route to it)."""

    async def go() -> None:
        sender = await PusherClient.connect(server.ws_url)
        receiver = await connect_on_worker(server.ws_url, avoid={worker_of(sender)})
        clients = [sender, receiver]
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
