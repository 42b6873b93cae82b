"""Client events between sibling workers (workers/siblings.py), without the broker.

Several Siblings objects share one directory in one event loop, each with a fake worker
whose channel index records what it was asked to deliver. Real Unix sockets, no broker.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from vask.config import Webhook, load_settings
from vask.metrics import WorkerMetrics
from vask.workers import siblings as siblings_module
from vask.workers.outbound import Corker
from vask.workers.siblings import Siblings, hooked_apps, parse
from vask.workers.wsframe import text_frame

PAYLOAD = b'{"event":"client-typing","channel":"private-chat","data":"{}"}'


class FakeIndex:
    def __init__(self) -> None:
        self.delivered: list[tuple[str, str, str, bytes]] = []

    def fan_out(self, app_id: str, channel: str, exclude: str, data: bytes,
                frames: int = 1) -> None:
        self.delivered.append((app_id, channel, exclude, data))


def fake_worker(loop: asyncio.AbstractEventLoop, settings: Any = None) -> Any:
    settings = settings or load_settings(env={})
    return SimpleNamespace(loop=loop, settings=settings, index=FakeIndex(),
                           corker=Corker(loop, 262_144),
                           metrics=WorkerMetrics([a.id for a in settings.apps]))


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def make(loop: asyncio.AbstractEventLoop, directory: Path, name: str,
         settings: Any = None) -> Siblings:
    """A Siblings as process ``name`` would make it (the socket is named by pid)."""
    real = os.getpid
    os.getpid = lambda: int(name)  # type: ignore[assignment]
    try:
        return Siblings(fake_worker(loop, settings), str(directory))
    finally:
        os.getpid = real  # type: ignore[assignment]


def settle(loop: asyncio.AbstractEventLoop, done: Any = None, timeout: float = 10.0) -> None:
    """Run the loop until ``done()`` (or, without it, for 0.1 s); fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    turns = 0
    while (done is None and turns < 20) or (done is not None and not done()):
        assert time.monotonic() < deadline, "not settled in time"
        loop.run_until_complete(asyncio.sleep(0.005))
        turns += 1


def delivered(s: Siblings) -> list[tuple[str, str, str, bytes]]:
    return s.worker.index.delivered  # type: ignore[no-any-return]


def test_a_client_event_reaches_every_sibling_once_and_not_the_sender(
        loop: asyncio.AbstractEventLoop, tmp_path: Path) -> None:
    a, b, c = (make(loop, tmp_path, n) for n in ("101", "102", "103"))
    assert a.send("1", "private-chat", "101.7", PAYLOAD)
    settle(loop, lambda: delivered(b) and delivered(c))
    expected = [("1", "private-chat", "101.7", text_frame(PAYLOAD))]
    assert delivered(b) == expected
    assert delivered(c) == expected
    assert delivered(a) == []
    assert a.counts["sent"] == 2 and b.counts["received"] == 1
    for s in (a, b, c):
        s.close()
    assert os.listdir(tmp_path) == []


def test_many_events_arrive_in_order_and_whole(loop: asyncio.AbstractEventLoop,
                                               tmp_path: Path) -> None:
    a, b = make(loop, tmp_path, "201"), make(loop, tmp_path, "202")
    big = b"x" * 100_000  # several reads' worth, split across recv calls
    sent = [f'{{"n":{i}}}'.encode() + (big if i % 50 == 0 else b"") for i in range(500)]
    for payload in sent:
        assert a.send("1", "presence-room", "", payload)
    settle(loop, lambda: len(delivered(b)) >= len(sent))
    assert [d[3] for d in delivered(b)] == [text_frame(p) for p in sent]
    a.close()
    b.close()


def test_a_sibling_that_starts_later_gets_the_next_event(
        loop: asyncio.AbstractEventLoop, tmp_path: Path) -> None:
    a, b = make(loop, tmp_path, "301"), make(loop, tmp_path, "302")
    assert a.send("1", "private-a", "", b"1")
    listed = os.stat(tmp_path).st_mtime_ns
    c = make(loop, tmp_path, "303")
    # File times advance in clock ticks: a socket bound within the tick of a's listing
    # leaves the directory's time as a listed it. Make it so, every time.
    os.utime(tmp_path, ns=(listed, listed))
    assert a.send("1", "private-a", "", b"2")
    settle(loop, lambda: delivered(c) and len(delivered(b)) >= 2)
    assert [d[3] for d in delivered(c)] == [text_frame(b"2")]
    assert [d[3] for d in delivered(b)] == [text_frame(b"1"), text_frame(b"2")]
    for s in (a, b, c):
        s.close()


