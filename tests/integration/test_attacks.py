"""Attacks from the public internet against a real ``vask run --workers 2`` on loopback.

Each test reproduces one attack that needs nothing but the public app key, and asserts
the bound the server must hold (``docs/security.md``). Every socket has a timeout and
every loop a count and a deadline, so an unbounded server makes a test fail, never hang.

The workers are told apart by the socket id prefix (before the dot) of a WebSocket:
helpers connect until they hold one client per worker. Plain HTTP connections cannot be
placed, so HTTP probes are repeated on fresh connections and land on both workers.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pusher
import pytest

from tests.pusher_client import PusherClient, close_all
from tests.servers import APP_ID, APP_KEY, APP_SECRET, Server, process_name, run_vask
from vask.signing import channel_string, sign

pytestmark = pytest.mark.timeout(90)

#: the one app, as every [[apps]] table here must spell it out
APP = f'\n[[apps]]\nid = "{APP_ID}"\nkey = "{APP_KEY}"\nsecret = "{APP_SECRET}"\n'

OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 1, 2, 8, 9, 10
MIB = 1 << 20

# --- helpers ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    """Default settings (the built-in default app), shared by the cheap tests."""
    with run_vask(workers=2) as srv:
        yield srv


def client_frame(opcode: int, payload: bytes = b"", fin: bool = True) -> bytes:
    """One client-to-server WebSocket frame, masked as RFC 6455 requires."""
    mask = os.urandom(4)
    size = len(payload)
    head = bytes([(0x80 if fin else 0) | opcode])
    if size < 126:
        head += bytes([0x80 | size])
    elif size < 1 << 16:
        head += bytes([0x80 | 126]) + struct.pack("!H", size)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", size)
    if not size:
        return head + mask
    key = (mask * (size // 4 + 1))[:size]
    masked = int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")
    return head + mask + masked.to_bytes(size, "big")


def text_frames(messages: list[Any]) -> bytes:
    """Masked text frames for JSON-able messages (str and bytes are sent as they are)."""
    out = []
    for message in messages:
        if isinstance(message, bytes):
            data = message
        elif isinstance(message, str):
            data = message.encode()
        else:
            data = json.dumps(message).encode()
        out.append(client_frame(OP_TEXT, data))
    return b"".join(out)


class RawWebSocket:
    """A blocking WebSocket client on a plain socket.

    It sends exactly the bytes a test chooses (any frames, in writes as large as it
    likes) and reads frames with deadlines. Reading waits with ``select``, so one thread
    may read while another sends (the socket's own timeout only bounds sends).
    """

    def __init__(self, port: int, path: str = f"/app/{APP_KEY}?protocol=7",
                 timeout: float = 10.0, rcvbuf: int = 0) -> None:
        self.sock = socket.socket()
        if rcvbuf:  # set before connect, so the window is small from the start
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.buffer = bytearray()
        self.messages: list[dict[str, Any]] = []
        self.close_frame: tuple[int, str] | None = None
        self.ended = False
        self.socket_id = ""
        try:
            self.sock.connect(("127.0.0.1", port))
            key = base64.b64encode(os.urandom(16)).decode()
            self.sock.sendall(
                f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                f"Sec-WebSocket-Version: 13\r\n\r\n".encode())
            deadline = time.monotonic() + timeout
            while b"\r\n\r\n" not in self.buffer:
                if not self._fill(deadline):
                    raise AssertionError(
                        f"connection ended during the handshake: {bytes(self.buffer)[:200]!r}")
            head, _, rest = bytes(self.buffer).partition(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 101 "):
                raise AssertionError(f"no 101 Switching Protocols: {head[:200]!r}")
            self.buffer = bytearray(rest)
        except BaseException:
            self.sock.close()
            raise

    def _fill(self, deadline: float) -> bool:
        """Read once more; False at EOF or reset. TimeoutError past the deadline."""
        remaining = deadline - time.monotonic()
        try:
            if remaining <= 0 or not select.select([self.sock], [], [], remaining)[0]:
                raise TimeoutError("nothing to read before the deadline")
            chunk = self.sock.recv(1 << 16)
        except (OSError, ValueError) as exc:  # reset, or closed by the test
            if isinstance(exc, TimeoutError):
                raise
            return False
        if not chunk:
            return False
        self.buffer += chunk
        return True

    def _parse(self) -> tuple[int, bytes] | None:
        buf = self.buffer
        if len(buf) < 2:
            return None
        size, pos = buf[1] & 0x7F, 2
        if size == 126:
            if len(buf) < 4:
                return None
            size, pos = struct.unpack_from("!H", buf, 2)[0], 4
        elif size == 127:
            if len(buf) < 10:
                return None
            size, pos = struct.unpack_from("!Q", buf, 2)[0], 10
        if len(buf) < pos + size:
            return None
        frame = buf[0] & 0x0F, bytes(buf[pos:pos + size])
        del buf[:pos + size]
        return frame

    def recv_frame(self, timeout: float = 10.0) -> tuple[int, bytes] | None:
        """The next frame as (opcode, payload), None at EOF; TimeoutError if none."""
        deadline = time.monotonic() + timeout
        while True:
            frame = self._parse()
            if frame is not None:
                return frame
            if not self._fill(deadline):
                return None

    def pump(self, timeout: float, until: Callable[[], bool] = lambda: False) -> None:
        """Read frames into ``messages`` (text), ``close_frame`` and ``ended`` (EOF) until
        ``until()`` holds, the connection ends or ``timeout`` passes (not an error)."""
        deadline = time.monotonic() + timeout
        while not self.ended and not until():
            try:
                frame = self.recv_frame(deadline - time.monotonic())
            except TimeoutError:
                return
            if frame is None:
                self.ended = True
                return
            opcode, payload = frame
            if opcode == OP_TEXT:
                self.messages.append(json.loads(payload))
            elif opcode == OP_CLOSE:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                self.close_frame = (code, payload[2:].decode(errors="replace"))

    def established(self, timeout: float = 10.0) -> str:
        def found() -> bool:
            return any(m.get("event") == "pusher:connection_established" for m in self.messages)
        self.pump(timeout, found)
        assert found(), f"no connection_established: {self.messages} {self.close_frame}"
        frame = next(m for m in self.messages
                     if m.get("event") == "pusher:connection_established")
        self.socket_id = json.loads(frame["data"])["socket_id"]
        return self.socket_id

    def send(self, *messages: Any) -> None:
        self.sock.sendall(text_frames(list(messages)))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def http_status(port: int, path: str, timeout: float = 5.0) -> tuple[int, float]:
    """(status, seconds) of one GET on a fresh connection; status 0 if it failed."""
    start = time.monotonic()
    data = b""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         f"Connection: close\r\n\r\n".encode())
            while b"\r\n" not in data:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
    except OSError:
        return 0, time.monotonic() - start
    elapsed = time.monotonic() - start
    if not data.startswith(b"HTTP/1.1 "):
        return 0, elapsed
    return int(data.split(b" ", 2)[1]), elapsed


class Prober(threading.Thread):
    """GET ``path`` on a fresh connection every ``interval`` seconds (at most ``limit``
    times) until :meth:`finish`: the (status, seconds) of each. Fresh connections land
    on both workers."""

    def __init__(self, port: int, path: str = "/up", interval: float = 0.05,
                 limit: int = 1000) -> None:
        super().__init__(daemon=True)
        self.port, self.path, self.interval, self.limit = port, path, interval, limit
        self.results: list[tuple[int, float]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set() and len(self.results) < self.limit:
            self.results.append(http_status(self.port, self.path))
            self.halt.wait(self.interval)

    def finish(self) -> list[tuple[int, float]]:
        self.halt.set()
        self.join(10)
        return self.results


def worker_pids(srv: Server) -> list[int]:
    pids = [p for p in srv.children() if process_name(p).startswith("vask-worker")]
    assert len(pids) == 2, f"expected 2 workers, found {pids}"
    return pids


def vm_kib(pid: int, field: str = "VmRSS") -> int:
    """A /proc/PID/status memory field in KiB (0 once the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class RssWatch(threading.Thread):
    """Samples the workers' VmRSS every 20 ms. :meth:`growth` is the largest rise of any
    worker over its value at the start (also counting VmHWM, the kernel's own peak, so a
    short peak between samples is not missed). ``exceeded`` is set as soon as a rise
    passes ``bound``, so an attack can stop before it does more harm."""

    def __init__(self, srv: Server, bound: int) -> None:
        super().__init__(daemon=True)
        self.pids = worker_pids(srv)
        self.bound = bound
        self.start_rss = {p: vm_kib(p) for p in self.pids}
        self.start_hwm = {p: vm_kib(p, "VmHWM") for p in self.pids}
        self.peak = dict(self.start_rss)
        self.exceeded = threading.Event()
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            for pid in self.pids:
                kib = vm_kib(pid)
                self.peak[pid] = max(self.peak[pid], kib)
                if (kib - self.start_rss[pid]) * 1024 > self.bound:
                    self.exceeded.set()
            self.halt.wait(0.02)

    def finish(self) -> int:
        self.halt.set()
        self.join(10)
        return self.growth()

    def growth(self) -> int:
        """Bytes: the largest rise of any worker's resident memory during the watch."""
        rises = []
        for pid in self.pids:
            sampled = self.peak[pid] - self.start_rss[pid]
            hwm = vm_kib(pid, "VmHWM")
            rises.append(max(sampled, hwm - self.start_hwm[pid] if hwm else 0))
        return max(rises) * 1024


def flood_without_reading(sock: socket.socket, chunk: bytes, max_bytes: int, seconds: float,
                          stop: threading.Event, stall: float = 2.0) -> tuple[str, int]:
    """Send ``chunk`` over and over and never read. Returns (outcome, bytes sent):

    * ``"stalled"``: a send made no progress for ``stall`` s (the server stopped reading);
    * ``"cut"``: the server reset or closed the connection;
    * ``"stopped"``: ``stop`` was set (the memory bound was already crossed);
    * ``"unbounded"``: ``max_bytes`` or ``seconds`` ran out and the server kept reading.
    """
    sock.settimeout(stall)
    sent = 0
    deadline = time.monotonic() + seconds
    while sent < max_bytes and time.monotonic() < deadline:
        if stop.is_set():
            return "stopped", sent
        try:
            sock.sendall(chunk)
        except TimeoutError:
            return "stalled", sent
        except (ConnectionResetError, BrokenPipeError, ConnectionAbortedError):
            return "cut", sent
        sent += len(chunk)
    return "unbounded", sent


def outbound_flood(srv: Server, sock: socket.socket, chunk: bytes, max_bytes: int,
                   bound: int) -> tuple[str, int, int, list[tuple[int, float]]]:
    """Run :func:`flood_without_reading` while watching worker memory and probing /up.

    Returns (outcome, bytes sent, largest worker RSS growth, probe results). After a
    stall the attacker holds its connection for two more seconds, still unread, so a
    buffer that kept growing would show.
    """
    watch = RssWatch(srv, bound)
    probe = Prober(srv.port, interval=0.1)
    watch.start()
    probe.start()
    try:
        outcome, sent = flood_without_reading(sock, chunk, max_bytes, seconds=15.0,
                                              stop=watch.exceeded)
        if outcome == "stalled":
            time.sleep(2.0)
    finally:
        probes = probe.finish()
        growth = watch.finish()
    return outcome, sent, growth, probes


async def one_client_per_worker(url: str, workers: int = 2,
                                attempts: int = 60) -> list[PusherClient]:
    """Connect until there is one client on each worker (socket id prefixes differ)."""
    chosen: dict[str, PusherClient] = {}
    extra: list[PusherClient] = []
    for _ in range(attempts):
        client = await PusherClient.connect(url)
        prefix = client.socket_id.split(".")[0]
        if prefix in chosen:
            extra.append(client)
        else:
            chosen[prefix] = client
        if len(chosen) == workers:
            break
    await close_all(extra)
    assert len(chosen) == workers, f"only reached workers {sorted(chosen)}"
    return list(chosen.values())


def no_traceback(srv: Server, since: int = 0) -> None:
    log = srv.log()[since:]
    assert "Traceback" not in log, log[log.index("Traceback") - 300:][:3000]


def presence_auth(socket_id: str, channel: str, channel_data: str) -> str:
    return f"{APP_KEY}:{sign(APP_SECRET, channel_string(socket_id, channel, channel_data))}"


# --- 1. subscription flood --------------------------------------------------------------


def test_subscription_flood_is_bounded_and_starves_nobody() -> None:
    """One connection sends 20 000 subscribes to distinct channels in big writes. It gets
    at most max_channels_per_connection of them; a client on each worker keeps getting
    published events within 1 s, and /ready stays 200 (the broker keeps heartbeating)."""
    limit, flood_count = 200, 20_000
    config = ("[server]\nheartbeat_interval = 0.5\nheartbeat_timeout = 3.0\n" + APP
              + f"max_channels_per_connection = {limit}\nmax_subscriptions_per_second = 10\n")
    with run_vask(workers=2, config=config) as srv:
        sdk = pusher.Pusher(app_id=APP_ID, key=APP_KEY, secret=APP_SECRET, host="127.0.0.1",
                            port=srv.port, ssl=False, timeout=10)
        flooder = RawWebSocket(srv.port)
        flooder.established()
        first_reply = len(flooder.messages)
        blob = text_frames([{"event": "pusher:subscribe", "data": {"channel": f"flood-{i}"}}
                            for i in range(flood_count)])
        sent_at: list[float] = []

        def write() -> None:
            with contextlib.suppress(OSError):
                for offset in range(0, len(blob), 1 << 18):
                    flooder.sock.sendall(blob[offset:offset + (1 << 18)])
            sent_at.append(time.monotonic())

        def flood() -> None:
            writer = threading.Thread(target=write, daemon=True)
            writer.start()
            flooder.pump(25.0, lambda: len(flooder.messages) - first_reply >= flood_count
                         or flooder.close_frame is not None)
            writer.join(10)

        latencies: list[float] = []
        ready: list[int] = []

        async def go() -> None:
            watchers = await one_client_per_worker(srv.ws_url)
            for watcher in watchers:
                await watcher.subscribe("watched")
            attack = asyncio.ensure_future(asyncio.to_thread(flood))
            ended_at = 0.0
            for i in range(400):  # one publish and one /ready poll per round
                start = time.monotonic()
                try:
                    await asyncio.to_thread(sdk.trigger, "watched", "tick", str(i))
                    await asyncio.gather(*(w.wait(
                        lambda f, n=str(i): f.get("event") == "tick" and f.get("data") == n,
                        timeout=5) for w in watchers))
                    latencies.append(time.monotonic() - start)
                except (TimeoutError, pusher.errors.PusherError) as exc:
                    latencies.append(float("inf"))
                    print(f"probe {i}: {exc!r}")
                ready.append((await asyncio.to_thread(http_status, srv.port, "/ready"))[0])
                if attack.done():
                    ended_at = ended_at or time.monotonic()
                    if time.monotonic() - ended_at > 1.0:
                        break
                await asyncio.sleep(0.05)
            await attack
            await close_all(watchers)

        try:
            asyncio.run(go())
        finally:
            flooder.close()
        replies = flooder.messages[first_reply:]
        succeeded = [m for m in replies
                     if m.get("event") == "pusher_internal:subscription_succeeded"]
        refused = [m for m in replies if m.get("event") == "pusher:subscription_error"]
        # anything else may only be the pusher:error that goes with a 4100 close
        other = [m for m in replies if m.get("event") not in (
            "pusher_internal:subscription_succeeded", "pusher:subscription_error")
            and m != {"event": "pusher:error", "data": {
                "code": 4100, "message": (flooder.close_frame or (0, ""))[1]}}]
        print(f"flood: {len(succeeded)} succeeded, {len(refused)} refused, close "
              f"{flooder.close_frame}, {len(latencies)} probes, max latency "
              f"{max(latencies):.3f}s, /ready {sorted(set(ready))}")
        assert len(succeeded) <= limit, f"{len(succeeded)} subscriptions succeeded"
        assert all(m["data"].get("type") == "LimitReached" and m["data"].get("status") == 4301
                   for m in refused), [m for m in refused
                                       if m["data"].get("type") != "LimitReached"][:3]
        assert not other, other[:3]
        if flooder.close_frame is None:  # every subscribe was answered, none dropped
            assert len(succeeded) + len(refused) == flood_count, (len(succeeded), len(refused))
        else:
            assert flooder.close_frame[0] == 4100, flooder.close_frame
        assert refused or flooder.close_frame is not None
        assert latencies and max(latencies) < 1.0, [round(x, 3) for x in latencies]
        assert ready and all(status == 200 for status in ready), ready
        no_traceback(srv)


# --- 2. pipelined requests, never read ----------------------------------------------------


def test_pipelined_requests_never_read_pause_the_connection_not_the_worker() -> None:
    """One TCP connection sends GET /up pipelined without end and never reads. The
    worker stops reading it (or cuts it) instead of buffering the answers: its memory
    grows by at most a few MiB over write_buffer_limit, and /up stays fast for others."""
    bound = 16 * MIB
    with run_vask(workers=2) as srv:
        pids = worker_pids(srv)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(5)
        sock.connect(("127.0.0.1", srv.port))
        request = b"GET /up HTTP/1.1\r\n\r\n"
        try:
            # up to 1 000 000 requests (~86 MB of answers), 2 000 per write
            outcome, sent, growth, probes = outbound_flood(
                srv, sock, request * 2000, max_bytes=len(request) * 1_000_000, bound=bound)
        finally:
            sock.close()
        slowest = max(t for _, t in probes)
        print(f"pipelined: {outcome} after {sent / MIB:.1f} MiB sent ({sent // len(request)} "
              f"requests), worker RSS +{growth / MIB:.1f} MiB, {len(probes)} /up probes, "
              f"slowest {slowest:.3f}s")
        assert growth <= bound, f"a worker grew by {growth / MIB:.1f} MiB"
        assert outcome in ("stalled", "cut"), outcome
        assert probes and all(status == 200 for status, _ in probes), probes
        assert slowest < 1.0
        assert worker_pids(srv) == pids  # no worker died on the way
        no_traceback(srv)


# --- 3. ping flood, never read ----------------------------------------------------------


@pytest.mark.parametrize("kind", ["websocket-ping", "pusher-ping"])
def test_ping_flood_never_read_pauses_the_connection_not_the_worker(kind: str) -> None:
    """After the handshake a client sends pings (WebSocket ping frames with 125-byte
    payloads, or pusher:ping messages) and never reads the answers: same bounds as above.
    (The pongs to WebSocket pings are written by the WebSocket layer, not the event path,
    so both kinds must go through the same outbound bound.)"""
    bound = 16 * MIB
    with run_vask(workers=2) as srv:
        pids = worker_pids(srv)
        ws = RawWebSocket(srv.port, rcvbuf=4096)
        try:
            ws.established()
            if kind == "websocket-ping":
                chunk = client_frame(OP_PING, b"p" * 125) * 500
            else:
                chunk = text_frames([{"event": "pusher:ping", "data": {}}]) * 1500
            outcome, sent, growth, probes = outbound_flood(srv, ws.sock, chunk,
                                                           max_bytes=64 * MIB, bound=bound)
        finally:
            ws.close()
        slowest = max(t for _, t in probes)
        print(f"{kind}: {outcome} after {sent / MIB:.1f} MiB sent, worker RSS "
              f"+{growth / MIB:.1f} MiB, {len(probes)} /up probes, slowest {slowest:.3f}s")
        assert growth <= bound, f"a worker grew by {growth / MIB:.1f} MiB"
        assert outcome in ("stalled", "cut"), outcome
        assert probes and all(status == 200 for status, _ in probes), probes
        assert slowest < 1.0

        async def still_served() -> None:
            clients = await one_client_per_worker(srv.ws_url)
            for client in clients:
                await client.send({"event": "pusher:ping", "data": {}})
                await client.wait_for("pusher:pong", timeout=2)
            await close_all(clients)

        asyncio.run(still_served())
        assert worker_pids(srv) == pids
        no_traceback(srv)


# --- 4. huge header, long URL -------------------------------------------------------------


def send_and_read_status(port: int, data: bytes, timeout: float = 10.0,
                         close_wait: float = 3.0) -> tuple[int, bool, float]:
    """Send ``data`` while watching for the answer; stop sending once it starts.

    Returns (status or 0, whether the server closed the connection within ``close_wait``
    of the status line, seconds until the status line arrived).
    """
    start = time.monotonic()
    deadline = start + timeout
    got = b""
    status, answered_at = 0, 0.0
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.setblocking(False)
        offset = 0
        while time.monotonic() < deadline:
            sending = offset < len(data) and not status
            readable, writable, _ = select.select(
                [sock], [sock] if sending else [], [], deadline - time.monotonic())
            if writable:
                try:
                    offset += sock.send(data[offset:offset + (1 << 16)])
                except BlockingIOError:
                    pass
                except OSError:
                    offset = len(data)  # reset: stop sending, read what came
            if readable:
                try:
                    chunk = sock.recv(1 << 16)
                except BlockingIOError:
                    continue
                except OSError:
                    chunk = b""
                if not chunk:
                    return status, True, answered_at - start if status else 0.0
                got += chunk
                if not status and b"\r\n" in got:
                    status = int(got.split(b" ", 2)[1]) if got.startswith(b"HTTP/1.1 ") else -1
                    answered_at = time.monotonic()
                    deadline = min(deadline, answered_at + close_wait)
    return status, False, answered_at - start if status else 0.0


def test_huge_header_is_431_and_long_url_414_without_stalling_the_worker() -> None:
    """A 1 MiB header value gets 431 and a close, again and again for 2 s; clients on
    both workers keep answering pings within 0.5 s meanwhile. A request target longer than
    max_url_bytes gets 414 and a close."""
    with run_vask(workers=2) as srv:
        huge = (b"GET /up HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * MIB
                + b"\r\n\r\n")
        outcomes: list[tuple[int, bool, float]] = []
        rtts: list[float] = []

        async def go() -> None:
            clients = await one_client_per_worker(srv.ws_url)
            done = asyncio.Event()

            async def ping_loop(client: PusherClient) -> None:
                for _ in range(2000):
                    if done.is_set():
                        return
                    start = time.monotonic()
                    seen = len(client.events("pusher:pong"))
                    await client.send({"event": "pusher:ping", "data": {}})
                    await client.wait(lambda f, s=seen: len(client.events("pusher:pong")) > s,
                                      timeout=5)
                    rtts.append(time.monotonic() - start)
                    await asyncio.sleep(0.01)

            pingers = [asyncio.ensure_future(ping_loop(c)) for c in clients]
            # at least 10 attacks and 2 s of them (so the pings measure something), at
            # most 2000 attacks or 15 s; the first wrong answer ends it
            start = time.monotonic()
            while len(outcomes) < 2000 and time.monotonic() - start < 15:
                if len(outcomes) >= 10 and time.monotonic() - start > 2:
                    break
                outcomes.append(await asyncio.to_thread(send_and_read_status, srv.port, huge))
                if outcomes[-1][:2] != (431, True):
                    break
            done.set()
            await asyncio.gather(*pingers)
            await close_all(clients)

        asyncio.run(go())
        probes = [http_status(srv.port, "/up") for _ in range(10)]
        long_url = send_and_read_status(
            srv.port, b"GET /up?" + b"a" * 9000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        print(f"huge header: {len(outcomes)} attacks, first {outcomes[:2]} last "
              f"{outcomes[-1]}; ping rtt max {max(rtts):.3f}s over {len(rtts)}; "
              f"long URL: {long_url}")
        assert all(status == 431 for status, _, _ in outcomes), outcomes
        assert all(closed for _, closed, _ in outcomes), outcomes
        assert rtts and max(rtts) < 0.5, sorted(rtts)[-5:]
        assert all(status == 200 and t < 0.5 for status, t in probes), probes
        assert long_url[:2] == (414, True), long_url
        no_traceback(srv)


# --- 5. slow requests and idle keep-alive ---------------------------------------------------


def _until_closed(sock: socket.socket, deadline: float, trickle: bytes = b"",
                  every: float = 0.2) -> tuple[float | None, bytes]:
    """Send ``trickle`` one byte every ``every`` s (if any) and read, until the server
    closes (returns the time, and what it sent) or ``deadline`` passes (time None)."""
    got = b""
    position = 0
    while time.monotonic() < deadline:
        if trickle:
            try:
                sock.send(trickle[position % len(trickle):position % len(trickle) + 1])
                position += 1
            except OSError:
                return time.monotonic(), got
        wait = min(every, max(0.0, deadline - time.monotonic()))
        if select.select([sock], [], [], wait)[0]:
            try:
                chunk = sock.recv(65536)
            except OSError:
                chunk = b""
            if not chunk:
                return time.monotonic(), got
            got += chunk
    return None, got


def test_slow_requests_get_408_and_idle_keep_alive_is_closed() -> None:
    """http_request_timeout = 2 s: a head trickled a byte at a time, a body trickled the
    same way, and a connection that sends nothing are each closed within deadline + 2.5 s
    (with 408, or just a close); keep_alive_timeout = 2 s: an idle keep-alive connection
    is closed within 2 + 2.5 s of its last answer."""
    timeout, slack = 2.0, 2.5
    config = f"[server]\nhttp_request_timeout = {timeout}\nkeep_alive_timeout = {timeout}\n"

    def slow(first: bytes, trickle: bytes) -> tuple[float | None, bytes]:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
            start = time.monotonic()
            if first:
                sock.sendall(first)
            closed, got = _until_closed(sock, start + timeout + slack + 3, trickle)
            return (closed - start if closed else None), got

    def idle_keep_alive() -> tuple[float | None, bytes]:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
            sock.sendall(b"GET /up HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            got = b""
            while not got.endswith(b'{"status":"ok"}'):
                chunk = sock.recv(4096)
                assert chunk, f"closed before the answer: {got!r}"
                got += chunk
            assert got.startswith(b"HTTP/1.1 200 "), got
            start = time.monotonic()
            closed, rest = _until_closed(sock, start + timeout + slack + 3)
            return (closed - start if closed else None), rest

    head = b"GET /up HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 200
    body_head = (f"POST /apps/{APP_ID}/events HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 f"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n").encode()
    with run_vask(workers=2, config=config) as srv, ThreadPoolExecutor(4) as pool:
        cases = {
            "slow head": pool.submit(slow, b"", head),
            "slow body": pool.submit(slow, body_head, b"x" * 1000),
            "silent": pool.submit(slow, b"", b""),
            "idle keep-alive": pool.submit(idle_keep_alive),
        }
        results = {name: future.result(timeout=30) for name, future in cases.items()}
        print({name: (t, got[:40]) for name, (t, got) in results.items()})
        for name, (closed_after, got) in results.items():
            assert closed_after is not None, f"{name}: still open after {timeout + slack + 3}s"
            assert 0.9 <= closed_after <= timeout + slack, f"{name}: closed at {closed_after}"
            if name == "idle keep-alive":
                assert got == b"", got
            else:
                assert got == b"" or got.startswith(b"HTTP/1.1 408 "), got
        no_traceback(srv)


# --- 6. bad protocol values -----------------------------------------------------------


@pytest.mark.parametrize("value, code", [
    ("%C2%B2", 4006),  # superscript two: str.isdigit() says yes, int() says no
    ("9" * 5000, 4006),  # more digits than int() converts
    ("%EF%BC%97", 4006),  # fullwidth 7: int() reads it as 7
    ("abc", 4006),
    ("", 4006),
    ("-7", 4006),
    ("%207", 4006),
    ("0007", 4006),
    ("%00", 4006),
    ("3", 4007),
    ("8", 4007),
    ("999", 4007),
])
def test_bad_protocol_values_close_cleanly(server: Server, value: str, code: int) -> None:
    since = len(server.log())
    ws = RawWebSocket(server.port, f"/app/{APP_KEY}?protocol={value}&client=js")
    try:
        ws.pump(10, lambda: ws.close_frame is not None)
    finally:
        ws.close()
    message = {4006: "Invalid version string format", 4007: "Unsupported protocol version"}
    assert ws.messages[:1] == [{"event": "pusher:error",
                                "data": {"code": code, "message": message[code]}}], ws.messages
    assert ws.close_frame == (code, message[code])
    time.sleep(0.2)
    no_traceback(server, since)


# --- 7. presence churn --------------------------------------------------------------------


def test_presence_churn_is_rate_limited() -> None:
    """A member joins and leaves a presence channel in a tight pipelined loop while
    another member watches. The watcher sees at most burst + rate x seconds member
    events (plus slack), and the churner is refused or closed (4100)."""
    burst, rate, slack = 20, 5, 10
    config = (APP + f"max_channels_per_connection = {burst}\n"
              f"max_subscriptions_per_second = {rate}\n")
    channel = "presence-room"
    with run_vask(workers=2, config=config) as srv:
        churner = RawWebSocket(srv.port)
        socket_id = churner.established()
        data = json.dumps({"user_id": "churner"})
        pair = text_frames([
            {"event": "pusher:subscribe", "data": {
                "channel": channel, "channel_data": data,
                "auth": presence_auth(socket_id, channel, data)}},
            {"event": "pusher:unsubscribe", "data": {"channel": channel}}])

        def churn() -> int:
            stop = threading.Event()

            def read() -> None:
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline and not stop.is_set() \
                        and not churner.ended and churner.close_frame is None:
                    churner.pump(0.2)

            reader = threading.Thread(target=read, daemon=True)
            reader.start()
            pairs = 0
            deadline = time.monotonic() + 6
            with contextlib.suppress(OSError):
                while pairs < 2000 and time.monotonic() < deadline and not churner.ended \
                        and churner.close_frame is None:
                    churner.sock.sendall(pair * 50)
                    pairs += 50
                    time.sleep(0.05)
            reader.join(2)  # a close may still be on its way
            stop.set()
            reader.join(5)
            return pairs

        async def go() -> tuple[int, int, float]:
            watcher = await PusherClient.connect(srv.ws_url)
            await watcher.subscribe(channel, json.dumps({"user_id": "watcher"}))
            start = time.monotonic()
            pairs = await asyncio.to_thread(churn)
            await asyncio.sleep(2)  # deliveries in flight
            events = [f for f in watcher.frames if f.get("channel") == channel and f.get(
                "event") in ("pusher_internal:member_added", "pusher_internal:member_removed")]
            elapsed = time.monotonic() - start
            await watcher.send({"event": "pusher:ping", "data": {}})
            await watcher.wait_for("pusher:pong", timeout=5)
            await watcher.close()
            return pairs, len(events), elapsed

        try:
            pairs, seen, elapsed = asyncio.run(go())
        finally:
            churner.close()
        refused = [m for m in churner.messages if m.get("event") == "pusher:subscription_error"]
        allowed = burst + rate * elapsed + slack
        print(f"churn: {pairs} pairs sent, watcher saw {seen} member events in {elapsed:.1f}s "
              f"(bound {allowed:.0f}), {len(refused)} refusals, close {churner.close_frame}")
        assert seen <= allowed
        assert all(m["data"].get("type") == "LimitReached" and m["data"].get("status") == 4301
                   for m in refused), refused[:3]
        assert refused or churner.close_frame is not None
        if churner.close_frame is not None:
            assert churner.close_frame[0] == 4100, churner.close_frame
        no_traceback(srv)


# --- garbage messages -------------------------------------------------------------------


def _garbage(i: int) -> str | bytes:
    """One of many kinds of bad message; none is a subscribe that passes the channel name
    check (those would spend the subscription rate budget, which is tested above)."""
    deep = 2000 + i
    kinds: list[str | bytes] = [
        "not json", "", "{", "}", "null", "true", str(i), '"string"', "[]", "{}",
        "[" * deep + "]" * deep,
        '{"a":' * 600 + "1" + "}" * 600,
        '{"event":"pusher:ping","data":' + "9" * 5000 + "}",
        '{"event":"pusher:ping","data":1e99999}',
        '{"event":"pusher:ping","data":-1e-99999}',
        '{"event":' + "1" * 400 + "}",
        '{"event":"pusher:ping","data":NaN}',
        '{"event":"\\ud800"}',
        '{"event":"pusher:ping","event":"pusher:subscribe"}',
        '{"event":null}', '{"event":""}', '{"event":["pusher:ping"]}', '{"event":{"x":1}}',
        f'{{"event":"pusher:nope-{i}"}}',
        '{"event":"pusher:subscribe"}',
        '{"event":"pusher:subscribe","data":"{\\"channel\\": 5}"}',
        '{"event":"pusher:subscribe","data":"not json"}',
        '{"event":"pusher:subscribe","data":[]}',
        '{"event":"pusher:subscribe","data":{"channel":null}}',
        '{"event":"pusher:subscribe","data":{"channel":["a"]}}',
        '{"event":"pusher:subscribe","data":{"channel":1e308}}',
        '{"event":"pusher:subscribe","data":{"channel":"bad name ' + str(i) + '"}}',
        '{"event":"pusher:subscribe","data":{"channel":"' + "x" * 300 + '"}}',
        '{"event":"pusher:subscribe","data":{"channel":"#server-to-user-' + str(i) + '"}}',
        '{"event":"pusher:unsubscribe","data":5}',
        '{"event":"pusher:unsubscribe","data":{"channel":{}}}',
        '{"event":"pusher:unsubscribe","data":{"channel":"never-' + str(i) + '"}}',
        '{"event":"pusher:signin","data":1}',
        '{"event":"pusher:signin","data":{"auth":5,"user_data":{}}}',
        '{"event":"pusher:signin","data":{"auth":"app-key:00","user_data":"{"}}',
        '{"event":"pusher:signin","data":{"auth":"' + "a" * 3000 + '","user_data":"[]"}}',
        '{"event":"client-x"}',
        '{"event":"client-x","channel":5,"data":{}}',
        '{"event":"client-' + "x" * 300 + '","channel":"private-a","data":1}',
        '{"event":"client-x","channel":"private-not-mine","data":"' + "d" * 20000 + '"}',
        b"\x00\x01binary" * (i % 7 + 1),
    ]
    return kinds[i % len(kinds)]


def test_a_thousand_garbage_messages_leave_the_connection_working(server: Server) -> None:
    """Bad JSON, deep nesting, huge numbers, wrong types, binary frames: each gets an
    error (or nothing), the connection stays usable, and nothing is logged as a
    traceback. (tests/integration/test_lifecycle.py covers a handful of bad messages
    and the 1009 close; this is the bulk and the variety.)"""
    since = len(server.log())
    sdk = pusher.Pusher(app_id=APP_ID, key=APP_KEY, secret=APP_SECRET, host="127.0.0.1",
                        port=server.port, ssl=False, timeout=10)

    async def go() -> None:
        victim = await PusherClient.connect(server.ws_url)
        for i in range(1000):
            await victim.send(_garbage(i))
        await victim.send({"event": "pusher:subscribe", "data": {"channel": "after-garbage"}})
        await victim.wait_for("pusher_internal:subscription_succeeded", "after-garbage",
                              timeout=15)
        await asyncio.to_thread(sdk.trigger, "after-garbage", "hello", "still here")
        await victim.wait_for("hello", "after-garbage")
        assert not victim.closed.done()
        assert len(victim.events("pusher:error")) >= 500
        await victim.close()

    asyncio.run(go())
    time.sleep(0.2)
    no_traceback(server, since)


# --- connection caps --------------------------------------------------------------------


@pytest.mark.parametrize("setting, status", [("max_connections_per_worker", 503),
                                             ("max_connections_per_ip", 429)])
def test_connection_caps_refuse_with_a_status(setting: str, status: int) -> None:
    """With a cap of 2 per worker, 5 held connections cannot all be accepted by 2 workers:
    the extra ones get the HTTP status and are closed before any upgrade."""
    cap = 2
    with run_vask(workers=2, config=f"[server]\n{setting} = {cap}\n") as srv:
        held: list[socket.socket] = []
        refused: list[bytes] = []
        try:
            for _ in range(2 * cap + 1):
                sock = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
                got = b""
                if select.select([sock], [], [], 0.5)[0]:
                    with contextlib.suppress(OSError):
                        while chunk := sock.recv(4096):
                            got += chunk
                if got:
                    refused.append(got)
                    sock.close()
                else:
                    held.append(sock)
            assert refused, f"{len(held)} connections held, none refused"
            assert len(held) <= 2 * cap
            assert all(r.startswith(f"HTTP/1.1 {status} ".encode()) for r in refused), refused
        finally:
            for sock in held:
                sock.close()
        # the slots come back once the held connections are gone
        deadline = time.monotonic() + 5
        answers = []
        while time.monotonic() < deadline:
            answers = [http_status(srv.port, "/up")[0] for _ in range(4)]
            if answers == [200] * 4:
                break
            time.sleep(0.2)
        assert answers == [200] * 4, answers
        no_traceback(srv)


def test_a_read_ending_inside_a_frame_header_does_not_leak_into_another_connection() -> None:
    """A connection whose read ends inside a frame header (2 of its 6 bytes here) keeps
    its parser: the worker's pool of parsers must not hand that half-read parser to
    another connection, whose frames it would then misread (seen under load as another
    client's ``pusher:ping`` answered with "not valid UTF-8 JSON" and close 1002)."""
    with run_vask(workers=1) as srv:
        first = RawWebSocket(srv.port)
        second = RawWebSocket(srv.port)
        try:
            first.established()
            second.established()
            frame = text_frames([{"event": "pusher:ping", "data": {}}])
            first.sock.sendall(frame[:2])
            time.sleep(0.3)  # the worker has read those two bytes on their own
            for _ in range(3):
                second.send({"event": "pusher:ping", "data": {}})
            second.pump(10, until=lambda: sum(
                m.get("event") == "pusher:pong" for m in second.messages) >= 3)
            assert [m.get("event") for m in second.messages[1:]] == ["pusher:pong"] * 3, \
                second.messages
            first.sock.sendall(frame[2:])
            first.pump(10, until=lambda: any(
                m.get("event") == "pusher:pong" for m in first.messages))
            assert [m.get("event") for m in first.messages[1:]] == ["pusher:pong"], \
                first.messages
            assert second.close_frame is None and first.close_frame is None
        finally:
            first.close()
            second.close()
        no_traceback(srv)
