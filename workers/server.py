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
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import ssl
import time
from collections import Counter

import orjson
from websockets.server import ServerProtocol

from vask.config import Settings
from vask.process import STARTUP_FAILURE, die_with_parent
from vask.workers.admission import Admission
from vask.workers.api_adapter import ApiAdapter
from vask.workers.broker_link import BrokerLink
from vask.workers.broker_sync import BrokerSync
from vask.workers.http import LINGER, HttpProtocol, Response, error_response, http_response
from vask.workers.index import ChannelIndex
from vask.workers.outbound import Corker
from vask.workers.rosters import Rosters
from vask.workers.tls import server_context
from vask.workers.websocket import OPEN, OPENING, PusherConnection

log = logging.getLogger("vask.worker")

SWEEP_INTERVAL = 1.0
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
        self.clock = time.monotonic()
        self.wall = time.time()
        #: named event counts (refusals, cuts); read by tests and, later, metrics
        self.counters: Counter[str] = Counter()
        # Corked bytes of one turn, all connections together: past this they are written at
        # once (a turn's pongs to a ping flood, a drain's deliveries to many subscribers).
        self.corker = Corker(self.loop, settings.write_buffer_limit)
        self.rosters = Rosters()
        self.index = ChannelIndex(self.corker, self.rosters)
        self.sync = BrokerSync(self)
        self.admission = Admission(self)
        self.link = BrokerLink(settings, endpoint, slot, self.sync.on_messages,
                               self.sync.on_welcome, self.corker.cork, self.sync.converge)
        self.welcomed = asyncio.Event()
        self.server: asyncio.AbstractServer | None = None
        self.stopping = False
        self.api: ApiAdapter | None = None
        #: the TLS context connections are accepted with (None: plain TCP); a reload can
        #: re-read the certificate into it without touching open connections
        #: (vask.workers.tls.reload_context)
        try:
            self.tls = server_context(settings)
        except (ssl.SSLError, OSError) as exc:
            # checked before the workers started, so the files changed since
            log.error("worker %d: cannot load tls_cert/tls_key: %s", slot, exc)
            raise SystemExit(STARTUP_FAILURE) from None

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
            if type(conn) is not PusherConnection:
                if conn.transport is not None:
                    conn.transport.abort()
            elif conn.phase == OPEN:
                conn.close(4200, "Server is closing. Please reconnect shortly.")
            elif conn.phase != OPENING:
                conn.abort()
        self.corker.flush()
        deadline = self.loop.time() + self.settings.shutdown_grace
        while self.connections and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()
        self.link.close()


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
