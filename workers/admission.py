"""Who may connect: TCP-level caps at accept, then the Pusher-level checks of a fresh
WebSocket (path, protocol version, app, quota) before ``connection_established``.

TCP level (before any request is read; ``docs/security.md``):

* more than ``max_connections_per_worker`` open connections on this worker -> HTTP 503
  and close. 0 means automatic: the process's open-file limit minus ``FD_HEADROOM``, so
  the worker refuses politely before ``accept`` would fail for lack of descriptors;
* more than ``max_connections_per_ip`` from one address on this worker -> HTTP 429.

WebSocket level (Pusher spec, close codes after one ``pusher:error``): 4005 bad path,
4006 a ``protocol`` parameter that is not 1-3 ASCII digits, 4007 a version outside 4-7,
4001 unknown app key, 4003 disabled app, 4200 while the worker stops, 4004 over the
app's connection quota (asked of the broker, which counts cluster-wide).
"""

from __future__ import annotations

import resource
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
    app = apps_by_key.get(unquote(path[5:]))
    if app is None:
        return 4001, "Application does not exist"
    if not app.enabled:
        return 4003, "Application disabled"
    if stopping:
        return 4200, "Server is closing. Please reconnect shortly."
    return app


def _query_value(query: str, name: str, default: str) -> str:
    """One parameter of a query string (cheaper than parsing all of it per connect)."""
    prefix = name + "="
    for part in query.split("&"):
        if part.startswith(prefix):
            return unquote(part[len(prefix):])
    return default


class Admission:
    """Connection caps and the Pusher-level admission of a worker."""

    __slots__ = ("apps_by_key", "max_connections", "max_per_ip", "next_socket", "per_ip",
                 "worker")

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        settings = worker.settings
        self.apps_by_key: dict[str, App] = {a.key: a for a in settings.apps}
        self.max_connections = connection_cap(settings.max_connections_per_worker)
        self.max_per_ip = settings.max_connections_per_ip
        self.per_ip: dict[str, int] = {}
        self.next_socket = 1

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
        if self.max_per_ip:
            transport = conn.transport
            peer = transport.get_extra_info("peername") if transport is not None else None
            ip = peer[0] if isinstance(peer, tuple) and peer else "?"
            count = self.per_ip.get(ip, 0)
            if count >= self.max_per_ip:
                return 429, "Too many connections from your address"
            self.per_ip[ip] = count + 1
            conn.peer = ip
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

        worker.link.request(lambda rid: ConnOpen(rid, app.id, socket_id, app.max_connections),
                            answered)

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
