"""The HTTP side of a real server: keep-alive, pipelining, bad requests, and the
official pusher-http-python SDK against every endpoint."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator

import pusher
import pytest

from tests.pusher_client import close_all, connect_many
from tests.servers import APP_ID, APP_KEY, APP_SECRET, Server, run_vask
from vask.signing import body_md5, http_string_to_sign, sign

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with run_vask(workers=2, config="[server]\nmax_http_body_bytes = 2048\n") as srv:
        yield srv


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
    sock.settimeout(timeout)
    data = b""
    out: list[tuple[int, dict]] = []
    while len(out) < count:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return out
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        status = int(lines[0].split()[1])
        length = next(int(line.split(":")[1]) for line in lines
                      if line.lower().startswith("content-length"))
        while len(rest) < length:
            rest += sock.recv(65536)
        out.append((status, json.loads(rest[:length]) if length else {}))
        data = rest[length:]
    return out


def test_keep_alive_and_pipelined_requests_answer_in_order(server: Server) -> None:
    body = json.dumps({"name": "e", "channel": "pipe", "data": "x"}).encode()
    batch = (signed_request("POST", f"/apps/{APP_ID}/events", body)
             + signed_request("GET", f"/apps/{APP_ID}/channels/pipe",
                              params="info=subscription_count")
             + b"GET /up HTTP/1.1\r\nHost: x\r\n\r\n"
             + signed_request("GET", f"/apps/{APP_ID}/channels"))
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(batch)
        answers = read_responses(sock, 4)
        assert answers == [(200, {}), (200, {"occupied": False, "subscription_count": 0}),
                           (200, {"status": "ok"}), (200, {"channels": {}})]
        # and the connection is still open for more
        sock.sendall(b"GET /up HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_responses(sock, 1) == [(200, {"status": "ok"})]


def test_app_key_is_accepted_in_place_of_the_app_id(server: Server) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(signed_request("GET", f"/apps/{APP_KEY}/channels"))
        assert read_responses(sock, 1) == [(200, {"channels": {}})]


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

    async def go() -> None:
        a, b = await connect_many(server.ws_url, 2)
        await a.subscribe("presence-sdk", json.dumps({"user_id": "ann"}))
        await b.subscribe("news")
        # authenticate/authorize helpers produce auths the server accepts
        auth = client.authenticate(channel="private-sdk", socket_id=b.socket_id)
        await b.send({"event": "pusher:subscribe",
                      "data": {"channel": "private-sdk", "auth": auth["auth"]}})
        await b.wait_for("pusher_internal:subscription_succeeded", "private-sdk")
        user = client.authenticate_user(socket_id=b.socket_id, user_data={"id": "bob"})
        await b.send({"event": "pusher:signin", "data": user})
        await b.wait_for("pusher:signin_success")

        result = await asyncio.to_thread(
            client.trigger, ["news", "presence-sdk"], "hello", {"n": 1})
        assert result == {}
        await b.wait_for("hello", "news")
        await a.wait_for("hello", "presence-sdk")
        batch = await asyncio.to_thread(client.trigger_batch, [
            {"channel": "news", "name": "one", "data": "1"},
            {"channel": "news", "name": "two", "data": "2"}])
        assert batch == {}
        await b.wait_for("two", "news")
        assert [f["event"] for f in b.frames if f.get("channel") == "news"][-2:] == ["one", "two"]
        listed = await asyncio.to_thread(client.channels_info, "presence-", ["user_count"])
        assert listed == {"channels": {"presence-sdk": {"user_count": 1}}}
        info = await asyncio.to_thread(client.channel_info, "presence-sdk", ["user_count"])
        assert info == {"occupied": True, "user_count": 1}
        users = await asyncio.to_thread(client.users_info, "presence-sdk")
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
    import subprocess
    import sys

    from tests.servers import free_port

    port = free_port()
    broker_port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "vask.cli", "run", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--broker", f"tcp://127.0.0.1:{broker_port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    broker = subprocess.Popen(
        [sys.executable, "-m", "vask.cli", "broker", "--bind", f"tcp://127.0.0.1:{broker_port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        from tests.servers import wait_ready
        wait_ready(port, time.monotonic() + 30, proc, hits=2)
        client = pusher.Pusher(app_id=APP_ID, key=APP_KEY, secret=APP_SECRET,
                               host="127.0.0.1", port=port, ssl=False, timeout=10)
        assert client.channels_info() == {"channels": {}}
        broker.kill()
        broker.wait(5)
        deadline = time.monotonic() + 20
        status = 200
        import urllib.error
        import urllib.request
        while time.monotonic() < deadline and status == 200:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2)
            except urllib.error.HTTPError as exc:
                status = exc.code
            time.sleep(0.2)
        assert status == 503
        with pytest.raises(pusher.errors.PusherError):
            client.channels_info()
    finally:
        for p in (proc, broker):
            if p.poll() is None:
                import os
                import signal
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)
