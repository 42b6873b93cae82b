"""Load-generator worker processes: lean Pusher WebSocket clients on uvloop.

Each worker process owns many connections and is driven by the parent over a
``multiprocessing`` pipe with small ``(request_id, command, args)`` messages.
The receive path is hand-written (see :mod:`vask.bench.wsframe`) because a
general WebSocket library costs several times more CPU per frame, and a
saturated load generator would make the server look slow.

Latency: publishers embed ``~ts<microseconds>~`` (CLOCK_MONOTONIC, which is
system-wide on Linux, so comparable across processes) in the event data; the
receiver finds the marker with ``bytes.find`` and never JSON-parses the frame.
One clock reading per socket read serves every frame in that read.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import resource
import time
from array import array
from collections.abc import Awaitable, Callable
from multiprocessing.connection import Connection
from typing import Any, cast

import orjson

from vask.bench.httppub import client_tls
from vask.bench.signing import presence_auth, private_auth
from vask.bench.wsframe import (
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    FrameDecoder,
    close_payload,
    encode_frame,
    parse_close,
    upgrade_request,
)

MARK = b"~ts"
_mono_ns = time.monotonic_ns


def now_us() -> int:
    """CLOCK_MONOTONIC in integer microseconds (comparable between processes)."""
    return _mono_ns() // 1000


def raise_nofile_limit() -> int:
    """Raise RLIMIT_NOFILE to the hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class PusherConn(asyncio.Protocol):
    """One Pusher client connection, subscribed to a single channel."""

    def __init__(self, w: Worker, index: int, channel: str, user_id: str | None) -> None:
        self.w = w
        self.index = index
        self.channel = channel
        self.user_id = user_id
        self.transport: asyncio.Transport | None = None
        self.dec = FrameDecoder()
        self.hs_buf = b""
        self.upgraded = False
        self.mask = os.urandom(4)  # fixed per connection: RFC-valid, and cheap
        self.socket_id = ""
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.subscribed = False
        self.left = False  # closed on purpose by the bench
        self.closed = False
        self.close_code: int | None = None
        self.recv_count = 0
        self.frag: list[bytes] = []
        # presence bookkeeping
        self.roster: list[str] = []
        self.added: list[str] = []
        self.removed: list[str] = []
        # Set while a reconnect-storm retry loop owns this connection: its loss is
        # that loop's business (it retries), not a new drop.
        self.retrying = False

    # --- asyncio.Protocol -------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Send the upgrade request as soon as TCP is up."""
        # uvloop's transports do not subclass asyncio.Transport, hence the cast.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(upgrade_request(self.w.host, self.w.port, self.w.path))

    def connection_lost(self, exc: Exception | None) -> None:
        """Record unexpected closes; fail a pending subscription."""
        self.closed = True
        if not self.left and self.w.storm is not None:
            if not self.retrying:
                self.w.storm.dropped(self)
        elif not self.left:
            self.w.unexpected_closes += 1
            self.w.note_error(f"connection {self.index} lost (code {self.close_code}): {exc}")
        if not self.ready.done():
            self.ready.set_exception(
                ConnectionError(f"closed before subscribed ({self.close_code})")
            )

    def data_received(self, data: bytes) -> None:
        """Hot path: decode frames, count and time bench events without JSON parsing."""
        if not self.upgraded:
            data = self._handshake(data)
            if not data:
                return
        t = _mono_ns() // 1000
        w = self.w
        for fin, op, payload in self.dec.feed(data):
            if op == OP_TEXT and fin:
                i = payload.find(MARK)
                if i >= 0:
                    j = payload.find(b"~", i + 3)
                    w.lat.append(t - int(payload[i + 3 : j]))
                    self.recv_count += 1
                    w.deliveries += 1
                    if not w.first_t:
                        w.first_t = t
                    w.last_t = t
                else:
                    self._control(payload)
            else:
                self._other_frame(fin, op, payload)

    # --- helpers ------------------------------------------------------------
    def _handshake(self, data: bytes) -> bytes:
        buf = self.hs_buf + data
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            self.hs_buf = buf
            return b""
        status = buf[: buf.find(b"\r\n")]
        if b" 101" not in status:
            self.w.note_error(f"upgrade refused: {status.decode('latin-1')}")
            self.abort()
            return b""
        self.upgraded = True
        self.hs_buf = b""
        return buf[end + 4 :]

    def _other_frame(self, fin: bool, op: int, payload: bytes) -> None:
        if op == OP_PING:
            self.send_raw(OP_PONG, payload)
        elif op == OP_CLOSE:
            self.close_code, _reason = parse_close(payload)
            if not self.closed and self.transport is not None:
                self.send_raw(OP_CLOSE, payload[:2])
                self.transport.close()
        elif op == OP_TEXT and not fin:
            self.frag = [payload]
        elif op == OP_CONT and self.frag:
            self.frag.append(payload)
            if fin:
                whole = b"".join(self.frag)
                self.frag = []
                self.data_frame_reassembled(whole)

    def data_frame_reassembled(self, payload: bytes) -> None:
        """Handle a text message that arrived fragmented (rare; not the fast path)."""
        i = payload.find(MARK)
        if i >= 0:
            j = payload.find(b"~", i + 3)
            t = now_us()
            self.w.lat.append(t - int(payload[i + 3 : j]))
            self.recv_count += 1
            self.w.deliveries += 1
            self.w.last_t = t
            if not self.w.first_t:
                self.w.first_t = t
        else:
            self._control(payload)

    def _control(self, payload: bytes) -> None:
        try:
            msg = orjson.loads(payload)
        except orjson.JSONDecodeError:
            self.w.note_error(f"bad JSON frame: {payload[:80]!r}")
            return
        ev = msg.get("event")
        if ev == "pusher:connection_established":
            data = _maybe_json(msg.get("data"))
            self.socket_id = str(data.get("socket_id", ""))
            self._subscribe()
        elif ev == "pusher_internal:subscription_succeeded":
            self.subscribed = True
            if self.user_id is not None:
                data = _maybe_json(msg.get("data"))
                ids = data.get("presence", {}).get("ids", [])
                self.roster = [str(x) for x in ids]
                self._check_join()
            if not self.ready.done():
                self.ready.set_result(None)
        elif ev == "pusher_internal:member_added":
            self.added.append(str(_maybe_json(msg.get("data")).get("user_id")))
            self._check_join()
        elif ev == "pusher_internal:member_removed":
            self.removed.append(str(_maybe_json(msg.get("data")).get("user_id")))
            if len(self.removed) == self.w.expect_removed:
                self.w.leave_last_t = max(self.w.leave_last_t, now_us())
        elif ev == "pusher:ping":
            self.send_text(b'{"event":"pusher:pong","data":{}}')
        elif ev in ("pusher:error", "pusher:subscription_error"):
            self.w.note_error(f"{ev}: {msg.get('data')}")
            if not self.ready.done():
                self.ready.set_exception(RuntimeError(f"{ev}: {msg.get('data')}"))
        # Anything else (pong, cache_miss, subscription_count, ...) is ignored.

    def _check_join(self) -> None:
        # Record when this member's view became complete (roster + member_added),
        # so join time is measured by the receiver, not by the parent's polling.
        if len(self.roster) + len(self.added) == self.w.expect_members:
            self.w.join_last_t = max(self.w.join_last_t, now_us())

    def _subscribe(self) -> None:
        w = self.w
        data: dict[str, Any] = {"channel": self.channel, "auth": ""}
        if self.channel.startswith("presence-"):
            cd = orjson.dumps({"user_id": self.user_id, "user_info": {}}).decode()
            data["channel_data"] = cd
            data["auth"] = presence_auth(w.key, w.secret, self.socket_id, self.channel, cd)
        elif self.channel.startswith("private-"):
            data["auth"] = private_auth(w.key, w.secret, self.socket_id, self.channel)
        self.send_text(orjson.dumps({"event": "pusher:subscribe", "data": data}))

    def send_raw(self, op: int, payload: bytes) -> None:
        """Send one masked frame if the transport is still open."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(encode_frame(op, payload, self.mask))

    def send_text(self, payload: bytes) -> None:
        """Send a text frame."""
        self.send_raw(OP_TEXT, payload)

    def leave(self) -> None:
        """Close on purpose with a normal close frame (the server sees a clean leave)."""
        self.left = True
        if self.transport is not None and not self.transport.is_closing():
            self.send_raw(OP_CLOSE, close_payload(1000))
            self.transport.close()

    def abort(self) -> None:
        """Drop the TCP connection without a close handshake."""
        self.left = True
        if self.transport is not None:
            self.transport.abort()


class Storm:
    """Reconnect-storm bookkeeping of one loadgen process.

    A dropped connection is replaced at once by a new one (same index, channel and
    user) that connects, waits for ``connection_established`` and resubscribes. A
    refused TCP connect (the server is not listening yet) is retried after a
    jittered delay that starts at ``retry_min`` and doubles up to ``retry_max``,
    so thousands of clients do not spin on a closed port. Any other failure after
    TCP connected (reset, timeout, upgrade refused, ``pusher:error``, subscription
    error) is a *failed reconnect*: it is counted and retried the same way.
    """

    def __init__(self, w: Worker, retry_min: float, retry_max: float, timeout: float) -> None:
        self.w = w
        self.retry_min, self.retry_max, self.timeout = retry_min, retry_max, timeout
        self.drops = 0  # connections lost (the first drop and any later ones)
        self.redrops = 0  # lost again after having come back
        self.down: set[int] = set()  # indices not subscribed right now
        self.ever: set[int] = set()  # indices dropped at least once
        self.back = 0  # successful resubscriptions
        self.attempts = 0
        self.refused = 0  # TCP connect refused (server not listening): expected, retried
        self.failed = 0  # failed reconnects (anything but refused)
        self.fail_t: array[int] = array("q")  # when each failed attempt began (µs)
        self.first_drop_t = 0
        self.last_back_t = 0
        self.errors: list[str] = []
        self._tasks: set[asyncio.Future[None]] = set()  # the running reconnect loops

    def dropped(self, conn: PusherConn) -> None:
        """A subscribed connection was lost: start its reconnect loop."""
        self.drops += 1
        if conn.index in self.ever:
            self.redrops += 1
        if not self.first_drop_t:
            self.first_drop_t = now_us()
        self.down.add(conn.index)
        self.ever.add(conn.index)
        task = asyncio.ensure_future(self._reconnect(conn))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reconnect(self, old: PusherConn) -> None:
        w = self.w
        loop = asyncio.get_running_loop()
        delay = self.retry_min
        while w.storm is self:
            conn = PusherConn(w, old.index, old.channel, old.user_id)
            conn.retrying = True
            self.attempts += 1
            t_attempt = now_us()

            def factory(c: PusherConn = conn) -> PusherConn:
                return c

            try:
                await asyncio.wait_for(
                    loop.create_connection(factory, w.host, w.port,
                                           local_addr=w.source(old.index)), self.timeout)
                await asyncio.wait_for(asyncio.shield(conn.ready), self.timeout)
            except ConnectionRefusedError:
                self.refused += 1
            except (OSError, TimeoutError, RuntimeError, ConnectionError) as e:
                self.failed += 1
                self.fail_t.append(t_attempt)
                if len(self.errors) < 10:
                    self.errors.append(f"reconnect {old.index}: {e!r}")
                conn.abort()
            else:
                conn.retrying = False
                try:
                    w.conns[w.conns.index(old)] = conn
                except ValueError:
                    w.conns.append(conn)
                self.down.discard(old.index)
                self.back += 1
                self.last_back_t = now_us()
                return
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, self.retry_max)

    def status(self) -> dict[str, Any]:
        """Counters for the parent (JSON-friendly)."""
        return {
            "drops": self.drops, "redrops": self.redrops, "down": len(self.down),
            "ever": len(self.ever), "back": self.back, "attempts": self.attempts,
            "refused": self.refused, "failed": self.failed,
            "first_drop_t": self.first_drop_t, "last_back_t": self.last_back_t,
            "errors": list(self.errors),
        }


def _maybe_json(data: Any) -> dict[str, Any]:
    """Pusher double-encodes ``data`` (a JSON string); some servers send an object."""
    if isinstance(data, (str, bytes)):
        try:
            data = orjson.loads(data)
        except orjson.JSONDecodeError:
            return {}
    return data if isinstance(data, dict) else {}


class Worker:
    """State and command handlers of one load-generator process."""

    def __init__(self, pipe: Connection, cfg: dict[str, Any]) -> None:
        self.pipe = pipe
        self.host: str = cfg["host"]
        self.port: int = cfg["port"]
        self.key: str = cfg["key"]
        self.secret: str = cfg["secret"]
        #: one client TLS context for all of this process's connections (None: plain)
        self.tls = client_tls(cfg.get("tls", False), cfg.get("tls_ca", ""))
        self.path = f"/app/{self.key}?protocol=7&client=js&version=8.4.0&flash=false"
        #: loopback source addresses 127.0.0.1..N: one address has only ~28 000 ephemeral
        #: ports towards one server port, so 40 000 connections need several
        self.sources: int = cfg.get("sources", 1)
        self.conns: list[PusherConn] = []
        self.lat: array[int] = array("q")
        self.deliveries = 0
        self.first_t = 0
        self.last_t = 0
        self.unexpected_closes = 0
        self.errors: list[str] = []
        self.error_count = 0
        self.client_sent = 0
        self.expect_members = -1
        self.expect_removed = -1
        self.join_last_t = 0
        self.leave_last_t = 0
        self.done = asyncio.get_running_loop().create_future()
        self.storm: Storm | None = None

    def source(self, index: int) -> tuple[str, int] | None:
        """The local address for connection ``index`` (None: the kernel's choice)."""
        if self.sources <= 1:
            return None
        return (f"127.0.0.{1 + index % self.sources}", 0)

    def note_error(self, msg: str) -> None:
        """Count an error; keep the first few messages for the report."""
        self.error_count += 1
        if len(self.errors) < 10:
            self.errors.append(msg)

    # --- command plumbing -----------------------------------------------------
    def on_pipe_readable(self) -> None:
        """Read one command from the parent and run it as a task."""
        try:
            rid, cmd, args = self.pipe.recv()
        except (EOFError, OSError):
            if not self.done.done():
                self.done.set_result(None)
            return
        handler: Callable[[dict[str, Any]], Awaitable[Any]] = getattr(self, f"cmd_{cmd}")
        task = asyncio.ensure_future(handler(args))
        task.add_done_callback(lambda t: self._reply(rid, t))

    def _reply(self, rid: int, task: asyncio.Future[Any]) -> None:
        exc = task.exception()
        payload = ("error", repr(exc)) if exc else ("ok", task.result())
        with contextlib.suppress(OSError, BrokenPipeError):
            self.pipe.send((rid, *payload))

    # --- commands -----------------------------------------------------------
    async def cmd_connect(self, args: dict[str, Any]) -> dict[str, Any]:
        """Open ``count`` connections (global indices from ``start``) and subscribe each.

        ``channel`` may contain ``{i}`` for a per-connection channel name.
        Presence channels use user id ``u<index>``.
        """
        loop = asyncio.get_running_loop()
        start: int = args["start"]
        count: int = args["count"]
        channel_t: str = args["channel"]
        timeout: float = args.get("timeout", 30.0)
        sem = asyncio.Semaphore(args.get("concurrency", 200))
        self.expect_members = args.get("members", -1)
        groups: int = args.get("groups", 1)  # {g} in the channel is index % groups
        ok = 0
        failed = 0
        t_begin = now_us()

        async def one(i: int) -> None:
            nonlocal ok, failed
            ch = channel_t.replace("{i}", str(i)).replace("{g}", str(i % groups))
            uid = f"u{i}" if ch.startswith("presence-") else None
            conn = PusherConn(self, i, ch, uid)
            async with sem:
                try:
                    await asyncio.wait_for(
                        loop.create_connection(
                            lambda: conn, self.host, self.port, ssl=self.tls,
                            server_hostname=self.host if self.tls is not None else None,
                            local_addr=self.source(i)),
                        timeout
                    )
                    self.conns.append(conn)
                    await asyncio.wait_for(asyncio.shield(conn.ready), timeout)
                    ok += 1
                except (OSError, TimeoutError, RuntimeError, ConnectionError) as e:
                    failed += 1
                    self.note_error(f"connect {i}: {e!r}")
                    conn.abort()

        await asyncio.gather(*(one(i) for i in range(start, start + count)))
        return {"ok": ok, "failed": failed, "t_begin": t_begin, "t_end": now_us()}

    async def cmd_storm_arm(self, args: dict[str, Any]) -> None:
        """From now on a dropped connection reconnects and resubscribes (reconnect storm)."""
        self.storm = Storm(self, args["retry_min"], args["retry_max"], args["timeout"])

    async def cmd_storm_status(self, args: dict[str, Any]) -> dict[str, Any]:
        """Reconnect-storm counters (see :class:`Storm`)."""
        assert self.storm is not None
        return self.storm.status()

    async def cmd_storm_disarm(self, args: dict[str, Any]) -> dict[str, Any]:
        """Stop reconnecting; later drops count as unexpected closes again.

        ``listen_t`` (µs): failures of attempts begun from then on are reported as
        ``failed_after_listen``.
        """
        st = self.storm
        self.storm = None
        if st is None:
            return {}
        since = args.get("listen_t", 0)
        return {**st.status(), "failed_after_listen": sum(1 for t in st.fail_t if t >= since)}

    async def cmd_status(self, args: dict[str, Any]) -> dict[str, Any]:
        """Progress counters; optionally presence progress against expectations."""
        out: dict[str, Any] = {
            "deliveries": self.deliveries,
            "open": sum(1 for c in self.conns if not c.closed),
            "unexpected_closes": self.unexpected_closes,
            "errors": self.error_count,
            "last_t": self.last_t,
            "join_last_t": self.join_last_t,
            "leave_last_t": self.leave_last_t,
        }
        if "members" in args:
            m = args["members"]
            out["join_complete"] = sum(
                1 for c in self.conns if not c.left and len(c.roster) + len(c.added) >= m
            )
        if "removed_expected" in args:
            r = args["removed_expected"]
            out["leave_complete"] = sum(
                1 for c in self.conns if not c.left and len(c.removed) >= r
            )
        return out

    async def cmd_reset(self, args: dict[str, Any]) -> None:
        """Forget delivery counters and latencies (e.g. after a warm-up)."""
        self.lat = array("q")
        self.deliveries = 0
        self.first_t = self.last_t = 0
        for c in self.conns:
            c.recv_count = 0

    async def cmd_client_events(self, args: dict[str, Any]) -> dict[str, Any]:
        """Send client events round-robin over this worker's connections at a fixed rate."""
        conns = [c for c in self.conns if c.subscribed and not c.closed]
        if not conns:
            return {"sent": 0}
        rate_total = args["rate"] * len(conns)
        duration: float = args["duration"]
        pad = "x" * args.get("pad", 0)
        event = args.get("event", "client-bench")
        n = len(conns)
        total = round(rate_total * duration)  # exactly rate*duration per connection
        # Stagger the workers so their sends do not line up in bursts.
        t0 = time.monotonic() + args.get("offset", 0.0) / rate_total
        sent = 0
        while sent < total:
            now = time.monotonic()
            due = min(total, int((now - t0) * rate_total) + 1) if now >= t0 else 0
            while sent < due:
                c = conns[sent % n]
                stamp = now_us()
                c.send_text(
                    b'{"event":"%s","channel":"%s","data":{"m":"~ts%d~","pad":"%s"}}'
                    % (event.encode(), c.channel.encode(), stamp, pad.encode())
                )
                sent += 1
            await asyncio.sleep(0.002)
        self.client_sent += sent
        return {"sent": sent}

    async def cmd_leave(self, args: dict[str, Any]) -> int:
        """Close the connections whose global index is in ``indices``."""
        wanted = set(args["indices"])
        self.expect_removed = args.get("removed_expected", -1)
        n = 0
        for c in self.conns:
            if c.index in wanted and not c.left:
                c.leave()
                n += 1
        return n

    async def cmd_results(self, args: dict[str, Any]) -> dict[str, Any]:
        """Latency samples (raw int64 bytes), counters, CPU and presence verification."""
        live = [c for c in self.conns if not c.left]
        counts = [c.recv_count for c in live]
        out: dict[str, Any] = {
            "deliveries": self.deliveries,
            "lat": self.lat.tobytes(),
            "first_t": self.first_t,
            "last_t": self.last_t,
            "min_per_conn": min(counts) if counts else 0,
            "max_per_conn": max(counts) if counts else 0,
            "live": len(live),
            "unexpected_closes": self.unexpected_closes,
            "error_count": self.error_count,
            "errors": list(self.errors),
            "client_sent": self.client_sent,
        }
        if "all_ids" in args:
            out["presence"] = self._verify_presence(set(args["all_ids"]), set(args["left_ids"]))
        return out

    def _verify_presence(self, all_ids: set[str], left_ids: set[str]) -> dict[str, Any]:
        """Check every remaining member saw exactly the expected joins and leaves."""
        bad_join = bad_leave = 0
        samples: list[str] = []
        for c in self.conns:
            if c.left:
                continue
            seen = set(c.roster) | set(c.added)
            dup_add = len(c.added) != len(set(c.added)) or bool(set(c.added) & set(c.roster))
            own_add = c.user_id in c.added
            if seen != all_ids or dup_add or own_add:
                bad_join += 1
                if len(samples) < 5:
                    samples.append(
                        f"{c.user_id}: roster {len(c.roster)} + added {len(c.added)}, "
                        f"missing {len(all_ids - seen)}, dup {dup_add}, own {own_add}"
                    )
            if sorted(c.removed) != sorted(left_ids):
                bad_leave += 1
                if len(samples) < 5:
                    rem = set(c.removed)
                    samples.append(
                        f"{c.user_id}: removed {len(c.removed)} (expected {len(left_ids)}), "
                        f"missing {len(left_ids - rem)}, unexpected {len(rem - left_ids)}"
                    )
        return {"bad_join": bad_join, "bad_leave": bad_leave, "samples": samples}

    async def cmd_close(self, args: dict[str, Any]) -> None:
        """Close every connection, then let the process exit."""
        for c in self.conns:
            c.leave()
        await asyncio.sleep(0.2)
        for c in self.conns:
            if not c.closed:
                c.abort()
        asyncio.get_running_loop().call_later(0.05, self._finish)

    def _finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)

    # --- the webhooks scenario (vask.bench.webhooks) -------------------------
    churn_stopped: bool = False

    async def cmd_churn(self, args: dict[str, Any]) -> dict[str, Any]:
        """Occupy and vacate fresh channels on the connections sitting on ``home``."""
        from vask.bench.webhooks import churn_channels

        self.churn_stopped = False
        conns = [c for c in self.conns
                 if c.channel == args["home"] and c.subscribed and not c.closed]
        return await churn_channels(conns, args["rate"], args["duration"],
                                    args.get("offset", 0.0), lambda: self.churn_stopped)

    async def cmd_churn_stop(self, args: dict[str, Any]) -> None:
        """End an open-ended churn (its own command then answers)."""
        self.churn_stopped = True


async def _serve(pipe: Connection, cfg: dict[str, Any]) -> None:
    w = Worker(pipe, cfg)
    loop = asyncio.get_running_loop()
    loop.add_reader(pipe.fileno(), w.on_pipe_readable)
    os.set_blocking(pipe.fileno(), True)  # uvloop made it non-blocking; big sends need blocking
    pipe.send((0, "ok", {"pid": os.getpid(), "nofile": raise_nofile_limit()}))
    await w.done
    loop.remove_reader(pipe.fileno())


def worker_main(pipe: Connection, cfg: dict[str, Any]) -> None:
    """Entry point of a load-generator process (spawned by the parent)."""
    raise_nofile_limit()
    with contextlib.suppress(KeyboardInterrupt), asyncio.Runner(loop_factory=loop_factory()) as r:
        r.run(_serve(pipe, cfg))


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop factory when available (it is a dependency), else asyncio's default."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return None
    return uvloop.new_event_loop
