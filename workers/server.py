"""The worker process: one uvloop loop serving one SO_REUSEPORT socket shard.

Global state of a worker: its connections, the local index ``(app, channel) -> local
connections``, the broker link, the cork list and a coarse clock that the single
periodic sweep advances (connections read it instead of calling ``time``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
from typing import Any
from urllib.parse import unquote

import orjson
from websockets.server import ServerProtocol

from vask import frames
from vask.channels import kind_of
from vask.config import App, Settings
from vask.envelope import (
    ConnClose,
    ConnOpen,
    Deliver,
    DeliverTo,
    SignIn,
    Subscribe,
    Terminate,
    Unsubscribe,
    Verb,
)
from vask.process import STARTUP_FAILURE, die_with_parent
from vask.session import PusherSession
from vask.workers.api_adapter import ApiAdapter
from vask.workers.broker_link import BrokerLink
from vask.workers.connection import (
    OPEN,
    OPENING,
    Connection,
    http_response,
    json_error,
)
from vask.workers.wsframe import text_frame

log = logging.getLogger("vask.worker")

SWEEP_INTERVAL = 1.0
_OK: dict[str, Any] = {"ok": True}
STARTUP_BROKER_WAIT = 6  # times broker_timeout to wait for the first welcome


class Worker:
    """Everything one worker process holds."""

    def __init__(self, settings: Settings, endpoint: str, slot: int) -> None:
        self.settings = settings
        self.slot = slot
        self.loop = asyncio.get_running_loop()
        self.apps_by_key: dict[str, App] = {a.key: a for a in settings.apps}
        self.connections: set[Connection] = set()
        self.by_socket_id: dict[str, Connection] = {}
        self.index: dict[tuple[str, str], Connection | set[Connection]] = {}
        #: channels the broker has confirmed it routes to this worker (see ask_subscribe)
        self.confirmed: set[tuple[str, str]] = set()
        self.dirty: list[Connection] = []
        #: websockets protocols between frames, shared by connections (Connection.protocol)
        self.ws_pool: list[ServerProtocol] = []
        self.flush_scheduled = False
        self.clock = time.monotonic()
        self.wall = time.time()
        self.next_socket = 1
        self.link = BrokerLink(settings, endpoint, slot, self.on_broker_messages, self.on_welcome,
                               self.cork)
        #: True while a multi-message broker batch is handled: fan-out output is corked
        #: and flushed once at its end, so a subscriber gets one write per batch
        self.corked = False
        self.welcomed = asyncio.Event()
        self.server: asyncio.AbstractServer | None = None
        self.stopping = False
        self._frame_cache: tuple[bytes, bytes] = (b"", b"")
        self.api: ApiAdapter | None = None

    # --- clock and sweep ----------------------------------------------------------------

    def sweep(self) -> None:
        self.clock = now = time.monotonic()
        self.wall = time.time()
        for conn in list(self.connections):
            conn.sweep(now)
        self.loop.call_later(SWEEP_INTERVAL, self.sweep)

    # --- broker ---------------------------------------------------------------------

    def on_welcome(self, replay: bool) -> None:
        self.welcomed.set()
        if replay:
            self.replay()

    def replay(self) -> None:
        """Tell a restarted broker everything this worker holds (DESIGN.md failure rules)."""
        link = self.link
        for conn in self.connections:
            session = conn.session
            if session is None or conn.phase != OPEN:
                continue
            conn.registered = True
            link.send(ConnOpen(0, session.app.id, session.socket_id, 0))
            for channel, member in session.replay_subscriptions():
                link.send(Subscribe(0, session.app.id, channel, session.socket_id, member, 0))
            if session.user_id is not None:
                link.send(SignIn(session.app.id, session.socket_id, session.user_id,
                                 session.watchlist))

    def on_broker_messages(self, messages: list[Verb]) -> None:
        """One batch from the broker. Consecutive deliveries to the same channel (a busy
        channel's events) are framed and joined once, so each subscriber gets them in
        one write."""
        i, n = 0, len(messages)
        while i < n:
            message = messages[i]
            i += 1
            if type(message) is Deliver:
                run = [message]
                while i < n:
                    after = messages[i]
                    if type(after) is not Deliver or after.channel != message.channel \
                            or after.app != message.app or after.exclude != message.exclude:
                        break
                    run.append(after)
                    i += 1
                data = text_frame(message.payload) if len(run) == 1 else \
                    b"".join([text_frame(m.payload) for m in run])
                self.fan_out(message.app, message.channel, message.exclude, data)
            elif isinstance(message, DeliverTo):
                frame = text_frame(message.payload)
                for socket_id in message.socket_ids:
                    conn = self.by_socket_id.get(socket_id)
                    if conn is not None:
                        self.queue(conn, frame)
            elif isinstance(message, Terminate):
                for socket_id in message.socket_ids:
                    conn = self.by_socket_id.get(socket_id)
                    if conn is not None:
                        conn.close(message.code, message.message)
            else:
                log.warning("unexpected %s from the broker", type(message).__name__)

    def cork(self, on: bool) -> None:
        """Start or end a corked broker batch (see :attr:`corked`)."""
        if on:
            self.corked = True
        elif self.corked:
            self.corked = False
            self.flush()

    def fan_out(self, app_id: str, channel: str, exclude: str, data: bytes) -> None:
        """Write ``data`` (complete frames) to every local subscriber but ``exclude``.

        The hot path of a publish: the same bytes go to each connection, written
        straight away; a connection that already has corked output queued gets it
        appended there instead, to keep its order. Inside a multi-message broker batch
        everything is corked and leaves in one write per connection at the batch's end
        (a burst of presence joins or events: one syscall per member, not per event).
        """
        targets = self.index.get((app_id, channel))
        if targets is None:
            return
        if type(targets) is Connection:
            targets = (targets,)  # type: ignore[assignment]
        if self.corked:
            queue = self.queue
            for conn in targets:  # type: ignore[union-attr]
                if conn.socket_id != exclude:
                    queue(conn, data)
            return
        limit = self.settings.write_buffer_limit
        for conn in targets:  # type: ignore[union-attr]
            if conn.socket_id == exclude:
                continue
            out = conn.out
            if out is not None:
                out.append(data)
                continue
            transport = conn.transport
            if transport is None:
                continue
            transport.write(data)
            if transport.get_write_buffer_size() > limit:
                transport.abort()  # a slow consumer: cut it off, never buffer without bound

    # --- local index ----------------------------------------------------------------
    #
    # (app, channel) -> the local subscribers. A channel with one local subscriber (the
    # common per-user private channel) maps straight to its Connection; a set is made
    # only for the second one. That saves a set (about 220 bytes) per such channel.

    def bind(self, conn: Connection, channel: str, on: bool) -> None:
        key = (conn.app_id, channel)
        index = self.index
        members = index.get(key)
        if on:
            if members is None:
                index[key] = conn
            elif isinstance(members, set):
                members.add(conn)
            elif members is not conn:
                index[key] = {members, conn}
        elif isinstance(members, set):
            members.discard(conn)
            if len(members) == 1:
                index[key] = next(iter(members))
        elif members is conn:
            del index[key]
            self.confirmed.discard(key)

    def forget(self, conn: Connection) -> None:
        """A connection ended: drop it locally and tell the broker."""
        session = conn.session
        if session is None:
            if conn.registered and conn.socket_id:
                # a quota check was sent (and perhaps counted) but never settled
                conn.registered = False
                self.link.send(ConnClose(conn.app_id, conn.socket_id))
            return
        conn.session = None
        self.by_socket_id.pop(session.socket_id, None)
        for channel in session.local_channels():
            self.bind(conn, channel, False)
        if conn.registered and (not self.stopping or self.link.up):
            self.link.send(ConnClose(session.app.id, session.socket_id))

    def ask_subscribe(self, conn: Connection, message: Subscribe) -> None:
        """Settle a subscribe: locally when the broker already routes a plain channel to
        this worker (``confirmed``), otherwise by asking the broker."""
        session = conn.session
        if session is None:
            return
        key = (message.app, message.channel)
        if message.member is None and key in self.confirmed and not kind_of(key[1]).cache:
            self.link.send(message)
            conn.apply(session.subscribe_answered(message, _OK))
            return

        def answered(body: dict[str, Any] | None) -> None:
            session = conn.session
            if session is None:
                return
            if body is None:
                body = {"ok": False, "type": "ServerError", "status": 503,
                        "error": "The cluster did not answer in time; try again"}
                # the broker may still apply it later: take it back
                self.link.send(Unsubscribe(message.app, message.channel, message.socket_id))
            actions = session.subscribe_answered(message, body)
            conn.apply(actions)
            if body.get("ok") and key in self.index:
                self.confirmed.add(key)

        self.link.request(
            lambda rid: Subscribe(rid, message.app, message.channel, message.socket_id,
                                  message.member, message.max_members),
            answered,
        )

    # --- writing --------------------------------------------------------------------

    def frame(self, payload: bytes) -> bytes:
        # Consecutive sends of the same payload (a fan-out) reuse one frame.
        cached = self._frame_cache
        if cached[0] is payload:
            return cached[1]
        frame = text_frame(payload)
        self._frame_cache = (payload, frame)
        return frame

    def queue(self, conn: Connection, frame: bytes) -> None:
        out = conn.out
        if out is None:
            conn.out = [frame]
            self.dirty.append(conn)
            if not self.flush_scheduled:
                self.flush_scheduled = True
                self.loop.call_soon(self.flush)
        else:
            out.append(frame)

    def flush(self) -> None:
        self.flush_scheduled = False
        dirty = self.dirty
        self.dirty = []
        limit = self.settings.write_buffer_limit
        for conn in dirty:
            self.flush_one(conn, limit)

    def flush_one(self, conn: Connection, limit: int = 0) -> None:
        out = conn.out
        if out is None:
            return
        conn.out = None
        transport = conn.transport
        if transport is None:
            return
        transport.write(out[0] if len(out) == 1 else b"".join(out))
        if limit and transport.get_write_buffer_size() > limit:
            # A slow consumer: cut it off rather than buffer without bound.
            transport.abort()

    # --- new connections ------------------------------------------------------------

    def _admit(self, target: str) -> App | tuple[int, str]:
        """The app a fresh WebSocket on ``target`` joins, or the (code, message) it is
        rejected with (vask-scope §1)."""
        path, _, query = target.partition("?")
        if not path.startswith("/app/") or "/" in path[5:] or len(path) == 5:
            return 4005, "Path not found"
        protocol = _query_value(query, "protocol", "7")
        if not protocol.isdigit():
            return 4006, "Invalid version string format"
        if not 4 <= int(protocol) <= 7:
            return 4007, "Unsupported protocol version"
        app = self.apps_by_key.get(unquote(path[5:]))
        if app is None:
            return 4001, "Application does not exist"
        if not app.enabled:
            return 4003, "Application disabled"
        if self.stopping:
            return 4200, "Server is closing. Please reconnect shortly."
        return app

    def websocket_opened(self, conn: Connection, target: str) -> None:
        """Admit a fresh WebSocket or reject it: one pusher:error, then that close code."""
        app = self._admit(target)
        if isinstance(app, tuple):
            conn.close(*app)
            return
        socket_id = f"{self.link.prefix}.{self.next_socket}"
        self.next_socket += 1
        conn.socket_id = socket_id
        conn.app_id = app.id
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
                conn.close(4004, "Application is over connection quota")
            else:
                self._established(conn, app)

        self.link.request(lambda rid: ConnOpen(rid, app.id, socket_id, app.max_connections),
                          answered)

    def _established(self, conn: Connection, app: App) -> None:
        conn.phase = OPEN
        conn.session = PusherSession(app, conn.socket_id)
        self.by_socket_id[conn.socket_id] = conn
        conn.queue(frames.connection_established(conn.socket_id,
                                                 self.settings.activity_timeout))

    # --- HTTP -----------------------------------------------------------------------

    def http_request(self, conn: Connection, method: str, url: bytes,
                     headers: list[tuple[bytes, bytes]], body: bytes, keep_alive: bool) -> None:
        target = url.decode("latin-1")
        path, _, query = target.partition("?")
        if path == "/up" or path == "/":
            conn.respond(http_response(200, b'{"status":"ok"}', keep_alive), keep_alive)
            return
        if path == "/ready":
            ready = self.link.up and not self.stopping
            status = 200 if ready else 503
            body_out = orjson.dumps({"ready": ready, "broker": self.link.up})
            conn.respond(http_response(status, body_out, keep_alive), keep_alive)
            return
        if self.api is not None and (path.startswith("/apps/") or path.startswith("/users/")):
            future = asyncio.ensure_future(
                self.api.handle(method, path, query, headers, body, keep_alive))
            conn.respond(future, keep_alive)
            return
        conn.respond(http_response(404, json_error(404, f"No route for {method} {path}"),
                                   keep_alive), keep_alive)

    # --- lifecycle ------------------------------------------------------------------

    async def serve(self, sock: socket.socket, parent_pid: int) -> None:
        self.link.start()
        self.sweep()
        patience = STARTUP_BROKER_WAIT * self.settings.broker_timeout
        try:
            await asyncio.wait_for(self.welcomed.wait(), timeout=patience)
        except TimeoutError:
            log.error("worker %d: no broker answered at %s within %.0fs",
                      self.slot, self.link.endpoint, patience)
            raise SystemExit(STARTUP_FAILURE) from None
        self.server = await self.loop.create_server(
            lambda: Connection(self), sock=sock, backlog=4096)
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(signum, stop.set)
        log.info("worker %d serving (pid %d)", self.slot, os.getpid())
        await stop.wait()
        await self.shutdown()

    async def shutdown(self) -> None:
        self.stopping = True
        if self.server is not None:
            self.server.close()
        for conn in list(self.connections):
            if conn.phase == OPEN:
                conn.close(4200, "Server is closing. Please reconnect shortly.")
            elif conn.phase != OPENING:
                conn.abort()
        self.flush()
        deadline = self.loop.time() + self.settings.shutdown_grace
        while self.connections and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            conn.abort()
        self.link.close()


def _query_value(query: str, name: str, default: str) -> str:
    """One parameter of a query string (cheaper than parsing all of it per connect)."""
    prefix = name + "="
    for part in query.split("&"):
        if part.startswith(prefix):
            return unquote(part[len(prefix):])
    return default


def run_worker(settings: Settings, endpoint: str, slot: int, fd: int, parent_pid: int) -> None:
    """Process entry point (called in the forked child)."""
    import uvloop

    die_with_parent(parent_pid)
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)

    async def main() -> None:
        worker = Worker(settings, endpoint, slot)
        worker.api = ApiAdapter(worker)
        await worker.serve(sock, parent_pid)

    uvloop.run(main())
