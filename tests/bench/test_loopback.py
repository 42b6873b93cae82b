"""The lean WebSocket client and the HTTP publisher against tiny loopback fakes.

The fake WebSocket server uses the ``websockets`` library, which enforces client
masking and framing rules, so this checks the hand-written client end to end.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import multiprocessing as mp
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
from websockets.asyncio.server import ServerConnection, serve

from vask.bench.httppub import Publisher, PublishRejected
from vask.bench.loadgen import Worker, now_us
from vask.bench.signing import hmac_hex, private_auth

KEY, SECRET = "app-key", "app-secret"


async def fake_pusher(ws: ServerConnection) -> None:
    sid = f"{id(ws) % 1000}.{id(ws) % 997}"
    data = json.dumps({"socket_id": sid, "activity_timeout": 120})
    await ws.send(json.dumps({"event": "pusher:connection_established", "data": data}))
    async for raw in ws:
        msg = json.loads(raw)
        if msg["event"] == "pusher:subscribe":
            ch = msg["data"]["channel"]
            assert msg["data"]["auth"] == private_auth(KEY, SECRET, sid, ch)
            await ws.send(json.dumps({"event": "pusher_internal:subscription_succeeded",
                                      "channel": ch, "data": "{}"}))
            await ws.send(json.dumps({"event": "pusher:ping", "data": {}}))
            for i in range(3):
                d = json.dumps({"m": f"~ts{now_us()}~", "seq": i, "pad": "z" * (i * 40000)})
                await ws.send(json.dumps({"event": "bench", "channel": ch, "data": d}))
        elif msg["event"].startswith("client-"):
            # echo back so the test can count it (a real server would not)
            await ws.send(json.dumps(msg))


@pytest.mark.timeout(20)
def test_worker_against_websockets_server() -> None:
    async def main() -> dict[str, Any]:
        async with serve(fake_pusher, "127.0.0.1", 0) as server:
            port = server.sockets[0].getsockname()[1]  # the kernel's pick: no race
            a, _b = mp.Pipe()
            w = Worker(a, {"host": "127.0.0.1", "port": port, "key": KEY, "secret": SECRET})
            res = await w.cmd_connect({"start": 0, "count": 5, "channel": "private-b{i}"})
            assert res == {**res, "ok": 5, "failed": 0}
            for _ in range(100):
                if w.deliveries >= 15:
                    break
                await asyncio.sleep(0.02)
            sent = await w.cmd_client_events({"rate": 5, "duration": 0.4})
            for _ in range(100):
                if w.deliveries >= 15 + sent["sent"]:
                    break
                await asyncio.sleep(0.02)
            out = await w.cmd_results({})
            await w.cmd_close({})
            return {**out, "sent": sent["sent"]}

    out = asyncio.run(main())
    assert out["sent"] == 10  # 5 connections x 5/s x 0.4 s
    assert out["deliveries"] == 15 + 10
    assert out["min_per_conn"] == out["max_per_conn"] == 5
    assert out["unexpected_closes"] == 0 and out["error_count"] == 0
    assert len(out["lat"]) == 8 * 25


@pytest.mark.timeout(20)
def test_publisher_signs_and_reuses_connections() -> None:
    seen: list[dict[str, Any]] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode().split("\r\n")
            method, target, _ = lines[0].split(" ")
            length = next(
                int(x.split(":")[1]) for x in lines if x.lower().startswith("content-length")
            )
            body = await reader.readexactly(length)
            url = urlsplit(target)
            q = dict(parse_qsl(url.query))
            sig = q.pop("auth_signature")
            to_sign = "&".join(f"{k}={q[k]}" for k in sorted(q))
            ok = sig == hmac_hex(SECRET, f"{method}\n{url.path}\n{to_sign}")
            ok = ok and q["body_md5"] == hashlib.md5(body).hexdigest()
            seen.append({"ok": ok, "body": json.loads(body)})
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
            await writer.drain()

    async def main() -> Publisher:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]  # the kernel's pick: no race
        pub = Publisher("127.0.0.1", port, "app-id", KEY, SECRET, inflight=2)
        await pub.run(6, lambda seq, t: f"~ts{t}~{seq}", "bench")
        server.close()
        return pub

    pub = asyncio.run(main())
    assert pub.ok == 6 and pub.failed == 0
    assert pub.connections == 2  # keep-alive honoured: one connection per lane
    assert all(s["ok"] for s in seen) and len(seen) == 6
    assert {s["body"]["channel"] for s in seen} == {"bench"}


@pytest.mark.timeout(20)
def test_publisher_stops_at_the_first_4xx_with_the_servers_message() -> None:
    requests = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal requests
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return
            length = next(int(x.split(b":")[1]) for x in head.split(b"\r\n")
                          if x.lower().startswith(b"content-length"))
            await reader.readexactly(length)
            requests += 1
            body = b'{"error":"Unknown app id \'x\'."}'
            writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(body), body))
            await writer.drain()

    async def main() -> tuple[Publisher, str]:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        pub = Publisher("127.0.0.1", port, "x", KEY, SECRET, inflight=3)
        try:
            await pub.run(1000, lambda seq, t: f"~ts{t}~{seq}", "bench")
        except PublishRejected as e:
            msg = str(e)
        else:
            msg = ""
        server.close()
        return pub, msg

    pub, msg = asyncio.run(main())
    assert "HTTP 404" in msg and "Unknown app id" in msg and "/apps/x/events" in msg
    # Each lane stops after its first answer: at most one request per lane.
    assert pub.ok == 0 and 1 <= requests <= 3 and pub.sent == requests
