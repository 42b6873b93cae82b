"""Configuration: a TOML file, ``VASK_*`` environment variables and CLI flags.

Precedence, lowest to highest: built-in defaults, the TOML file, the environment, flags.
Everything is validated before any process starts; a problem raises :class:`ConfigError`
whose message names the offending key, and the CLI turns it into one line and exit 2.

The file layout (every key is documented in ``docs/configuration.md``)::

    [server]
    host = "0.0.0.0"
    port = 6001
    workers = 2
    activity_timeout = 120

    [[apps]]
    id = "1"
    key = "app-key"
    secret = "app-secret"
    enable_client_messages = true

With no ``[[apps]]`` there is one default app (id ``1``, key ``app-key``, secret
``app-secret``; each overridable by ``VASK_APP_ID``/``VASK_APP_KEY``/``VASK_APP_SECRET``).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """Invalid configuration; the message names the key and what is wrong with it."""


#: webhook events sent unless an endpoint lists its own; subscription_count
#: is opt-in
DEFAULT_WEBHOOK_EVENTS = (
    "channel_occupied",
    "channel_vacated",
    "member_added",
    "member_removed",
    "client_event",
    "cache_miss",
)


@dataclass(frozen=True, slots=True)
class Webhook:
    """One webhook endpoint of an app and the events it wants."""

    url: str
    event_types: tuple[str, ...] = DEFAULT_WEBHOOK_EVENTS
    headers: Mapping[str, str] = field(default_factory=dict)
    #: only events on channels whose name starts / ends with these ("" = any)
    channel_name_starts_with: str = ""
    channel_name_ends_with: str = ""

    def wants(self, name: str, channel: str) -> bool:
        """Whether this endpoint takes event ``name`` on ``channel`` (its filters)."""
        return (name in self.event_types
                and channel.startswith(self.channel_name_starts_with)
                and channel.endswith(self.channel_name_ends_with))


@dataclass(frozen=True, slots=True)
class App:
    """An app: credentials, switches and limits."""

    id: str
    key: str
    secret: str
    enabled: bool = True
    max_connections: int = 0  # 0 = unlimited
    enable_client_messages: bool = False
    max_client_events_per_second: int = 10
    enable_user_authentication: bool = False
    user_authentication_timeout: float = 30.0
    enable_subscription_count: bool = False
    enable_watchlist_events: bool = True
    max_presence_members_per_channel: int = 100
    max_presence_member_size_kb: float = 1.0
    max_channel_name_length: int = 200
    max_event_channels_at_once: int = 100
    max_event_name_length: int = 200
    max_event_payload_kb: float = 10.0
    max_event_batch_size: int = 10
    max_watchlist_size: int = 100
    max_backend_events_per_second: int = 0  # 0 = unlimited
    max_channels_per_connection: int = 200  # 0 = unlimited
    max_subscriptions_per_second: int = 10  # 0 = unlimited
    cache_ttl: float = 1800.0
    cors_origins: tuple[str, ...] = ()
    webhooks: tuple[Webhook, ...] = ()
    #: most events in one webhook request (1 = one event per request, like Pusher
    #: without batching), and the longest a released event waits for more to join it
    webhook_batch_max_events: int = 20
    webhook_batch_max_wait: float = 0.05
    #: member_removed and channel_vacated are held this long, and dropped together with
    #: the matching member_added / channel_occupied if the user or channel comes back
    webhook_leave_delay: float = 3.0
    #: origins whose browsers may open a WebSocket ("" entries never; empty = any); each
    #: an exact origin (https://app.example.com) or a host wildcard (https://*.example.com)
    allowed_origins: tuple[str, ...] = ()

    @property
    def max_event_payload_bytes(self) -> int:
        return int(self.max_event_payload_kb * 1024)

    @property
    def max_presence_member_bytes(self) -> int:
        return int(self.max_presence_member_size_kb * 1024)


DEFAULT_APP_ID = "1"
DEFAULT_APP_KEY = "app-key"
DEFAULT_APP_SECRET = "app-secret"


@dataclass(frozen=True, slots=True)
class Settings:
    """The whole validated configuration, shared by the supervisor, broker and workers."""

    host: str = "0.0.0.0"
    port: int = 6001
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    broker: str = ""  # "" = ipc:// endpoint in a private runtime directory
    log_level: str = "info"
    activity_timeout: int = 120
    pong_timeout: float = 30.0
    max_message_bytes: int = 65536
    max_http_body_bytes: int = 1_048_576
    write_buffer_limit: int = 4 * 1_048_576
    #: per connection outbound bytes above which the worker stops reading from it
    write_buffer_high: int = 262_144
    #: ... and below which it reads again
    write_buffer_low: int = 65_536
    max_request_head_bytes: int = 16_384
    max_url_bytes: int = 8_192
    http_request_timeout: float = 10.0
    keep_alive_timeout: float = 30.0
    max_connections_per_worker: int = 0  # 0 = the open-file limit minus headroom
    max_connections_per_ip: int = 0  # per worker; 0 = unlimited
    broker_timeout: float = 5.0
    heartbeat_interval: float = 1.0
    heartbeat_timeout: float = 5.0
    shutdown_grace: float = 3.0
    #: where durable state lives (the webhook queue); "" = $XDG_STATE_HOME/vask or
    #: ~/.local/state/vask
    data_dir: str = ""
    webhook_timeout: float = 5.0
    #: requests in flight at once per webhook endpoint
    webhook_concurrency: int = 8
    #: how long a failing webhook is retried before it is given up
    webhook_retry_window: float = 300.0
    #: webhook events and requests kept in the queue at most (see docs/webhooks.md)
    webhook_max_queued: int = 100_000
    #: PEM files for TLS on the listening port (both or neither; "" = plain TCP)
    tls_cert: str = ""
    tls_key: str = ""
    #: proxies (IP addresses or CIDR networks) whose X-Forwarded-For is believed
    trusted_proxies: tuple[str, ...] = ()
    #: "text" (one human-readable line per record) or "json" (one object per line)
    log_format: str = "text"
    #: connections from trusted_proxies start with a PROXY protocol v1 line naming the
    #: client (HAProxy send-proxy, nginx stream proxy_protocol, cloud load balancers)
    proxy_protocol: bool = False
    apps: tuple[App, ...] = ()
    default_app: bool = False  # True when ``apps`` came from the built-in default
    config_file: str = ""
    #: a rolling restart (and a stop, capped by shutdown_grace) closes a worker's
    #: WebSocket clients with 4200 at moments spread evenly over this many seconds, so
    #: they do not all reconnect at once
    drain_window: float = 10.0
    #: on stop, /ready answers 503 this long before the listeners close, so a load
    #: balancer takes the instance out of rotation while it still accepts
    stop_ready_delay: float = 2.0
    #: the supervisor writes its pid here ("" = no file); `vask reload`/`vask restart`
    #: read it
    pid_file: str = ""
    #: the broker's Prometheus listener (docs/metrics.md); port 0 = no listener
    metrics_port: int = 9601
    metrics_host: str = "127.0.0.1"
    #: CURVE on a TCP broker link (docs/security.md): the broker's public key file (on
    #: worker hosts), this process's own secret key file (broker or worker), and the
    #: folder of worker public keys the broker admits
    broker_public_key: str = ""
    curve_secret_key: str = ""
    authorized_keys_dir: str = ""
    #: allow a plain (unencrypted, unauthenticated) TCP broker link off this host
    insecure_broker: bool = False
    #: the dashboard's credential (docs/dashboard.md); "" = no dashboard, no admin API
    admin_token: str = ""
    #: seconds a worker may fall behind in delivering what the broker routed to it
    #: before HTTP API publishes that reach it are answered late (back-pressure on
    #: the publisher; docs/operations.md); 0 = never answer late
    max_delivery_lag: float = 0.0
    #: seconds a worker's subscribes, unsubscribes and closes may wait to share one
    #: message to the broker with others while its link is busy (docs/configuration.md);
    #: 0 = each loop turn's churn leaves at the end of that turn
    churn_linger: float = 0.01

    def app_by_key(self, key: str) -> App | None:
        for app in self.apps:
            if app.key == key:
                return app
        return None


_LOG_LEVELS = ("debug", "info", "warning", "error")
_SERVER_KEYS = {
    "host": str,
    "port": int,
    "workers": int,
    "broker": str,
    "log_level": str,
    "activity_timeout": int,
    "pong_timeout": float,
    "max_message_bytes": int,
    "max_http_body_bytes": int,
    "write_buffer_limit": int,
    "write_buffer_high": int,
    "write_buffer_low": int,
    "max_request_head_bytes": int,
    "max_url_bytes": int,
    "http_request_timeout": float,
    "keep_alive_timeout": float,
    "max_connections_per_worker": int,
    "max_connections_per_ip": int,
    "broker_timeout": float,
    "heartbeat_interval": float,
    "heartbeat_timeout": float,
    "shutdown_grace": float,
    "data_dir": str,
    "webhook_timeout": float,
    "webhook_concurrency": int,
    "webhook_retry_window": float,
    "webhook_max_queued": int,
    "drain_window": float,
    "stop_ready_delay": float,
    "pid_file": str,
    "metrics_port": int,
    "metrics_host": str,
    "tls_cert": str,
    "tls_key": str,
    "trusted_proxies": list,
    "log_format": str,
    "proxy_protocol": bool,
    "broker_public_key": str,
    "curve_secret_key": str,
    "authorized_keys_dir": str,
    "insecure_broker": bool,
    "admin_token": str,
    "max_delivery_lag": float,
    "churn_linger": float,
}
_WEBHOOK_EVENTS = frozenset((*DEFAULT_WEBHOOK_EVENTS, "subscription_count"))
#: headers of a webhook request that the configuration may not set (besides X-Pusher-*)
_RESERVED_HEADERS = frozenset(("content-type", "content-length", "host", "user-agent"))


def _coerce(where: str, value: Any, kind: type, convert: bool = False) -> Any:
    """Check one value; ``convert``: it is a string from the environment or a flag, to be
    converted to ``kind``. TOML values are never converted: the file has types of its
    own, and ``port = "6001"`` is a mistake worth naming."""
    if kind is list:
        if convert and isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: expected a list of strings, got {value!r}")
        return tuple(value)
    if convert and isinstance(value, str) and kind is not str:
        text = value.strip()
        try:
            if kind is bool:
                lowered = text.lower()
                if lowered in ("1", "true", "yes", "on"):
                    return True
                if lowered in ("0", "false", "no", "off"):
                    return False
                raise ValueError
            return kind(text)
        except ValueError:
            raise ConfigError(f"{where}: expected {kind.__name__}, got {value!r}") from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, bool):
        raise ConfigError(f"{where}: expected int, got {value!r}")
    if not isinstance(value, kind):
        raise ConfigError(f"{where}: expected {kind.__name__}, got {value!r}")
    return value


def _app_field_types() -> dict[str, Any]:
    return {f.name: f.type for f in dataclasses.fields(App)}


_SCALARS = {"str": str, "int": int, "bool": bool, "float": float}


def _parse_webhook(where: str, raw: Any) -> Webhook:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a table with at least 'url'")
    unknown = set(raw) - {"url", "event_types", "headers", "filter"}
    if unknown:
        raise ConfigError(f"{where}.{sorted(unknown)[0]}: unknown key")
    url = raw.get("url")
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise ConfigError(f"{where}.url: expected an http:// or https:// URL, got {url!r}")
    kwargs: dict[str, Any] = {"url": url}
    if "event_types" in raw:
        types = raw["event_types"]
        if not isinstance(types, list) or not all(isinstance(t, str) for t in types):
            raise ConfigError(f"{where}.event_types: expected a list of event names")
        bad = [t for t in types if t not in _WEBHOOK_EVENTS]
        if bad:
            raise ConfigError(
                f"{where}.event_types: unknown event {bad[0]!r} "
                f"(known: {', '.join(sorted(_WEBHOOK_EVENTS))})"
            )
        kwargs["event_types"] = tuple(types)
    if "headers" in raw:
        headers = raw["headers"]
        if not isinstance(headers, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
        ):
            raise ConfigError(f"{where}.headers: expected a table of string values")
        reserved = [k for k in headers
                    if k.lower() in _RESERVED_HEADERS or k.lower().startswith("x-pusher-")]
        if reserved:
            raise ConfigError(f"{where}.headers: {reserved[0]!r} is set by Vask itself")
        kwargs["headers"] = dict(headers)
    if "filter" in raw:
        filt = raw["filter"]
        names = ("channel_name_starts_with", "channel_name_ends_with")
        if not isinstance(filt, dict) or set(filt) - set(names) or not all(
                isinstance(v, str) for v in filt.values()):
            raise ConfigError(f"{where}.filter: expected a table with string keys "
                              f"{names[0]} and/or {names[1]}")
        kwargs.update(filt)
    return Webhook(**kwargs)


def parse_app(where: str, raw: Any) -> App:
    """Validate one ``[[apps]]`` table into an :class:`App`."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a table")
    types = _app_field_types()
    kwargs: dict[str, Any] = {}
    for name, value in raw.items():
        if name not in types:
            raise ConfigError(f"{where}.{name}: unknown app key")
        if name == "webhooks":
            if not isinstance(value, list):
                raise ConfigError(f"{where}.webhooks: expected a list of tables")
            kwargs[name] = tuple(
                _parse_webhook(f"{where}.webhooks[{i}]", w) for i, w in enumerate(value)
            )
        elif name == "cors_origins":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{where}.cors_origins: expected a list of origins")
            kwargs[name] = tuple(value)
        elif name == "allowed_origins":
            kwargs[name] = _parse_origins(f"{where}.allowed_origins", value)
        else:
            kind = _SCALARS[str(types[name]).split()[0]]
            kwargs[name] = _coerce(f"{where}.{name}", value, kind)
    for required in ("id", "key", "secret"):
        if not kwargs.get(required):
            raise ConfigError(f"{where}.{required}: required and must not be empty")
    app = App(**kwargs)
    _check_app(where, app)
    return app


