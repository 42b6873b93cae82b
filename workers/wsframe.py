"""Server-to-client WebSocket frames, built once and shared by every recipient.

Server frames are never masked (RFC 6455 §5.1), so one text frame's bytes can be written
unchanged to any number of connections; this is what makes fan-out "frame once".
"""

from __future__ import annotations

import struct

_OP_TEXT_FIN = 0x81


def text_frame(payload: bytes) -> bytes:
    """One unfragmented, unmasked text frame holding ``payload`` (RFC 6455 §5.2)."""
    n = len(payload)
    if n < 126:
        return bytes((_OP_TEXT_FIN, n)) + payload
    if n < 65536:
        return struct.pack("!BBH", _OP_TEXT_FIN, 126, n) + payload
    return struct.pack("!BBQ", _OP_TEXT_FIN, 127, n) + payload
