"""A real ``vask run``: the per-app Origin allow-list (403 with a body naming the
problem), and ``trusted_proxies`` deciding whose X-Forwarded-For the per-address cap
believes."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from tests.servers import Server, run_vask

pytestmark = pytest.mark.timeout(90)

ORIGINS = """
[[apps]]
id = "1"
key = "app-key"
secret = "app-secret"
allowed_origins = ["https://app.example.com", "https://*.example.org"]

[[apps]]
id = "2"
key = "open-key"
secret = "open-secret"
"""


def handshake(port: int, key: str = "app-key", headers: tuple[str, ...] = ()) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    extra = "".join(f"{h}\r\n" for h in headers)
    sock.sendall((f"GET /app/{key}?protocol=7 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                  "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                  f"Sec-WebSocket-Version: 13\r\n{extra}\r\n").encode())
    return sock


def answer(sock: socket.socket) -> bytes:
    """The response head and whatever came with it: for a 101, up to the Pusher
    connection_established or error frame; otherwise until the server closes."""
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
        if data.startswith(b"HTTP/1.1 101") and (b"connection_established" in data
                                                 or b"pusher:error" in data):
            return data


@pytest.fixture(scope="module")
def origins_server() -> Iterator[Server]:
    with run_vask(workers=1, config=ORIGINS) as server:
        yield server


@pytest.mark.parametrize(("key", "origin", "accepted"), [
    ("app-key", "https://app.example.com", True),
    ("app-key", "https://chat.example.org", True),
    ("app-key", None, True),  # not a browser: the list cannot apply
    ("app-key", "https://evil.example.com", False),
    ("app-key", "http://app.example.com", False),
    ("app-key", "https://example.org", False),
    ("open-key", "https://evil.example.com", True),  # an app without a list takes any
])
def test_origin_allow_list(origins_server: Server, key: str, origin: str | None,
                           accepted: bool) -> None:
    headers = (f"Origin: {origin}",) if origin else ()
    with handshake(origins_server.port, key, headers) as sock:
        data = answer(sock)
    if accepted:
        assert data.startswith(b"HTTP/1.1 101") and b"connection_established" in data, data
    else:
        assert data.startswith(b"HTTP/1.1 403 Forbidden"), data
        body = data.partition(b"\r\n\r\n")[2]
        assert f"Origin '{origin}' is not allowed".encode() in body, body
        assert b"allowed_origins" in body


PROXIED = """
[server]
max_connections_per_ip = 1
trusted_proxies = ["127.0.0.1"]
"""


def test_a_trusted_proxy_forwards_the_client_address() -> None:
    """From a trusted proxy, X-Forwarded-For names the client: one connection per client
    address, however many arrive through the proxy; the right-most untrusted address
    counts, whatever the client wrote left of it."""
    with run_vask(workers=1, config=PROXIED) as server:
        a = handshake(server.port, headers=("X-Forwarded-For: 203.0.113.1",))
        b = handshake(server.port, headers=("X-Forwarded-For: 6.6.6.6, 203.0.113.2",))
        try:
            assert b"connection_established" in answer(a)
            assert b"connection_established" in answer(b)
            # a second connection for 203.0.113.1, even if it claims another origin first
            with handshake(server.port,
                           headers=("X-Forwarded-For: 198.51.100.7, 203.0.113.1",)) as c:
                refused = answer(c)
            assert refused.startswith(b"HTTP/1.1 429"), refused
        finally:
            a.close()
            b.close()


def test_an_untrusted_peer_cannot_choose_its_address() -> None:
    """Without trusted_proxies the header is ignored: the TCP peer is the client."""
    with run_vask(workers=1, config="[server]\nmax_connections_per_ip = 1\n") as server:
        a = handshake(server.port, headers=("X-Forwarded-For: 203.0.113.1",))
        try:
            assert b"connection_established" in answer(a)
            with handshake(server.port, headers=("X-Forwarded-For: 203.0.113.2",)) as b:
                refused = answer(b)
            assert refused.startswith(b"HTTP/1.1 429"), refused
        finally:
            a.close()


PROXY_PROTOCOL = """
[server]
max_connections_per_ip = 1
trusted_proxies = ["127.0.0.2"]
proxy_protocol = true
"""


def test_proxy_protocol_names_the_client() -> None:
    """With proxy_protocol, each connection from the trusted proxy starts with a PROXY
    line; the client it names is what max_connections_per_ip counts, for WebSockets and
    plain HTTP alike. The "proxy" connects from 127.0.0.2, so the harness's readiness
    probes from 127.0.0.1 are ordinary clients."""
    with run_vask(workers=1, config=PROXY_PROTOCOL,
                  env={"VASK_HTTP_REQUEST_TIMEOUT": "5"}, startup_timeout=30) as server:
        def from_proxy() -> socket.socket:
            return socket.create_connection(("127.0.0.1", server.port), timeout=10,
                                            source_address=("127.0.0.2", 0))

        def proxied(source: str) -> socket.socket:
            sock = from_proxy()
            sock.sendall(f"PROXY TCP4 {source} 127.0.0.1 40000 {server.port}\r\n".encode())
            return sock

        a, b = proxied("203.0.113.1"), proxied("203.0.113.2")
        try:
            for sock in (a, b):
                sock.sendall(b"GET /app/app-key?protocol=7 HTTP/1.1\r\nHost: x\r\n"
                             b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
                             b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                             b"Sec-WebSocket-Version: 13\r\n\r\n")
                assert b"connection_established" in answer(sock)
            with proxied("203.0.113.1") as c:
                c.sendall(b"GET /up HTTP/1.1\r\nHost: x\r\n\r\n")
                assert answer(c).startswith(b"HTTP/1.1 429")
            with proxied("203.0.113.3") as d:
                d.sendall(b"GET /up HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                assert answer(d).startswith(b"HTTP/1.1 200")
            # the trusted proxy without its PROXY line is refused
            with from_proxy() as e:
                e.sendall(b"GET /up HTTP/1.1\r\nHost: x\r\n\r\n")
                assert answer(e).startswith(b"HTTP/1.1 400")
        finally:
            a.close()
            b.close()
