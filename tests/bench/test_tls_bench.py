"""``vask bench --tls``: the load generator's WebSocket clients and the HTTP publisher
speak TLS to loopback fakes that only speak TLS, verified against a CA or not at all."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import ssl
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.server import serve

from tests.bench.test_loopback import KEY, SECRET, fake_pusher
from tests.tls_certs import make_ca, make_server_cert
from vask.bench.httppub import Publisher, client_tls
from vask.bench.loadgen import Worker


def server_tls(folder: Path) -> tuple[ssl.SSLContext, str]:
    ca = make_ca(folder)
    leaf = make_server_cert(folder, ca)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(leaf.cert_path, leaf.key_path)
    return context, str(ca.path)


def test_client_tls_modes(tmp_path: Path) -> None:
    assert client_tls(False) is None
    unverified = client_tls(True)
    assert unverified is not None and unverified.verify_mode == ssl.CERT_NONE
    _, ca = server_tls(tmp_path)
    verified = client_tls(False, ca)  # a CA file alone turns TLS on
    assert verified is not None and verified.verify_mode == ssl.CERT_REQUIRED


@pytest.mark.timeout(30)
@pytest.mark.parametrize("verify", [True, False])
def test_loadgen_and_publisher_over_tls(tmp_path: Path, verify: bool) -> None:
    context, ca = server_tls(tmp_path)
    cfg_tls = {"tls": True, "tls_ca": ca if verify else ""}
    requests: list[bytes] = []

    async def http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            requests.append(await reader.readexactly(length))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
            await writer.drain()

    async def main() -> dict[str, Any]:
        async with serve(fake_pusher, "127.0.0.1", 0, ssl=context) as server:
            port = server.sockets[0].getsockname()[1]
            a, _b = mp.Pipe()
            w = Worker(a, {"host": "127.0.0.1", "port": port, "key": KEY, "secret": SECRET,
                           **cfg_tls})
            res = await w.cmd_connect({"start": 0, "count": 3, "channel": "private-t{i}"})
            for _ in range(200):
                if w.deliveries >= 9:
                    break
                await asyncio.sleep(0.02)
            out = await w.cmd_results({})
            await w.cmd_close({})
        api = await asyncio.start_server(http, "127.0.0.1", 0, ssl=context)
        pub = Publisher("127.0.0.1", api.sockets[0].getsockname()[1], "app-id", KEY, SECRET,
                        inflight=2, tls=client_tls(True, cfg_tls["tls_ca"]))
        await pub.run(4, lambda seq, t: f"~ts{t}~{seq}", "bench")
        api.close()
        return {**out, "connected": res["ok"], "published": pub.ok}

    out = asyncio.run(main())
    assert out["connected"] == 3 and out["deliveries"] == 9, out
    assert out["error_count"] == 0 and out["published"] == 4 and len(requests) == 4
