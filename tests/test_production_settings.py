"""Unit tests (no sockets) of the production settings: TLS files, trusted proxies and
X-Forwarded-For, the Origin allow-list, the JSON log format, TOML typing, and
``vask config check``."""

from __future__ import annotations

import contextlib
import json
import logging
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.tls_certs import make_ca, make_server_cert
from vask.cli import main
from vask.config import ConfigError, load_settings, settings_from_dict, settings_to_dict
from vask.logs import JsonFormatter
from vask.workers.admission import (
    forwarded_client,
    origin_allowed,
    proxy_source,
    trusted_networks,
)
from vask.workers.tls import server_context


def load(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> object:
    path = tmp_path / "vask.toml"
    path.write_text(text)
    return load_settings(str(path), env=env or {})


# --- TOML values have TOML types -------------------------------------------------------

@pytest.mark.parametrize("line", ['port = "6001"', 'activity_timeout = "120"',
                                  'pong_timeout = "5"', 'trusted_proxies = "10.0.0.1"'])
def test_toml_strings_are_not_converted(tmp_path: Path, line: str) -> None:
    with pytest.raises(ConfigError, match=r"server\.\w+: expected"):
        load(tmp_path, f"[server]\n{line}\n")


def test_toml_app_strings_are_not_converted(tmp_path: Path) -> None:
    app = '[[apps]]\nid = "1"\nkey = "k"\nsecret = "s"\n'
    with pytest.raises(ConfigError, match=r"apps\[0\]\.enable_client_messages: expected bool"):
        load(tmp_path, app + 'enable_client_messages = "true"\n')
    with pytest.raises(ConfigError, match=r"apps\[0\]\.max_connections: expected int"):
        load(tmp_path, app + 'max_connections = "10"\n')


def test_environment_strings_are_converted() -> None:
    settings = load_settings(env={"VASK_PORT": "7001", "VASK_PONG_TIMEOUT": "2.5",
                                  "VASK_TRUSTED_PROXIES": "10.0.0.1, 192.168.0.0/16",
                                  "VASK_APP_ENABLE_CLIENT_MESSAGES": "no"})
    assert settings.port == 7001 and settings.pong_timeout == 2.5
    assert settings.trusted_proxies == ("10.0.0.1", "192.168.0.0/16")
    assert settings.apps[0].enable_client_messages is False


# --- TLS files -------------------------------------------------------------------------

def test_tls_needs_both_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"server\.tls_key: tls_cert and tls_key go together"):
        load_settings(env={"VASK_TLS_CERT": str(tmp_path / "c.pem")})
    with pytest.raises(ConfigError, match=r"server\.tls_cert: tls_cert and tls_key go together"):
        load_settings(env={"VASK_TLS_KEY": str(tmp_path / "k.pem")})


def test_tls_files_must_be_readable_and_a_matching_pair(tmp_path: Path) -> None:
    ca = make_ca(tmp_path)
    one = make_server_cert(tmp_path, ca, "one")
    two = make_server_cert(tmp_path, ca, "two")
    missing = str(tmp_path / "nope.pem")
    with pytest.raises(ConfigError, match=r"server\.tls_cert: cannot read .*nope\.pem"):
        load_settings(overrides={"tls_cert": missing, "tls_key": str(one.key_path)}, env={})
    with pytest.raises(ConfigError, match="do not load as a PEM certificate chain"):
        load_settings(overrides={"tls_cert": str(one.cert_path), "tls_key": str(two.key_path)},
                      env={})
    with pytest.raises(ConfigError, match="do not load as a PEM certificate chain"):
        load_settings(overrides={"tls_cert": str(one.key_path), "tls_key": str(one.key_path)},
                      env={})
    good = load_settings(overrides={"tls_cert": str(one.cert_path),
                                    "tls_key": str(one.key_path)}, env={})
    context = server_context(good)
    assert context is not None
    assert context.minimum_version.name == "TLSv1_2"
    assert server_context(load_settings(env={})) is None


def test_tls_error_is_one_line_exit_2(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["run", "--tls-cert", str(tmp_path / "x.pem")], env={})
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0
    assert "configuration error: server.tls_key" in result.output


