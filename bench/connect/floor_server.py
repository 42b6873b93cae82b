"""The floor under a Python connect: the least a uvloop server can do for `vask bench idle`.

Each of ``--workers`` forked processes accepts on one SO_REUSEPORT socket and, per
connection, answers the WebSocket handshake with ``connection_established`` and the one
``pusher:subscribe`` with ``subscription_succeeded``: no HTTP parser, no JSON parser,
no broker, no state. It is not a server anyone should run (it checks nothing); it
measures what accept, two reads, two writes and the event loop's own work cost per
connection on this machine, so that a connect's CPU can be split into that floor and
everything Vask does on top of it. Compare it with soketi or Vask in the same run::

    vask bench compare "python bench/connect/floor_server.py {port}" "<other server>" idle

(see docs/benchmarks.md, "The floor under a connect").
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import os
import signal
import socket

import uvloop

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC11B65"
_CHANNEL = b'"channel":"'


def _frame(payload: bytes) -> bytes:
    if len(payload) < 126:
        return bytes((0x81, len(payload))) + payload
    return bytes((0x81, 126)) + len(payload).to_bytes(2, "big") + payload


class FloorProtocol(asyncio.Protocol):
    connections = 0

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.upgraded = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        transport = self.transport
        assert transport is not None
        if not self.upgraded:
            start = data.find(b"Sec-WebSocket-Key: ")
            if start < 0:
                transport.close()
                return
            key = data[start + 19:data.find(b"\r\n", start)]
            accept = base64.b64encode(hashlib.sha1(key + _GUID).digest())
            FloorProtocol.connections += 1
            socket_id = b"1.%d" % FloorProtocol.connections
            transport.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
                + _frame(b'{"event":"pusher:connection_established","data":"{\\"socket_id\\":\\"'
                         + socket_id + b'\\",\\"activity_timeout\\":120}"}'))
            self.upgraded = True
            return
        # one masked text frame with a short payload, or anything else: then close
        if len(data) < 6 or data[0] != 0x81 or data[1] & 0x7F >= 126:
            transport.close()
            return
        size = data[1] & 0x7F
        mask = data[2:6]
        payload = bytes(b ^ mask[i & 3] for i, b in enumerate(data[6:6 + size]))
        start = payload.find(_CHANNEL)
        if start < 0:
            return
        start += len(_CHANNEL)
        channel = payload[start:payload.find(b'"', start)]
        transport.write(_frame(b'{"event":"pusher_internal:subscription_succeeded",'
                               b'"channel":"' + channel + b'","data":"{}"}'))


def _serve(port: int) -> None:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(4096)
    sock.setblocking(False)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        await loop.create_server(FloorProtocol, sock=sock, backlog=4096)
        await asyncio.Event().wait()

    uvloop.run(main())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("port", type=int)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    children = []
    for _ in range(args.workers):
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            _serve(args.port)
            os._exit(0)
        children.append(pid)

    def stop(signum: int, frame: object) -> None:
        for pid in children:
            os.kill(pid, signal.SIGKILL)
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for pid in children:
        os.waitpid(pid, 0)


if __name__ == "__main__":
    main()