def test_a_sibling_that_stopped_is_let_go_and_a_dead_socket_removed(
        loop: asyncio.AbstractEventLoop, tmp_path: Path) -> None:
    a, b = make(loop, tmp_path, "401"), make(loop, tmp_path, "402")
    assert a.send("1", "private-a", "", b"1")
    settle(loop, lambda: delivered(b))
    b.close()
    # a worker killed without cleaning up: its socket file stays, nobody listens
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(tmp_path / "499"))
    dead.close()
    c = make(loop, tmp_path, "403")
    assert a.send("1", "private-a", "", b"2")
    settle(loop, lambda: delivered(c))
    assert sorted(os.path.basename(p) for p in a.peers) == ["403"]
    assert sorted(os.listdir(tmp_path)) == ["401", "403"]  # the dead one is removed
    assert [d[3] for d in delivered(c)] == [text_frame(b"2")]
    a.close()
    c.close()


def test_a_socket_is_listed_only_once_it_listens(loop: asyncio.AbstractEventLoop,
                                                 tmp_path: Path) -> None:
    """A sibling starting up binds under a hidden name: one seen before it listens
    would be refused, taken for dead and removed, and never reached again."""
    a = make(loop, tmp_path, "801")
    starting = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    starting.bind(str(tmp_path / ".802"))  # bound, not yet listening
    assert a.send("1", "private-a", "", b"1")
    assert a.peers == {}
    assert sorted(os.listdir(tmp_path)) == [".802", "801"]  # not taken for dead
    starting.close()
    a.close()


def test_an_app_with_client_event_webhooks_goes_through_the_broker(
        loop: asyncio.AbstractEventLoop, tmp_path: Path) -> None:
    settings = load_settings(env={})
    hooked = replace(settings.apps[0], webhooks=(
        Webhook(url="http://127.0.0.1:9/hook", event_types=("client_event",)),))
    settings = replace(settings, apps=(hooked,))
    assert hooked_apps(settings) == {hooked.id}
    a = make(loop, tmp_path, "501", settings)
    b = make(loop, tmp_path, "502", settings)
    assert not a.send(hooked.id, "private-a", "", b"1")
    settle(loop)
    assert delivered(b) == []
    # a reload that removes the webhook sends them straight again
    a.reload(load_settings(env={}))
    assert a.send(hooked.id, "private-a", "", b"2")
    a.close()
    b.close()


def test_a_sibling_that_does_not_read_costs_a_bounded_buffer_then_drops(
        loop: asyncio.AbstractEventLoop, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(siblings_module, "MAX_BUFFERED", 256 * 1024)
    a, b = make(loop, tmp_path, "601"), make(loop, tmp_path, "602")
    loop.remove_reader(b.listener.fileno())  # b accepts nobody: a stalled worker
    payload = b"y" * 10_000
    for _ in range(300):  # 3 MB: more than the kernel buffers plus our bound
        assert a.send("1", "private-a", "", payload)
    peer = next(iter(a.peers.values()))
    assert 0 < len(peer.out) <= 256 * 1024
    assert a.counts["drops"] > 0
    assert a.counts["sent"] + a.counts["drops"] == 300
    a.close()
    b.close()


def test_malformed_messages_are_dropped_not_delivered() -> None:
    assert parse(b"") is None
    assert parse(b"\x00\x05[1,2]") is None  # not three strings
    assert parse(b"\x00\x03[1,") is None  # not JSON
    head = b'["1","c",""]'
    assert parse(len(head).to_bytes(2, "big") + head + b"p") == ("1", "c", "", b"p")


def test_a_stream_claiming_a_huge_message_is_cut(loop: asyncio.AbstractEventLoop,
                                                 tmp_path: Path) -> None:
    b = make(loop, tmp_path, "702")
    rogue = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    rogue.connect(str(tmp_path / "702"))
    rogue.sendall((siblings_module.MAX_MESSAGE + 1).to_bytes(4, "big") + b"....")
    rogue.setblocking(False)

    def cut() -> bool:
        try:
            return rogue.recv(1) == b""  # b closed its end
        except BlockingIOError:
            return False

    settle(loop, cut)
    assert b.inbound == {}
    assert delivered(b) == []
    rogue.close()
    b.close()
