"""The WebSocket fast path (``PusherConnection._fast_frames``) against websockets' rules.

Complete, masked, unfragmented text frames are handled without websockets; everything
else must reach websockets at a frame boundary and come out exactly as before (the same
messages in the same order, the same close codes). Each case feeds raw client bytes,
split into reads at every possible boundary, and checks what the session saw and what
was written back.
"""

from __future__ import annotations

import asyncio
import os
import struct
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from websockets.utils import apply_mask

from tests.test_connection_layer import FakeTransport
from vask.config import load_settings
from vask.metrics import WorkerMetrics
from vask.workers.outbound import Corker
from vask.workers.websocket import BURST_FRAMES, OPEN, PusherConnection


def frame(payload: bytes, opcode: int = 0x1, fin: bool = True, masked: bool = True,
          rsv: int = 0) -> bytes:
    """A client frame, built by hand (so it can also break the rules)."""
    head = bytes([(0x80 if fin else 0) | rsv | opcode])
    n = len(payload)
    if n < 126:
        head += bytes([(0x80 if masked else 0) | n])
    elif n < 65536:
        head += bytes([(0x80 if masked else 0) | 126]) + struct.pack("!H", n)
    else:
        head += bytes([(0x80 if masked else 0) | 127]) + struct.pack("!Q", n)
    if not masked:
        return head + payload
    mask = os.urandom(4)
    return head + mask + apply_mask(payload, mask)


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def open_conn(loop: asyncio.AbstractEventLoop, max_message_bytes: int = 1024
              ) -> tuple[PusherConnection, FakeTransport, list[bytes]]:
    settings = load_settings(env={}, overrides={"max_message_bytes": max_message_bytes})
    metrics = WorkerMetrics([app.id for app in settings.apps])
    ended: list[Any] = []
    worker: Any = SimpleNamespace(
        settings=settings, clock=100.0, wall=1_000_000.0, connections=set(),
        counters=metrics.events, corker=Corker(loop, 262_144), stopping=False, loop=loop,
        metrics=metrics, ws_pool=[], held={},
        sync=SimpleNamespace(connection_ended=ended.append),
        admission=SimpleNamespace(tcp_closed=lambda peer: None),
    )
    transport = FakeTransport()
    conn = PusherConnection(worker, transport, 0, "10.0.0.1")
    transport.set_protocol(conn)
    conn.phase = OPEN
    seen: list[bytes] = []
    conn.session = SimpleNamespace(  # type: ignore[assignment]
        receive=lambda text, now: seen.append(bytes(text)) or [])
    return conn, transport, seen


def feed_in_reads(conn: PusherConnection, data: bytes, cut: int) -> None:
    if 0 < cut < len(data):
        conn.data_received(data[:cut])
        conn.data_received(data[cut:])
    else:
        conn.data_received(data)


def close_code(transport: FakeTransport) -> int | None:
    """The code of the close frame the server wrote, if any (server frames are unmasked)."""
    data = transport.text
    i = data.find(b"\x88")
    if i < 0:
        return None
    return int.from_bytes(data[i + 2:i + 4], "big")


MESSAGES = [b'{"event":"pusher:ping","data":{}}', b"x" * 200, "é√".encode() * 10, b""]


@pytest.mark.parametrize("cut", [0, 1, 2, 5, 7, 40, 300])
def test_text_frames_arrive_in_order_whatever_the_read_boundaries(
        loop: asyncio.AbstractEventLoop, cut: int) -> None:
    conn, transport, seen = open_conn(loop)
    data = b"".join(frame(m) for m in MESSAGES)
    feed_in_reads(conn, data, cut)
    assert seen == MESSAGES
    assert not transport.closed and not transport.aborted


def test_the_fast_path_is_taken_for_plain_text_frames(loop: asyncio.AbstractEventLoop) -> None:
    conn, _transport, seen = open_conn(loop)
    conn.data_received(frame(b"a") + frame(b"b" * 1000))
    assert seen == [b"a", b"b" * 1000]
    assert conn.ws is None and not conn.worker.ws_pool  # websockets was never needed


@pytest.mark.parametrize("cut", [0, 3, 9])
def test_control_frames_and_fragments_in_between_go_through_websockets(
        loop: asyncio.AbstractEventLoop, cut: int) -> None:
    conn, transport, seen = open_conn(loop)
    data = (frame(b"one") + frame(b"hi", opcode=0x9) + frame(b"fr", fin=False)
            + frame(b"ag", opcode=0x0) + frame(b"two"))
    feed_in_reads(conn, data, cut)
    assert seen == [b"one", b"frag", b"two"]
    assert b"\x8a\x02hi" in transport.text  # the pong
    assert not transport.closed


