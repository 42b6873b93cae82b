"""What a worker's own Python does for one connect + subscribe, counted exactly.

Drives a real :class:`~vask.workers.server.Worker` without sockets: a fake transport
takes its writes, and the broker's answers are given at once (``{"ok": true}``, after
the request is encoded as it would be sent). Per connection it runs the handshake, the
``connection_established`` write, one ``pusher:subscribe``, the answer and the
``subscription_succeeded`` write: the Python part of what ``vask bench idle`` measures,
without the kernel, the event loop or the broker.

The timing moves with the machine (a shared VM's CPU speed varies by 2x from second to
second); the counts do not. ``--count`` traces every Python function call and bytecode
instruction, which is the figure to compare two builds by::

    python bench/connect/python_path.py            # microseconds per connection
    python bench/connect/python_path.py --count    # instructions and calls, per function

(see docs/benchmarks.md, "The floor under a connect").
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import os
import sys
import time
from types import FrameType
from typing import Any

import uvloop

from vask import envelope
from vask.config import load_settings
from vask.workers.http import HttpProtocol
from vask.workers.server import Worker


class _Transport(asyncio.Transport):
    """Takes writes; reads nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.protocol: Any = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written.append(bytes(data))

    def get_write_buffer_size(self) -> int:
        return 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default


def _masked(payload: bytes) -> bytes:
    mask = b"\x11\x22\x33\x44"
    return bytes((0x81, 0x80 | len(payload))) + mask + bytes(
        b ^ mask[i & 3] for i, b in enumerate(payload))


async def _run(connections: int, count: bool) -> None:
    worker = Worker(load_settings(env={}), "ipc:///nonexistent/vask-python-path", 0)
    # every connection here stays open: the per-worker cap (from the descriptor limit)
    # would refuse the ones past it, which is not the path measured
    worker.admission.max_connections = 1 << 40
    link = worker.link
    link.welcomed = True
    answers: list[Any] = []

    def request(make: Any, callback: Any, timeout: float | None = None) -> None:
        # a message to send with a request id, or (older builds) a function making one
        if callable(make):
            envelope.encode(make(1))
        else:
            envelope.encode_request(make, 1)
        answers.append(callback)

    link.request = request  # type: ignore[method-assign]
    link.send = lambda message: envelope.encode(message) and None  # type: ignore[method-assign]
    key = base64.b64encode(os.urandom(16)).decode()
    handshake = (f"GET /app/app-key?protocol=7&client=js&version=8.4.0&flash=false "
                 f"HTTP/1.1\r\nHost: 127.0.0.1:6001\r\nConnection: Upgrade\r\n"
                 f"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
                 f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Extensions: "
                 f"permessage-deflate; client_max_window_bits\r\n\r\n").encode()
    warm = 200
    total = warm + connections
    subscribes = [_masked(b'{"event":"pusher:subscribe","data":{"channel":"idle-%d"}}' % i)
                  for i in range(total)]
    kept = []

    def one(i: int) -> None:
        protocol = HttpProtocol(worker)
        transport = _Transport()
        protocol.connection_made(transport)
        protocol.data_received(handshake)
        worker.corker.flush()
        transport.protocol.data_received(subscribes[i])
        worker.corker.flush()
        for answer in answers:
            answer({"ok": True})
        answers.clear()
        worker.corker.flush()
        kept.append(transport)

    for i in range(warm):
        one(i)
    if count:
        per: collections.Counter[str] = collections.Counter()
        totals = [0, 0]

        def line(frame: FrameType, event: str, arg: Any) -> Any:
            if event == "opcode":
                totals[0] += 1
                code = frame.f_code
                per[f"{code.co_filename.rsplit('/', 1)[-1]}:{code.co_name}"] += 1
            return line

        def call(frame: FrameType, event: str, arg: Any) -> Any:
            totals[1] += 1
            frame.f_trace_opcodes = True
            return line

        sys.settrace(call)
        for i in range(warm, total):
            one(i)
        sys.settrace(None)
        for name, n in per.most_common(30):
            print(f"{n / connections:8.1f}  {name}")
        print(f"{totals[0] / connections:.0f} bytecode instructions and "
              f"{totals[1] / connections:.0f} Python calls per connect + subscribe")
    else:
        started = time.process_time()
        for i in range(warm, total):
            one(i)
        spent = time.process_time() - started
        print(f"{spent / connections * 1e6:.1f} us of CPU per connect + subscribe")
    assert b"subscription_succeeded" in b"".join(kept[-1].written)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=3000)
    parser.add_argument("--count", action="store_true",
                        help="count instructions and calls (slow) instead of timing")
    args = parser.parse_args()
    uvloop.run(_run(args.connections if not args.count else min(args.connections, 300),
                    args.count))


if __name__ == "__main__":
    main()
