"""Minimal RFC 6455 client-side framing, written for throughput rather than generality.

The load generator only needs: an upgrade request, masked client frames
(text, pong, close) and a decoder for the unmasked frames a server sends.
No extensions are offered, so the server never compresses.
"""

from __future__ import annotations

import base64
import os

OP_CONT = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA


def upgrade_request(host: str, port: int, path: str) -> bytes:
    """Build the HTTP/1.1 upgrade request for ``path`` (no extensions offered)."""
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET {path} HTTP/1.1\r\n"
        f"Host: {host}:{port}\r\n"
        "Upgrade: websocket\r\n"
        "Connection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n"
        "\r\n"
    ).encode()


def mask_payload(payload: bytes, mask: bytes) -> bytes:
    """XOR ``payload`` with the 4-byte ``mask`` repeated.

    Done as one big-integer XOR: far faster in CPython than a per-byte loop
    and the payloads here are small.
    """
    n = len(payload)
    if n == 0:
        return b""
    reps = mask * (n // 4 + 1)
    return (int.from_bytes(payload, "big") ^ int.from_bytes(reps[:n], "big")).to_bytes(n, "big")


def encode_frame(opcode: int, payload: bytes, mask: bytes) -> bytes:
    """Encode one final (FIN) client frame; client frames must always be masked."""
    n = len(payload)
    head = bytes([0x80 | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([0x80 | 127]) + n.to_bytes(8, "big")
    return head + mask + mask_payload(payload, mask)


class FrameDecoder:
    """Incremental decoder of server frames.

    ``feed`` returns complete ``(fin, opcode, payload)`` tuples and keeps any
    partial frame for the next call. The common case (one or more whole frames
    per read and nothing buffered) avoids copying the input.
    """

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> list[tuple[bool, int, bytes]]:
        """Consume ``data`` and return every frame completed by it."""
        if self._buf:
            data = self._buf + data
            self._buf = b""
        out: list[tuple[bool, int, bytes]] = []
        pos = 0
        n = len(data)
        while n - pos >= 2:
            b0 = data[pos]
            b1 = data[pos + 1]
            ln = b1 & 0x7F
            hdr = 2
            if ln == 126:
                if n - pos < 4:
                    break
                ln = int.from_bytes(data[pos + 2 : pos + 4], "big")
                hdr = 4
            elif ln == 127:
                if n - pos < 10:
                    break
                ln = int.from_bytes(data[pos + 2 : pos + 10], "big")
                hdr = 10
            if b1 & 0x80:
                # A server must not mask, but decode it anyway rather than desync.
                if n - pos < hdr + 4:
                    break
                mask = data[pos + hdr : pos + hdr + 4]
                hdr += 4
                end = pos + hdr + ln
                if end > n:
                    break
                payload = mask_payload(data[pos + hdr : end], mask)
            else:
                end = pos + hdr + ln
                if end > n:
                    break
                payload = data[pos + hdr : end]
            out.append((bool(b0 & 0x80), b0 & 0x0F, payload))
            pos = end
        if pos < n:
            self._buf = data[pos:]
        return out


def close_payload(code: int = 1000, reason: bytes = b"") -> bytes:
    """Payload of a close frame: 2-byte status code followed by the reason."""
    return code.to_bytes(2, "big") + reason


def parse_close(payload: bytes) -> tuple[int | None, str]:
    """Return ``(code, reason)`` from a close frame payload."""
    if len(payload) < 2:
        return None, ""
    return int.from_bytes(payload[:2], "big"), payload[2:].decode("utf-8", "replace")
