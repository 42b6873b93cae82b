"""The broker of a real `vask run --workers 2` survives hostile peers on its link.

A raw ZeroMQ DEALER joins the broker's ROUTER the way a worker does (HELLO), then sends
well-framed messages with bad contents, garbage, verbs meant for workers, a frame above
the ROUTER's MAXMSGSIZE, and a flood. Afterwards the broker is the same process (same
pid), it still answers, and the cluster still serves: a WebSocket client subscribes and
receives an event published through the HTTP API.

The broker's endpoint is the supervisor's ipc:// socket in its runtime folder, which
tests/servers.py puts in the server's scratch folder (TMPDIR).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pusher
import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from tests.pusher_client import close_all, connect_many
from tests.servers import APP_ID, APP_KEY, APP_SECRET, Server, process_name, run_vask
from vask import envelope
from vask.broker.server import MAX_FRAME_BYTES
from vask.envelope import (
    ENVELOPE_VERSION,
    Bye,
    Hello,
    Publish,
    Query,
    Reply,
    Subscribe,
    Verb,
    Welcome,
)

pytestmark = pytest.mark.timeout(120)

NAME = "attacker:1:9:1"
PREFIX = 42  # workers pick 9-digit prefixes, so this one is free


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with run_vask(workers=2) as srv:
        yield srv


def broker_endpoint(server: Server) -> str:
    sockets = list(server.log_path.parent.glob("vask-*/broker.sock"))
    assert len(sockets) == 1, sockets
    return f"ipc://{sockets[0]}"


def broker_pid(server: Server) -> int:
    pids = [p for p in server.children() if process_name(p) == "vask-broker"]
    assert len(pids) == 1, pids
    return pids[0]


class Peer:
    """A raw DEALER on the broker link, with hard timeouts on every wait."""

    def __init__(self, endpoint: str, name: str) -> None:
        self.sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, name.encode())
        self.sock.setsockopt(zmq.LINGER, 0)
        # Before connecting, so that no disconnection goes unseen.
        self.monitor: zmq.Socket[bytes] = self.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.sock.connect(endpoint)
        self.name = name

    def disconnected(self, timeout: float) -> bool:
        """Whether the broker dropped our connection within ``timeout`` seconds."""
        if not self.monitor.poll(int(timeout * 1000)):
            return False
        event = recv_monitor_message(self.monitor)
        return bool(event["event"] == zmq.EVENT_DISCONNECTED)

    def send(self, frames: list[bytes]) -> None:
        assert self.sock.poll(5000, zmq.POLLOUT), "broker link not writable"
        self.sock.send_multipart([bytes(8), *frames], copy=False)  # unnumbered

    def wait(self, wanted: type[Verb], timeout: float = 15.0,
             rid: int | None = None) -> Verb:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if not self.sock.poll(int(left * 1000) + 1):
                break
            for message in envelope.decode_many(self.sock.recv_multipart()[1:]):
                if isinstance(message, wanted) and (
                        rid is None or getattr(message, "rid", None) == rid):
                    return message
        raise AssertionError(f"no {wanted.__name__} from the broker within {timeout}s")

    def hello(self, prefix: int) -> None:
        hello = Hello(ENVELOPE_VERSION, self.name, 1, prefix, 1)
        for _ in range(3):  # a first message can be lost while the pipe connects
            self.send(envelope.encode(hello))
            try:
                welcome = self.wait(Welcome, timeout=5.0)
            except AssertionError:
                continue
            assert isinstance(welcome, Welcome) and welcome.ok, welcome
            return
        raise AssertionError("the broker did not welcome us")

    def close(self) -> None:
        self.sock.disable_monitor()
        self.monitor.close(linger=0)
        self.sock.close(linger=0)


def bad_messages() -> list[list[bytes]]:
    pub = envelope.encode(Publish(APP_ID, "news", "", 0.0, b"{}"))
    good_sub = envelope.encode(Subscribe(0, APP_ID, "news", f"{PREFIX}.1", None, 0))
    return [
        [b"SUB", b'[1,"1","presence-r","42.1",[],100]'],  # empty presence member
        [b"SUB", b'[1,"1","presence-r","42.1",[null,{}],100]'],
        [b"PUB", b'["1","cache-x","","60",false]', b"{}"],  # string cache_ttl
        [b"PUB", b'["1","news","",0,false]', b"{}", b"extra frame"],
        [b"SUB", b'["1","1","news","42.1",null,0]'],  # string rid
        [b"SUB", b'[1,1,"news","42.1",null,0]'],  # int app
        [b"OPEN", b'[1,"1","42.1",true]'],  # bool quota
        [b"SIGNIN", b'["1","42.1",{"id":"u"},[]]'],
        [b"Q", b'[1,"1","channels","prefix"]'],  # args not an object
        [b"UNSUB", b'["1","' + b"c" * 10_000 + b'","42.1"]'],  # over-long channel
        [b"CLOSE", b"\xff\xfe not json"],  # garbage header
        [b"SUB", b"[1,2"],
        [b"NOPE", b"[]"],  # unknown verb
        [b"HB"],  # too few frames
        [b"DLV", b'["1","news",""]', b"{}"],  # a broker -> worker verb
        [b"R", b'[1,{}]'],
        [b"BATCH", b'["x"]', *pub],  # bad batch counts
        [b"BATCH", b"[2,2]", *pub],  # counts do not match
        # a batch with a bad message between good ones
        envelope.encode_batch([good_sub, [b"SUB", b'[1,"1","p","42.1",[],1]'], pub]),
    ]


async def publish_reaches_a_subscriber(server: Server, channel: str) -> None:
    clients = await connect_many(server.ws_url, 2)
    try:
        for client in clients:
            await client.subscribe(channel)
        sdk = pusher.Pusher(app_id=APP_ID, key=APP_KEY, secret=APP_SECRET, host="127.0.0.1",
                            port=server.port, ssl=False, timeout=10)
        await asyncio.to_thread(sdk.trigger, channel, "ping", {"n": 1})
        for client in clients:
            frame = await client.wait_for("ping", channel, timeout=15)
            assert json.loads(frame["data"]) == {"n": 1}
    finally:
        await close_all(clients)


def test_malformed_messages_do_not_stop_the_broker(server: Server) -> None:
    pid = broker_pid(server)
    peer = Peer(broker_endpoint(server), NAME)
    try:
        peer.hello(PREFIX)
        bad = bad_messages()
        for _ in range(20):  # many of each: the log must not grow per message
            for frames in bad:
                peer.send(frames)
        # The broker is still handling this very peer, in order.
        peer.send(envelope.encode(Query(7, APP_ID, "counts", {"channels": ["news"]})))
        reply = peer.wait(Reply, rid=7)
        assert isinstance(reply, Reply)
        # the good SUB in the mixed batch was applied, the bad one next to it dropped
        assert reply.body == {"channels": {"news": {"subscription_count": 1,
                                                    "user_count": 0}}}
        peer.send(envelope.encode(Bye(NAME)))
    finally:
        peer.close()
    assert broker_pid(server) == pid
    asyncio.run(publish_reaches_a_subscriber(server, "after-bad-input"))
    # Dropped messages are logged at most once a second, with a count, never one line
    # each; and none of them reached the catch-all (no handler error).
    deadline = time.monotonic() + 10
    while "more bad messages dropped" not in server.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    log = server.log()
    assert "more bad messages dropped" in log
    lines = [line for line in log.splitlines() if "dropped a bad message" in line]
    assert 1 <= len(lines) <= 12, lines
    assert "error handling" not in log and "Traceback" not in log


def test_a_frame_above_the_size_limit_only_disconnects_its_sender(server: Server) -> None:
    pid = broker_pid(server)
    endpoint = broker_endpoint(server)
    big = Peer(endpoint, "attacker:1:10:1")
    try:
        big.hello(PREFIX + 1)
        # ZeroMQ checks MAXMSGSIZE per frame and drops the connection at the frame's
        # header, before reading the body.
        big.send([b"PUB", b'["1","news","",0,false]', b"x" * (MAX_FRAME_BYTES + 1)])
        assert big.disconnected(timeout=20)
    finally:
        big.close()
    assert broker_pid(server) == pid
    peer = Peer(endpoint, NAME)
    try:
        peer.hello(PREFIX)
        peer.send(envelope.encode(Query(8, APP_ID, "counts", {"channels": []})))
        assert peer.wait(Reply, rid=8) == Reply(8, {"channels": {}})
        peer.send(envelope.encode(Bye(NAME)))
    finally:
        peer.close()
    asyncio.run(publish_reaches_a_subscriber(server, "after-big-frame"))


def test_the_cluster_serves_while_a_peer_floods_the_broker(server: Server) -> None:
    # (How much the publish below overlaps the flood depends on the machine; that each
    # peer gets its share while another floods is shown turn by turn in
    # tests/test_broker_state.py. Here: a flood neither stops nor stalls the broker.)
    pid = broker_pid(server)
    peer = Peer(broker_endpoint(server), NAME)
    batches, per_batch = 200, 1000
    try:
        peer.hello(PREFIX)
        for b in range(batches):  # 200,000 subscribes on 200 connections
            peer.send(envelope.encode_batch([
                envelope.encode(Subscribe(0, APP_ID, f"flood-{i}", f"{PREFIX}.{b}", None, 0))
                for i in range(per_batch)]))
        peer.send(envelope.encode(Query(9, APP_ID, "counts", {"channels": ["flood-0"]})))
        # Meanwhile the real workers' subscribes and publishes get their share.
        asyncio.run(publish_reaches_a_subscriber(server, "during-flood"))
        reply = peer.wait(Reply, timeout=90, rid=9)
        assert reply == Reply(9, {"channels": {"flood-0": {"subscription_count": batches,
                                                            "user_count": 0}}})
        peer.send(envelope.encode(Bye(NAME)))  # purges all 200,000 subscriptions
    finally:
        peer.close()
    assert broker_pid(server) == pid
    asyncio.run(publish_reaches_a_subscriber(server, "after-flood"))
    # No real worker was purged for silence while the broker handled the flood. (The
    # fake peers of the tests before, which vanish without a goodbye, are purged that
    # way, possibly during this test: they are not what it is about.)
    purged = [line for line in server.log().splitlines()
              if "stopped heartbeating" in line and "attacker:" not in line]
    assert not purged, purged


def test_the_endpoint_helper_finds_the_supervisors_socket(server: Server) -> None:
    assert Path(broker_endpoint(server).removeprefix("ipc://")).is_socket()
