"""The opening-handshake checks (RFC 6455 §4.2.1) and the server frame builder."""

from __future__ import annotations

import pytest
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

from vask.workers.http import handshake_problem as _handshake_problem
from vask.workers.wsframe import text_frame

GOOD = {
    b"upgrade": b"websocket",
    b"connection": b"keep-alive, Upgrade",
    b"sec-websocket-version": b"13",
    b"sec-websocket-key": b"dGhlIHNhbXBsZSBub25jZQ==",
}


def test_a_valid_handshake_passes() -> None:
    assert _handshake_problem(b"GET", "1.1", GOOD) is None
    assert _handshake_problem(b"GET", "1.1", {**GOOD, b"upgrade": b"WebSocket"}) is None


@pytest.mark.parametrize("method, version, changes, status", [
    (b"POST", "1.1", {}, 405),
    (b"GET", "1.0", {}, 400),
    (b"GET", "1.1", {b"upgrade": b"h2c"}, 426),
    (b"GET", "1.1", {b"connection": b"keep-alive"}, 400),
    (b"GET", "1.1", {b"sec-websocket-version": b"8"}, 426),
    (b"GET", "1.1", {b"sec-websocket-key": b"short"}, 400),
    (b"GET", "1.1", {b"sec-websocket-key": b""}, 400),
])
def test_invalid_handshakes(method: bytes, version: str, changes: dict[bytes, bytes],
                            status: int) -> None:
    problem = _handshake_problem(method, version, {**GOOD, **changes})
    assert problem is not None and problem[0] == status


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 70000])
def test_text_frames_parse_back_with_websockets(size: int) -> None:
    payload = b"x" * size
    reader = StreamReader()
    reader.feed_data(text_frame(payload))
    parser = Frame.parse(reader.read_exact, mask=False)
    try:
        next(parser)
    except StopIteration as done:
        frame = done.value
    else:  # pragma: no cover - the whole frame was fed
        raise AssertionError("frame not complete")
    assert frame.opcode is Opcode.TEXT and frame.fin and frame.data == payload
