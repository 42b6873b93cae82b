"""The webhook sender end to end in one process: a fake broker (the ROUTER end of the
link), the real sender (:func:`vask.webhooks.sender.serve`) and a real HTTP receiver
(aiohttp.web on 127.0.0.1, port chosen by the kernel) whose answers each test scripts.
The last test runs the sender as a process, kills it with SIGKILL and restarts it.

Backoff starts at 50 ms instead of 1 s here, so that retries are quick; the policy
itself is tested in test_webhook_core.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import orjson
import pusher
import pytest
import zmq
from aiohttp import web

from vask import __version__
from vask.config import App, Settings, Webhook, settings_to_dict
from vask.webhooks import core
from vask.webhooks.sender import COUNTERS, serve

pytestmark = pytest.mark.timeout(240)

#: (status, extra headers, seconds to wait before answering)
Answer = tuple[int, dict[str, str], float]


async def poll(check: Callable[[], bool], timeout: float = 20.0, what: str = "") -> None:
    """Wait until ``check()`` holds, looking every 10 ms; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true after {timeout}s: {what or check}")
        await asyncio.sleep(0.01)


class FakeBroker:
    """The broker's ROUTER: records what the sender says, sends it event batches."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.sock = zmq.Context.instance().socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(endpoint)
        self.peer: bytes | None = None
        self.received: list[dict[str, Any]] = []
        self.task = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        while True:
            try:
                identity, body = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                await asyncio.sleep(0.005)
                continue
            message = orjson.loads(body)
            if message["t"] == "hello":
                self.peer = identity
            self.received.append(message)

    def kinds(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.received if m["t"] == kind]

    def send_events(self, epoch: int, events: list[list[Any]]) -> None:
        assert self.peer is not None, "the sender has not said hello"
        self.sock.send_multipart(
            (self.peer, orjson.dumps({"t": "events", "epoch": epoch, "events": events})))

    def acked(self, epoch: int, seq: int) -> bool:
        return any(m["epoch"] == epoch and m["seq"] >= seq for m in self.kinds("ack"))

    async def close(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        self.sock.close(linger=0)


@dataclass
class Attempt:
    """One request the receiver got, and what it answered."""

    at: float  # time.monotonic() on arrival
    headers: dict[str, str]
    body: bytes
    status: int = 0
    events: list[dict[str, Any]] = field(default_factory=list)


class Receiver:
    """An HTTP endpoint on 127.0.0.1; ``answer(n, body)`` decides the n-th answer
    (default: 200 at once)."""

    def __init__(self) -> None:
        self.attempts: list[Attempt] = []
        self.answer: Callable[[int, bytes], Answer] = lambda n, body: (200, {}, 0.0)
        #: channels of requests being answered now, and requests that overlapped them
        self.busy: dict[str, int] = {}
        self.overlaps: list[set[str]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.runner: web.AppRunner | None = None
        self.port = 0
        #: set on close: answers still being delayed end at once
        self.closing = asyncio.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self.runner = web.AppRunner(app, handle_signals=False)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = self.runner.addresses[0][1]

    async def close(self) -> None:
        self.closing.set()
        if self.runner is not None:
            await self.runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        attempt = Attempt(time.monotonic(),
                          {k.lower(): v for k, v in request.headers.items()}, body)
        attempt.events = orjson.loads(body)["events"]
        n = len(self.attempts)
        self.attempts.append(attempt)
        channels = {e["channel"] for e in attempt.events}
        if channels & self.busy.keys():
            self.overlaps.append(channels & self.busy.keys())
        for channel in channels:
            self.busy[channel] = self.busy.get(channel, 0) + 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            status, headers, delay = self.answer(n, body)
            if delay:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.closing.wait(), delay)
            transport = request.transport
            # -1: the sender hung up before the answer (it timed out, or was killed)
            attempt.status = -1 if transport is None or transport.is_closing() else status
            return web.Response(status=status, headers=headers, body=b'{"ok":true}')
        finally:
            self.in_flight -= 1
            for channel in channels:
                self.busy[channel] -= 1
                if not self.busy[channel]:
                    del self.busy[channel]

    def delivered(self) -> list[dict[str, Any]]:
        """Events of the requests answered 2xx, in the order they were answered."""
        return [e for a in self.attempts if 200 <= a.status < 300 for e in a.events]


# --- the tests ------------------------------------------------------------------------

EVERYTHING = ("channel_occupied", "channel_vacated", "member_added", "member_removed",
              "client_event", "cache_miss", "subscription_count")
KEY, SECRET = "key-1", "secret-1"


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(core, "BACKOFF_BASE", 0.05)


def make_settings(url: str, **app: Any) -> Settings:
    hook = Webhook(url=url, event_types=EVERYTHING, headers={"X-Custom": "yes"})
    values: dict[str, Any] = {"webhook_batch_max_wait": 0.01, "webhook_leave_delay": 0.2,
                              **app}
    return Settings(apps=(App(id="1", key=KEY, secret=SECRET, webhooks=(hook,), **values),),
                    webhook_timeout=10.0, webhook_retry_window=60.0)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def whisper(channel: str, n: int) -> dict[str, Any]:
    return {"name": "client_event", "channel": channel, "event": "client-n",
            "data": orjson.dumps({"n": n}).decode(), "socket_id": "1.1"}


def numbers(events: list[dict[str, Any]], channel: str) -> list[int]:
    return [orjson.loads(e["data"])["n"] for e in events
            if e["name"] == "client_event" and e["channel"] == channel]


@dataclass
class Rig:
    broker: FakeBroker
    receiver: Receiver
    settings: Settings

    def counters(self) -> dict[str, int]:
        """The sender's last reported counters (it reports every second)."""
        stats = self.broker.kinds("stats")
        return dict(stats[-1]["counters"]) if stats else {}


