"""WebSocket frame encoding/decoding used by the load generator."""

from __future__ import annotations

import os

from vask.bench.wsframe import (
    OP_CLOSE,
    OP_PING,
    OP_TEXT,
    FrameDecoder,
    close_payload,
    encode_frame,
    mask_payload,
    parse_close,
    upgrade_request,
)


def server_frame(op: int, payload: bytes, fin: bool = True) -> bytes:
    """An unmasked frame as a server sends it."""
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | op])
    if n < 126:
        head += bytes([n])
    elif n < 65536:
        head += bytes([126]) + n.to_bytes(2, "big")
    else:
        head += bytes([127]) + n.to_bytes(8, "big")
    return head + payload


def test_mask_roundtrip_and_rfc_example() -> None:
    # RFC 6455 §5.7: "Hello" masked with 37 fa 21 3d
    mask = bytes.fromhex("37fa213d")
    assert mask_payload(b"Hello", mask) == bytes.fromhex("7f9f4d5158")
    frame = encode_frame(OP_TEXT, b"Hello", mask)
    assert frame == bytes.fromhex("818537fa213d7f9f4d5158")
    data = os.urandom(1000)
    assert mask_payload(mask_payload(data, mask), mask) == data
    assert mask_payload(b"", mask) == b""


def test_encode_extended_lengths() -> None:
    mask = b"\x01\x02\x03\x04"
    f = encode_frame(OP_TEXT, b"a" * 300, mask)
    assert f[1] == 0x80 | 126 and int.from_bytes(f[2:4], "big") == 300
    assert f[4:8] == mask and len(f) == 8 + 300
    f = encode_frame(OP_TEXT, b"a" * 70000, mask)
    assert f[1] == 0x80 | 127 and int.from_bytes(f[2:10], "big") == 70000


def test_decoder_whole_partial_and_many() -> None:
    frames = [
        server_frame(OP_TEXT, b'{"event":"a"}'),
        server_frame(OP_TEXT, b"x" * 200),
        server_frame(OP_TEXT, b"y" * 70000),
        server_frame(OP_PING, b"p"),
        server_frame(OP_TEXT, b"frag", fin=False),
    ]
    stream = b"".join(frames)
    expected = [
        (True, OP_TEXT, b'{"event":"a"}'),
        (True, OP_TEXT, b"x" * 200),
        (True, OP_TEXT, b"y" * 70000),
        (True, OP_PING, b"p"),
        (False, OP_TEXT, b"frag"),
    ]
    assert FrameDecoder().feed(stream) == expected
    # byte by byte, and in odd chunks: same frames, nothing lost
    for chunk in (1, 3, 127, 4096):
        d = FrameDecoder()
        out = []
        for i in range(0, len(stream), chunk):
            out.extend(d.feed(stream[i : i + chunk]))
        assert out == expected


def test_decoder_tolerates_masked_server_frame() -> None:
    masked = encode_frame(OP_TEXT, b"hi there", b"\x0a\x0b\x0c\x0d")
    assert FrameDecoder().feed(masked) == [(True, OP_TEXT, b"hi there")]


def test_close_and_upgrade() -> None:
    assert parse_close(close_payload(4201, b"pong")) == (4201, "pong")
    assert parse_close(b"") == (None, "")
    req = upgrade_request("127.0.0.1", 17001, "/app/k?protocol=7")
    assert req.startswith(b"GET /app/k?protocol=7 HTTP/1.1\r\n")
    assert b"Sec-WebSocket-Version: 13\r\n" in req and req.endswith(b"\r\n\r\n")
    assert encode_frame(OP_CLOSE, b"", b"\0\0\0\0")[:2] == b"\x88\x80"
