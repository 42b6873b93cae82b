"""TLS on Vask's own port: wss:// and https:// against a real ``vask run``, with a CA and
server certificate made by the test (tests/tls_certs.py), plus the certificate reload
of :mod:`vask.workers.tls` and the bounds that must still hold under TLS.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pusher
import pytest
from pusher.requests import RequestsBackend

from tests.integration.test_http import signed_request
from tests.pusher_client import PusherClient
from tests.servers import APP_ID, APP_KEY, APP_SECRET, Server, run_vask
from tests.tls_certs import Ca, make_ca, make_server_cert
from vask.config import Settings
from vask.workers.tls import reload_context, server_context

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def ca(tmp_path: Path) -> Ca:
    return make_ca(tmp_path)


@pytest.fixture
def tls_server(tmp_path: Path, ca: Ca) -> Iterator[Server]:
    leaf = make_server_cert(tmp_path, ca)
    with run_vask(workers=2, tls_ca=str(ca.path),
                  env={"VASK_HTTP_REQUEST_TIMEOUT": "2"},
                  extra_args=("--tls-cert", str(leaf.cert_path),
                              "--tls-key", str(leaf.key_path))) as server:
        yield server


def sdk(port: int, ca_file: str | None) -> pusher.Pusher:
    """pusher-http-python over https. It pins its own CA bundle (``verify`` set to the
    file it ships), so trusting the test CA takes a backend that sets ``verify`` after it;
    ``ca_file=None`` keeps the SDK's own bundle, which does not know the test CA."""

    class Backend(RequestsBackend):  # type: ignore[misc]
        def __init__(self, client: object, **options: object) -> None:
            super().__init__(client, **options)
            if ca_file is not None:
                self.options["verify"] = ca_file

    return pusher.Pusher(app_id=APP_ID, key=APP_KEY, secret=APP_SECRET, host="127.0.0.1",
                         port=port, ssl=True, timeout=10, backend=Backend)


def test_wss_subscribe_and_https_trigger_with_the_python_sdk(tls_server: Server,
                                                             ca: Ca) -> None:
    context = ssl.create_default_context(cafile=str(ca.path))
    url = f"wss://127.0.0.1:{tls_server.port}/app/{APP_KEY}?protocol=7"

    async def scenario() -> dict[str, object]:
        client = await PusherClient.connect(url, ssl=context)
        try:
            await client.subscribe("tls-news")
            answer = await asyncio.to_thread(
                sdk(tls_server.port, str(ca.path)).trigger, "tls-news", "headline",
                {"text": "over TLS"})
            frame = await client.wait_for("headline", "tls-news")
            return {"answer": answer, "data": json.loads(frame["data"])}
        finally:
            await client.close()

    seen = asyncio.run(scenario())
    assert seen == {"answer": {}, "data": {"text": "over TLS"}}


def test_a_client_that_does_not_trust_the_ca_is_refused(tls_server: Server) -> None:
    untrusting = ssl.create_default_context()  # the system store: no test CA in it
    with socket.create_connection(("127.0.0.1", tls_server.port), timeout=10) as raw, \
            pytest.raises(ssl.SSLCertVerificationError):
        untrusting.wrap_socket(raw, server_hostname="127.0.0.1")
    # the SDK with its own CA bundle refuses the server as well
    with pytest.raises(Exception) as caught:
        sdk(tls_server.port, None).trigger("tls-news", "headline", {})
    assert "CERTIFICATE_VERIFY_FAILED" in repr(caught.value)
    # and a plain-text client gets no HTTP answer from the TLS port
    with socket.create_connection(("127.0.0.1", tls_server.port), timeout=10) as raw:
        raw.sendall(b"GET /up HTTP/1.1\r\nHost: x\r\n\r\n")
        assert not _read_all(raw, 10).startswith(b"HTTP/1.1 200")


def _read_all(sock: socket.socket, timeout: float) -> bytes:
    """Everything until the peer closes or resets; TimeoutError if it does neither."""
    sock.settimeout(timeout)
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except (ConnectionResetError, ssl.SSLError):
        pass
    return b"".join(chunks)


def test_a_handshake_that_never_completes_is_closed_after_http_request_timeout(
        tls_server: Server) -> None:
    """http_request_timeout is 2 s here: a client that opens TCP and never sends a
    ClientHello, and one that sends half of one, are both disconnected after about that,
    not held open."""
    hello_start = bytes.fromhex("160301")  # a TLS handshake record header, cut short
    for first in (b"", hello_start):
        with socket.create_connection(("127.0.0.1", tls_server.port), timeout=10) as raw:
            raw.sendall(first)
            began = time.monotonic()
            _read_all(raw, 20)  # returns at EOF or reset
            waited = time.monotonic() - began
        assert 1.5 < waited < 15, (first, waited)