@asynccontextmanager
async def running(tmp_path: Path, change: Callable[[Settings], Settings] = lambda s: s,
                  **app: Any) -> AsyncIterator[Rig]:
    receiver = Receiver()
    await receiver.start()
    settings = change(make_settings(receiver.url, **app))
    broker = FakeBroker(f"inproc://webhooks-test-{uuid.uuid4().hex}")
    stop = asyncio.Event()
    task = asyncio.create_task(serve(settings, broker.endpoint, tmp_path / "q.sqlite", stop))
    try:
        await poll(lambda: broker.peer is not None or task.done(), what="the sender's hello")
        assert not task.done(), task
        yield Rig(broker, receiver, settings)
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=15)
        await broker.close()
        await receiver.close()


def run(test: Callable[[], Awaitable[None]], timeout: float = 120.0) -> None:
    asyncio.run(asyncio.wait_for(test(), timeout=timeout))


def test_events_are_delivered_signed_with_the_right_headers(tmp_path: Path) -> None:
    async def test() -> None:
        async with running(tmp_path) as rig:
            events = [{"name": "channel_occupied", "channel": "private-c"},
                      whisper("private-c", 1),
                      {"name": "member_added", "channel": "presence-p", "user_id": "u"}]
            rig.broker.send_events(11, [[n, "1", now_ms(), e] for n, e in enumerate(events, 1)])
            await poll(lambda: rig.broker.acked(11, 3), what="ack")
            await poll(lambda: len(rig.receiver.delivered()) == 3, what="3 events delivered")
            [attempt] = rig.receiver.attempts  # released together: one request
            headers = attempt.headers
            assert headers["content-type"] == "application/json"
            assert headers["x-pusher-key"] == KEY
            assert headers["user-agent"] == f"Vask-Webhooks/{__version__}"
            assert headers["x-custom"] == "yes"
            body = attempt.body.decode()
            checked = pusher.Pusher(app_id="1", key=KEY, secret=SECRET).validate_webhook(
                key=headers["x-pusher-key"], signature=headers["x-pusher-signature"],
                body=body)
            assert checked is not None
            assert checked["events"] == events
            assert abs(checked["time_ms"] - now_ms()) < 10_000
            forged = pusher.Pusher(app_id="1", key=KEY, secret="not-it").validate_webhook(
                key=KEY, signature=headers["x-pusher-signature"], body=body)
            assert forged is None
            await poll(lambda: rig.counters().get("sent") == 1, what="stats")
            counters = rig.counters()
            assert set(counters) == set(COUNTERS)
            assert counters["events_sent"] == 3
            assert counters["queued"] == 0
            assert counters["failed"] == counters["given_up"] == counters["dropped"] == 0

    run(test)


def test_a_500_is_retried_with_the_same_body(tmp_path: Path) -> None:
    async def test() -> None:
        async with running(tmp_path) as rig:
            rig.receiver.answer = lambda n, body: (500 if n == 0 else 200, {}, 0.0)
            rig.broker.send_events(1, [[1, "1", now_ms(), whisper("c", 1)]])
            await poll(lambda: len(rig.receiver.delivered()) == 1, what="delivered")
            first, second = rig.receiver.attempts
            assert (first.status, second.status) == (500, 200)
            assert first.body == second.body
            await poll(lambda: rig.counters().get("sent") == 1, what="stats")
            counters = rig.counters()
            assert (counters["failed"], counters["retried"], counters["given_up"]) == (1, 1, 0)

    run(test)


