"""The real supervisor, broker and workers: handshake, rejections, liveness, restarts."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
import websockets

from tests.pusher_client import PusherClient, close_all, connect_many
from tests.servers import Server, process_name, run_vask

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
        assert json.loads(r.read()) == {"ready": True, "broker": True}
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

            answering = await PusherClient.connect(srv.ws_url)
            await answering.wait_for("pusher:ping", timeout=10)
            await answering.send({"event": "pusher:pong", "data": {}})
            await asyncio.sleep(3)
            assert not answering.closed.done()
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


def test_startup_failure_stops_the_supervisor_with_the_cause() -> None:
    from tests.servers import free_port

    config = "[server]\nbroker_timeout = 0.5\n"
    path = f"/tmp/vask-startup-{os.getpid()}.toml"
    with open(path, "w") as f:
        f.write(config)
    dead_broker = f"tcp://127.0.0.1:{free_port()}"
    result = subprocess.run(
        [sys.executable, "-m", "vask.cli", "run", "--host", "127.0.0.1",
         "--port", str(free_port()), "--workers", "2", "--config", path,
         "--broker", dead_broker],
        capture_output=True, text=True, timeout=60, check=False)
    os.unlink(path)
    assert result.returncode == 1
    assert f"no broker answered at {dead_broker}" in result.stderr
    assert "failed to start" in result.stderr


def test_a_second_vask_on_the_same_port_is_refused() -> None:
    with run_vask(workers=1) as srv:
        result = subprocess.run(
            [sys.executable, "-m", "vask.cli", "run", "--host", "127.0.0.1",
             "--port", str(srv.port), "--workers", "1"],
            capture_output=True, text=True, timeout=30, check=False)
        assert result.returncode == 1
        assert f"cannot listen on 127.0.0.1:{srv.port}: Address already in use" in result.stderr


def test_fragmented_messages_and_idle_protocol_release(server: Server) -> None:
    async def go() -> None:
        client = await PusherClient.connect(server.ws_url)
        # a message split over three frames is reassembled
        await client.ws.send(iter(['{"event":"pusher:', 'ping",', '"data":{}}']))
        await client.wait_for("pusher:pong")
        # idle past the release time: the worker drops its protocol object, then
        # rebuilds it on the next inbound frame
        await asyncio.sleep(7)
        await client.send({"event": "pusher:ping", "data": {}})
        await client.wait(lambda f: len(client.events("pusher:pong")) == 2)
        await client.ws.send(iter(['{"event":"pusher:sub', 'scribe","data":{"channel":"frag"}}']))
        await client.wait_for("pusher_internal:subscription_succeeded", "frag")
        await client.close()

    run(go())
