"""Operations on a running `vask run`: configuration reload (SIGHUP), rolling restart
(SIGUSR2) under a connected load, and a graceful stop (SIGTERM) with a request in
flight.

Run as a script, the rolling restart part measures the reconnect curve with more
clients (the figures in docs/operations.md):

    .venv/bin/python -m tests.integration.test_reload_roll_stop 2000 --workers 2 \\
        --drain-window 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import websockets

from tests.pusher_client import PusherClient, close_all, connect_spread
from tests.servers import Server, process_name, run_vask
from vask.signing import body_md5, http_string_to_sign, sign

pytestmark = pytest.mark.timeout(180)

#: (id, key, secret, enabled)
AppRow = tuple[str, str, str, bool]
APP1: AppRow = ("1", "app-key", "app-secret", True)
APP2: AppRow = ("2", "key-two", "secret-two", True)
APP3: AppRow = ("3", "key-three", "secret-three", True)


def config(apps: list[AppRow], server: str = "") -> str:
    text = f"[server]\n{server}\n"
    for app_id, key, secret, enabled in apps:
        text += (f'[[apps]]\nid = "{app_id}"\nkey = "{key}"\nsecret = "{secret}"\n'
                 f"enabled = {'true' if enabled else 'false'}\n")
    return text


def url(server: Server, key: str) -> str:
    return f"ws://127.0.0.1:{server.port}/app/{key}?protocol=7&client=test&version=1"


def publish_request(app: AppRow, channel: str, data: str) -> tuple[str, bytes]:
    """The signed path+query and body of ``POST /apps/{id}/events``."""
    app_id, key, secret, _ = app
    body = json.dumps({"name": "ev", "channel": channel, "data": data}).encode()
    path = f"/apps/{app_id}/events"
    query = (f"auth_key={key}&auth_timestamp={int(time.time())}&auth_version=1.0"
             f"&body_md5={body_md5(body)}")
    pairs = [tuple(p.split("=", 1)) for p in query.split("&")]
    signature = sign(secret, http_string_to_sign("POST", path, pairs))
    return f"{path}?{query}&auth_signature={signature}", body


def publish(server: Server, app: AppRow, channel: str, data: str) -> int:
    target, body = publish_request(app, channel, data)
    request = urllib.request.Request(f"http://127.0.0.1:{server.port}{target}", data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def reload(server: Server, text: str, done_before: int) -> None:
    """Write the new configuration and SIGHUP the supervisor; return once every worker
    and the broker have taken it (their log lines), or once it was refused."""
    (server.log_path.parent / "vask.toml").write_text(text)
    server.process.send_signal(signal.SIGHUP)
    wanted = done_before + server.workers + 1
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        log = server.log()
        if log.count("configuration reloaded") >= wanted or "reload refused" in log:
            return
        time.sleep(0.05)
    raise AssertionError("the reload was not applied in time")


async def receives(client: PusherClient, channel: str, data: str) -> None:
    await client.wait(lambda f: f.get("channel") == channel and f.get("data") == data,
                      timeout=15)


async def refused_with(url_: str, code: int) -> None:
    client = await PusherClient.connect(url_, established=False)
    assert (await asyncio.wait_for(client.closed, 10))[0] == code
    await client.close()


# --- reload ----------------------------------------------------------------------------


def test_sighup_adds_an_app_and_every_client_stays_connected() -> None:
    with run_vask(workers=2, config=config([APP1])) as server:
        async def go() -> None:
            await refused_with(url(server, APP2[1]), 4001)
            olds = await connect_spread(url(server, APP1[1]), 4, 2)
            for client in olds:
                await client.subscribe("news")
            await asyncio.to_thread(reload, server, config([APP1, APP2]), 0)
            new = await PusherClient.connect(url(server, APP2[1]), key=APP2[1],
                                             secret=APP2[2])
            await new.subscribe("news")
            assert await asyncio.to_thread(publish, server, APP1, "news", "one") == 200
            assert await asyncio.to_thread(publish, server, APP2, "news", "two") == 200
            for client in olds:
                await receives(client, "news", "one")
                assert not client.closed.done()
            await receives(new, "news", "two")
            assert not new.events("ev") or all(f["data"] == "two" for f in new.events("ev"))
            await close_all([*olds, new])

        asyncio.run(go())
        assert "reload: app 2 added" in server.log()


def test_sighup_removing_and_disabling_apps_closes_only_their_clients() -> None:
    with run_vask(workers=2, config=config([APP1, APP2, APP3])) as server:
        async def go() -> None:
            ones = await connect_spread(url(server, APP1[1]), 2, 2)
            twos = await connect_spread(url(server, APP2[1]), 2, 2)
            threes = await connect_spread(url(server, APP3[1]), 2, 2)
            for client in ones:
                await client.subscribe("news")
            disabled = (*APP3[:3], False)
            await asyncio.to_thread(reload, server, config([APP1, disabled]), 0)
            for client in twos:
                assert (await asyncio.wait_for(client.closed, 10))[0] == 4001
                assert client.events("pusher:error")[-1]["data"]["code"] == 4001
            for client in threes:
                assert (await asyncio.wait_for(client.closed, 10))[0] == 4003
            assert await asyncio.to_thread(publish, server, APP1, "news", "still") == 200
            for client in ones:
                await receives(client, "news", "still")
                assert not client.closed.done()
            await refused_with(url(server, APP2[1]), 4001)
            await refused_with(url(server, APP3[1]), 4003)
            assert await asyncio.to_thread(publish, server, APP2, "news", "x") == 404
            assert await asyncio.to_thread(publish, server, APP3, "news", "x") == 403
            await close_all([*ones, *twos, *threes])

        asyncio.run(go())
        log = server.log()
        assert "reload: app 2 removed" in log and "reload: app 3 disabled" in log


def test_sighup_rekeying_checks_new_subscriptions_against_the_new_secret() -> None:
    with run_vask(workers=1, config=config([APP1, APP2])) as server:
        async def go() -> None:
            one = await PusherClient.connect(url(server, APP1[1]))
            two = await PusherClient.connect(url(server, APP2[1]), key=APP2[1],
                                             secret=APP2[2])
            first = await one.subscribe("private-before")
            assert first["event"] == "pusher_internal:subscription_succeeded"
            rekeyed = [("1", APP1[1], "fresh-secret", True), ("2", "key-two-b", APP2[2], True)]
            await asyncio.to_thread(reload, server, config(rekeyed), 0)
            assert (await asyncio.wait_for(two.closed, 10))[0] == 4001
            stale = await one.subscribe("private-stale")  # signed with the old secret
            assert stale["event"] == "pusher:subscription_error"
            one.secret = "fresh-secret"
            fresh = await one.subscribe("private-fresh")
            assert fresh["event"] == "pusher_internal:subscription_succeeded"
            assert not one.closed.done()
            again = await PusherClient.connect(url(server, "key-two-b"))
            await close_all([one, two, again])

        asyncio.run(go())
        log = server.log()
        assert "reload: app 1 secret changed" in log
        assert "reload: app 2 key changed (key-two -> key-two-b)" in log
        assert "fresh-secret" not in log


def test_sighup_with_a_broken_file_keeps_the_running_configuration() -> None:
    with run_vask(workers=2, config=config([APP1])) as server:
        async def go() -> None:
            client = await PusherClient.connect(url(server, APP1[1]))
            await client.subscribe("news")
            broken = config([APP1, APP2]) + "[server\n"
            await asyncio.to_thread(reload, server, broken, 0)
            assert await asyncio.to_thread(publish, server, APP1, "news", "ok") == 200
            await receives(client, "news", "ok")
            await refused_with(url(server, APP2[1]), 4001)
            await client.close()

        asyncio.run(go())
        lines = [line for line in server.log().splitlines() if "reload" in line]
        assert len(lines) == 1, lines
        assert "ERROR reload refused, keeping the running configuration: config: " in \
            lines[0] and "not valid TOML" in lines[0]


# --- rolling restart -------------------------------------------------------------------


@dataclass
class Load:
    """Clients that reconnect at once when closed with 4200, and what happened."""

    count: int
    #: per client, the socket ids it was given, in order
    ids: list[list[str]] = field(default_factory=list)
    #: (client, close code, monotonic time) of every close the server made
    closes: list[tuple[int, int | None, float]] = field(default_factory=list)
    #: (client, error) of every connection attempt that failed
    failures: list[tuple[int, str]] = field(default_factory=list)
    #: monotonic times of every successful reconnect
    reconnects: list[float] = field(default_factory=list)
    done: bool = False

    async def run_one(self, i: int, target: str) -> None:
        while not self.done:
            try:
                ws = await websockets.connect(target, open_timeout=30, close_timeout=2)
                established = json.loads(await asyncio.wait_for(ws.recv(), 30))
            except (TimeoutError, OSError, websockets.WebSocketException) as exc:
                self.failures.append((i, repr(exc)))
                await asyncio.sleep(0.05)
                continue
            self.ids[i].append(json.loads(established["data"])["socket_id"])
            if len(self.ids[i]) > 1:
                self.reconnects.append(time.monotonic())
            try:
                async for _ in ws:
                    pass
            except websockets.ConnectionClosed:
                pass
            if self.done:
                await ws.close()
                return
            self.closes.append((i, ws.close_code, time.monotonic()))

    def prefixes(self, which: int) -> set[str]:
        return {ids[which].split(".")[0] for ids in self.ids if ids}


async def roll_under_load(server: Server, count: int, drain_window: float,
                          deadline: float = 120.0) -> tuple[Load, float]:
    """``count`` clients connected, then SIGUSR2; returns once every client is on a new
    worker and the supervisor says the restart is done. Also returns the SIGUSR2 time."""
    load = Load(count, ids=[[] for _ in range(count)])
    target = url(server, APP1[1])
    tasks = []
    for i in range(count):
        tasks.append(asyncio.ensure_future(load.run_one(i, target)))
        if i % 50 == 49:
            await asyncio.sleep(0.05)  # connects in waves, like real clients arriving
    end = time.monotonic() + deadline
    while sum(1 for ids in load.ids if ids) < count:
        assert time.monotonic() < end, "clients did not all connect"
        await asyncio.sleep(0.05)
    old = load.prefixes(0)
    began = time.monotonic()
    server.process.send_signal(signal.SIGUSR2)
    while not (all(ids[-1].split(".")[0] not in old for ids in load.ids)
               and "rolling restart done" in server.log()):
        assert time.monotonic() < end, "the rolling restart did not finish in time"
        await asyncio.sleep(0.05)
    load.done = True
    await asyncio.sleep(0.2)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return load, began


ROLL_CLIENTS = 300
ROLL_WINDOW = 4.0


def test_rolling_restart_under_load_refuses_nothing_and_spreads_the_closes() -> None:
    cfg = config([APP1], f"drain_window = {ROLL_WINDOW}\nshutdown_grace = 3.0")
    with run_vask(workers=2, config=cfg) as server:
        old_workers = sorted(p for p in server.children()
                             if process_name(p).startswith("vask-worker"))
        load, began = asyncio.run(roll_under_load(server, ROLL_CLIENTS, ROLL_WINDOW))
        assert load.failures == []  # no connection attempt refused or failed
        codes = Counter(code for _, code, _ in load.closes)
        assert set(codes) == {4200}, codes
        first_closes = {i for i, _, _ in load.closes}
        assert first_closes == set(range(ROLL_CLIENTS))  # every client was moved...
        assert all(len(ids) >= 2 for ids in load.ids)  # ...and reconnected
        old, new = load.prefixes(0), load.prefixes(-1)
        assert len(old) == 2 and len(new) == 2 and not old & new
        # spread: the closes of each old worker cover most of the window, and not all
        # come in its first tenth
        times = sorted(t for _, _, t in load.closes)
        span = times[-1] - times[0]
        assert span >= 0.6 * ROLL_WINDOW, span
        early = sum(1 for t in times if t - times[0] < 0.1 * ROLL_WINDOW)
        assert early < 0.35 * len(times), (early, len(times))
        # the old workers are gone and the supervisor did not take that as a crash
        deadline = time.monotonic() + 20
        while any(Path(f"/proc/{p}").exists() and process_name(p) for p in old_workers):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        log = server.log()
        assert "exited with status" not in log
        assert log.count("drained and exited") == 2
        assert server.process.poll() is None
        assert not any(p in server.children() for p in old_workers)
        assert began > 0


# --- graceful stop ---------------------------------------------------------------------


def ready_status(port: int) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=5) as r:
            return int(r.status), json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_sigterm_answers_ready_503_first_and_finishes_a_request_in_flight() -> None:
    cfg = config([APP1], "stop_ready_delay = 2.0\nshutdown_grace = 5.0\ndrain_window = 1.0\n"
                         "broker_timeout = 30.0\nheartbeat_interval = 0.5\n"
                         "heartbeat_timeout = 30.0\n")
    with run_vask(workers=1, config=cfg) as server:
        broker = next(p for p in server.children() if process_name(p) == "vask-broker")

        async def go() -> None:
            subscriber = await PusherClient.connect(url(server, APP1[1]))
            await subscriber.subscribe("news")
            target, body = publish_request(APP1, "news", "in flight")
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
            os.kill(broker, signal.SIGSTOP)  # the publish now waits for the broker's ack
            try:
                sock.sendall(f"POST {target} HTTP/1.1\r\nHost: x\r\nContent-Type: "
                             f"application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                             .encode() + body)
                assert (await asyncio.to_thread(ready_status, server.port))[0] == 200
                server.process.send_signal(signal.SIGTERM)
                deadline = time.monotonic() + 10
                while True:  # /ready turns 503 while the listener still answers
                    status, ready = await asyncio.to_thread(ready_status, server.port)
                    if status == 503:
                        break
                    assert time.monotonic() < deadline, "/ready never answered 503"
                    await asyncio.sleep(0.05)
                assert ready == {"ready": False, "broker": True, "recovering": False}
            finally:
                os.kill(broker, signal.SIGCONT)
            answer = await asyncio.to_thread(sock.recv, 65536)
            assert answer.startswith(b"HTTP/1.1 200 OK"), answer
            # then the idle keep-alive connection is closed cleanly (FIN, not a reset)
            assert await asyncio.to_thread(sock.recv, 65536) == b""
            sock.close()
            await receives(subscriber, "news", "in flight")
            assert (await asyncio.wait_for(subscriber.closed, 15))[0] == 4200

        asyncio.run(go())
        assert server.process.wait(timeout=30) == 0
        log = server.log()
        assert "supervisor" in log and "INFO stopping:" in log and "INFO stopped" in log


def main() -> None:
    """Measure the reconnect curve of a rolling restart (see the module docstring)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("clients", type=int)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--drain-window", type=float, default=10.0)
    args = parser.parse_args()
    cfg = config([APP1], f"drain_window = {args.drain_window}")
    with run_vask(workers=args.workers, config=cfg, startup_timeout=60) as server:
        load, began = asyncio.run(roll_under_load(server, args.clients, args.drain_window,
                                                  deadline=300))
    per_second = Counter(int(t - began) for t in load.reconnects)
    print(f"clients {args.clients}, workers {args.workers}, drain_window "
          f"{args.drain_window:g}s: failed connection attempts {len(load.failures)}, "
          f"closes {Counter(c for _, c, _ in load.closes)}, reconnects "
          f"{len(load.reconnects)}")
    print("second after SIGUSR2: reconnects")
    for second in range(max(per_second) + 1 if per_second else 0):
        print(f"{second:>4} {per_second.get(second, 0):>6}")


if __name__ == "__main__":
    main()