# --- trusted proxies and X-Forwarded-For -----------------------------------------------

def test_trusted_proxies_are_validated(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"server\.trusted_proxies: 'proxy' is not an IP"):
        load(tmp_path, '[server]\ntrusted_proxies = ["10.0.0.1", "proxy"]\n')
    settings = load(tmp_path, '[server]\ntrusted_proxies = ["10.0.0.1", "fd00::/8"]\n')
    assert settings.trusted_proxies == ("10.0.0.1", "fd00::/8")  # type: ignore[attr-defined]
    assert settings_from_dict(settings_to_dict(settings)) == settings  # type: ignore[arg-type]


NETS = trusted_networks(["10.0.0.0/8", "127.0.0.1"])


@pytest.mark.parametrize(("headers", "client"), [
    ([], "10.1.1.1"),  # no header: the proxy itself
    ([b"203.0.113.9"], "203.0.113.9"),
    ([b"203.0.113.9, 10.2.2.2"], "203.0.113.9"),  # a second trusted hop is skipped
    ([b"6.6.6.6, 203.0.113.9"], "203.0.113.9"),  # the client's own claim is ignored
    ([b"6.6.6.6", b"203.0.113.9, 10.0.0.5"], "203.0.113.9"),  # headers joined in order
    ([b"10.0.0.7, 10.0.0.5"], "10.0.0.7"),  # all trusted: the left-most
    ([b"203.0.113.9, garbage"], "10.1.1.1"),  # malformed: nothing left of it is believed
    ([b" 2001:db8::1 "], "2001:db8::1"),
])
def test_forwarded_client(headers: list[bytes], client: str) -> None:
    assert forwarded_client("10.1.1.1", headers, NETS) == client


# --- Origin allow-list -------------------------------------------------------------------

def test_allowed_origins_parse(tmp_path: Path) -> None:
    app = '[[apps]]\nid = "1"\nkey = "k"\nsecret = "s"\n'
    settings = load(tmp_path, app + 'allowed_origins = ["https://App.Example.com", '
                                    '"https://*.example.org:8443"]\n')
    assert settings.apps[0].allowed_origins == (  # type: ignore[attr-defined]
        "https://app.example.com", "https://*.example.org:8443")
    for bad in ('"app.example.com"', '"https://a.com/path"', '"https://a.*.com"', "1"):
        with pytest.raises(ConfigError, match=r"apps\[0\]\.allowed_origins"):
            load(tmp_path, app + f"allowed_origins = [{bad}]\n")


ALLOWED = ("https://app.example.com", "https://*.example.org", "http://localhost:3000")


@pytest.mark.parametrize(("origin", "ok"), [
    ("https://app.example.com", True),
    ("HTTPS://APP.EXAMPLE.COM", True),
    ("http://app.example.com", False),  # another scheme
    ("https://app.example.com:8443", False),  # another port
    ("https://evil.com", False),
    ("https://app.example.com.evil.com", False),
    ("https://a.example.org", True),
    ("https://a.b.example.org", True),
    ("https://example.org", False),  # the wildcard needs a subdomain
    ("https://evilexample.org", False),
    ("https://x@a.example.org", False),
    ("http://localhost:3000", True),
    ("http://localhost:3001", False),
    ("null", False),
])
def test_origin_allowed(origin: str, ok: bool) -> None:
    assert origin_allowed(origin, ALLOWED) is ok


# --- log format ---------------------------------------------------------------------------

def test_log_format_is_validated() -> None:
    with pytest.raises(ConfigError, match=r"server\.log_format: 'xml'"):
        load_settings(env={"VASK_LOG_FORMAT": "xml"})
    assert load_settings(env={"VASK_LOG_FORMAT": "json"}).log_format == "json"


def test_json_log_lines() -> None:
    formatter = JsonFormatter("worker-3")
    record = logging.LogRecord("vask.worker", logging.WARNING, __file__, 1,
                               "worker %d: %s", (3, "two\nlines"), None)
    line = formatter.format(record)
    assert "\n" not in line
    data = json.loads(line)
    assert data["level"] == "warning" and data["role"] == "worker-3"
    assert data["logger"] == "vask.worker" and data["message"] == "worker 3: two\nlines"
    assert data["time"].endswith("Z") and "T" in data["time"]
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        import sys
        record = logging.LogRecord("vask", logging.ERROR, __file__, 1, "failed", (),
                                   sys.exc_info())
    data = json.loads(formatter.format(record))
    assert "RuntimeError: boom" in data["exception"]


