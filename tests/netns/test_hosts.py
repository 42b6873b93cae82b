"""Vask across simulated hosts: two `vask run` hosts, an active and a standby broker,
each in its own network namespace, linked over TCP with CURVE (tests/netns/conftest.py).

Clients connect from inside the host they use; the HTTP API is called from inside the
host too. Timings printed by these tests are what docs/scaling.md quotes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import pusher
import pytest
import websockets
import zmq

from tests.netns.conftest import BROKER_PORT, HEARTBEAT_TIMEOUT, PORT, Cluster
from tests.netns.net import inside
from tests.pusher_client import PusherClient, close_all, join_presence
from tests.servers import APP_ID, APP_KEY, APP_SECRET
from vask import envelope

pytestmark = pytest.mark.timeout(300)

ROOM = "presence-room"
STREAM = "stream"


async def connect(c: Cluster, host: str) -> PusherClient:
    """A Pusher client on ``host``, connected from inside its namespace."""
    addr = c.addr(host)
    with inside(c.net.ns(host)):
        sock = socket.create_connection((addr, PORT), timeout=5)
    sock.setblocking(False)
    url = f"ws://{addr}:{PORT}/app/{APP_KEY}?protocol=7&client=test&version=1"
    ws = await asyncio.wait_for(websockets.connect(url, sock=sock, open_timeout=10), 10)
    client = PusherClient(ws, APP_KEY, APP_SECRET)
    frame = await client.wait_for("pusher:connection_established")
    client.socket_id = json.loads(frame["data"])["socket_id"]
    return client


def sdk(c: Cluster, host: str) -> pusher.Pusher:
    return pusher.Pusher(app_id=APP_ID, key=APP_KEY, secret=APP_SECRET, host=c.addr(host),
                         port=PORT, ssl=False, timeout=10)


async def api(c: Cluster, host: str, call: Callable[[pusher.Pusher], Any]) -> Any:
    """An HTTP API call made from inside ``host`` (in a thread: the loop keeps going)."""
    def run() -> Any:
        with inside(c.net.ns(host)):
            return call(sdk(c, host))
    return await asyncio.to_thread(run)


async def join(client: PusherClient, user: str, timeout: float = 20.0) -> None:
    await join_presence(client, ROOM, user, time.monotonic() + timeout)


def roster(client: PusherClient) -> set[str]:
    """The presence roster as the client's events tell it."""
    members: set[str] = set()
    for frame in client.frames:
        if frame.get("channel") != ROOM:
            continue
        data = json.loads(frame["data"]) if isinstance(frame.get("data"), str) else {}
        event = frame.get("event")
        if event == "pusher_internal:subscription_succeeded":
            members = set(data["presence"]["ids"])
        elif event == "pusher_internal:member_added":
            members.add(data["user_id"])
        elif event == "pusher_internal:member_removed":
            members.discard(data["user_id"])
    return members


