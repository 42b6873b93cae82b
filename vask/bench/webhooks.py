"""The ``webhooks`` scenario: channel churn, a signed webhook receiver, fan-out cost.

What it answers: how many ``channel_occupied``/``channel_vacated`` webhooks a server
sends per second, how late they arrive, what they cost the server in CPU, and how
much the churn and its webhooks slow an unrelated fan-out running at the same time.

The pieces:

* :class:`Tally` checks and counts webhook requests. It is pure (the caller passes
  the body, headers and receipt time), so the signature check and the latency
  parsing are unit-tested without sockets.
* The receiver runs in its own process (:func:`receiver_main`, aiohttp): a server
  without batching (soketi's default) sends one request per event, thousands per
  second, and parsing those in the bench's main process would slow the HTTP
  publisher that the fan-out phases measure.
* :func:`churn_channels` runs inside load-generator processes: it subscribes to a
  fresh public channel and unsubscribes it at once, at a fixed rate. The channel
  name carries the send time (CLOCK_MONOTONIC microseconds, shared by every process
  on the host), so the receiver times each event without trusting the body's
  ``time_ms`` (a wall clock, in milliseconds, taken somewhere inside the server).
* :func:`run_webhooks` drives it all: a fan-out with no churn, the churn alone
  (webhook throughput, latency, server CPU), then the same fan-out while the churn
  runs, and a final check that every expected event arrived.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import json
import math
import multiprocessing as mp
import os
import shlex
import shutil
import tempfile
import time
from array import array
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING, Any

import orjson

from vask.bench.httppub import Publisher
from vask.bench.loadgen import loop_factory, now_us
from vask.bench.pool import WorkerPool, split_counts
from vask.bench.report import Meter
from vask.bench.scenarios import Common, Session, Target, _base, _fail, stamp_data
from vask.bench.server import free_port
from vask.bench.stats import latency_summary_us, safe_div

if TYPE_CHECKING:
    from vask.bench.loadgen import PusherConn

#: prefix of the channels the churn creates: ``wh-<stamp_us>-<conn>-<n>``
CHURN_PREFIX = "wh-"
OCCUPIED = "channel_occupied"
VACATED = "channel_vacated"
#: the channel the churn connections sit on between churned channels, and the
#: fan-out channel; their own occupied/vacated events are counted as "other"
CHURN_HOME = "whbench-churn"
FANOUT_CHANNEL = "whbench-fanout"


# --- checking and counting webhook requests (pure) ---------------------------------


def signature_ok(secret: str, body: bytes, signature: str) -> bool:
    """Whether ``signature`` is the hex HMAC-SHA256 of ``body`` under ``secret``.

    Compared in constant time, as a real receiver must, so the bench pays the same
    cost per request that an application would.
    """
    expected = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, signature)


def stamp_of(channel: str) -> int | None:
    """The send time (µs) carried by a churned channel's name, or None for any other."""
    if not channel.startswith(CHURN_PREFIX):
        return None
    end = channel.find("-", len(CHURN_PREFIX))
    digits = channel[len(CHURN_PREFIX) : end if end >= 0 else None]
    return int(digits) if digits.isdigit() else None


