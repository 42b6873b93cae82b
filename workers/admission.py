"""Who may connect: TCP-level caps at accept, then the Pusher-level checks of a fresh
WebSocket (path, protocol version, app, quota) before ``connection_established``.

TCP level (before any request is read; ``docs/security.md``):

* more than ``max_connections_per_worker`` open connections on this worker -> HTTP 503
  and close. 0 means automatic: the process's open-file limit minus ``FD_HEADROOM``, so
  the worker refuses politely before ``accept`` would fail for lack of descriptors;
* more than ``max_connections_per_ip`` from one address on this worker -> HTTP 429.
  A connection from one of the ``trusted_proxies`` is not counted at accept: its client
  is named in ``X-Forwarded-For``, read with the WebSocket handshake, and counted then
  (see :func:`forwarded_client`).

With ``proxy_protocol``, a connection from a trusted proxy must start with a PROXY
protocol v1 line (:func:`proxy_source`); the client it names is counted then, before the
first request, for plain HTTP requests as much as for WebSockets.

Handshake level: an app with ``allowed_origins`` refuses a browser whose ``Origin`` is
not on its list with HTTP 403 (:func:`origin_allowed`).

WebSocket level (Pusher spec, close codes after one ``pusher:error``): 4005 bad path,
4006 a ``protocol`` parameter that is not 1-3 ASCII digits, 4007 a version outside 4-7,
4001 unknown app key, 4003 disabled app, 4200 while the worker stops, 4004 over the
app's connection quota (asked of the broker, which counts cluster-wide).
"""

from __future__ import annotations

import ipaddress
import resource
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from vask import frames
from vask.config import App, Settings
from vask.envelope import ConnOpen
from vask.session import PusherSession
from vask.workers.websocket import OPEN, OPENING, PusherConnection

if TYPE_CHECKING:
    from vask.workers.http import HttpProtocol
    from vask.workers.server import Worker

#: descriptors kept free for the broker link, logs and the listening socket
FD_HEADROOM = 64
_MAX_PROTOCOL_DIGITS = 3


def connection_cap(configured: int) -> int:
    """The per-worker connection cap: the setting, or derived from the fd limit."""
    if configured:
        return configured
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1_000_000
    return max(16, soft - FD_HEADROOM)


def websocket_problem(target: str, apps_by_key: dict[str, App],
                      stopping: bool) -> App | tuple[int, str]:
    """The app a fresh WebSocket on ``target`` joins, or the (close code, message) it is
    rejected with."""
    path, _, query = target.partition("?")
    if not path.startswith("/app/") or "/" in path[5:] or len(path) == 5:
        return 4005, "Path not found"
    protocol = _query_value(query, "protocol", "7")
    # str.isdigit() accepts '²' and fullwidth digits; only ASCII digits are a version.
    if not (0 < len(protocol) <= _MAX_PROTOCOL_DIGITS and protocol.isascii()
            and protocol.isdigit()):
        return 4006, "Invalid version string format"
    if not 4 <= int(protocol) <= 7:
        return 4007, "Unsupported protocol version"
    app = apps_by_key.get(_unquoted(path[5:]))
    if app is None:
        return 4001, "Application does not exist"
    if not app.enabled:
        return 4003, "Application disabled"
    if stopping:
        return 4200, "Server is closing. Please reconnect shortly."
    return app


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def trusted_networks(entries: Sequence[str]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(entry, strict=False) for entry in entries)


