"""Loss on the worker <-> broker link is detected and repaired by a resync.

Both sides number their ZeroMQ messages. Here messages are lost on purpose: the test
plays one side with a raw socket and skips a number, and the real other side (the
broker loop, or a worker's BrokerLink) must notice and resync, after which the broker's
state is right again.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import zmq

from vask import envelope
from vask.broker.server import Broker
from vask.config import App, Settings
from vask.envelope import (
    ENVELOPE_VERSION,
    Heartbeat,
    Hello,
    Recovered,
    Resync,
    Subscribe,
    Synced,
    Unsubscribe,
    Verb,
    Welcome,
)
from vask.workers.broker_link import BrokerLink

APP = App(id="1", key="k", secret="s")


def numbered(seq: int, *messages: Verb) -> list[bytes]:
    return [seq.to_bytes(8, "big"),
            *envelope.encode_batch([envelope.encode(m) for m in messages])]


def take(sock: zmq.Socket[bytes], timeout_ms: int = 2000) -> list[tuple[int, list[Verb]]]:
    """Every ZeroMQ message waiting on ``sock``: (sequence number, messages)."""
    out = []
    if sock.poll(timeout_ms):
        while sock.poll(0):
            frames = sock.recv_multipart()
            if sock.type == zmq.ROUTER:
                frames = frames[1:]
            out.append((int.from_bytes(frames[0], "big"), envelope.decode_many(frames[1:])))
    return out


@contextlib.asynccontextmanager
async def linked(**callbacks: Any) -> AsyncIterator[tuple[zmq.Socket[bytes], BrokerLink]]:
    """A real worker-side BrokerLink connected to a raw ROUTER that plays the broker."""
    router: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    endpoint = f"inproc://link-{uuid.uuid4().hex}"
    router.bind(endpoint)
    settings = Settings(apps=(APP,), heartbeat_interval=3600.0, heartbeat_timeout=7200.0)
    link = BrokerLink(settings, endpoint, 0, lambda messages: None, lambda replay: None,
                      **callbacks)
    try:
        yield router, link
    finally:
        link.close()
        router.close(linger=0)


async def settle(link: BrokerLink) -> None:
    """Let the link take what the fake broker sent."""
    for _ in range(20):
        link.drain()
        await asyncio.sleep(0.01)


def turns(broker: Broker, sock: zmq.Socket[bytes]) -> list[Verb]:
    got: list[Verb] = []
    for _ in range(20):
        broker.turn()
        got += [m for _, batch in take(sock, 5) for m in batch]
    return got


def test_a_lost_worker_message_makes_the_broker_ask_for_a_resync(broker: Broker) -> None:
    worker: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    worker.setsockopt(zmq.IDENTITY, b"w")
    worker.setsockopt(zmq.LINGER, 0)
    worker.connect(broker.endpoint)
    broker.state.expected_workers = 1  # recovery ends with this worker's SYNCED
    try:
        hello = Hello(ENVELOPE_VERSION, "w", 1, 100, 1)
        worker.send_multipart(numbered(1, hello, Synced(1)))
        first = turns(broker, worker)
        assert Welcome(True, broker.epoch, "") in first and Recovered(broker.epoch) in first
        worker.send_multipart(numbered(2, Subscribe(0, "1", "news", "100.1", None, 0)))
        turns(broker, worker)
        assert ("1", "news") in broker.state.channels
        # Message 3 (the unsubscribe) is lost on the way; message 4 arrives.
        lost = numbered(3, Unsubscribe("1", "news", "100.1"))
        assert lost  # never sent
        worker.send_multipart(numbered(4, Heartbeat(1)))
        assert Resync(broker.epoch) in turns(broker, worker)
        assert broker.link_gaps == 1
        # The worker resyncs: hello, its replay (the connection no longer holds
        # "news"), SYNCED. The broker's state is right again, and every worker is told
        # to compare rosters.
        worker.send_multipart(numbered(5, hello, Synced(1)))
        after = turns(broker, worker)
        assert Welcome(True, broker.epoch, "") in after
        assert Recovered(broker.epoch) in after
        assert ("1", "news") not in broker.state.channels
    finally:
        worker.close(linger=0)


def test_a_lost_broker_message_makes_the_worker_resync() -> None:
    async def go() -> None:
        recovered: list[bool] = []
        failed: list[object] = []
        async with linked(on_recovered=lambda: recovered.append(True)) as (router, link):
            link.start()
            identity, *_ = await asyncio.to_thread(router.recv_multipart)

            def to_worker(seq: int, *messages: Verb) -> None:
                router.send_multipart([identity, *numbered(seq, *messages)])

            to_worker(1, Welcome(True, 77, ""))
            await settle(link)
            assert link.welcomed
            to_worker(2, Recovered(77))
            await settle(link)
            assert recovered == [True]
            link.request(Subscribe(0, "1", "p", "1.1", None, 0), failed.append)
            # Message 3 is lost; 4 arrives: the worker says hello again at once, and
            # the request still waiting is answered None (its answer may be lost).
            to_worker(4, Heartbeat(77))
            await settle(link)
            assert not link.welcomed
            assert link.counters["link_gaps"] == 1
            assert failed == [None]
            hellos = [m for _, batch in take(router) for m in batch if isinstance(m, Hello)]
            assert hellos

    asyncio.run(go())


def test_a_huge_turn_leaves_in_numbered_batches() -> None:
    """A replay of thousands of connections must not be one enormous ZeroMQ message: the
    broker could not interleave other workers while it works through it."""
    async def go() -> None:
        async with linked() as (router, link):
            for i in range(2500):
                link.send(Subscribe(0, "1", f"c{i}", "1.1", None, 0))
            link.flush()
            got = take(router)
            assert [seq for seq, _ in got] == [1, 2, 3]
            assert [len(batch) for _, batch in got] == [1024, 1024, 452]

    asyncio.run(go())


def test_a_worker_whose_prefix_is_taken_picks_another_and_says_hello_again() -> None:
    async def go() -> None:
        async with linked() as (router, link):
            link.start()
            identity, *_ = await asyncio.to_thread(router.recv_multipart)
            first = link.prefix
            router.send_multipart([identity, *numbered(1, Welcome(False, 77,
                                                                  "socket id prefix in use"))])
            await settle(link)
            assert not link.welcomed and link.prefix != first
            hellos = [m for _, batch in take(router) for m in batch if isinstance(m, Hello)]
            assert hellos and hellos[-1].prefix == link.prefix

    asyncio.run(go())


def test_an_unroutable_batch_to_a_known_worker_refuses_the_flush_acknowledgements(
        broker: Broker, monkeypatch: Any) -> None:
    """ZeroMQ answers EHOSTUNREACH for a known worker whose connection is being torn
    down or replaced: an event routed to it in the same flush is refused (503), not
    acknowledged, as when its queue is full."""
    from vask.broker import server
    from vask.envelope import Reply

    worker: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    worker.setsockopt(zmq.IDENTITY, b"w")
    worker.setsockopt(zmq.LINGER, 0)
    worker.connect(broker.endpoint)
    broker.state.expected_workers = 1
    try:
        worker.send_multipart(numbered(1, Hello(ENVELOPE_VERSION, "w", 1, 100, 1), Synced(1)))
        assert Recovered(broker.epoch) in turns(broker, worker)
        real = server.send_frames

        def unroutable(sock: Any, frames: list[bytes], flags: int) -> None:
            if frames[0] == b"w":
                raise zmq.ZMQError(zmq.EHOSTUNREACH)
            real(sock, frames, flags)

        publisher = b"publisher"
        monkeypatch.setattr(server, "send_frames", unroutable)
        broker.send([(b"w", Heartbeat(broker.epoch))])
        broker.acks.append((publisher, Reply(7, {"ok": True}), (b"w",)))
        answers: list[tuple[bytes, Verb]] = []
        monkeypatch.setattr(broker, "send", lambda out: answers.extend(out))
        broker.flush()
        assert [(who, reply.rid, reply.body["ok"]) for who, reply in answers
                if isinstance(reply, Reply)] == [(publisher, 7, False)]
    finally:
        worker.close(linger=0)
