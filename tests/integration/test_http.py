"""The HTTP side of a real server: keep-alive, pipelining, bad requests, and the
official pusher-http-python SDK against every endpoint.

The tests share one server; each names its channels with its own unique prefix and
lists channels filtered by that prefix, so none depends on what another left behind or
on the order the tests run in.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator

import pusher
import pytest

from tests.pusher_client import close_all, connect_many
from tests.servers import (
    APP_ID,
    APP_KEY,
    APP_SECRET,
    Server,
    free_port,
    run_vask,
    scratch_dir,
    vask_env,
    wait_ready,
)
from vask.signing import body_md5, http_string_to_sign, sign

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with run_vask(workers=2, config="[server]\nmax_http_body_bytes = 2048\n") as srv:
        yield srv


def unique(prefix: str) -> str:
    """A channel name prefix no other test uses."""
    return f"{prefix}{uuid.uuid4().hex[:12]}-"


def signed_request(method: str, path: str, body: bytes = b"", keep_alive: bool = True,
                   params: str = "") -> bytes:
    query = f"auth_key={APP_KEY}&auth_timestamp={int(time.time())}&auth_version=1.0"
    if body:
        query += f"&body_md5={body_md5(body)}"
    if params:
        query += "&" + params
    pairs = [tuple(p.split("=", 1)) for p in query.split("&")]
    signature = sign(APP_SECRET, http_string_to_sign(method, path, pairs))
    head = (f"{method} {path}?{query}&auth_signature={signature} HTTP/1.1\r\n"
            f"Host: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n")
    if not keep_alive:
        head += "Connection: close\r\n"
    return head.encode() + b"\r\n" + body


def read_responses(sock: socket.socket, count: int,
                   timeout: float = 10.0) -> list[tuple[int, dict]]:
    """Up to ``count`` responses; fewer if the server closes between two of them. A
    close inside a response, or ``timeout`` seconds without a byte, fails the test."""
    sock.settimeout(timeout)
    data = b""
    out: list[tuple[int, dict]] = []
    while len(out) < count:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                assert not data, f"connection closed inside a response head: {data!r}"
                return out
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        status = int(lines[0].split()[1])
        headers = dict(line.lower().split(":", 1) for line in lines[1:])
        assert headers["content-type"].strip() == "application/json", lines
        length = int(headers["content-length"])
        while len(rest) < length:
            chunk = sock.recv(65536)
            assert chunk, (f"connection closed inside a response body: "
                           f"{len(rest)} of {length} bytes: {data!r}")
            rest += chunk
        out.append((status, json.loads(rest[:length]) if length else {}))
        data = rest[length:]
    return out


def test_keep_alive_and_pipelined_requests_answer_in_order(server: Server) -> None:
    prefix = unique("pipe-")
    body = json.dumps({"name": "e", "channel": f"{prefix}a", "data": "x"}).encode()
    batch = (signed_request("POST", f"/apps/{APP_ID}/events", body)
             + signed_request("GET", f"/apps/{APP_ID}/channels/{prefix}a",
                              params="info=subscription_count")
             + b"GET /up HTTP/1.1\r\nHost: x\r\n\r\n"
             + signed_request("GET", f"/apps/{APP_ID}/channels",
                              params=f"filter_by_prefix={prefix}"))
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(batch)
        answers = read_responses(sock, 4)
        assert answers == [(200, {}), (200, {"occupied": False, "subscription_count": 0}),
                           (200, {"status": "ok"}), (200, {"channels": {}})]
        # and the connection is still open for more
        sock.sendall(b"GET /up HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_responses(sock, 1) == [(200, {"status": "ok"})]


def test_app_key_is_accepted_in_place_of_the_app_id(server: Server) -> None:
    prefix = unique("by-key-")

    async def go() -> None:
        (client,) = await connect_many(server.ws_url, 1)
        await client.subscribe(f"{prefix}a")
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            for app in (APP_KEY, APP_ID):
                sock.sendall(signed_request("GET", f"/apps/{app}/channels",
                                            params=f"filter_by_prefix={prefix}"))
                assert read_responses(sock, 1) == [(200, {"channels": {f"{prefix}a": {}}})]
        await client.close()

    asyncio.run(go())


def test_malformed_http_gets_a_clean_400(server: Server) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"THIS IS NOT HTTP\r\n\r\n")
        (status, body), = read_responses(sock, 1)
        assert status == 400 and "Malformed HTTP request" in body["error"]


def test_body_over_the_hard_limit_is_413(server: Server) -> None:
    body = json.dumps({"name": "e", "channel": "c", "data": "x" * 4000}).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(signed_request("POST", f"/apps/{APP_ID}/events", body))
        (status, answer), = read_responses(sock, 1)
        assert status == 413 and "2048" in answer["error"]


def test_pusher_http_python_against_every_endpoint(server: Server) -> None:
    client = pusher.Pusher(app_id=APP_ID, key=APP_KEY, secret=APP_SECRET, host="127.0.0.1",
                           port=server.port, ssl=False, timeout=10)

    presence = unique("presence-sdk-")
    room = f"{presence}room"
    news = f"{unique('news-')}a"

    async def go() -> None:
        a, b = await connect_many(server.ws_url, 2)
        await a.subscribe(room, json.dumps({"user_id": "ann"}))
        await b.subscribe(news)
        # authenticate/authorize helpers produce auths the server accepts
        private = f"{unique('private-sdk-')}a"
        auth = client.authenticate(channel=private, socket_id=b.socket_id)
        await b.send({"event": "pusher:subscribe",
                      "data": {"channel": private, "auth": auth["auth"]}})
        await b.wait_for("pusher_internal:subscription_succeeded", private)
        user = client.authenticate_user(socket_id=b.socket_id, user_data={"id": "bob"})
        await b.send({"event": "pusher:signin", "data": user})
        await b.wait_for("pusher:signin_success")

        result = await asyncio.to_thread(
            client.trigger, [news, room], "hello", {"n": 1})
        assert result == {}
        await b.wait_for("hello", news)
        await a.wait_for("hello", room)
        batch = await asyncio.to_thread(client.trigger_batch, [
            {"channel": news, "name": "one", "data": "1"},
            {"channel": news, "name": "two", "data": "2"}])
        assert batch == {}
        await b.wait_for("two", news)
        assert [f["event"] for f in b.frames if f.get("channel") == news][-2:] == ["one", "two"]
        listed = await asyncio.to_thread(client.channels_info, presence, ["user_count"])
        assert listed == {"channels": {room: {"user_count": 1}}}
        info = await asyncio.to_thread(client.channel_info, room, ["user_count"])
        assert info == {"occupied": True, "user_count": 1}
        users = await asyncio.to_thread(client.users_info, room)
        assert users == {"users": [{"id": "ann"}]}
        await asyncio.to_thread(client.send_to_user, "bob", "ping", {"x": 1})
        await b.wait_for("ping", "#server-to-user-bob")
        await asyncio.to_thread(client.terminate_user_connections, "bob")
        code, _ = await asyncio.wait_for(b.closed, 10)
        assert code == 4200
        assert not a.closed.done()
        await close_all([a])

    asyncio.run(go())


def test_sdk_errors_surface_status_and_message(server: Server) -> None:
    wrong = pusher.Pusher(app_id=APP_ID, key=APP_KEY, secret="not-the-secret",
                          host="127.0.0.1", port=server.port, ssl=False, timeout=10)
    with pytest.raises(pusher.errors.PusherBadAuth, match="signature"):
        wrong.trigger("news", "e", "d")
    unknown = pusher.Pusher(app_id="999", key=APP_KEY, secret=APP_SECRET,
                            host="127.0.0.1", port=server.port, ssl=False, timeout=10)
    with pytest.raises(pusher.errors.PusherBadStatus, match="404"):
        unknown.trigger("news", "e", "d")
    client = pusher.Pusher(app_id=APP_ID, key=APP_KEY, secret=APP_SECRET,
                           host="127.0.0.1", port=server.port, ssl=False, timeout=10)
    with pytest.raises(pusher.errors.PusherBadRequest, match="presence"):
        client.users_info("not-presence")


def test_broker_down_gives_503_and_ready_503() -> None:
    # workers joined to an external broker that is not there: the port answers but
    # /ready and broker-backed queries say 503
    port = free_port()
    broker_port = free_port()
    scratch = scratch_dir()
    env = vask_env(scratch)
    with open(scratch / "vask.log", "wb") as log, open(scratch / "broker.log", "wb") as blog:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vask.cli", "run", "--host", "127.0.0.1",
             "--port", str(port), "--workers", "1",
             "--broker", f"tcp://127.0.0.1:{broker_port}"],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        broker = subprocess.Popen(
            [sys.executable, "-m", "vask.cli", "broker", "--bind",
             f"tcp://127.0.0.1:{broker_port}"],
            stdout=blog, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    ok = False
    try:
        wait_ready(port, time.monotonic() + 30, proc, hits=2)
        client = pusher.Pusher(app_id=APP_ID, key=APP_KEY, secret=APP_SECRET,
                               host="127.0.0.1", port=port, ssl=False, timeout=10)
        assert client.channels_info() == {"channels": {}}
        broker.kill()
        broker.wait(5)
        deadline = time.monotonic() + 20
        status = 200
        while time.monotonic() < deadline and status == 200:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2)
            except urllib.error.HTTPError as exc:
                status = exc.code
            time.sleep(0.2)
        assert status == 503
        # a query the broker must answer: 503 with the API's JSON error body
        with pytest.raises(pusher.errors.PusherBadStatus) as info:
            client.channels_info()
        code, _, body = str(info.value).partition(": ")
        assert code == "503", info.value
        assert json.loads(body)["code"] == 503
        ok = True
    finally:
        for p in (proc, broker):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait(5)
        if ok:
            shutil.rmtree(scratch, ignore_errors=True)
        else:
            sys.stderr.write(f"--- vask log (kept in {scratch}) ---\n"
                             f"{(scratch / 'vask.log').read_text(errors='replace')}\n")