def _parse_origins(where: str, value: Any) -> tuple[str, ...]:
    """``allowed_origins``: each entry is scheme://host[:port], where the host may start
    with ``*.`` (any subdomain, not the bare domain). Compared lower-case."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: expected a list of origins")
    out = []
    for entry in value:
        scheme, sep, host = entry.strip().lower().partition("://")
        if not sep or not scheme or not host or "/" in host or "*" in host.removeprefix("*."):
            raise ConfigError(f"{where}: {entry!r} is not an origin like "
                              "'https://app.example.com' or 'https://*.example.com'")
        out.append(f"{scheme}://{host}")
    return tuple(out)


def _check_app(where: str, app: App) -> None:
    for name in ("key", "id"):
        value = getattr(app, name)
        if not all(c.isalnum() or c in "-_." for c in value):
            raise ConfigError(
                f"{where}.{name}: {value!r} may hold only letters, digits, '-', '_' and '.'"
            )
    positive = (
        "max_client_events_per_second",
        "max_presence_members_per_channel",
        "max_channel_name_length",
        "max_event_channels_at_once",
        "max_event_name_length",
        "max_event_batch_size",
        "max_watchlist_size",
        "webhook_batch_max_events",
    )
    for name in positive:
        if getattr(app, name) < 1:
            raise ConfigError(f"{where}.{name}: must be at least 1")
    for name in ("max_presence_member_size_kb", "max_event_payload_kb", "cache_ttl",
                 "user_authentication_timeout"):
        if getattr(app, name) <= 0:
            raise ConfigError(f"{where}.{name}: must be greater than 0")
    for name in ("webhook_batch_max_wait", "webhook_leave_delay"):
        if not 0 <= getattr(app, name) <= 60:
            raise ConfigError(f"{where}.{name}: must be between 0 and 60 seconds")
    for name in ("max_connections", "max_backend_events_per_second",
                 "max_channels_per_connection", "max_subscriptions_per_second"):
        if getattr(app, name) < 0:
            raise ConfigError(f"{where}.{name}: must be 0 (unlimited) or more")


def _check_settings(settings: Settings) -> None:
    if not 0 < settings.port < 65536:
        raise ConfigError(f"server.port: {settings.port} is not a TCP port (1-65535)")
    if not 1 <= settings.workers <= 256:
        raise ConfigError(f"server.workers: {settings.workers} must be between 1 and 256")
    if settings.log_level not in _LOG_LEVELS:
        raise ConfigError(
            f"server.log_level: {settings.log_level!r} is not one of {', '.join(_LOG_LEVELS)}"
        )
    if settings.activity_timeout < 1:
        raise ConfigError("server.activity_timeout: must be at least 1 second")
    for name in ("pong_timeout", "broker_timeout", "heartbeat_interval", "heartbeat_timeout",
                 "shutdown_grace", "http_request_timeout", "keep_alive_timeout",
                 "webhook_timeout", "webhook_retry_window"):
        if getattr(settings, name) <= 0:
            raise ConfigError(f"server.{name}: must be greater than 0")
    if settings.heartbeat_timeout <= settings.heartbeat_interval:
        raise ConfigError("server.heartbeat_timeout: must be longer than heartbeat_interval")
    for name in ("max_message_bytes", "max_http_body_bytes", "write_buffer_limit",
                 "write_buffer_high", "write_buffer_low", "max_request_head_bytes",
                 "max_url_bytes"):
        if getattr(settings, name) < 1024:
            raise ConfigError(f"server.{name}: must be at least 1024 bytes")
    if not settings.write_buffer_low < settings.write_buffer_high < settings.write_buffer_limit:
        raise ConfigError("server.write_buffer_high: must be above write_buffer_low and "
                          "below write_buffer_limit")
    if settings.max_url_bytes > settings.max_request_head_bytes:
        raise ConfigError("server.max_url_bytes: must not exceed max_request_head_bytes")
    for name in ("webhook_concurrency", "webhook_max_queued"):
        if getattr(settings, name) < 1:
            raise ConfigError(f"server.{name}: must be at least 1")
    for name in ("max_connections_per_worker", "max_connections_per_ip"):
        if getattr(settings, name) < 0:
            raise ConfigError(f"server.{name}: must be 0 (automatic/unlimited) or more")
    if not 0 <= settings.max_delivery_lag < settings.broker_timeout:
        raise ConfigError("server.max_delivery_lag: must be from 0 up to (not including) "
                          "broker_timeout")
    if not 0 <= settings.churn_linger <= 1:
        raise ConfigError("server.churn_linger: must be from 0 to 1 second")
    for name in ("drain_window", "stop_ready_delay"):
        if not 0 <= getattr(settings, name) <= 3600:
            raise ConfigError(f"server.{name}: must be between 0 and 3600 seconds")
    if not 0 <= settings.metrics_port < 65536:
        raise ConfigError(f"server.metrics_port: {settings.metrics_port} is not a TCP port "
                          "(1-65535, or 0 for no metrics listener)")
    if settings.log_format not in ("text", "json"):
        raise ConfigError(f"server.log_format: {settings.log_format!r} is not text or json")
    for entry in settings.trusted_proxies:
        try:
            ipaddress.ip_network(entry, strict=False)
        except ValueError:
            raise ConfigError(f"server.trusted_proxies: {entry!r} is not an IP address or "
                              "CIDR network") from None
    _check_tls(settings)
    if settings.proxy_protocol and not settings.trusted_proxies:
        raise ConfigError("server.proxy_protocol: needs trusted_proxies (the addresses whose "
                          "PROXY line is believed)")
    if settings.proxy_protocol and settings.tls_cert:
        raise ConfigError("server.proxy_protocol: cannot be combined with tls_cert (the PROXY "
                          "line would come before the TLS handshake); end TLS in the proxy")
    _check_admin_token(settings)
    if settings.broker and not settings.broker.startswith(("ipc://", "tcp://")):
        raise ConfigError(f"server.broker: {settings.broker!r} must start with ipc:// or tcp://")
    _check_broker_list(settings.broker)
    seen: dict[str, str] = {}
    for i, app in enumerate(settings.apps):
        for name in ("id", "key"):
            value = getattr(app, name)
            tag = f"{name}:{value}"
            if tag in seen:
                raise ConfigError(f"apps[{i}].{name}: {value!r} is already used by {seen[tag]}")
            seen[tag] = f"apps[{i}]"
        # The HTTP API accepts either the key or the id in its path, so one app's id
        # must not be another app's key.
        for j, other in enumerate(settings.apps):
            if j != i and app.id == other.key:
                raise ConfigError(f"apps[{i}].id: {app.id!r} equals the key of apps[{j}]")


def _check_tls(settings: Settings) -> None:
    """Both files or neither, and they must load (a wrong key or an unreadable file is
    reported now, as one line, not by every worker at startup)."""
    if not settings.tls_cert and not settings.tls_key:
        return
    if not settings.tls_cert or not settings.tls_key:
        missing = "tls_key" if settings.tls_cert else "tls_cert"
        raise ConfigError(f"server.{missing}: tls_cert and tls_key go together; set both")
    for name in ("tls_cert", "tls_key"):
        path = getattr(settings, name)
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise ConfigError(f"server.{name}: cannot read {path!r} ({exc.strerror})") from None
    import ssl  # only with TLS: the supervisor's imports are in every process it forks

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"server.tls_cert: {settings.tls_cert!r} and {settings.tls_key!r} "
                          f"do not load as a PEM certificate chain and its key "
                          f"({getattr(exc, 'reason', None) or exc})") from None


def _check_broker_list(value: str) -> None:
    """``broker`` may list several endpoints, comma-separated, in order of preference
    (failover, docs/operations.md "Several hosts"); each must be a ZeroMQ endpoint."""
    if "," not in value:
        return
    parts = [part.strip() for part in value.split(",")]
    for part in parts:
        if not part.startswith(("ipc://", "tcp://")):
            raise ConfigError(f"server.broker: {part!r} in the list must start with "
                              "ipc:// or tcp://")
    if len(set(parts)) != len(parts):
        raise ConfigError("server.broker: an endpoint appears twice in the list")


#: shortest accepted admin token: it is the only thing between the network and the
#: dashboard's event creator, so a guessable one is refused at startup
MIN_ADMIN_TOKEN = 16


def _check_admin_token(settings: Settings) -> None:
    token = settings.admin_token
    if not token:
        return
    if len(token) < MIN_ADMIN_TOKEN or token != token.strip():
        raise ConfigError(f"server.admin_token: must be at least {MIN_ADMIN_TOKEN} characters "
                          "without leading or trailing spaces (or empty: no dashboard)")
    for i, app in enumerate(settings.apps):
        if token in (app.key, app.secret):
            raise ConfigError(f"server.admin_token: must not be the key or secret of apps[{i}] "
                              "(an app's key is public, and its secret is the app's own)")


def load_settings(
    config_file: str | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build validated :class:`Settings` from file, environment and flag overrides.

    ``overrides`` holds flag values; ``None`` values mean "flag not given".
    """
    env = os.environ if env is None else env
    raw_server: dict[str, Any] = {}
    raw_apps: list[Any] = []
    path = config_file or env.get("VASK_CONFIG") or ""
    if path:
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config: file {path!r} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config: {path}: not valid TOML ({exc})") from None
        except OSError as exc:
            raise ConfigError(f"config: cannot read {path!r} ({exc.strerror})") from None
        unknown = set(data) - {"server", "apps"}
        if unknown:
            raise ConfigError(
                f"{sorted(unknown)[0]}: unknown top-level key (use [server], [[apps]])")
        server = data.get("server", {})
        if not isinstance(server, dict):
            raise ConfigError("server: expected a table")
        raw_server.update(server)
        apps = data.get("apps", [])
        if not isinstance(apps, list):
            raise ConfigError("apps: expected an array of tables ([[apps]])")
        raw_apps = apps

    values: dict[str, Any] = {}
    for name, value in raw_server.items():
        if name not in _SERVER_KEYS:
            raise ConfigError(f"server.{name}: unknown server key")
        values[name] = _coerce(f"server.{name}", value, _SERVER_KEYS[name])
    for name, kind in _SERVER_KEYS.items():
        env_name = f"VASK_{name.upper()}"
        if env.get(env_name, "") != "":
            values[name] = _coerce(env_name, env[env_name], kind, convert=True)
    for name, value in (overrides or {}).items():
        if value is not None:
            values[name] = _coerce(f"--{name.replace('_', '-')}", value, _SERVER_KEYS[name],
                                   convert=True)

    apps_parsed = tuple(parse_app(f"apps[{i}]", raw) for i, raw in enumerate(raw_apps))
    default_app = False
    if not apps_parsed:
        apps_parsed = (
            parse_app(
                "default app",
                {
                    "id": env.get("VASK_APP_ID") or DEFAULT_APP_ID,
                    "key": env.get("VASK_APP_KEY") or DEFAULT_APP_KEY,
                    "secret": env.get("VASK_APP_SECRET") or DEFAULT_APP_SECRET,
                    "enable_client_messages": _coerce(
                        "VASK_APP_ENABLE_CLIENT_MESSAGES",
                        env.get("VASK_APP_ENABLE_CLIENT_MESSAGES", "true"), bool, convert=True),
                },
            ),
        )
        default_app = True
    settings = Settings(
        **values, apps=apps_parsed, default_app=default_app, config_file=str(path)
    )
    _check_settings(settings)
    return settings


