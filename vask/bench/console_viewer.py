"""A headless debug console viewer, to measure what an open console costs a server.

``python -m vask.bench.console_viewer --port ADMIN_PORT --token TOKEN --app APP`` waits
for the admin listener, opens its live feed as the dashboard page does, switches the
app's debug console on and reads everything until the server goes away (or
``--timeout`` passes), then prints how many records and samples it got. Started next to
a server in a ``vask bench`` ``--server-cmd`` (detached with ``setsid`` so that its own
CPU is not counted as the server's), it keeps a console open for the whole run
(docs/dashboard.md, "Cost").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

import aiohttp


async def view(port: int, token: str, app: str, timeout: float) -> dict[str, int]:
    got = {"records": 0, "samples": 0, "sampled_left_out": 0}
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while True:  # the server may still be starting
            try:
                ws = await session.ws_connect(f"http://127.0.0.1:{port}/admin/ws")
                break
            except aiohttp.ClientError:
                if time.monotonic() > deadline:
                    return got
                await asyncio.sleep(0.2)
        async with ws:
            await ws.send_str(json.dumps({"type": "auth", "token": token}))
            await ws.send_str(json.dumps({"type": "watch", "app": app, "console": True}))
            while time.monotonic() < deadline:
                try:
                    message = await ws.receive(timeout=max(0.1, deadline - time.monotonic()))
                except TimeoutError:
                    break
                if message.type != aiohttp.WSMsgType.TEXT:
                    break  # closed: the server stopped
                data = json.loads(message.data)
                if data["type"] == "console":
                    got["records"] += len(data["records"])
                    got["sampled_left_out"] += sum(int(r.get("left_out", 0))
                                                   for r in data["records"])
                elif data["type"] == "sample":
                    got["samples"] += 1
    return got


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True, help="the admin listener's port")
    parser.add_argument("--token", required=True)
    parser.add_argument("--app", default="1")
    parser.add_argument("--timeout", type=float, default=900.0,
                        help="give up after this many seconds in any case")
    args = parser.parse_args()
    got = asyncio.run(view(args.port, args.token, args.app, args.timeout))
    print(json.dumps(got), file=sys.stderr)


if __name__ == "__main__":
    main()