@pytest.mark.parametrize(("bad", "code"), [
    (frame(b"abc", masked=False), 1002),            # clients must mask
    (frame(b"abc", rsv=0x40), 1002),                # no extension was negotiated
    (frame(b"y" * 2000), 1009),                     # over max_message_bytes
])
def test_rule_breaking_frames_are_closed_with_websockets_codes(
        loop: asyncio.AbstractEventLoop, bad: bytes, code: int) -> None:
    conn, transport, seen = open_conn(loop)
    conn.data_received(frame(b"before") + bad + frame(b"after"))
    assert seen == [b"before"]
    assert close_code(transport) == code


def test_a_binary_frame_is_answered_with_an_error(loop: asyncio.AbstractEventLoop) -> None:
    conn, transport, seen = open_conn(loop)
    conn.data_received(frame(b"\x00\x01", opcode=0x2) + frame(b"ok"))
    loop.run_until_complete(asyncio.sleep(0))  # the corked error frame leaves
    assert seen == [b"ok"]
    assert b"Binary frames are not supported" in transport.text


def test_a_message_that_closes_the_connection_stops_the_fast_path(
        loop: asyncio.AbstractEventLoop) -> None:
    conn, transport, seen = open_conn(loop)

    def receive(text: bytes, now: float) -> list[Any]:
        seen.append(bytes(text))
        conn.close(4009, "bye")  # what a session's Close action ends in
        return []

    conn.session = SimpleNamespace(receive=receive)  # type: ignore[assignment]
    conn.data_received(frame(b"first") + frame(b"second"))
    assert seen == [b"first"]  # nothing is accepted once closing
    assert close_code(transport) == 4009


def test_text_that_is_not_utf8_reaches_the_session_as_with_websockets(
        loop: asyncio.AbstractEventLoop) -> None:
    # websockets' sans-I/O protocol does not check UTF-8 either; the session's JSON
    # decoding answers it with a pusher:error (tests/integration/test_lifecycle.py).
    conn, transport, seen = open_conn(loop)
    conn.data_received(frame(b"\xff\xfe") + frame(b"after"))
    assert seen == [b"\xff\xfe", b"after"]
    assert close_code(transport) is None


def turn(loop: asyncio.AbstractEventLoop) -> None:
    """Run one turn of the loop: the callbacks that are due now, not those they add."""
    loop.call_soon(loop.stop)
    loop.run_forever()


@pytest.mark.parametrize("with_pings", [False, True], ids=["fast path", "websockets"])
def test_a_burst_in_one_read_is_handled_a_share_per_loop_turn(
        loop: asyncio.AbstractEventLoop, with_pings: bool) -> None:
    # One read of thousands of small frames must not hold the worker's loop for all of
    # them: each turn takes at most BURST_FRAMES, and reading waits until the last.
    # Pings in between send the frames through websockets, whose parsed frames are
    # shared out the same way.
    conn, transport, seen = open_conn(loop)
    count = 3 * BURST_FRAMES + 10
    messages = [str(i).encode() for i in range(count)]
    data = b"".join((frame(b"p", opcode=0x9) if with_pings else b"") + frame(m)
                    for m in messages)
    per_frame = 2 if with_pings else 1
    conn.data_received(data)
    shares = [len(seen)]
    while not transport.reading:
        turn(loop)
        shares.append(len(seen) - sum(shares))
        assert len(shares) < 20, shares
    assert seen == messages  # every message, in order
    assert all(0 < share * per_frame <= BURST_FRAMES for share in shares), shares
    assert len(shares) >= count * per_frame // BURST_FRAMES
    assert not conn.worker.held
    if with_pings:
        turn(loop)
        assert transport.text.count(b"\x8a\x01p") == count  # every ping got its pong
    conn.data_received(frame(b"later"))  # the connection reads again as before
    assert seen[-1] == b"later"


def test_a_connection_lost_during_a_burst_drops_the_rest(
        loop: asyncio.AbstractEventLoop) -> None:
    conn, _transport, seen = open_conn(loop)
    conn.data_received(b"".join(frame(b"m") for _ in range(2 * BURST_FRAMES)))
    assert len(seen) == BURST_FRAMES and conn.worker.held
    conn.connection_lost(None)
    turn(loop)
    assert len(seen) == BURST_FRAMES and not conn.worker.held