def _trusted(address: str, networks: tuple[Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in networks)


def forwarded_client(peer: str, forwarded_for: Sequence[bytes],
                     networks: tuple[Network, ...]) -> str:
    """The client address of a connection from ``peer``, a trusted proxy.

    ``X-Forwarded-For`` lists addresses left to right, each proxy appending the one it
    received from; anything left of the last trusted hop may have been written by the
    client itself. So the answer is the right-most address that is not a trusted proxy
    (or the left-most if all are). A malformed entry ends the walk: nothing left of it
    is believed, and the last trusted hop before it answers.
    """
    hops = [hop.strip() for value in forwarded_for
            for hop in value.decode("latin-1").split(",")]
    client = peer
    for hop in reversed(hops):
        try:
            ipaddress.ip_address(hop)
        except ValueError:
            return client
        client = hop
        if not _trusted(hop, networks):
            return hop
    return client


#: the longest PROXY protocol v1 line, "\r\n" included (the protocol's own bound)
PROXY_LINE_MAX = 107


def proxy_source(line: bytes) -> str | None:
    """The client address of a PROXY protocol v1 line (without its CRLF): ``""`` for
    ``PROXY UNKNOWN`` (the proxy does not know: count the proxy), None if malformed.

    ``PROXY TCP4 <source> <destination> <source port> <destination port>``, single
    spaces, addresses of the family named, ports 0-65535.
    """
    parts = line.split(b" ")
    if len(parts) < 2 or parts[0] != b"PROXY":
        return None
    if parts[1] == b"UNKNOWN":
        return ""
    if parts[1] not in (b"TCP4", b"TCP6") or len(parts) != 6:
        return None
    try:
        source = ipaddress.ip_address(parts[2].decode("ascii"))
        target = ipaddress.ip_address(parts[3].decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return None
    version = 4 if parts[1] == b"TCP4" else 6
    if source.version != version or target.version != version:
        return None
    for port in parts[4:]:
        if not (port.isdigit() and len(port) <= 5 and int(port) <= 65535):
            return None
    return str(source)


def origin_allowed(origin: str, allowed: tuple[str, ...]) -> bool:
    """Whether a handshake's ``Origin`` is one of ``allowed`` (lower-case entries, each
    an exact ``scheme://host[:port]`` or ``scheme://*.domain[:port]`` for any subdomain).
    """
    origin = origin.strip().lower()
    for entry in allowed:
        if origin == entry:
            return True
        scheme, _, host = entry.partition("://")
        if host.startswith("*."):
            prefix, suffix = scheme + "://", host[1:]
            middle = origin[len(prefix):len(origin) - len(suffix)]
            if (origin.startswith(prefix) and origin.endswith(suffix) and middle
                    and not any(c in middle for c in "/:@")):
                return True
    return False


def _query_value(query: str, name: str, default: str) -> str:
    """One parameter of a query string (cheaper than parsing all of it per connect)."""
    prefix = name + "="
    for part in query.split("&"):
        if part.startswith(prefix):
            return _unquoted(part[len(prefix):])
    return default


def _unquoted(text: str) -> str:
    """``text`` with %-escapes decoded (without a call when it has none)."""
    return unquote(text) if "%" in text else text


class Admission:
    """Connection caps and the Pusher-level admission of a worker."""

    __slots__ = ("apps_by_key", "max_connections", "max_per_ip", "next_socket", "per_ip",
                 "proxy_protocol", "trusted", "worker")

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        settings = worker.settings
        self.apps_by_key: dict[str, App] = {a.key: a for a in settings.apps}
        self.max_connections = connection_cap(settings.max_connections_per_worker)
        self.max_per_ip = settings.max_connections_per_ip
        self.per_ip: dict[str, int] = {}
        self.next_socket = 1
        self.trusted = trusted_networks(settings.trusted_proxies)
        self.proxy_protocol = settings.proxy_protocol

    def reload(self, settings: Settings) -> None:
        """New settings (a reload): apps and caps for connections from now on."""
        self.apps_by_key = {a.key: a for a in settings.apps}
        self.max_connections = connection_cap(settings.max_connections_per_worker)
        self.max_per_ip = settings.max_connections_per_ip

    # --- TCP level ------------------------------------------------------------------

    def tcp_opened(self, conn: HttpProtocol) -> tuple[int, str] | None:
        """Count a fresh TCP connection; (status, message) if it must be refused."""
        if len(self.worker.connections) > self.max_connections:
            return 503, "This server is at its connection limit; try another or retry later"
        if self.max_per_ip or self.proxy_protocol:
            transport = conn.transport
            peer = transport.get_extra_info("peername") if transport is not None else None
            ip = peer[0] if isinstance(peer, tuple) and peer else "?"
            if self.trusted and _trusted(ip, self.trusted):
                if self.proxy_protocol:
                    conn.proxy_line = b""  # its first bytes are a PROXY line
                return None  # counted as its real client later
            if self.max_per_ip:
                return self._count(conn, ip)
        return None

    def proxied(self, conn: HttpProtocol, line: bytes) -> tuple[int, str] | None:
        """The PROXY line of a connection from a trusted proxy has arrived: count the
        client it names. (status, message) if the connection must be refused."""
        source = proxy_source(line)
        if source is None:
            return 400, "Malformed PROXY protocol header"
        if not source:  # PROXY UNKNOWN: the proxy's own address stands
            transport = conn.transport
            peer = transport.get_extra_info("peername") if transport is not None else None
            source = peer[0] if isinstance(peer, tuple) and peer else "?"
        if self.max_per_ip:
            return self._count(conn, source)
        conn.peer = source
        return None

    def _count(self, conn: HttpProtocol, ip: str) -> tuple[int, str] | None:
        count = self.per_ip.get(ip, 0)
        if count >= self.max_per_ip:
            return 429, "Too many connections from your address"
        self.per_ip[ip] = count + 1
        conn.peer = ip
        return None

    def handshake(self, conn: HttpProtocol, target: str,
                  headers: list[tuple[bytes, bytes]]) -> tuple[int, str] | None:
        """Checks of a WebSocket handshake that need its headers: the app's Origin
        allow-list, and the per-address cap for a client behind a trusted proxy.
        (status, message) if it must be refused."""
        path = target.partition("?")[0]
        app = self.apps_by_key.get(_unquoted(path[5:])) if path.startswith("/app/") else None
        if app is not None and app.allowed_origins:
            origin = next((v for n, v in headers if n.lower() == b"origin"), None)
            # No Origin: not a browser. Any other client can send whatever Origin it
            # likes, so the list protects browsers' users only, and they always send one.
            if origin is not None and not origin_allowed(origin.decode("latin-1"),
                                                         app.allowed_origins):
                self.worker.counters["origin_refused"] += 1
                return 403, (f"Origin {origin.decode('latin-1')!r} is not allowed to connect "
                             f"to app {app.key!r} (see the app's allowed_origins)")
        if self.trusted and conn.peer is None and conn.transport is not None:
            peer = conn.transport.get_extra_info("peername")
            ip = peer[0] if isinstance(peer, tuple) and peer else "?"
            if _trusted(ip, self.trusted):
                client = forwarded_client(
                    ip, [v for n, v in headers if n.lower() == b"x-forwarded-for"],
                    self.trusted)
                if self.max_per_ip:
                    return self._count(conn, client)
                conn.peer = client
        return None

    def tcp_closed(self, peer: str | None) -> None:
        if peer is None:
            return
        count = self.per_ip.get(peer, 0) - 1
        if count > 0:
            self.per_ip[peer] = count
        else:
            self.per_ip.pop(peer, None)

    # --- WebSocket level ----------------------------------------------------------------

    def open(self, conn: PusherConnection, target: str) -> None:
        """Admit a fresh WebSocket or reject it: one pusher:error, then that close code."""
        worker = self.worker
        app = websocket_problem(target, self.apps_by_key, worker.stopping)
        if isinstance(app, tuple):
            conn.close(*app)
            return
        socket_id = f"{worker.link.prefix}.{self.next_socket}"
        self.next_socket += 1
        conn.socket_id = socket_id
        conn.app_id = app.id
        conn.stats = worker.metrics.app(app.id)
        if not app.max_connections:
            # No quota: the broker learns of the connection from its first subscribe or
            # sign-in (a connection that does neither costs the broker nothing).
            self._established(conn, app)
            return
        conn.registered = True

        def answered(body: dict[str, Any] | None) -> None:
            if conn.phase != OPENING:
                return
            conn.phase = OPEN
            if body is None:
                conn.close(4100, "Over capacity: the cluster did not answer; retry later")
            elif not body.get("ok"):
                worker.counters["reject_connection_quota"] += 1
                conn.close(4004, "Application is over connection quota")
            else:
                self._established(conn, app)

        worker.link.request(ConnOpen(0, app.id, socket_id, app.max_connections), answered)

    def _established(self, conn: PusherConnection, app: App) -> None:
        # after a quota check the app may have been reloaded meanwhile (same key)
        app = self.apps_by_key.get(app.key, app)
        conn.phase = OPEN
        stats = conn.stats
        stats.connected += 1
        stats.new_connections += 1
        conn.session = PusherSession(app, conn.socket_id)
        self.worker.by_socket_id[conn.socket_id] = conn
        conn.send(frames.connection_established(conn.socket_id,
                                                self.worker.settings.activity_timeout))
        if stats.console is not None:
            stats.console.connection("connect", conn)