def test_a_4xx_is_not_retried_and_frees_its_channel(tmp_path: Path) -> None:
    async def test() -> None:
        async with running(tmp_path) as rig:
            rig.receiver.answer = lambda n, body: (400 if n == 0 else 200, {}, 0.0)
            rig.broker.send_events(1, [[1, "1", now_ms(), whisper("c", 1)]])
            await poll(lambda: rig.counters().get("given_up") == 1, what="given up")
            assert len(rig.receiver.attempts) == 1
            rig.broker.send_events(1, [[2, "1", now_ms(), whisper("c", 2)]])
            await poll(lambda: len(rig.receiver.delivered()) == 1, what="the next event")
            assert numbers(rig.receiver.delivered(), "c") == [2]
            assert len(rig.receiver.attempts) == 2
            assert rig.counters()["retried"] == 0

    run(test)


def test_a_timeout_is_retried(tmp_path: Path) -> None:
    async def test() -> None:
        change = lambda s: replace(s, webhook_timeout=1.0)  # noqa: E731
        async with running(tmp_path, change) as rig:
            rig.receiver.answer = lambda n, body: (200, {}, 30.0 if n == 0 else 0.0)
            rig.broker.send_events(1, [[1, "1", now_ms(), whisper("c", 1)]])
            await poll(lambda: len(rig.receiver.delivered()) == 1, what="delivered")
            # (on a very busy machine a retry may time out too: at least two attempts)
            first, last = rig.receiver.attempts[0], rig.receiver.attempts[-1]
            assert first.status <= 0  # not answered yet: the sender did not wait 30 s
            assert last.at - first.at >= 0.95
            assert first.body == last.body
            await poll(lambda: rig.counters().get("sent") == 1, what="stats")
            assert rig.counters()["failed"] == len(rig.receiver.attempts) - 1

    run(test)


def test_retry_after_is_honoured(tmp_path: Path) -> None:
    async def test() -> None:
        async with running(tmp_path) as rig:
            rig.receiver.answer = lambda n, body: (
                (429, {"Retry-After": "1"}, 0.0) if n == 0 else (200, {}, 0.0))
            rig.broker.send_events(1, [[1, "1", now_ms(), whisper("c", 1)]])
            await poll(lambda: len(rig.receiver.delivered()) == 1, what="delivered")
            first, second = rig.receiver.attempts
            # The backoff alone would have retried within 50 ms.
            assert second.at - first.at >= 0.95

    run(test)


def test_order_per_channel_holds_under_failures(tmp_path: Path) -> None:
    async def test() -> None:
        channels = ["a", "b", "c", "d"]
        async with running(tmp_path, webhook_batch_max_events=3) as rig:
            rig.receiver.answer = lambda n, body: (500 if n % 3 == 0 else 200, {}, 0.1)
            seq = 0
            for round_ in range(4):
                batch = []
                for n in range(round_ * 3, round_ * 3 + 3):
                    for channel in channels:
                        seq += 1
                        batch.append([seq, "1", now_ms(), whisper(channel, n)])
                rig.broker.send_events(5, batch)
                await asyncio.sleep(0.03)
            await poll(lambda: len(rig.receiver.delivered()) == 48, what="48 delivered")
            delivered = rig.receiver.delivered()
            for channel in channels:
                assert numbers(delivered, channel) == list(range(12)), channel
            assert rig.receiver.overlaps == []
            assert 1 < rig.receiver.max_in_flight <= rig.settings.webhook_concurrency
            assert sum(1 for a in rig.receiver.attempts if a.status == 500) >= 4

    run(test)


def test_a_debounced_leave_and_join_are_not_sent(tmp_path: Path) -> None:
    async def test() -> None:
        async with running(tmp_path, webhook_leave_delay=0.5) as rig:
            t = now_ms()
            rig.broker.send_events(1, [
                [1, "1", t, {"name": "member_removed", "channel": "presence-p", "user_id": "1"}],
                [2, "1", t, {"name": "member_removed", "channel": "presence-p", "user_id": "2"}],
                [3, "1", t + 100, {"name": "member_added", "channel": "presence-p",
                                   "user_id": "1"}]])
            await poll(lambda: len(rig.receiver.delivered()) == 1, what="delivered")
            [event] = rig.receiver.delivered()
            assert event == {"name": "member_removed", "channel": "presence-p", "user_id": "2"}
            assert rig.receiver.attempts[0].at - (t / 1000 - time.time() + time.monotonic()) \
                >= 0.45
            await poll(lambda: rig.counters().get("cancelled") == 1, what="stats")

    run(test)