def data_dir(settings: Settings, env: Mapping[str, str] | None = None) -> Path:
    """The directory for durable state (created by whoever writes there)."""
    if settings.data_dir:
        return Path(settings.data_dir).expanduser()
    env = os.environ if env is None else env
    state_home = env.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state_home) / "vask"


def wants_webhooks(settings: Settings) -> bool:
    """Whether any app has a webhook endpoint (and so a webhook sender is needed)."""
    return any(app.webhooks for app in settings.apps)


def warnings_for(settings: Settings) -> list[str]:
    """Things that are valid but probably not what the operator wants."""
    out = []
    for app in settings.apps:
        if not app.id.isdigit():
            out.append(
                f"app id {app.id!r} is not all digits: pusher-http-python refuses such ids "
                "(use the app key in its app_id setting instead)"
            )
    if settings.default_app and settings.apps[0].secret == DEFAULT_APP_SECRET:
        out.append("using the default app secret 'app-secret'; set VASK_APP_SECRET in production")
    return out


def settings_to_dict(settings: Settings) -> dict[str, Any]:
    """Plain-data form, handed to child processes."""
    return dataclasses.asdict(settings)


def settings_from_dict(data: Mapping[str, Any]) -> Settings:
    """Inverse of :func:`settings_to_dict` (no re-validation: the parent validated)."""
    values = dict(data)
    apps = []
    for raw in values.pop("apps"):
        raw = dict(raw)
        raw["webhooks"] = tuple(
            Webhook(**{**w, "event_types": tuple(w["event_types"]), "headers": dict(w["headers"])})
            for w in raw.get("webhooks", ())
        )
        raw["cors_origins"] = tuple(raw.get("cors_origins", ()))
        raw["allowed_origins"] = tuple(raw.get("allowed_origins", ()))
        apps.append(App(**raw))
    values["trusted_proxies"] = tuple(values.get("trusted_proxies", ()))
    return Settings(**values, apps=tuple(apps))
