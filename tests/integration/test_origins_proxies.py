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