async def until(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll ``condition`` until it holds (the monotonic time it did) or fail."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)
    return time.monotonic()


async def api_users(c: Cluster, host: str) -> set[str]:
    body = await api(c, host, lambda s: s.users_info(ROOM))
    return {u["id"] for u in body["users"]}


def test_fanout_presence_client_events_and_api_across_hosts(cluster: Cluster) -> None:
    async def main() -> None:
        a, b = await connect(cluster, "h1"), await connect(cluster, "h2")
        for client in (a, b):
            frame = await client.subscribe(STREAM)
            assert frame["event"] == "pusher_internal:subscription_succeeded", frame
        # fan-out: published on h1's API, received on both hosts
        await api(cluster, "h1", lambda s: s.trigger(STREAM, "tick", {"n": 1}))
        for client in (a, b):
            frame = await client.wait_for("tick", STREAM)
            assert json.loads(frame["data"]) == {"n": 1}
        # presence: a join on h1 is seen on h2 and the other way round
        await join(a, "alice")
        await join(b, "bob")
        await a.wait(lambda f: f.get("event") == "pusher_internal:member_added"
                     and json.loads(f["data"])["user_id"] == "bob")
        assert roster(a) == roster(b) == {"alice", "bob"}
        # client events: from h2 to h1, not echoed to the sender
        await b.send({"event": "client-hi", "channel": ROOM, "data": {"from": "bob"}})
        frame = await a.wait_for("client-hi", ROOM)
        data = frame["data"]
        assert (json.loads(data) if isinstance(data, str) else data) == {"from": "bob"}
        assert not b.events("client-hi", ROOM)
        # the HTTP API on either host answers with the cluster's counts
        for host in ("h1", "h2"):
            assert await api_users(cluster, host) == {"alice", "bob"}
            info = await api(cluster, host, lambda s: s.channel_info(
                STREAM, ["subscription_count"]))
            assert info["subscription_count"] == 2, info
            room = await api(cluster, host, lambda s: s.channel_info(ROOM, ["user_count"]))
            assert room["user_count"] == 2, room
        await close_all([a, b])
    asyncio.run(main())


def test_a_whole_host_dies_and_its_members_leave_everywhere(cluster: Cluster) -> None:
    async def main() -> None:
        a, b = await connect(cluster, "h1"), await connect(cluster, "h2")
        await join(a, "alice")
        await join(b, "bob")
        await until(lambda: roster(a) == {"alice", "bob"}, 5, "alice to see bob")
        # the host vanishes: its cable first (nothing it says gets out), then its
        # processes; only the broker's heartbeat timeout can notice
        cluster.net.unplug("h2")
        died = time.monotonic()
        cluster.hosts["h2"].kill()
        gone = await until(lambda: roster(a) == {"alice"}, HEARTBEAT_TIMEOUT + 5,
                           "bob's member_removed on h1")
        print(f"\nhost killed -> member_removed on the other host: {gone - died:.2f}s "
              f"(heartbeat_timeout {HEARTBEAT_TIMEOUT}s)")
        assert gone - died < HEARTBEAT_TIMEOUT + 2.0
        assert await api_users(cluster, "h1") == {"alice"}
        await close_all([a])
        b.ws.transport.abort()
    asyncio.run(main())


def test_partition_and_heal_converge(cluster: Cluster) -> None:
    async def main() -> None:
        a, b = await connect(cluster, "h1"), await connect(cluster, "h2")
        await join(a, "alice")
        await join(b, "bob")
        await until(lambda: roster(a) == roster(b) == {"alice", "bob"}, 5, "both rosters")
        cluster.net.unplug("h2")  # h2 and its clients are cut off from everything else
        await until(lambda: roster(a) == {"alice"}, HEARTBEAT_TIMEOUT + 5,
                    "bob removed on h1 during the partition")
        # changes on both sides while apart: a newcomer on h1, bob's own view unchanged
        c = await connect(cluster, "h1")
        await join(c, "carol")
        await asyncio.sleep(HEARTBEAT_TIMEOUT)
        healed = time.monotonic()
        cluster.net.plug("h2")
        expected = {"alice", "bob", "carol"}
        done = await until(lambda: roster(a) == roster(b) == roster(c) == expected,
                           4 * HEARTBEAT_TIMEOUT + 15, "rosters to converge after the heal")
        print(f"\npartition healed -> every roster converged: {done - healed:.2f}s")
        for host in ("h1", "h2"):
            assert await api_users(cluster, host) == expected
        # and fan-out works across the healed link
        for client in (a, b):
            await client.subscribe(STREAM)
        await api(cluster, "h2", lambda s: s.trigger(STREAM, "tick", {"n": 7}))
        for client in (a, b):
            await client.wait_for("tick", STREAM)
        await close_all([a, b, c])
    asyncio.run(main())


class Publisher(threading.Thread):
    """Triggers numbered events from inside ``host`` until stopped; records which were
    acknowledged (2xx) and when each call was made."""

    def __init__(self, cluster: Cluster, host: str, interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.cluster, self.host, self.interval = cluster, host, interval
        self.acked: dict[int, float] = {}
        #: when each acknowledged call returned
        self.answered: dict[int, float] = {}
        self.refused = 0
        self.halt = threading.Event()

    def run(self) -> None:
        with inside(self.cluster.net.ns(self.host)):
            client = sdk(self.cluster, self.host)
            n = 0
            while not self.halt.is_set():
                began = time.monotonic()
                try:
                    client.trigger(STREAM, "tick", {"n": n})
                    self.acked[n] = began
                    self.answered[n] = time.monotonic()
                except Exception:  # the SDK raises several kinds; a 503 among them
                    self.refused += 1
                n += 1
                time.sleep(self.interval)


def ticks(client: PusherClient) -> set[int]:
    return {json.loads(f["data"])["n"] for f in client.events("tick", STREAM)}


def test_broker_failover_loses_no_acknowledged_publish(cluster: Cluster) -> None:
    async def main() -> None:
        subs = [await connect(cluster, h) for h in ("h1", "h2", "h1", "h2")]
        for client in subs:
            await client.subscribe(STREAM)
        a, b = await connect(cluster, "h1"), await connect(cluster, "h2")
        await join(a, "alice")
        await join(b, "bob")
        publisher = Publisher(cluster, "h1")
        publisher.start()
        await asyncio.sleep(1.0)
        killed_n = max(publisher.acked)
        killed = time.monotonic()
        cluster.brokers["b1"].kill()  # the active broker, without a word
        # full delivery again: an event published after the kill reaches every
        # subscriber on both hosts (through the standby)
        def delivered_after_kill() -> bool:
            got = [ticks(s) for s in subs]
            return any(all(n in g for g in got)
                       for n, t in list(publisher.acked.items()) if t > killed)
        back = await until(delivered_after_kill, 4 * HEARTBEAT_TIMEOUT + 20,
                           "delivery through the standby broker")
        failover = back - killed
        # the old broker comes back: everyone returns to it (it is first in the list)
        restarted = time.monotonic()
        cluster.start_broker("b1")
        def moved_back() -> bool:
            return sum(log.count("a preferred broker answers again")
                       for log in (cluster.hosts["h1"].log(), cluster.hosts["h2"].log())) >= 2
        moved = await until(moved_back, 4 * HEARTBEAT_TIMEOUT + 20, "workers moving back")
        last = max(publisher.acked)
        await until(lambda: all(last in ticks(s) for s in subs), 4 * HEARTBEAT_TIMEOUT + 20,
                    "delivery through the restarted first broker")
        await asyncio.sleep(1.0)
        publisher.halt.set()
        await asyncio.to_thread(publisher.join, 30)
        acked = set(publisher.acked)
        assert len(acked) > 50, f"only {len(acked)} acknowledged, {publisher.refused} refused"
        for client in subs:
            end = time.monotonic() + 5
            while not acked <= ticks(client) and time.monotonic() < end:
                await asyncio.sleep(0.05)
            missing = sorted(acked - ticks(client))
            timing = [(n, round(publisher.acked[n] - killed, 3),
                       round(publisher.answered[n] - killed, 3)) for n in missing[:5]]
            assert not missing, (f"{client.socket_id} missed acknowledged {missing[:20]}; "
                                 f"the kill came after #{killed_n}; (n, call, answer) "
                                 f"relative to the kill: {timing}")
        assert roster(a) == roster(b) == {"alice", "bob"}
        assert await api_users(cluster, "h2") == {"alice", "bob"}
        print(f"\nbroker kill -> full delivery through the standby: {failover:.2f}s "
              f"(heartbeat_timeout {HEARTBEAT_TIMEOUT}s); first broker restarted -> "
              f"both hosts back on it: {moved - restarted:.2f}s; {len(acked)} publishes "
              f"acknowledged, {publisher.refused} refused (503) and retried by nobody, "
              "none lost")
        await close_all([*subs, a, b])
    asyncio.run(main())


def test_a_peer_without_an_authorized_key_cannot_join_or_read(cluster: Cluster) -> None:
    """From a host on the same network: a plain (NULL) ZeroMQ peer, and a CURVE peer
    with a valid-looking key pair that is not authorized, each say hello and listen
    while events flow; neither hears anything, and the cluster carries on."""
    keys = cluster.keys
    addr = f"tcp://{cluster.addr('b1')}:{BROKER_PORT}"
    context = zmq.Context()
    peers = []
    try:
        with inside(cluster.net.ns("x")):
            plain = context.socket(zmq.DEALER)
            plain.setsockopt(zmq.IDENTITY, b"x:1:0:1")
            plain.connect(addr)
            stranger = context.socket(zmq.DEALER)
            stranger.setsockopt(zmq.IDENTITY, b"x:2:0:1")
            public, secret = zmq.auth.load_certificate(keys / "stranger.key_secret")
            server, _ = zmq.auth.load_certificate(keys / "broker.key")
            stranger.curve_publickey, stranger.curve_secretkey = public, secret
            stranger.curve_serverkey = server
            stranger.connect(addr)
            peers = [plain, stranger]
        hello = envelope.encode(envelope.Hello(envelope.ENVELOPE_VERSION, "x:1:0:1", 1,
                                               123456789, 1))
        for sock in peers:
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDTIMEO, 1000)
            # a peer that never completes its handshake may not even queue this
            with contextlib.suppress(zmq.Again):
                sock.send_multipart([bytes(8), *hello])

        async def main() -> None:
            a = await connect(cluster, "h1")
            await a.subscribe(STREAM)
            for n in range(20):
                await api(cluster, "h2", lambda s, n=n: s.trigger(STREAM, "tick", {"n": n}))
            await until(lambda: len(ticks(a)) == 20, 10, "the cluster's own delivery")
            await close_all([a])
        asyncio.run(main())
        deadline = time.monotonic() + 3
        for sock in peers:
            left = max(0.0, deadline - time.monotonic())
            assert not sock.poll(int(left * 1000)), "an unauthorized peer got an answer"
        assert not cluster.hosts["h1"].log().count("moving to broker")
    finally:
        for sock in peers:
            sock.close(0)
        context.term()
