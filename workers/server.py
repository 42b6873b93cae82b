"""The worker process: one uvloop loop serving one SO_REUSEPORT socket shard.

The worker is split by responsibility:

* :mod:`vask.workers.http` / :mod:`vask.workers.websocket`: the two connection
  protocols (HTTP until an upgrade, then a Pusher WebSocket);
* :mod:`vask.workers.outbound`: every outbound byte, corking and flow control;
* :mod:`vask.workers.index`: the local channel index and the fan-out that reads it;
* :mod:`vask.workers.broker_sync`: what the worker tells the broker and does with its
  answers, and the replay after a broker restart;
* :mod:`vask.workers.admission`: connection caps and WebSocket admission.

:class:`Worker` holds them, the set of open connections, the HTTP routes and a coarse
clock that the single periodic sweep advances (connections read it instead of calling
``time``).

Signals (from the supervisor): SIGTERM/SIGINT stop the worker (:meth:`Worker.shutdown`
after ``stop_ready_delay`` of answering ``/ready`` with 503); SIGUSR1 drains it for a
rolling restart (no delay: its replacement already accepts on the same socket); SIGHUP
reloads the settings the supervisor wrote (:meth:`Worker.on_reload`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
import socket
import ssl
import time
from collections import Counter
from typing import Any

import orjson
from websockets.server import ServerProtocol

from vask.config import Settings
from vask.metrics import WorkerMetrics
from vask.process import STARTUP_FAILURE, die_with_parent, freeze_startup_objects
from vask.reload import app_verdict, read_settings_file
from vask.workers.admission import Admission
from vask.workers.api_adapter import ApiAdapter
from vask.workers.broker_link import BrokerLink
from vask.workers.broker_sync import BrokerSync
from vask.workers.console import ConsoleRecorder
from vask.workers.http import LINGER, HttpProtocol, Response, error_response, http_response
from vask.workers.index import ChannelIndex
from vask.workers.outbound import Corker, Outbound
from vask.workers.rosters import Rosters
from vask.workers.siblings import Siblings
from vask.workers.tls import reload_context, server_context
from vask.workers.websocket import CLOSING, OPEN, OPENING, PusherConnection

log = logging.getLogger("vask.worker")

SWEEP_INTERVAL = 1.0
#: how often a draining worker sends the 4200 closes that are due and closes idle HTTP
#: connections
DRAIN_TICK = 0.05
#: a connection accepted this recently that has sent no request yet is not closed by a
#: drain: its request may be on its way (closing it with unread input would reset it)
FRESH_HTTP = 0.5
STARTUP_BROKER_WAIT = 6  # times broker_timeout to wait for the first welcome


class Worker:
    """Everything one worker process holds."""

    def __init__(self, settings: Settings, endpoint: str, slot: int) -> None:
        self.settings = settings
        self.slot = slot
        self.loop = asyncio.get_running_loop()
        self.connections: set[HttpProtocol | PusherConnection] = set()
        self.by_socket_id: dict[str, PusherConnection] = {}
        #: websockets protocols between frames, shared by connections
        self.ws_pool: list[ServerProtocol] = []
        #: the rest of a long read each connection holds for the next turn (Outbound.hold)
        self.held: dict[Outbound, Any] = {}
        self.clock = time.monotonic()
        self.wall = time.time()
        #: every figure this worker counts, sent to the broker with each heartbeat
        #: (vask.metrics); ``counters`` holds its named rare events (refusals, cuts)
        self.metrics = WorkerMetrics([app.id for app in settings.apps])
        self.counters: Counter[str] = self.metrics.events
        # Corked bytes of one turn, all connections together: past this they are written at
        # once (a turn's pongs to a ping flood, a drain's deliveries to many subscribers).
        self.corker = Corker(self.loop, settings.write_buffer_limit)
        self.rosters = Rosters()
        self.index = ChannelIndex(self.corker, self.rosters)
        self.sync = BrokerSync(self)
        self.admission = Admission(self)
        self.link = BrokerLink(settings, endpoint, slot, self.sync.on_messages,
                               self.sync.on_welcome, self.corker.cork, self.sync.converge,
                               metrics=self.metrics)
        self.welcomed = asyncio.Event()
        self.server: asyncio.AbstractServer | None = None
        self.stopping = False
        self.api: ApiAdapter | None = None
        #: the file the supervisor writes reloaded settings to ("" = none)
        self.settings_path = ""
        #: the supervisor's ready pipe: this worker writes its pid there once ready
        self.ready_fd = -1
        #: the socket client events reach the other workers of this host through, when
        #: they are the whole cluster (vask.workers.siblings); None: through the broker
        self.siblings: Siblings | None = None
        #: the TLS context connections are accepted with (None: plain TCP); a reload can
        #: re-read the certificate into it without touching open connections
        #: (vask.workers.tls.reload_context)
        try:
            self.tls = server_context(settings)
        except (ssl.SSLError, OSError) as exc:
            # checked before the workers started, so the files changed since
            log.error("worker %d: cannot load tls_cert/tls_key: %s", slot, exc)
            raise SystemExit(STARTUP_FAILURE) from None
        #: the debug console's recorder, on only while the broker asks (CONSOLE)
        self.console = ConsoleRecorder(self.metrics, slot, self.link.send,
                                       settings.heartbeat_interval)
        self.link.on_console = self.console.watch

    # --- clock and sweep ----------------------------------------------------------------

    def sweep(self) -> None:
        self.clock = now = time.monotonic()
        self.wall = time.time()
        for conn in list(self.connections):
            conn.sweep(now)
        self.loop.call_later(SWEEP_INTERVAL, self.sweep)

    # --- HTTP -----------------------------------------------------------------------

    def http_route(self, method: str, url: bytes, headers: list[tuple[bytes, bytes]],
                   body: bytes, keep_alive: bool) -> Response:
        """The answer to one plain HTTP request (health, the HTTP API, or 404)."""
        target = url.decode("latin-1")
        path, _, query = target.partition("?")
        if path == "/up" or path == "/":
            return http_response(200, b'{"status":"ok"}', keep_alive)
        if path == "/ready":
            link = self.link
            ready = link.up and link.recovered and not self.stopping
            body_out = orjson.dumps({"ready": ready, "broker": link.up,
                                     "recovering": link.up and not link.recovered})
            return http_response(200 if ready else 503, body_out, keep_alive)
        api = self.api
        if api is not None and (path.startswith("/apps/") or path.startswith("/users/")):
            return lambda: api.handle(method, path, query, headers, body, keep_alive)
        return error_response(404, f"No route for {method} {path}", keep_alive)

    # --- lifecycle ------------------------------------------------------------------

    async def serve(self, sock: socket.socket, parent_pid: int) -> None:
        stop = asyncio.Event()
        drain = False

        def retire() -> None:
            nonlocal drain
            drain = True
            stop.set()

        for signum in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(signum, stop.set)
        self.loop.add_signal_handler(signal.SIGUSR1, retire)
        self.loop.add_signal_handler(signal.SIGHUP, self.reload_from_file)
        # a reload between the fork and the line above sent its SIGHUP in vain
        self.reload_from_file()
        self.link.start()
        self.sweep()
        patience = STARTUP_BROKER_WAIT * self.settings.broker_timeout
        try:
            await asyncio.wait_for(self.welcomed.wait(), timeout=patience)
        except TimeoutError:
            log.error("worker %d: no broker answered at %s within %.0fs",
                      self.slot, self.link.endpoint, patience)
            raise SystemExit(STARTUP_FAILURE) from None
        # With TLS, a handshake must complete within http_request_timeout, like a request
        # head (the sweep cannot see a connection before its handshake ends: asyncio's
        # own timer bounds it), and a closing TLS connection waits for the client's
        # close_notify at most LINGER seconds, like the lingering close of plain HTTP.
        tls = self.tls
        self.server = await self.loop.create_server(
            lambda: HttpProtocol(self), sock=sock, backlog=4096, ssl=tls,
            ssl_handshake_timeout=self.settings.http_request_timeout if tls else None,
            ssl_shutdown_timeout=LINGER if tls else None)
        log.info("worker %d serving (pid %d)", self.slot, os.getpid())
        announce = self.loop.create_task(self._announce_ready(stop))
        await stop.wait()
        announce.cancel()
        s = self.settings
        if drain:
            log.info("worker %d draining for a rolling restart over %gs",
                     self.slot, s.drain_window)
            await self.shutdown(0.0, s.drain_window)
        else:
            await self.shutdown(s.stop_ready_delay, min(s.drain_window, s.shutdown_grace))

    async def _announce_ready(self, stop: asyncio.Event) -> None:
        """Tell the supervisor (its ready pipe) once ``/ready`` would answer 200: a
        rolling restart retires the old worker of this slot only then."""
        link = self.link
        while not (link.up and link.recovered) and not stop.is_set():
            await asyncio.sleep(0.05)
        if self.ready_fd >= 0 and not stop.is_set():
            try:
                os.write(self.ready_fd, f"{os.getpid()}\n".encode())
            except OSError as exc:
                log.warning("worker %d cannot tell the supervisor it is ready: %s",
                            self.slot, exc.strerror)

    async def shutdown(self, ready_delay: float = 0.0, spread: float = 0.0) -> None:
        """Stop without cutting anyone off.

        1. ``/ready`` answers 503 (and new WebSockets get 4200) for ``ready_delay``
           seconds while the listener still accepts, so a load balancer can take this
           instance out of rotation first;
        2. the listener closes (connections queued on the shard socket stay there for
           the other process sharing it: the replacement in a rolling restart);
        3. open WebSockets get 4200 at moments spread evenly, in random order, over
           ``spread`` seconds, so they do not all reconnect at once; HTTP requests in
           flight finish and are answered with ``Connection: close``; idle HTTP
           connections are closed (FIN, not reset);
        4. whatever is left ``shutdown_grace`` seconds after the last 4200 is aborted,
           and the broker is told BYE.
        """
        self.stopping = True
        loop = self.loop
        if ready_delay > 0:
            await asyncio.sleep(ready_delay)
        if self.server is not None:
            self.server.close()
        start = loop.time()
        deadline = start + spread + self.settings.shutdown_grace
        order = [c for c in self.connections if type(c) is PusherConnection]
        random.shuffle(order)
        step = spread / len(order) if order else 0.0
        sent = 0
        while loop.time() < deadline:
            elapsed = loop.time() - start
            while sent < len(order) and sent * step <= elapsed:
                client = order[sent]
                sent += 1
                if client.phase == OPEN:
                    client.close(4200, "Server is closing. Please reconnect shortly.")
            late = sent == len(order) and elapsed >= spread
            fresh = time.monotonic() - FRESH_HTTP
            for conn in list(self.connections):
                if not isinstance(conn, HttpProtocol):
                    # opened after the list was made (a quota check was pending)
                    if late and conn.phase == OPEN:
                        conn.close(4200, "Server is closing. Please reconnect shortly.")
                elif (conn.transport is not None and not conn.in_request
                        and conn.pipeline is None and not conn.lingering
                        and (conn.idle_since or conn.started < fresh)):
                    conn.transport.close()
            self.corker.flush()
            if not self.connections:
                break
            await asyncio.sleep(DRAIN_TICK)
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()
        self.link.close()

    # --- reload -------------------------------------------------------------------------

    def reload_from_file(self) -> None:
        """SIGHUP: take the settings the supervisor wrote, if they differ."""
        if not self.settings_path:
            return
        try:
            new = read_settings_file(self.settings_path)
        except (OSError, ValueError, TypeError) as exc:
            log.error("worker %d cannot read the reloaded settings: %s", self.slot, exc)
            return
        if new is None:
            return
        if new != self.settings:
            self.on_reload(new)
        elif self.tls is not None:
            # The same settings: a renewed certificate at the same paths.
            self._reload_tls(new)
            log.info("worker %d: TLS certificate re-read", self.slot)

    def _reload_tls(self, new: Settings) -> None:
        if self.tls is None:
            return
        try:
            reload_context(self.tls, new)
        except (ssl.SSLError, OSError) as exc:
            log.error("worker %d: tls_cert/tls_key not reloaded, the previous "
                      "certificate stays in use: %s", self.slot, exc)

    def on_reload(self, new: Settings) -> None:
        """Run with ``new`` settings from now on (validated by the supervisor).

        Requests read ``self.settings`` as they come (the HTTP API resolves its app per
        request), so swapping it covers them. Open connections follow their app by id:
        one whose app was removed, disabled or re-keyed is closed with the code a
        connect would now get (4001, 4003); the others keep their connection and check
        new subscriptions against the new secret and limits.

        With TLS, the certificate and key are read again into the live context: new
        connections get the renewed pair, open ones keep their session. A pair that
        does not load is logged and the previous one stays in use.
        """
        old = self.settings
        self._reload_tls(new)
        self.settings = new
        self.link.settings = new
        if self.siblings is not None:
            self.siblings.reload(new)
        self.corker.limit = new.write_buffer_limit
        self.admission.reload(new)
        logging.getLogger().setLevel(new.log_level.upper())
        previous = {app.id: app for app in old.apps}
        current = {app.id: app for app in new.apps}
        closed = 0
        for conn in list(self.connections):
            if type(conn) is not PusherConnection:
                continue
            session = conn.session
            if session is not None:
                verdict = app_verdict(session.app, current)
            elif conn.phase == OPENING and conn.app_id in previous:
                verdict = app_verdict(previous[conn.app_id], current)
            else:
                continue
            if isinstance(verdict, tuple):
                if conn.phase < CLOSING:
                    conn.close(*verdict)
                    closed += 1
            elif session is not None:
                session.app = verdict
        self.corker.flush()
        log.info("worker %d: configuration reloaded (%d connection(s) of removed, "
                 "disabled or re-keyed apps closed)", self.slot, closed)


def run_worker(settings: Settings, endpoint: str, slot: int, fd: int, parent_pid: int,
               settings_path: str = "", ready_fd: int = -1, siblings_dir: str = "") -> None:
    """Process entry point (called in the forked child)."""
    import uvloop

    die_with_parent(parent_pid)
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)

    async def main() -> None:
        worker = Worker(settings, endpoint, slot)
        worker.api = ApiAdapter(worker)
        worker.settings_path = settings_path
        worker.ready_fd = ready_fd
        if siblings_dir:
            # before the listener opens: a sibling that lists the directory after this
            # reaches every client this worker will ever have
            try:
                worker.siblings = Siblings(worker, siblings_dir)
            except OSError as exc:  # e.g. a socket path over the 107-byte limit
                log.warning("worker %d: client events go through the broker: cannot "
                            "listen in %s: %s", slot, siblings_dir, exc)
        try:
            await worker.serve(sock, parent_pid)
        finally:
            if worker.siblings is not None:
                worker.siblings.close()

    freeze_startup_objects()
    uvloop.run(main())