# --- vask config check ------------------------------------------------------------------

CHECKED = """
[server]
port = 7001

[[apps]]
id = "1"
key = "public-key"
secret = "very-secret-value"
allowed_origins = ["https://app.example.com"]

[[apps.webhooks]]
url = "https://hooks:hook-password@example.com/pusher"
headers = { Authorization = "Bearer token-value" }
filter = { channel_name_starts_with = "private-" }
"""


@pytest.mark.parametrize("fmt", ["toml", "json"])
def test_config_check_prints_the_effective_config_masked(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / "vask.toml"
    path.write_text(CHECKED)
    result = CliRunner().invoke(main, ["config", "check", str(path), "--format", fmt],
                                env={"VASK_WORKERS": "3"})
    assert result.exit_code == 0, result.output
    out = result.stdout
    for secret in ("very-secret-value", "token-value", "hook-password"):
        assert secret not in out
    data = tomllib.loads(out) if fmt == "toml" else json.loads(out)
    assert data["server"]["port"] == 7001 and data["server"]["workers"] == 3  # file + env
    assert data["server"]["activity_timeout"] == 120  # defaults shown too
    app = data["apps"][0]
    assert app["key"] == "public-key" and app["secret"] == "********"
    assert app["allowed_origins"] == ["https://app.example.com"]
    hook = app["webhooks"][0]
    assert hook["headers"] == {"Authorization": "********"}
    assert hook["url"] == "https://hooks:********@example.com/pusher"
    assert hook["filter"] == {"channel_name_starts_with": "private-"}
    if fmt == "toml":
        # the output is a configuration file again, once the secret is filled back in
        again = tmp_path / "again.toml"
        again.write_text(out.replace('"********"', '"x"'))
        assert load_settings(str(again), env={}).port == 7001


def test_config_check_error_is_one_line_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "vask.toml"
    path.write_text('[server]\nport = "6001"\n')
    result = CliRunner().invoke(main, ["config", "check", str(path)], env={})
    assert result.exit_code == 2
    assert result.output == "vask: configuration error: server.port: expected int, " \
                            "got '6001'\n"


# --- the handshake checks inside a worker (fake transport, no sockets) ----------------------

UPGRADE = (b"GET /app/app-key?protocol=7 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
           b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
           b"Sec-WebSocket-Version: 13\r\n")


def _worker(loop: object, **server: object) -> object:
    import dataclasses

    from tests.test_connection_layer import make_worker
    from vask.workers.admission import Admission

    worker = make_worker(loop, **server)
    app = dataclasses.replace(worker.settings.apps[0],
                              allowed_origins=("https://app.example.com",))
    worker.settings = dataclasses.replace(worker.settings, apps=(app,))
    worker.admission = Admission(worker)
    return worker


def test_a_refused_origin_is_403_and_counted() -> None:
    import asyncio

    from tests.test_connection_layer import connect, status_of

    loop = asyncio.new_event_loop()
    try:
        worker: object = _worker(loop)
        conn, transport = connect(worker)
        conn.data_received(UPGRADE + b"Origin: https://evil.example.com\r\n\r\n")
        assert status_of(transport) == 403
        assert b"'https://evil.example.com' is not allowed" in transport.text
        assert worker.counters["origin_refused"] == 1  # type: ignore[attr-defined]
        assert worker.counters["http_403"] == 1  # type: ignore[attr-defined]
    finally:
        loop.close()


def test_a_trusted_proxy_connection_is_counted_as_its_forwarded_client() -> None:
    import asyncio

    from tests.test_connection_layer import connect

    loop = asyncio.new_event_loop()
    try:
        # the fake transport's peer is 10.0.0.1
        worker: object = _worker(loop, max_connections_per_ip=5,
                                 trusted_proxies="10.0.0.0/8")
        admission = worker.admission  # type: ignore[attr-defined]
        conn, _ = connect(worker)
        assert admission.per_ip == {}  # not counted as the proxy at accept
        # The fake worker has no broker link: the upgrade stops with AttributeError just
        # after the checks under test, which have run by then.
        with contextlib.suppress(AttributeError):
            conn.data_received(UPGRADE + b"Origin: https://app.example.com\r\n"
                               b"X-Forwarded-For: 203.0.113.5, 10.9.9.9\r\n\r\n")
        assert admission.per_ip == {"203.0.113.5": 1}
        # and without trusted_proxies, the same header changes nothing
        plain: object = _worker(loop, max_connections_per_ip=5)
        conn, _ = connect(plain)
        assert plain.admission.per_ip == {"10.0.0.1": 1}  # type: ignore[attr-defined]
    finally:
        loop.close()



# --- PROXY protocol v1 -------------------------------------------------------------------

@pytest.mark.parametrize(("line", "source"), [
    (b"PROXY TCP4 203.0.113.7 10.0.0.1 56324 6001", "203.0.113.7"),
    (b"PROXY TCP6 2001:db8::7 2001:db8::1 56324 6001", "2001:db8::7"),
    (b"PROXY UNKNOWN", ""),
    (b"PROXY UNKNOWN 1.2.3.4 garbage", ""),
    (b"PROXY TCP4 2001:db8::7 10.0.0.1 1 2", None),  # family mismatch
    (b"PROXY TCP4 203.0.113.7 10.0.0.1 56324", None),  # a field missing
    (b"PROXY TCP4 203.0.113.7 10.0.0.1 56324 70000", None),  # port out of range
    (b"PROXY TCP4  203.0.113.7 10.0.0.1 1 2", None),  # two spaces
    (b"PROXY UDP4 203.0.113.7 10.0.0.1 1 2", None),
    (b"GET / HTTP/1.1", None),
])
def test_proxy_source(line: bytes, source: str | None) -> None:
    assert proxy_source(line) == source


def test_proxy_protocol_settings_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"server\.proxy_protocol: needs trusted_proxies"):
        load_settings(env={"VASK_PROXY_PROTOCOL": "true"})
    ca = make_ca(tmp_path)
    leaf = make_server_cert(tmp_path, ca)
    with pytest.raises(ConfigError, match=r"server\.proxy_protocol: cannot be combined"):
        load_settings(env={"VASK_PROXY_PROTOCOL": "yes", "VASK_TRUSTED_PROXIES": "10.0.0.1",
                           "VASK_TLS_CERT": str(leaf.cert_path),
                           "VASK_TLS_KEY": str(leaf.key_path)})