class Tally:
    """Counts what the receiver got: per request validity, per event latency.

    An event is identified by ``(name, channel)``; each churned channel must bring
    exactly one of each, so a repeat is a duplicate. Counters prefixed ``phase_``
    (and the latency samples) cover the current phase only and are restarted by
    :meth:`snapshot` with ``mark``; the rest covers the whole run.
    """

    def __init__(self, key: str, secret: str) -> None:
        self.key = key
        self.secret = secret
        self.requests = 0
        self.invalid = 0  # wrong key or signature
        self.malformed = 0  # signed, but not the expected JSON shape
        self.events = 0  # distinct churn events
        self.duplicates = 0
        self.other = 0  # events on channels the churn did not create
        self.vacated_first = 0  # a channel's vacated arrived before its occupied
        self.seen: set[tuple[str, str]] = set()
        self.errors: list[str] = []
        self._new_phase()

    def _new_phase(self) -> None:
        self.phase_requests = 0
        self.phase_events = 0
        self.phase_first_t = 0
        self.phase_last_t = 0
        self.occupied_us: array[int] = array("q")
        self.vacated_us: array[int] = array("q")

    def _error(self, msg: str) -> None:
        if len(self.errors) < 10:
            self.errors.append(msg)

    def feed(self, body: bytes, key: str, signature: str, t_us: int) -> int:
        """Account for one request received at ``t_us``; return the HTTP status to answer."""
        self.requests += 1
        self.phase_requests += 1
        if key != self.key or not signature_ok(self.secret, body, signature):
            self.invalid += 1
            self._error(f"bad key or signature: key {key!r}, signature {signature[:16]!r}")
            return 401
        try:
            events = orjson.loads(body)["events"]
            if not isinstance(events, list):
                raise TypeError("events is not a list")
        except (orjson.JSONDecodeError, KeyError, TypeError) as e:
            self.malformed += 1
            self._error(f"malformed body ({e}): {body[:120]!r}")
            return 400
        for ev in events:
            name = ev.get("name") if isinstance(ev, dict) else None
            channel = ev.get("channel") if isinstance(ev, dict) else None
            if not isinstance(name, str) or not isinstance(channel, str):
                self.malformed += 1
                self._error(f"event without name/channel: {ev!r:.120}")
                continue
            stamp = stamp_of(channel) if name in (OCCUPIED, VACATED) else None
            if stamp is None:
                self.other += 1
                continue
            k = (name, channel)
            if k in self.seen:
                self.duplicates += 1
                continue
            self.seen.add(k)
            if name == VACATED and (OCCUPIED, channel) not in self.seen:
                self.vacated_first += 1
            (self.occupied_us if name == OCCUPIED else self.vacated_us).append(t_us - stamp)
            self.events += 1
            self.phase_events += 1
            if not self.phase_first_t:
                self.phase_first_t = t_us
            self.phase_last_t = t_us
        return 200

    def stats(self) -> dict[str, Any]:
        """Counters only (cheap enough to poll for progress)."""
        return {
            "requests": self.requests,
            "invalid": self.invalid,
            "malformed": self.malformed,
            "events": self.events,
            "duplicates": self.duplicates,
            "other": self.other,
            "vacated_first": self.vacated_first,
            "errors": list(self.errors),
            "phase_requests": self.phase_requests,
            "phase_events": self.phase_events,
            "phase_first_t": self.phase_first_t,
            "phase_last_t": self.phase_last_t,
        }

    def snapshot(self, mark: bool = False) -> dict[str, Any]:
        """Counters plus the phase's latency samples (raw int64); ``mark`` starts a new phase."""
        out = self.stats()
        out["occupied_us"] = self.occupied_us.tobytes()
        out["vacated_us"] = self.vacated_us.tobytes()
        if mark:
            self._new_phase()
        return out


def latency_of(raw: bytes, minus_us: int = 0) -> dict[str, float]:
    """Latency summary (ms) of raw int64 µs samples, each reduced by ``minus_us``."""
    samples = array("q")
    samples.frombytes(raw)
    return latency_summary_us(v - minus_us for v in samples)


# --- the receiver process ----------------------------------------------------------


def receiver_main(pipe: Connection, cfg: dict[str, Any]) -> None:
    """Entry point of the receiver process (spawned by :class:`Receiver`)."""
    with contextlib.suppress(KeyboardInterrupt), asyncio.Runner(loop_factory=loop_factory()) as r:
        r.run(_receive(pipe, cfg))