def test_garbage_and_huge_answers_do_not_break_the_sender(tmp_path: Path) -> None:
    async def test() -> None:
        answered = 0

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal answered
            try:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                await reader.readexactly(length)
                answered += 1
                if answered == 1:
                    writer.write(b"NOT HTTP AT ALL\r\n\r\n")
                else:
                    huge = 4 * 1024 * 1024
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % huge)
                    writer.write(b"x" * huge)
                await writer.drain()
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        url = f"http://127.0.0.1:{port}/hook"
        hook = Webhook(url=url, event_types=EVERYTHING)
        change = lambda s: replace(s, apps=(replace(s.apps[0], webhooks=(hook,)),))  # noqa: E731
        try:
            async with running(tmp_path, change) as rig:
                rig.broker.send_events(1, [[1, "1", now_ms(), whisper("c", 1)]])
                await poll(lambda: rig.counters().get("sent") == 1, what="first sent")
                assert rig.counters()["failed"] == 1
                rig.broker.send_events(1, [[2, "1", now_ms(), whisper("c", 2)]])
                await poll(lambda: rig.counters().get("sent") == 2, what="second sent")
                assert answered == 3
        finally:
            server.close()
            await server.wait_closed()

    run(test)


# --- kill -9 --------------------------------------------------------------------------

SENDER = (
    "import sys, orjson\n"
    "from pathlib import Path\n"
    "from vask.config import settings_from_dict\n"
    "from vask.logs import setup_logging\n"
    "from vask.webhooks.sender import run_sender\n"
    "setup_logging('info', 'webhooks')\n"
    "run_sender(settings_from_dict(orjson.loads(sys.argv[1])), sys.argv[2], Path(sys.argv[3]))\n"
)


def test_a_killed_sender_delivers_everything_after_a_restart(tmp_path: Path) -> None:
    runtime = tempfile.mkdtemp(prefix="vwh-")  # short: an ipc:// path is at most ~100 bytes
    endpoint = f"ipc://{runtime}/link"
    store = tmp_path / "state" / "q.sqlite"
    procs: list[subprocess.Popen[bytes]] = []

    def start(settings: Settings, log: Path) -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-c", SENDER, orjson.dumps(settings_to_dict(settings)),
                 endpoint, str(store)], stdout=out, stderr=out)
        procs.append(proc)
        return proc

    async def test() -> None:
        receiver = Receiver()
        await receiver.start()
        hang = True
        receiver.answer = lambda n, body: (200, {}, 60.0 if hang else 0.0)
        broker = FakeBroker(endpoint)
        settings = replace(make_settings(receiver.url, webhook_batch_max_events=5,
                                         webhook_leave_delay=1.0),
                           webhook_timeout=30.0, webhook_concurrency=2)
        log = tmp_path / "sender.log"
        try:
            first = start(settings, log)
            await poll(lambda: broker.peer is not None, timeout=60, what="first hello")
            events = [[n + 1, "1", now_ms(), whisper(f"c{n % 5}", n)] for n in range(50)]
            events.append([51, "1", now_ms(), {"name": "member_removed",
                                               "channel": "presence-p", "user_id": "9"}])
            broker.send_events(3, events)
            await poll(lambda: broker.acked(3, 51), timeout=60, what="ack of all 51")
            await poll(lambda: len(receiver.attempts) == 2, timeout=60,
                       what="2 requests in flight")
            os.kill(first.pid, signal.SIGKILL)
            first.wait(timeout=10)

            hang = False
            broker.peer = None
            second = start(settings, log)
            await poll(lambda: broker.peer is not None, timeout=60, what="second hello")
            # Nothing is re-sent by the broker: it all comes from the store.
            await poll(lambda: len({orjson.dumps(e) for e in receiver.delivered()}) == 51,
                       timeout=60, what="all 51 delivered")
            delivered = receiver.delivered()
            for channel in range(5):
                got = numbers(delivered, f"c{channel}")
                assert sorted(set(got)) == list(range(channel, 50, 5))
                firsts = list(dict.fromkeys(got))
                assert firsts == sorted(firsts)
            second.send_signal(signal.SIGTERM)
            assert second.wait(timeout=30) == 0
            text = log.read_text()
            assert "queued items loaded" in text
            assert "0 queued items loaded" in text and "webhooks of app 1" in text
            loaded = [line for line in text.splitlines() if "queued items loaded" in line]
            assert len(loaded) == 2 and not loaded[1].endswith(" 0 queued items loaded")
        finally:
            await broker.close()
            await receiver.close()

    try:
        run(test, timeout=220)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        for name in os.listdir(runtime):
            os.unlink(os.path.join(runtime, name))
        os.rmdir(runtime)
