"""The files under deploy/ are checked by the tools that will read them: systemd's own
verifier, ``nginx -t`` and ``caddy adapt --validate``, and nginx is also run for real in
front of a ``vask run``: TLS at the proxy, WebSocket upgrades through it, and
X-Forwarded-For honoured because 127.0.0.1 is in ``trusted_proxies``.

A tool that is not installed skips its test, naming the tool (``.ci/run`` installs
nginx where it can).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.pusher_client import PusherClient
from tests.servers import APP_KEY, free_port, run_vask
from tests.tls_certs import Ca, make_ca, make_server_cert

pytestmark = pytest.mark.timeout(90)

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
VASK_BIN = Path(sys.executable).parent / "vask"  # the console script next to python


def _tool(name: str) -> str:
    path = shutil.which(name) or (f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists()
                                  else None)
    if path is None:
        pytest.skip(f"{name} is not installed here, so deploy/ cannot be checked with it")
    return path


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    analyze = _tool("systemd-analyze")
    vask = str(VASK_BIN) if VASK_BIN.exists() else shutil.which("vask") or str(VASK_BIN)
    assert Path(vask).exists(), vask
    # the unit names /opt/vask/venv/bin/vask; verify checks that commands exist
    unit = (DEPLOY / "vask.service").read_text().replace("/opt/vask/venv/bin/vask", vask)
    (tmp_path / "vask.service").write_text(unit)
    done = subprocess.run([analyze, "verify", str(tmp_path / "vask.service")],
                          capture_output=True, text=True, timeout=60, check=False)
    # any complaint (an unknown key is only a warning) counts as a failure
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr
    assert "KillMode=mixed" in unit and "LimitNOFILE=" in unit and "Restart=" in unit


def test_caddyfile_validates() -> None:
    caddy = _tool("caddy")
    done = subprocess.run([caddy, "adapt", "--config", str(DEPLOY / "Caddyfile"),
                           "--validate"], capture_output=True, text=True, timeout=60,
                          check=False, env={**os.environ, "HOME": "/tmp"})
    assert done.returncode == 0, done.stderr
    config = json.loads(done.stdout)
    route = json.dumps(config)
    assert "127.0.0.1:6001" in route and "/ready" in route


def _nginx_config(folder: Path, vask_port: int, cert: Path, key: Path) -> tuple[Path, int, int]:
    """deploy/nginx-vask.conf inside a minimal nginx.conf that runs as this user in
    ``folder``, on free ports, with the test's certificate."""
    http_port, https_port = free_port(), free_port()
    site = (DEPLOY / "nginx-vask.conf").read_text()
    site = (site.replace("127.0.0.1:6001", f"127.0.0.1:{vask_port}")
            .replace("listen 80;", f"listen 127.0.0.1:{http_port};")
            .replace("listen 443 ssl;", f"listen 127.0.0.1:{https_port} ssl;")
            .replace("listen [::]:80;", "").replace("listen [::]:443 ssl;", "")
            .replace("/etc/letsencrypt/live/realtime.example.com/fullchain.pem", str(cert))
            .replace("/etc/letsencrypt/live/realtime.example.com/privkey.pem", str(key)))
    (folder / "vask.conf").write_text(site)
    temp = folder / "temp"
    temp.mkdir()
    main = f"""
pid {folder}/nginx.pid;
error_log {folder}/error.log warn;
daemon off;
worker_processes 1;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    include {folder}/vask.conf;
}}
"""
    if os.geteuid() == 0:
        main = "user root;\n" + main
    path = folder / "nginx.conf"
    path.write_text(main)
    return path, http_port, https_port


@pytest.fixture
def ca(tmp_path: Path) -> Ca:
    return make_ca(tmp_path)


def test_nginx_config_passes_nginx_t(tmp_path: Path, ca: Ca) -> None:
    nginx = _tool("nginx")
    leaf = make_server_cert(tmp_path, ca)
    conf, _, _ = _nginx_config(tmp_path, 6001, leaf.cert_path, leaf.key_path)
    done = subprocess.run([nginx, "-t", "-p", str(tmp_path), "-c", str(conf)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0 and "test is successful" in done.stderr, done.stderr


@contextlib.contextmanager
def running_nginx(nginx: str, conf: Path, folder: Path, port: int) -> Iterator[None]:
    process = subprocess.Popen([nginx, "-p", str(folder), "-c", str(conf)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port),
                                                                        timeout=1):
                break
            assert time.monotonic() < deadline, "nginx did not listen in time"
            time.sleep(0.05)
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=5)


def test_behind_nginx_tls_upgrades_and_forwarded_addresses(tmp_path: Path, ca: Ca) -> None:
    """Clients reach Vask through nginx over wss://; each is counted as the address
    nginx forwards, so with max_connections_per_ip = 1 two clients get in and a second
    connection of the first is refused with 429, relayed by nginx."""
    nginx = _tool("nginx")
    leaf = make_server_cert(tmp_path, ca)
    config = '[server]\ntrusted_proxies = ["127.0.0.1"]\nmax_connections_per_ip = 1\n'
    with run_vask(workers=1, config=config) as server:
        conf, http_port, https_port = _nginx_config(tmp_path, server.port, leaf.cert_path,
                                                    leaf.key_path)
        context = ssl.create_default_context(cafile=str(ca.path))
        url = f"wss://127.0.0.1:{https_port}/app/{APP_KEY}?protocol=7"

        async def scenario() -> None:
            # nginx appends the address it saw (127.0.0.1, trusted) to the header the
            # client sent; Vask takes the right-most untrusted one
            a = await PusherClient.connect(url, ssl=context,
                                           additional_headers={"X-Forwarded-For": "203.0.113.1"})
            b = await PusherClient.connect(url, ssl=context,
                                           additional_headers={"X-Forwarded-For": "203.0.113.2"})
            try:
                await a.subscribe("through-nginx")
                with pytest.raises(Exception) as refused:
                    await PusherClient.connect(
                        url, ssl=context, additional_headers={"X-Forwarded-For": "203.0.113.1"})
                assert "429" in str(refused.value), refused.value
            finally:
                await a.close()
                await b.close()

        with running_nginx(nginx, conf, tmp_path, https_port):
            asyncio.run(asyncio.wait_for(scenario(), 60))
            # plain http on the proxy redirects to https
            with socket.create_connection(("127.0.0.1", http_port), timeout=10) as raw:
                raw.sendall(b"GET /up HTTP/1.1\r\nHost: realtime.example.com\r\n"
                            b"Connection: close\r\n\r\n")
                assert raw.recv(4096).startswith(b"HTTP/1.1 301")