def test_a_refused_request_over_tls_still_gets_its_answer(tls_server: Server, ca: Ca) -> None:
    """A 413 is written, then the TLS connection closes: the client reads the answer."""
    context = ssl.create_default_context(cafile=str(ca.path))
    body = b"x" * (1_048_576 + 10)
    with socket.create_connection(("127.0.0.1", tls_server.port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        tls.sendall(b"POST /apps/1/events HTTP/1.1\r\nHost: x\r\nContent-Type: "
                    b"application/json\r\nContent-Length: " + str(len(body)).encode() +
                    b"\r\n\r\n")
        with contextlib.suppress(OSError):  # it may close before the body is all sent
            tls.sendall(body)
        answer = _read_all(tls, 15)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]


SLOW_CONSUMER_CONFIG = """
[server]
write_buffer_limit = 262144
write_buffer_high = 131072
write_buffer_low = 65536
max_http_body_bytes = 16777216

[[apps]]
id = "1"
key = "app-key"
secret = "app-secret"
max_event_payload_kb = 64.0
max_event_batch_size = 100
"""


def test_a_slow_consumer_over_tls_is_cut(tmp_path: Path, ca: Ca) -> None:
    """write_buffer_limit holds under TLS: a wss subscriber that never reads is aborted
    once its unsent bytes pass the limit. Reading afterwards ends in a reset or EOF
    before everything published has arrived (a connection left open would deliver it
    all, then time out). Kernel buffers hold a few MB (the client's receive buffer is
    kept small, the server's send buffer autotunes up to tcp_wmem's maximum, 4 MB by
    default), so 12 MB are published, in two batches of big events."""
    leaf = make_server_cert(tmp_path, ca)
    with run_vask(workers=1, tls_ca=str(ca.path), config=SLOW_CONSUMER_CONFIG,
                  extra_args=("--tls-cert", str(leaf.cert_path),
                              "--tls-key", str(leaf.key_path))) as server:
        context = ssl.create_default_context(cafile=str(ca.path))
        raw = socket.socket()
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        raw.settimeout(10)
        raw.connect(("127.0.0.1", server.port))
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(b"GET /app/app-key?protocol=7 HTTP/1.1\r\nHost: x\r\n"
                        b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
                        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                        b"Sec-WebSocket-Version: 13\r\n\r\n")
            got = b""
            while b"connection_established" not in got:
                got += tls.recv(4096)
            subscribe = json.dumps({"event": "pusher:subscribe",
                                    "data": {"channel": "flood"}}).encode()
            tls.sendall(_masked_text(subscribe))
            while b"subscription_succeeded" not in got:
                got += tls.recv(4096)
            # pusher-http-python refuses events over 10 KB itself: sign by hand
            payload = "y" * 60_000
            body = json.dumps({"batch": [{"channel": "flood", "name": "e", "data": payload}
                                         for _ in range(100)]}).encode()
            published = 0
            with socket.create_connection(("127.0.0.1", server.port), timeout=20) as api_raw, \
                    context.wrap_socket(api_raw, server_hostname="127.0.0.1") as api:
                for _ in range(2):
                    api.sendall(signed_request("POST", "/apps/1/batch_events", body))
                    head = b""
                    while b"\r\n\r\n" not in head:
                        head += api.recv(4096)
                    assert head.startswith(b"HTTP/1.1 200"), head
                    published += 100 * len(payload)
            received = len(_read_all(tls, 20))
    assert received < published, (received, published)


def _masked_text(payload: bytes) -> bytes:
    mask = b"\x01\x02\x03\x04"
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    assert len(payload) < 126
    return bytes([0x81, 0x80 | len(payload)]) + mask + body


def test_reload_serves_the_new_certificate_to_new_connections_only(tmp_path: Path) -> None:
    """reload_context on the live context: a connection opened before keeps working on
    its session, and a connection opened after is given the new certificate."""
    ca = make_ca(tmp_path)
    first = make_server_cert(tmp_path, ca, "first")
    second = make_server_cert(tmp_path, ca, "second")
    cert_path, key_path = tmp_path / "live.pem", tmp_path / "live-key.pem"
    cert_path.write_bytes(first.cert_path.read_bytes())
    key_path.write_bytes(first.key_path.read_bytes())
    settings = Settings(tls_cert=str(cert_path), tls_key=str(key_path))
    context = server_context(settings)
    assert context is not None
    client_context = ssl.create_default_context(cafile=str(ca.path))

    class Echo(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            self.transport.write(data)  # type: ignore[attr-defined]

    async def serial_of(writer: asyncio.StreamWriter) -> int:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        from cryptography import x509
        return int(x509.load_der_x509_certificate(der).serial_number)

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   text: bytes) -> bytes:
        writer.write(text)
        await writer.drain()
        return await asyncio.wait_for(reader.readexactly(len(text)), 10)

    async def scenario() -> None:
        server = await asyncio.get_running_loop().create_server(
            Echo, "127.0.0.1", 0, ssl=context, ssl_handshake_timeout=10)
        port = server.sockets[0].getsockname()[1]
        try:
            old_r, old_w = await asyncio.open_connection(
                "127.0.0.1", port, ssl=client_context, server_hostname="127.0.0.1")
            assert await serial_of(old_w) == first.serial
            assert await echo(old_r, old_w, b"before") == b"before"

            cert_path.write_bytes(second.cert_path.read_bytes())
            key_path.write_bytes(second.key_path.read_bytes())
            reload_context(context, settings)

            new_r, new_w = await asyncio.open_connection(
                "127.0.0.1", port, ssl=client_context, server_hostname="127.0.0.1")
            assert await serial_of(new_w) == second.serial
            assert await echo(new_r, new_w, b"new") == b"new"
            # the connection from before the reload is still open and still works
            assert await echo(old_r, old_w, b"still here") == b"still here"
            assert await serial_of(old_w) == first.serial

            # a pair that does not load leaves the live context serving the last good one
            key_path.write_bytes(first.key_path.read_bytes())  # key of another cert
            with pytest.raises(ssl.SSLError):
                reload_context(context, settings)
            _, third_w = await asyncio.open_connection(
                "127.0.0.1", port, ssl=client_context, server_hostname="127.0.0.1")
            assert await serial_of(third_w) == second.serial
            for w in (old_w, new_w, third_w):
                w.close()
        finally:
            server.close()

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_sighup_serves_a_renewed_certificate_and_keeps_open_connections(
        tmp_path: Path) -> None:
    """A real ``vask run`` with TLS: the certificate files are replaced in place (as a
    renewal does) and SIGHUP reloads; a new connection gets the new certificate (signed
    by another CA), while a WebSocket opened before still receives events."""
    import shutil
    import signal

    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    first_ca = make_ca(tmp_path / "first")
    second_ca = make_ca(tmp_path / "second", name="Vask renewed CA")
    first = make_server_cert(tmp_path / "first", first_ca)
    second = make_server_cert(tmp_path / "second", second_ca)
    live = tmp_path / "live"
    live.mkdir()
    cert, key = live / "cert.pem", live / "key.pem"
    shutil.copy(first.cert_path, cert)
    shutil.copy(first.key_path, key)
    with run_vask(workers=2, tls_ca=str(first_ca.path),
                  extra_args=("--tls-cert", str(cert), "--tls-key", str(key))) as server:
        url = f"wss://127.0.0.1:{server.port}/app/{APP_KEY}?protocol=7"
        trusts_first = ssl.create_default_context(cafile=str(first_ca.path))
        trusts_second = ssl.create_default_context(cafile=str(second_ca.path))

        async def scenario() -> None:
            old = await PusherClient.connect(url, ssl=trusts_first)
            try:
                await old.subscribe("renewal")
                shutil.copy(second.cert_path, cert)
                shutil.copy(second.key_path, key)
                before = server.log().count("TLS certificate re-read")
                server.process.send_signal(signal.SIGHUP)
                deadline = time.monotonic() + 30
                while server.log().count("TLS certificate re-read") < before + 2:
                    assert time.monotonic() < deadline, server.log()[-2000:]
                    await asyncio.sleep(0.05)
                # every worker now serves the renewed pair: try several connections
                for _ in range(6):
                    fresh = await PusherClient.connect(url, ssl=trusts_second)
                    await fresh.close()
                    with pytest.raises(ssl.SSLCertVerificationError):
                        await PusherClient.connect(url, ssl=trusts_first)
                await asyncio.to_thread(sdk(server.port, str(second_ca.path)).trigger,
                                        "renewal", "still-here", {"n": 1})
                frame = await old.wait_for("still-here", "renewal")
                assert json.loads(frame["data"]) == {"n": 1}
            finally:
                await old.close()

        asyncio.run(scenario())
