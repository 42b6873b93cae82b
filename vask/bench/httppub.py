"""A small keep-alive HTTP/1.1 client for triggering events through the signed API."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable
from typing import Any, cast

import httptools
import orjson

from vask.bench.signing import sign_query


def client_tls(enabled: bool, ca_file: str = "") -> ssl.SSLContext | None:
    """The client context for a server speaking TLS: verified against ``ca_file``, or,
    without one, not verified at all (the bench measures what TLS costs; whom to trust
    is not its question). None when TLS is off."""
    if not enabled and not ca_file:
        return None
    if ca_file:
        return ssl.create_default_context(cafile=ca_file)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


class _HttpConn(asyncio.Protocol):
    """One keep-alive connection, one request in flight at a time (no pipelining)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.body: list[bytes] = []
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.lost = False
        self.keep_alive = True
        self.used = 0  # requests completed on this connection
        self.got_bytes = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, hence the cast.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError(f"HTTP connection lost: {exc}"))

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            if self.waiter is not None and not self.waiter.done():
                self.waiter.set_exception(e)

    # httptools callbacks
    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        # soketi answers every API call with "Connection: close"; honour it.
        self.keep_alive = bool(self.parser.should_keep_alive())
        self.used += 1
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result((self.parser.get_status_code(), b"".join(self.body)))
        self.body = []

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        assert self.transport is not None
        self.got_bytes = False
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(raw)
        return await self.waiter


class PublishRejected(RuntimeError):
    """The server answered a trigger with a 4xx: retrying cannot help, so the run stops.

    Typical causes are a wrong ``--app-id``, key or secret, or an app limit; the
    message carries the status and the server's own words.
    """


class Publisher:
    """Triggers events over ``inflight`` keep-alive connections.

    Timestamps are taken immediately before each request is written, so the
    latency measured by receivers includes the server's HTTP handling. The first
    4xx answer stops every lane and ``run`` raises :class:`PublishRejected`: a
    client error repeats for every request, and waiting for deliveries that can
    never come only hides the server's message behind a timeout.
    """

    def __init__(self, host: str, port: int, app_id: str, key: str, secret: str,
                 inflight: int = 8, tls: ssl.SSLContext | None = None,
                 keep: bool = False) -> None:
        self.host, self.port = host, port
        #: keep the lanes' connections open between runs (``close`` ends them), so that
        #: a run of a few events is not charged a few fresh TCP connections each time
        self.keep = keep
        self._spare: list[_HttpConn] = []
        self.tls = tls
        self.app_id, self.key, self.secret = app_id, key, secret
        self.inflight = inflight
        self.path = f"/apps/{app_id}/events"
        self.sent = 0
        self.ok = 0
        self.failed = 0
        self.errors: list[str] = []
        self.http_lat_us: list[int] = []
        self.connections = 0
        self.retries = 0
        self.rejected: str | None = None  # the first 4xx, as "HTTP 404: <body>"

    def build(self, name: str, channel: str | list[str], data: str) -> bytes:
        """Return the raw signed HTTP request triggering one event (on up to 100 channels)."""
        where = {"channels": channel} if isinstance(channel, list) else {"channel": channel}
        body = orjson.dumps({"name": name, **where, "data": data})
        query = sign_query("POST", self.path, self.key, self.secret, body)
        return (
            f"POST {self.path}?{query} HTTP/1.1\r\n"
            f"Host: {self.host}:{self.port}\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode() + body

    async def _connect(self) -> _HttpConn:
        loop = asyncio.get_running_loop()
        _t, proto = await loop.create_connection(
            _HttpConn, self.host, self.port, ssl=self.tls,
            server_hostname=self.host if self.tls is not None else None)
        self.connections += 1
        return proto

    async def _send(self, conn: _HttpConn, raw: bytes) -> tuple[_HttpConn, int, bytes]:
        """Send on ``conn`` (replacing it if closed); retry once on a stale keep-alive.

        A reused connection that the server closed while idle dies without a
        single response byte: the request was never processed, so resending it
        cannot duplicate the event.
        """
        if conn.lost or not conn.keep_alive:
            if conn.transport is not None:
                conn.transport.close()
            conn = await self._connect()
        try:
            status, body = await asyncio.wait_for(conn.request(raw), 30)
        except ConnectionError:
            if conn.used == 0 or conn.got_bytes:
                raise
            self.retries += 1
            conn = await self._connect()
            status, body = await asyncio.wait_for(conn.request(raw), 30)
        return conn, status, body

    async def trigger(self, name: str, channels: list[str], data: str) -> None:
        """Trigger one event on ``channels`` (at most 100) over a fresh connection.

        Raises :class:`PublishRejected` on a 4xx and ``RuntimeError`` on any other
        non-200 answer.
        """
        conn = await self._connect()
        try:
            conn, status, body = await self._send(conn, self.build(name, channels, data))
        finally:
            if conn.transport is not None:
                conn.transport.close()
        self.sent += 1
        text = body[:300].decode("utf-8", "replace").strip()
        if 400 <= status < 500:
            raise PublishRejected(f"HTTP {status} from {self.path}: {text}")
        if status != 200:
            raise RuntimeError(f"HTTP {status} from {self.path}: {text}")
        self.ok += 1

    async def run(
        self,
        count: int,
        make_data: Callable[[int, int], str],
        channel: str,
        name: str = "bench",
        rate: float | None = None,
        on_progress: Callable[[], Any] | None = None,
    ) -> float:
        """Trigger ``count`` events (optionally paced at ``rate``/s); return elapsed seconds.

        ``make_data(seq, now_us)`` builds the event data string.
        """
        next_seq = 0
        t0 = time.monotonic()

        async def lane() -> None:
            nonlocal next_seq
            conn = self._spare.pop() if self._spare else await self._connect()
            while next_seq < count and self.rejected is None:
                seq = next_seq
                next_seq += 1
                if rate:
                    delay = t0 + seq / rate - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                stamp = time.monotonic_ns() // 1000
                raw = self.build(name, channel, make_data(seq, stamp))
                self.sent += 1
                try:
                    conn, status, body = await self._send(conn, raw)
                except (ConnectionError, TimeoutError, httptools.HttpParserError) as e:
                    self.failed += 1
                    self._err(f"request {seq}: {e!r}")
                    conn = await self._connect()
                    continue
                self.http_lat_us.append(time.monotonic_ns() // 1000 - stamp)
                if status == 200:
                    self.ok += 1
                else:
                    self.failed += 1
                    self._err(f"HTTP {status}: {body[:200]!r}")
                    if 400 <= status < 500 and self.rejected is None:
                        text = body[:300].decode("utf-8", "replace").strip()
                        self.rejected = f"HTTP {status} from {self.path}: {text}"
                if on_progress is not None:
                    on_progress()
            if self.keep and not conn.lost:
                self._spare.append(conn)
            elif conn.transport is not None:
                conn.transport.close()

        await asyncio.gather(*(lane() for _ in range(max(1, min(self.inflight, count)))))
        if self.rejected is not None:
            raise PublishRejected(self.rejected)
        return time.monotonic() - t0

    def close(self) -> None:
        """Close the connections kept between runs."""
        for conn in self._spare:
            if conn.transport is not None:
                conn.transport.close()
        self._spare.clear()

    def _err(self, msg: str) -> None:
        if len(self.errors) < 10:
            self.errors.append(msg)
