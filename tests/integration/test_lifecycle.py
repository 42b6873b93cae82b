"""The real supervisor, broker and workers: handshake, rejections, liveness, restarts."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import websockets

from tests.pusher_client import PusherClient, close_all, connect_many
from tests.servers import (
    Server,
    free_port,
    process_name,
    run_vask,
    scratch_dir,
    vask_env,
)

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    config = """
[server]
max_message_bytes = 4096

[[apps]]
id = "1"
key = "app-key"
secret = "app-secret"
enable_client_messages = true

[[apps]]
id = "2"
key = "off-key"
secret = "s"
enabled = false
"""
    with run_vask(workers=2, config=config) as srv:
        yield srv


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


async def first_frame_and_close(url: str) -> tuple[dict[str, object], int | None, str | None]:
    async with websockets.connect(url, open_timeout=10) as ws:
        frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
        with contextlib.suppress(websockets.ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 10)
        rcvd = ws.protocol.close_rcvd
        return frame, (rcvd.code if rcvd else None), (rcvd.reason if rcvd else None)


def test_many_clients_get_connection_established_with_unique_socket_ids(server: Server) -> None:
    async def go() -> list[PusherClient]:
        clients = await connect_many(server.ws_url, 60)
        await close_all(clients)
        return clients

    clients = run(go())
    assert isinstance(clients, list)
    ids = [c.socket_id for c in clients]
    assert all(re.fullmatch(r"\d+\.\d+", i) for i in ids)
    assert len(set(ids)) == len(ids)
    first = clients[0].frames[0]
    assert isinstance(first["data"], str)
    assert json.loads(first["data"])["activity_timeout"] == 120
    # SO_REUSEPORT spreads connections: both workers (distinct id prefixes) took some
    assert len({i.split(".")[0] for i in ids}) == 2


def test_ping_pong_and_websocket_ping(server: Server) -> None:
    async def go() -> None:
        client = await PusherClient.connect(server.ws_url)
        await client.send({"event": "pusher:ping", "data": {}})
        pong = await client.wait_for("pusher:pong")
        assert pong == {"event": "pusher:pong", "data": "{}"}
        waiter = await client.ws.ping(b"x")
        await asyncio.wait_for(waiter, 5)  # answered with a WebSocket pong frame
        await client.close()

    run(go())


@pytest.mark.parametrize("path, code, message", [
    ("/app/no-such-key?protocol=7", 4001, "Application does not exist"),
    ("/app/off-key?protocol=7", 4003, "Application disabled"),
    ("/somewhere/else", 4005, "Path not found"),
    ("/app/app-key?protocol=seven", 4006, "Invalid version string format"),
    ("/app/app-key?protocol=3", 4007, "Unsupported protocol version"),
    ("/app/app-key?protocol=8", 4007, "Unsupported protocol version"),
])
def test_rejections_upgrade_send_one_error_and_close(server: Server, path: str, code: int,
                                                     message: str) -> None:
    frame, close_code, reason = run(first_frame_and_close(
        f"ws://127.0.0.1:{server.port}{path}"))  # type: ignore[misc]
    assert frame == {"event": "pusher:error", "data": {"code": code, "message": message}}
    assert close_code == code and reason == message


def test_missing_protocol_is_treated_as_7(server: Server) -> None:
    async def go() -> None:
        client = await PusherClient.connect(f"ws://127.0.0.1:{server.port}/app/app-key")
        await client.close()

    run(go())


def test_bad_input_gets_errors_and_never_hurts_another_client(server: Server) -> None:
    async def go() -> None:
        victim, bystander = await connect_many(server.ws_url, 2)
        await bystander.subscribe("news")
        for bad in ("not json", "[1]", '{"event":1}', '{"event":"pusher:nope"}', b"\x00\x01"):
            await victim.send(bad)
        await victim.ws.send(b"\xff\xfe", text=True)  # a text frame that is not UTF-8
        await victim.wait(lambda f: len(victim.events("pusher:error")) >= 6, timeout=10)
        messages = [e["data"]["message"] for e in victim.events("pusher:error")]
        assert any("Binary" in m for m in messages)
        assert any("pusher:nope" in m for m in messages)
        # the connection is still usable
        await victim.send({"event": "pusher:ping"})
        await victim.wait_for("pusher:pong")
        # an oversize frame closes only that connection, with 1009
        await victim.send("x" * 5000)
        code, _ = await asyncio.wait_for(victim.closed, 10)
        assert code == 1009
        await bystander.send({"event": "pusher:ping"})
        await bystander.wait_for("pusher:pong")
        await close_all([victim, bystander])

    run(go())


def test_health_ready_and_404(server: Server) -> None:
    base = f"http://127.0.0.1:{server.port}"
    with urllib.request.urlopen(base + "/up", timeout=5) as r:
        assert r.status == 200
    with urllib.request.urlopen(base + "/ready", timeout=5) as r:
        assert json.loads(r.read()) == {"ready": True, "broker": True, "recovering": False}
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(base + "/nothing-here", timeout=5)
    assert info.value.code == 404
    assert json.loads(info.value.read())["code"] == 404


def test_idle_clients_are_pinged_then_closed_with_4201() -> None:
    config = "[server]\nactivity_timeout = 1\npong_timeout = 1.5\n"
    with run_vask(workers=1, config=config) as srv:
        async def go() -> None:
            client = await PusherClient.connect(srv.ws_url)
            assert json.loads(client.frames[0]["data"])["activity_timeout"] == 1
            ping = await client.wait_for("pusher:ping", timeout=10)
            assert ping["data"] == "{}"
            # a client that answers stays; this one does not answer
            code, reason = await asyncio.wait_for(client.closed, 10)
            assert code == 4201 and reason == "Pong reply not received"
            assert client.events("pusher:error")[-1]["data"]["code"] == 4201

            # A client that answers every ping outlives several ping rounds. The worker's
            # sweep runs once a second, so the moments are only known to a second; the
            # check does not depend on them: after an ignored pong the next thing this
            # client would see is the 4201 close, not another ping.
            answering = await PusherClient.connect(srv.ws_url)
            for n in range(1, 4):
                await answering.wait(lambda f, n=n: len(answering.events("pusher:ping")) >= n,
                                     timeout=10)
                await answering.send({"event": "pusher:pong", "data": {}})
            assert not answering.closed.done()
            assert not answering.events("pusher:error")
            await answering.close()

        run(go())


def test_sigkill_of_a_worker_is_repaired_on_the_same_port() -> None:
    with run_vask(workers=2) as srv:
        before = set(srv.children())
        workers = [p for p in before if process_name(p).startswith("vask-worker")]
        assert len(workers) == 2
        os.kill(workers[0], signal.SIGKILL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            now = set(srv.children())
            if len(now) == len(before) and workers[0] not in now:
                break
            time.sleep(0.1)
        assert workers[0] not in srv.children()
        assert len(srv.children()) == len(before)

        async def go() -> None:
            clients = await connect_many(srv.ws_url, 40)
            assert len({c.socket_id.split(".")[0] for c in clients}) == 2
            await close_all(clients)

        run(go())
        assert "restarting" in srv.log()


def test_sigterm_stops_every_process_and_exits_0() -> None:
    with run_vask(workers=2) as srv:
        pids = srv.pids()
        assert len(pids) == 4  # supervisor, broker, two workers
        srv.process.send_signal(signal.SIGTERM)
        assert srv.process.wait(timeout=20) == 0
        _assert_all_gone(pids)


def test_sigkill_of_the_supervisor_leaves_no_orphans() -> None:
    with run_vask(workers=2) as srv:
        pids = srv.pids()
        srv.process.kill()
        srv.process.wait(timeout=5)
        _assert_all_gone(pids)


def _assert_all_gone(pids: list[int], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    alive = pids
    while time.monotonic() < deadline:
        alive = [p for p in pids if _alive(p)]
        if not alive:
            return
        time.sleep(0.1)
    raise AssertionError(f"processes still alive: {alive}")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


def test_invalid_config_exits_2_with_one_clear_line() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "vask.cli", "run", "--port", "70000"],
        capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line == "vask: configuration error: server.port: 70000 is not a TCP port (1-65535)"


def test_version() -> None:
    result = subprocess.run([sys.executable, "-m", "vask.cli", "--version"],
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0 and "vask" in result.stdout


def test_startup_failure_stops_the_supervisor_with_the_cause(tmp_path: Path) -> None:
    path = tmp_path / "vask.toml"
    path.write_text("[server]\nbroker_timeout = 0.5\n")
    dead_broker = f"tcp://127.0.0.1:{free_port()}"
    scratch = scratch_dir()
    try:
        result = subprocess.run(
            [sys.executable, "-m", "vask.cli", "run", "--host", "127.0.0.1",
             "--port", str(free_port()), "--workers", "2", "--config", str(path),
             "--broker", dead_broker],
            capture_output=True, text=True, timeout=60, check=False, env=vask_env(scratch))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    assert result.returncode == 1
    assert f"no broker answered at {dead_broker}" in result.stderr
    assert "failed to start" in result.stderr


def test_a_second_vask_on_the_same_port_is_refused() -> None:
    with run_vask(workers=1) as srv:
        result = subprocess.run(
            [sys.executable, "-m", "vask.cli", "run", "--host", "127.0.0.1",
             "--port", str(srv.port), "--workers", "1"],
            capture_output=True, text=True, timeout=30, check=False,
            env=vask_env(srv.log_path.parent))
        assert result.returncode == 1
        assert f"cannot listen on 127.0.0.1:{srv.port}: Address already in use" in result.stderr


def test_fragmented_messages_are_reassembled(server: Server) -> None:
    async def go() -> None:
        client = await PusherClient.connect(server.ws_url)
        # a message split over three frames is reassembled
        await client.ws.send(iter(['{"event":"pusher:', 'ping",', '"data":{}}']))
        await client.wait_for("pusher:pong")
        # a whole message after it is parsed too (between messages the worker hands its
        # frame parser back to a pool and takes one again for the next bytes)
        await client.send({"event": "pusher:ping", "data": {}})
        await client.wait(lambda f: len(client.events("pusher:pong")) == 2)
        await client.ws.send(iter(['{"event":"pusher:sub', 'scribe","data":{"channel":"frag"}}']))
        await client.wait_for("pusher_internal:subscription_succeeded", "frag")
        await client.close()

    run(go())


def _masked_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """One client-to-server WebSocket frame (clients must mask)."""
    mask = os.urandom(4)
    size = len(payload)
    head = bytes([(0x80 if fin else 0) | opcode])
    head += bytes([0x80 | size]) if size < 126 else bytes([0x80 | 126]) + size.to_bytes(2, "big")
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def _read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    b0, b1 = await asyncio.wait_for(reader.readexactly(2), 10)
    size = b1 & 0x7F
    if size == 126:
        size = int.from_bytes(await reader.readexactly(2), "big")
    elif size == 127:
        size = int.from_bytes(await reader.readexactly(8), "big")
    return b0 & 0x0F, await asyncio.wait_for(reader.readexactly(size), 10)


def test_a_fragmented_message_survives_separate_reads_and_control_frames(server: Server) -> None:
    """The worker keeps a connection's partial message between reads: each fragment is
    sent only after the server has answered a WebSocket ping sent after the previous
    one, so the fragments certainly arrive in separate reads, with pings between them."""
    text, cont, ping, pong = 0x1, 0x0, 0x9, 0xA

    async def go() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(f"GET /app/app-key?protocol=7 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     f"Upgrade: websocket\r\nConnection: Upgrade\r\n"
                     f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 101 ")
        opcode, data = await _read_frame(reader)
        assert opcode == text and b"connection_established" in data

        parts = [b'{"event":"pusher:sub', b'scribe","data":{"chan', b'nel":"raw-frag"}}']
        for n, part in enumerate(parts):
            first, last = n == 0, n == len(parts) - 1
            writer.write(_masked_frame(text if first else cont, part, fin=last))
            if not last:
                writer.write(_masked_frame(ping, b"p%d" % n))
                assert await _read_frame(reader) == (pong, b"p%d" % n)
        opcode, data = await _read_frame(reader)
        assert opcode == text
        assert json.loads(data) == {"event": "pusher_internal:subscription_succeeded",
                                    "channel": "raw-frag", "data": "{}"}
        writer.close()

    run(go())