def test_a_proxy_line_in_pieces_names_the_client_then_requests_follow() -> None:
    import asyncio

    from tests.test_connection_layer import connect

    loop = asyncio.new_event_loop()
    try:
        worker: object = _worker(loop, max_connections_per_ip=1, trusted_proxies="10.0.0.1",
                                 proxy_protocol="true")
        admission = worker.admission  # type: ignore[attr-defined]
        conn, transport = connect(worker)
        assert admission.per_ip == {}
        conn.data_received(b"PROXY TCP4 203.0.113.7 10.0.0.1 5")
        conn.data_received(b"6324 6001\r\nGET /up HTTP/1.1\r\nHost: x\r\n\r\n")
        assert admission.per_ip == {"203.0.113.7": 1}
        assert transport.text.startswith(b"HTTP/1.1 200") and b"/up" in transport.text
        # the same client again, through the same proxy: over the cap
        conn2, second = connect(worker)
        conn2.data_received(b"PROXY TCP4 203.0.113.7 10.0.0.1 1 6001\r\n")
        assert second.text.startswith(b"HTTP/1.1 429")
        # no PROXY line from the proxy: refused, not read as a request
        conn3, third = connect(worker)
        conn3.data_received(b"GET /up HTTP/1.1\r\nHost: x\r\n\r\n")
        assert third.text.startswith(b"HTTP/1.1 400")
        assert b"PROXY protocol" in third.text
    finally:
        loop.close()