async def _receive(pipe: Connection, cfg: dict[str, Any]) -> None:
    from aiohttp import web

    tally = Tally(cfg["key"], cfg["secret"])

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        status = tally.feed(
            body,
            request.headers.get("X-Pusher-Key", ""),
            request.headers.get("X-Pusher-Signature", ""),
            now_us(),
        )
        return web.Response(status=status)

    app = web.Application(client_max_size=16 * 1024 * 1024)
    app.router.add_post("/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    port = 0
    fixed = int(cfg.get("port") or 0)
    for _ in range(1 if fixed else 20):  # a port may be taken between check and bind
        port = fixed or free_port()
        try:
            await web.TCPSite(runner, cfg["host"], port).start()
            break
        except OSError:
            port = 0
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def on_command() -> None:
        try:
            cmd, args = pipe.recv()
        except (EOFError, OSError):  # the bench went away
            if not done.done():
                done.set_result(None)
            return
        if cmd == "stats":
            reply: Any = tally.stats()
        elif cmd == "snapshot":
            reply = tally.snapshot(bool(args.get("mark")))
        else:  # stop
            reply = None
            if not done.done():
                done.set_result(None)
        pipe.send(reply)

    loop.add_reader(pipe.fileno(), on_command)
    os.set_blocking(pipe.fileno(), True)  # uvloop made it non-blocking; big sends need it
    pipe.send({"pid": os.getpid(), "port": port})
    await done
    loop.remove_reader(pipe.fileno())
    await runner.cleanup()


class Receiver:
    """Parent-side handle on the receiver process: start, query, stop."""

    def __init__(self, host: str, key: str, secret: str, port: int = 0) -> None:
        self.host = host
        self.cfg: dict[str, Any] = {"host": host, "key": key, "secret": secret, "port": port}
        self.proc: BaseProcess | None = None
        self.pipe: Connection | None = None
        self.pid = 0
        self.port = 0
        self._lock = asyncio.Lock()

    @property
    def url(self) -> str:
        """Where the server under test must send its webhooks."""
        return f"http://{self.host}:{self.port}/webhooks"

    def _roundtrip(self, msg: tuple[str, dict[str, Any]] | None, timeout: float) -> Any:
        assert self.pipe is not None
        if msg is not None:
            self.pipe.send(msg)
        if not self.pipe.poll(timeout):
            raise TimeoutError("the webhook receiver did not answer")
        return self.pipe.recv()

    async def start(self) -> None:
        """Spawn the receiver and wait until it listens."""
        ctx = mp.get_context("spawn")  # inherit no loop, sockets or server child
        parent, child = ctx.Pipe()
        self.proc = ctx.Process(target=receiver_main, args=(child, self.cfg), daemon=True)
        self.proc.start()
        child.close()
        self.pipe = parent
        hello = await asyncio.to_thread(self._roundtrip, None, 60.0)
        self.pid, self.port = hello["pid"], hello["port"]
        if not self.port:
            raise RuntimeError(f"the webhook receiver could not listen on port "
                               f"{self.cfg['port'] or 'any of 17000-17999'}")

    async def call(self, cmd: str, **args: Any) -> Any:
        """Send one command (``stats``, ``snapshot``, ``stop``) and return the answer."""
        async with self._lock:
            return await asyncio.to_thread(self._roundtrip, (cmd, args), 30.0)

    async def stop(self) -> None:
        """Ask the receiver to exit; kill it by PID if it does not."""
        if self.proc is None:
            return
        with contextlib.suppress(Exception):
            await self.call("stop")
        await asyncio.to_thread(self.proc.join, 5)
        if self.proc.is_alive():
            self.proc.kill()
            await asyncio.to_thread(self.proc.join, 5)
        if self.pipe is not None:
            self.pipe.close()
        self.proc = None


# --- the server's configuration and command ----------------------------------------


def webhook_config_toml(app_id: str, key: str, secret: str, url: str, leave_delay: float,
                        data_dir: str) -> str:
    """A Vask config: the bench's app with one webhook endpoint for occupied/vacated.

    ``data_dir`` gives the run its own webhook queue, so nothing left over from an
    earlier run (to a receiver long gone) is delivered into this one's counts.
    JSON string escapes are valid TOML basic-string escapes, hence ``json.dumps``.
    """
    q = json.dumps
    return "\n".join([
        "# Written by `vask bench webhooks` for one run, and deleted after it.",
        "[server]",
        f"data_dir = {q(data_dir)}",
        "",
        "[[apps]]",
        f"id = {q(app_id)}",
        f"key = {q(key)}",
        f"secret = {q(secret)}",
        "enable_client_messages = true",
        f"webhook_leave_delay = {float(leave_delay)!r}",
        "",
        "[[apps.webhooks]]",
        f"url = {q(url)}",
        f"event_types = [{q(OCCUPIED)}, {q(VACATED)}]",
        "",
    ])


def substitute_webhook_placeholders(cmd: str, url: str, config_path: str) -> str:
    """Replace ``{webhook_url}`` and ``{webhook_config}`` (a shell-quoted path)."""
    return cmd.replace("{webhook_url}", url).replace("{webhook_config}", shlex.quote(config_path))


# --- the churn (runs in load-generator processes) ----------------------------------


def churn_frames(channel: str) -> tuple[bytes, bytes]:
    """The subscribe and unsubscribe frames' payloads for one public channel."""
    ch = channel.encode()
    return (b'{"event":"pusher:subscribe","data":{"channel":"%s","auth":""}}' % ch,
            b'{"event":"pusher:unsubscribe","data":{"channel":"%s"}}' % ch)


async def churn_channels(conns: Sequence[PusherConn], rate: float, duration: float,
                         offset: float, stopped: Callable[[], bool]) -> dict[str, Any]:
    """Occupy and vacate fresh channels round-robin over ``conns`` at ``rate`` per second.

    Runs ``duration`` seconds, or until ``stopped()`` when ``duration`` is 0. Both
    frames go out back to back: the server sees a subscribe immediately followed by
    an unsubscribe, so each channel is occupied and vacated once. ``offset`` (0..1)
    staggers processes so their sends do not line up.
    """
    if not conns or rate <= 0:
        return {"channels": 0, "t_begin": now_us(), "t_end": now_us()}
    n = len(conns)
    limit = round(rate * duration) if duration > 0 else None
    t_begin = now_us()
    t0 = time.monotonic() + offset / rate
    sent = 0
    while not stopped() and (limit is None or sent < limit):
        now = time.monotonic()
        due = int((now - t0) * rate) + 1 if now >= t0 else 0
        if limit is not None:
            due = min(due, limit)
        while sent < due:
            c = conns[sent % n]
            sub, unsub = churn_frames(f"{CHURN_PREFIX}{now_us()}-{c.index}-{sent}")
            c.send_text(sub)
            c.send_text(unsub)
            sent += 1
        await asyncio.sleep(0.002)
    return {"channels": sent, "t_begin": t_begin, "t_end": now_us()}


class Churn:
    """The churn's own load-generator processes (apart from the fan-out subscribers,
    so that sending the churn does not slow the processes counting deliveries)."""

    def __init__(self, procs: int, cfg: dict[str, Any]) -> None:
        self.pool = WorkerPool(procs, cfg)
        self.channels = 0  # churned so far, over all phases
        self._task: asyncio.Future[list[Any]] | None = None

    async def connect(self, total: int, common: Common) -> tuple[int, int, list[str]]:
        """Open ``total`` connections, each subscribed to the churn's home channel."""
        counts = split_counts(total, self.pool.n)
        args = [{"start": sum(counts[:i]), "count": counts[i], "channel": CHURN_HOME,
                 "concurrency": common.connect_concurrency, "timeout": common.connect_timeout,
                 "members": -1} for i in range(self.pool.n)]
        replies = await self.pool.call_all("connect", args)
        ok = sum(r["ok"] for r in replies)
        failed = sum(r["failed"] for r in replies)
        errors: list[str] = []
        if failed:
            res = await self.pool.call_all("results")
            errors = [e for r in res for e in r["errors"]][:10]
        return ok, failed, errors

    def begin(self, rate: float, duration: float) -> None:
        """Start churning at ``rate`` channels/s in total (``duration`` 0: until :meth:`end`)."""
        n = self.pool.n
        args = [{"rate": rate / n, "duration": duration, "offset": i / n, "home": CHURN_HOME}
                for i in range(n)]
        self._task = asyncio.ensure_future(self.pool.call_all("churn", args))

    @property
    def running(self) -> bool:
        """Whether the current churn is still sending."""
        return self._task is not None and not self._task.done()

    async def end(self) -> dict[str, Any]:
        """Stop (if open-ended) and wait for the churn; return channels and send window."""
        assert self._task is not None
        if not self._task.done():
            await self.pool.call_all("churn_stop")
        replies = await self._task
        self._task = None
        channels = sum(r["channels"] for r in replies)
        self.channels += channels
        return {"channels": channels,
                "t_begin": min(r["t_begin"] for r in replies),
                "t_end": max(r["t_end"] for r in replies)}

    async def results(self) -> dict[str, Any]:
        """Unexpected closes and protocol errors of the churn connections."""
        res = await self.pool.call_all("results")
        return {"unexpected_closes": sum(r["unexpected_closes"] for r in res),
                "error_count": sum(r["error_count"] for r in res),
                "errors": [e for r in res for e in r["errors"]][:10]}


# --- the scenario ------------------------------------------------------------------


@dataclasses.dataclass
class WebhookParams:
    """Sizes of a ``webhooks`` run (the CLI's options)."""

    connections: int = 200
    rate: float = 1000.0
    duration: float = 10.0
    subscribers: int = 1000
    events: int = 2000
    inflight: int = 8
    leave_delay: float = 0.0
    check_webhooks: bool = True
    churn_procs: int = 1
    warmup_events: int = 200
    #: the receiver's port (0: a free one), for a server started outside the bench
    receiver_port: int = 0


async def _fanout(s: Session, target: Target, p: WebhookParams, events: int, label: str,
                  meter: Meter) -> dict[str, Any]:
    """Trigger ``events`` on the fan-out channel as fast as the server answers; count all."""
    await s.p.call_all("reset")
    pub = Publisher(target.host, target.port, target.app_id, target.key, target.secret,
                    p.inflight)
    expected = p.subscribers * events
    meter.begin()
    t0 = now_us()
    task = asyncio.ensure_future(pub.run(events, stamp_data(0), FANOUT_CHANNEL))
    complete = await s.wait_for(
        label, lambda st: (sum(x["deliveries"] for x in st), expected), background=task)
    win = meter.end()
    # A 4xx stopped the publisher (PublishRejected): its message leads the errors.
    stopped = [str(task.exception())] if task.done() and task.exception() else []
    r = await s.results()
    window_s = (r["last_t"] - t0) / 1e6 if r["last_t"] else math.nan
    return {
        "deliveries": r["deliveries"],
        "expected": expected,
        "deliveries_per_s": safe_div(r["deliveries"], window_s),
        "latency_ms": r["latency_ms"],
        "server_cpu_s_per_million": safe_div(win.server_cpu, r["deliveries"]) * 1e6,
        "http_failed": pub.failed,
        "exact": complete and r["deliveries"] == expected and not pub.failed,
        "errors": stopped + pub.errors + r["errors"],
        "resources": win.as_dict(),
    }


async def _drain(s: Session, rx: Receiver, want: int, stall: float, label: str) -> bool:
    """Poll the receiver until it has ``want`` churn events, or nothing new for ``stall`` s."""
    last, last_change = -1, time.monotonic()
    while True:
        st = await rx.call("stats")
        have = st["events"]
        now = time.monotonic()
        if have != last:
            last, last_change = have, now
        s.progress(f"{label}: {have:,}/{want:,} webhook events")
        if have >= want:
            s.progress(f"{label}: {have:,}/{want:,} webhook events, all in", force=True)
            return True
        if now - last_change > stall:
            s.progress(f"{label}: stalled at {have:,}/{want:,} webhook events", force=True)
            return False
        await asyncio.sleep(0.1)


async def run_webhooks(target: Target, common: Common, p: WebhookParams) -> dict[str, Any]:
    """Fan-out quiet, churn alone (webhook metrics), fan-out under churn; all checked."""
    rx = Receiver(target.host, target.key, target.secret, p.receiver_port)
    tmp = tempfile.mkdtemp(prefix="vask-bench-webhooks-")
    try:
        await rx.start()
        cmd = target.server_cmd
        if cmd and "{webhook_config}" in cmd:
            path = os.path.join(tmp, "vask.toml")
            with open(path, "w", encoding="utf-8") as f:
                f.write(webhook_config_toml(target.app_id, target.key, target.secret, rx.url,
                                            p.leave_delay, os.path.join(tmp, "data")))
            cmd = substitute_webhook_placeholders(cmd, rx.url, path)
        elif cmd:
            cmd = substitute_webhook_placeholders(cmd, rx.url, "")
        t = dataclasses.replace(target, server_cmd=cmd)
        return await _run(t, common, p, rx)
    finally:
        await rx.stop()
        shutil.rmtree(tmp, ignore_errors=True)


async def _run(target: Target, common: Common, p: WebhookParams,
               rx: Receiver) -> dict[str, Any]:
    async with Session(target, common, p.subscribers) as s:
        cfg = {"host": target.host, "port": target.port, "key": target.key,
               "secret": target.secret}
        churn = Churn(p.churn_procs, cfg)
        await churn.pool.start()
        try:
            return await _phases(s, target, p, rx, churn)
        finally:
            await churn.pool.stop()


async def _phases(s: Session, target: Target, p: WebhookParams, rx: Receiver,
                  churn: Churn) -> dict[str, Any]:
    params = dataclasses.asdict(p)
    params["webhook_url"] = rx.url
    out = _base("webhooks", params, s)
    m = out["metrics"]
    fanout = p.subscribers > 0 and p.events > 0
    if fanout:
        _ok, failed, took, errs = await s.connect(p.subscribers, FANOUT_CHANNEL)
        m["connect_s"] = took
        if failed:
            _fail(out, f"{failed} of {p.subscribers} fan-out subscriptions failed")
            out["errors"] = errs
            return out
    ok, failed, errs = await churn.connect(p.connections, s.c)
    s.progress(f"churn connections: {ok}/{p.connections} open", force=True)
    if failed:
        _fail(out, f"{failed} of {p.connections} churn connections failed")
        out["errors"] = errs
        return out
    if s.server is not None:
        s.server.remember_tree()
    meter = Meter(s.server_root, [os.getpid(), *s.p.pids, *churn.pool.pids, rx.pid])
    stall = s.c.drain_timeout + p.leave_delay
    # Let the home channels' own webhooks arrive before the first phase begins.
    await asyncio.sleep(0.5)
    await rx.call("snapshot", mark=True)

    quiet: dict[str, Any] = {}
    if fanout:
        if p.warmup_events:
            await _fanout(s, target, p, min(p.warmup_events, p.events), "warm-up", meter)
        quiet = await _fanout(s, target, p, p.events, "fan-out, no churn", meter)
        out["resources"]["fanout_quiet"] = quiet.pop("resources")

    # Churn alone: webhook throughput, latency and the server's cost per event.
    s.progress(f"churn: {p.rate:g} channels/s for {p.duration:g}s", force=True)
    meter.begin()
    churn.begin(p.rate, p.duration)
    while churn.running:
        st = await rx.call("stats")
        s.progress(f"churn: {st['phase_events']:,} webhook events received")
        await asyncio.sleep(0.25)
    sent = await churn.end()
    want = 2 * churn.channels
    drained = await _drain(s, rx, want, stall if p.check_webhooks else 1.0, "churn")
    win = meter.end()
    snap = await rx.call("snapshot", mark=True)
    out["resources"]["churn"] = win.as_dict()
    delay_us = round(p.leave_delay * 1e6)
    send_s = (sent["t_end"] - sent["t_begin"]) / 1e6
    recv_s = (snap["phase_last_t"] - sent["t_begin"]) / 1e6 if snap["phase_last_t"] else math.nan
    events = snap["phase_events"]
    m["channels_churned"] = sent["channels"]
    m["churn_rate_per_s"] = safe_div(sent["channels"], send_s)
    m["webhook_events"] = events
    m["webhook_events_expected"] = 2 * sent["channels"]
    m["webhook_events_per_s"] = safe_div(events, recv_s)
    m["webhook_requests_per_s"] = safe_div(snap["phase_requests"], recv_s)
    m["events_per_request"] = safe_div(events, snap["phase_requests"])
    m["occupied_latency_ms"] = latency_of(snap["occupied_us"])
    m["vacated_latency_ms"] = latency_of(snap["vacated_us"], delay_us)
    m["server_cpu_s_per_thousand_events"] = safe_div(win.server_cpu, events) * 1e3
    m["churn_server_cpu_pct_of_core"] = safe_div(win.server_cpu, win.wall) * 100
    m["churn_drained"] = drained

    if fanout:
        # The same fan-out while the churn runs (open-ended, stopped when it is done).
        churn.begin(p.rate, 0)
        await asyncio.sleep(1.0)  # let the churn and its webhooks reach a steady state
        busy = await _fanout(s, target, p, p.events, "fan-out under churn", meter)
        out["resources"]["fanout_churn"] = busy.pop("resources")
        sent2 = await churn.end()
        m["fanout_churn_channels"] = sent2["channels"]
        m["fanout_quiet_deliveries_per_s"] = quiet["deliveries_per_s"]
        m["fanout_churn_deliveries_per_s"] = busy["deliveries_per_s"]
        m["fanout_churn_ratio"] = safe_div(busy["deliveries_per_s"], quiet["deliveries_per_s"])
        m["fanout_quiet_latency_ms"] = quiet["latency_ms"]
        m["fanout_churn_latency_ms"] = busy["latency_ms"]
        m["fanout_quiet_server_cpu_s_per_million"] = quiet["server_cpu_s_per_million"]
        m["fanout_churn_server_cpu_s_per_million"] = busy["server_cpu_s_per_million"]
        for label, ph in (("without churn", quiet), ("under churn", busy)):
            out["errors"].extend(ph["errors"])
            if not ph["exact"]:
                _fail(out, f"fan-out {label}: {ph['deliveries']}/{ph['expected']} deliveries, "
                      f"{ph['http_failed']} HTTP triggers failed")
        await _drain(s, rx, 2 * churn.channels, stall if p.check_webhooks else 1.0, "final")

    final = await rx.call("stats")
    m["webhook_requests_total"] = final["requests"]
    m["invalid_requests"] = final["invalid"]
    m["malformed"] = final["malformed"]
    m["missing_events"] = 2 * churn.channels - final["events"]
    m["duplicate_events"] = final["duplicates"]
    m["vacated_before_occupied"] = final["vacated_first"]
    m["other_events"] = final["other"]
    out["errors"].extend(final["errors"])
    if final["invalid"] or final["malformed"]:
        _fail(out, f"{final['invalid']} webhook requests with a bad key or signature, "
              f"{final['malformed']} malformed")
    if p.check_webhooks and m["missing_events"]:
        _fail(out, f"{m['missing_events']} of {2 * churn.channels} webhook events missing "
              f"after the drain timeout")
    cr = await churn.results()
    r = await s.results()
    closes = cr["unexpected_closes"] + r["unexpected_closes"]
    out["errors"].extend(cr["errors"] + r["errors"])
    if closes or cr["error_count"]:
        _fail(out, f"{closes} connections closed unexpectedly, "
              f"{cr['error_count']} protocol errors on churn connections")
    out["errors"] = out["errors"][:20]
    return out
