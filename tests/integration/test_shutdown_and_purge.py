"""Recovery paths on a real `vask run`: a graceful stop with clients connected, the
broker purging a worker that stopped heartbeating (SIGSTOP, not dead), the supervisor's
crash-loop stop and SIGKILL escalation, and the closing-handshake deadline."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time
from pathlib import Path

import pytest

from tests.pusher_client import PusherClient, close_all, connect_on_worker, worker_of
from tests.servers import process_name, run_vask

pytestmark = pytest.mark.timeout(120)


def test_sigterm_with_clients_connected_closes_each_with_4200_then_exits_0() -> None:
    with run_vask(workers=2) as server:
        async def go() -> list[tuple[int | None, str | None]]:
            clients = [await PusherClient.connect(server.ws_url) for _ in range(6)]
            for client in clients:
                await client.subscribe("news")
            server.process.send_signal(signal.SIGTERM)
            closes = [await asyncio.wait_for(c.closed, 10) for c in clients]
            for client in clients:
                errors = client.events("pusher:error")
                assert errors and errors[-1]["data"]["code"] == 4200
            return closes

        closes = asyncio.run(go())
        assert {code for code, _ in closes} == {4200}
        assert server.process.wait(timeout=15) == 0


def worker_holding(client: PusherClient, port: int, pids: list[int]) -> int:
    """The pid of the process holding the server side of ``client``'s TCP connection
    (found through /proc: the socket's inode, then the process's descriptors)."""
    client_port = client.ws.local_address[1]
    inode = ""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                local, remote = fields[1], fields[2]
                if int(local.rsplit(":", 1)[1], 16) == port and \
                        int(remote.rsplit(":", 1)[1], 16) == client_port:
                    inode = fields[9]
    assert inode, "the connection is not in /proc/net/tcp"
    for pid in pids:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                    return pid
            except OSError:
                continue
    raise AssertionError("no process holds the connection")


CONFIG = """
[server]
heartbeat_interval = 0.5
heartbeat_timeout = 2.0
"""


def test_a_worker_that_stops_heartbeating_is_purged_with_its_members() -> None:
    with run_vask(workers=2, config=CONFIG) as server:
        async def go() -> None:
            watcher = await PusherClient.connect(server.ws_url)
            frozen = await connect_on_worker(server.ws_url, avoid={worker_of(watcher)})
            data = {"user_id": "frozen", "user_info": {}}
            await watcher.subscribe("presence-room", json.dumps({"user_id": "w"}))
            await frozen.subscribe("presence-room", json.dumps(data))
            await watcher.wait(lambda f: f.get("event") == "pusher_internal:member_added")
            stopped = worker_holding(frozen, server.port, server.children())
            os.kill(stopped, signal.SIGSTOP)
            began = time.monotonic()
            try:
                removed = await watcher.wait(
                    lambda f: f.get("event") == "pusher_internal:member_removed", timeout=15)
                assert json.loads(removed["data"])["user_id"] == "frozen"
                assert time.monotonic() - began < 10  # heartbeat_timeout 2 s plus a tick
            finally:
                os.kill(stopped, signal.SIGCONT)
            await close_all([watcher, frozen])

        asyncio.run(go())


def test_a_child_that_keeps_dying_at_startup_stops_the_supervisor() -> None:
    """The broker is killed within EARLY_DEATH of each start: after MAX_EARLY_DEATHS in a
    row the supervisor gives up with exit status 1 and says why."""
    with run_vask(workers=1) as server:
        seen: set[int] = set()
        deadline = time.monotonic() + 60
        while server.process.poll() is None and time.monotonic() < deadline:
            brokers = [p for p in server.children()
                       if process_name(p) == "vask-broker" and p not in seen]
            for pid in brokers:
                seen.add(pid)
                os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        assert server.process.wait(timeout=10) == 1
        assert len(seen) == 5
        assert "keeps dying at startup" in server.log()


def test_a_worker_that_ignores_sigterm_is_killed_after_the_grace() -> None:
    config = "[server]\nshutdown_grace = 1.0\n"
    with run_vask(workers=1, config=config) as server:
        worker = next(p for p in server.children() if process_name(p).startswith("vask-worker"))
        os.kill(worker, signal.SIGSTOP)  # a stopped process does not act on SIGTERM
        began = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        server.process.wait(timeout=20)
        took = time.monotonic() - began
        # it waits stop_ready_delay (0 here) + min(drain_window, shutdown_grace) +
        # shutdown_grace + 2 s = 4 s, then SIGKILL
        assert 3.5 < took < 4.0 + 3.0
        stat = Path(f"/proc/{worker}/stat")
        assert not stat.exists() or stat.read_text().split()[2] == "Z"


def test_a_client_that_never_answers_the_close_frame_is_cut_after_5_s() -> None:
    with run_vask(workers=1) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=15) as sock:
            sock.sendall(b"GET /app/app-key?protocol=abc HTTP/1.1\r\nHost: x\r\n"
                         b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
                         b"Sec-WebSocket-Version: 13\r\n"
                         b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
            began = time.monotonic()
            got = b""
            while True:  # the 101, the pusher:error 4006 and the close frame, then EOF
                try:
                    chunk = sock.recv(4096)
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                got += chunk
            took = time.monotonic() - began
        assert b"101 Switching Protocols" in got and b"4006" in got
        assert 4.0 < took < 5.0 + 2.5  # the closing handshake waits 5 s, checked each 1 s
