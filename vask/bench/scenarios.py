"""The benchmark scenarios: fanout, fanout-rate, idle, presence, client-events.

Every scenario returns a JSON-friendly dict with ``ok`` (correctness: delivery
ratio exactly 1.0, exact presence events, no dropped connections), ``metrics``,
``resources`` (per measured phase) and ``failures``. Speed never affects ``ok``.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from array import array
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from vask.bench.httppub import Publisher, client_tls
from vask.bench.pool import WorkerPool, split_counts
from vask.bench.report import Meter, Progress
from vask.bench.server import ManagedServer
from vask.bench.stats import latency_summary_us, safe_div
from vask.config import DEFAULT_APP_ID

MAX_CONNS_PER_PROC = 5000  # 20 000 open files per process; leave ample headroom


@dataclass
class Target:
    """Where the server under test is and how to sign for it."""

    host: str = "127.0.0.1"
    port: int = 6001
    app_id: str = DEFAULT_APP_ID
    key: str = "app-key"
    secret: str = "app-secret"
    server_cmd: str | None = None
    server_pid: int | None = None
    server_log: str | None = None
    startup_timeout: float = 30.0
    #: speak TLS (wss://, https://) to the server; ``tls_ca``: the CA file to verify it
    #: with ("" = do not verify: the bench measures cost, not trust)
    tls: bool = False
    tls_ca: str = ""


@dataclass
class Common:
    """Knobs shared by all scenarios."""

    procs: int | None = None
    connect_concurrency: int = 200
    connect_timeout: float = 30.0
    drain_timeout: float = 10.0
    progress: bool = True
    #: loopback source addresses for the clients (127.0.0.1..N); 1 = the kernel's choice
    sources: int = 1


def default_procs(conns: int, requested: int | None) -> int:
    """Number of loadgen processes: as asked, else enough for the fd limit and >= 2."""
    need = math.ceil(conns / MAX_CONNS_PER_PROC)
    if requested:
        if requested < need:
            raise ValueError(f"{conns} connections need at least {need} loadgen processes")
        return min(requested, max(conns, 1))
    return max(need, min(2, max(conns, 1)))


class Session:
    """Server (optional managed) + loadgen pool + meter for one scenario run."""

    def __init__(self, target: Target, common: Common, conns: int) -> None:
        self.t = target
        self.c = common
        self.nprocs = default_procs(conns, common.procs)
        self.server: ManagedServer | None = None
        self.pool: WorkerPool | None = None
        self.progress = Progress(common.progress)
        self.server_root: int | None = target.server_pid

    async def __aenter__(self) -> Session:
        if self.t.server_cmd:
            self.server = ManagedServer(
                self.t.server_cmd, self.t.host, self.t.startup_timeout, self.t.server_log
            )
            self.progress(f"starting server: {self.server.cmd}", force=True)
            await asyncio.to_thread(self.server.start)
            self.t.port = self.server.port
            self.server_root = self.server.pid
        cfg = {"host": self.t.host, "port": self.t.port, "key": self.t.key, "secret": self.t.secret,
               "tls": self.t.tls, "tls_ca": self.t.tls_ca,
               "sources": self.c.sources}
        self.pool = WorkerPool(self.nprocs, cfg)
        await self.pool.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            if self.pool is not None:
                await self.pool.stop()
        finally:
            if self.server is not None:
                await asyncio.to_thread(self.server.stop)

    @property
    def p(self) -> WorkerPool:
        """The worker pool (only valid inside the context)."""
        assert self.pool is not None
        return self.pool

    def meter(self) -> Meter:
        """A meter over the server tree and the loadgen (this process + workers)."""
        if self.server is not None:
            self.server.remember_tree()
        return Meter(self.server_root, [os.getpid(), *self.p.pids])

    def target_desc(self) -> str:
        """Human description of the target."""
        if self.server is not None:
            return f"{self.server.cmd} (pid {self.server.pid}, port {self.t.port})"
        pid = f", server pid {self.t.server_pid}" if self.t.server_pid else ", server not measured"
        return f"{self.t.host}:{self.t.port}{pid}"

    async def connect(
        self, total: int, channel: str, members: int = -1, groups: int = 1
    ) -> tuple[int, int, float, list[str]]:
        """Open ``total`` subscribed connections spread over the workers.

        Returns (ok, failed, seconds, errors) with progress on stderr meanwhile.
        """
        counts = split_counts(total, self.nprocs)
        starts = [sum(counts[:i]) for i in range(self.nprocs)]
        args = [
            {
                "start": starts[i],
                "count": counts[i],
                "channel": channel,
                "concurrency": self.c.connect_concurrency,
                "timeout": self.c.connect_timeout,
                "members": members,
                "groups": groups,
            }
            for i in range(self.nprocs)
        ]
        t0 = time.monotonic()
        task = asyncio.ensure_future(self.p.call_all("connect", args))
        while not task.done():
            await asyncio.wait([task], timeout=1.0)
            if not task.done():
                st = await self.p.call_all("status")
                self.progress(f"connecting: {sum(s['open'] for s in st)}/{total} open")
        replies = task.result()
        took = time.monotonic() - t0
        ok = sum(r["ok"] for r in replies)
        failed = sum(r["failed"] for r in replies)
        self.progress(f"connected {ok}/{total} in {took:.2f}s", force=True)
        errors: list[str] = []
        if failed:
            res = await self.p.call_all("results")
            errors = [e for r in res for e in r["errors"]][:10]
        return ok, failed, took, errors

    async def wait_for(
        self,
        label: str,
        done: Callable[[list[dict[str, Any]]], tuple[int, int]],
        status_args: dict[str, Any] | None = None,
        stall: float | None = None,
        background: Awaitable[Any] | None = None,
    ) -> bool:
        """Poll worker status until ``done`` reports (have >= want), or no progress.

        ``done`` maps status replies to (have, want). Stops after ``stall``
        seconds without any change once ``background`` (e.g. the publisher)
        has finished.
        """
        stall = self.c.drain_timeout if stall is None else stall
        bg = asyncio.ensure_future(background) if background is not None else None
        last_have = -1
        last_change = time.monotonic()
        while True:
            st = await self.p.call_all("status", status_args)
            have, want = done(st)
            now = time.monotonic()
            if have != last_have:
                last_have, last_change = have, now
            self.progress(f"{label}: {have:,}/{want:,} ({safe_div(have, want):.1%})")
            bg_done = bg is None or bg.done()
            if bg is not None and bg.done() and not bg.cancelled() and bg.exception():
                # e.g. the publisher got a 4xx: nothing more is coming, say why now.
                self.progress(f"{label}: stopped at {have:,}/{want:,}: {bg.exception()}",
                              force=True)
                return False
            if bg_done and have >= want:
                self.progress(f"{label}: {have:,}/{want:,} done", force=True)
                return True
            if bg_done and now - last_change > stall:
                self.progress(f"{label}: stalled at {have:,}/{want:,}", force=True)
                return False
            await asyncio.sleep(0.05)

    async def results(self, args: dict[str, Any] | None = None) -> dict[str, Any]:
        """Merge per-worker results: totals, latency summary, errors."""
        res = await self.p.call_all("results", args)
        lat = array("q")
        for r in res:
            lat.frombytes(r["lat"])
        live = [r for r in res if r["live"]]
        merged: dict[str, Any] = {
            "deliveries": sum(r["deliveries"] for r in res),
            "latency_ms": latency_summary_us(lat),
            "first_t": min((r["first_t"] for r in res if r["first_t"]), default=0),
            "last_t": max((r["last_t"] for r in res), default=0),
            "min_per_conn": min((r["min_per_conn"] for r in live), default=0),
            "max_per_conn": max((r["max_per_conn"] for r in live), default=0),
            "unexpected_closes": sum(r["unexpected_closes"] for r in res),
            "error_count": sum(r["error_count"] for r in res),
            "errors": [e for r in res for e in r["errors"]][:10],
            "client_sent": sum(r["client_sent"] for r in res),
        }
        if res and "presence" in res[0]:
            merged["presence"] = {
                "bad_join": sum(r["presence"]["bad_join"] for r in res),
                "bad_leave": sum(r["presence"]["bad_leave"] for r in res),
                "samples": [s for r in res for s in r["presence"]["samples"]][:10],
            }
        return merged


def _base(name: str, params: dict[str, Any], s: Session) -> dict[str, Any]:
    return {
        "scenario": name,
        "target": s.target_desc(),
        "params": {**params, "loadgen_procs": s.nprocs},
        "ok": True,
        "metrics": {},
        "resources": {},
        "failures": [],
        "errors": [],
    }


def _per_million(cpu_s: float, count: float) -> float:
    return safe_div(cpu_s, count) * 1e6


def stamp_data(pad: int) -> Callable[[int, int], str]:
    filler = "x" * pad

    def make(seq: int, stamp: int) -> str:
        # The marker keeps receivers from parsing JSON; the data stays valid JSON.
        return f'{{"m":"~ts{stamp}~","seq":{seq},"pad":"{filler}"}}'

    return make



def _fail(out: dict[str, Any], reason: str) -> None:
    """Mark a scenario result as failed (the run exits non-zero) and say why."""
    out["ok"] = False
    out["failures"].append(reason)

async def run_fanout(
    target: Target,
    common: Common,
    subscribers: int,
    events: int,
    inflight: int = 8,
    rate: float | None = None,
    payload: int = 0,
    channel: str = "bench",
    name: str = "fanout",
) -> dict[str, Any]:
    """S subscribers on one channel, E events through the HTTP API, all counted and timed.

    With ``rate`` the events are paced (fanout-rate), otherwise sent as fast as
    the server answers with ``inflight`` requests outstanding.
    """
    async with Session(target, common, subscribers) as s:
        params: dict[str, Any] = {
            "subscribers": subscribers, "events": events, "inflight": inflight,
            "payload_pad": payload,
        }
        if rate:
            params["rate_per_s"] = rate
        out = _base(name, params, s)
        _ok, failed, took, errs = await s.connect(subscribers, channel)
        out["metrics"]["connect_s"] = took
        if failed:
            _fail(out, f"{failed} of {subscribers} subscriptions failed")
            out["errors"] = errs
            return out
        pub = Publisher(target.host, target.port, target.app_id, target.key, target.secret,
                        inflight, client_tls(target.tls, target.tls_ca))
        expected = subscribers * events
        meter = s.meter()
        meter.begin()
        t_pub0 = time.monotonic_ns() // 1000
        pub_task = asyncio.ensure_future(
            pub.run(events, stamp_data(payload), channel, rate=rate)
        )
        complete = await s.wait_for(
            "delivered",
            lambda st: (sum(x["deliveries"] for x in st), expected),
            background=pub_task,
        )
        win = meter.end()
        if pub_task.exception() is not None:
            _fail(out, f"publishing stopped: {pub_task.exception()}")
            out["errors"] = pub.errors
            return out
        pub_elapsed = pub_task.result()
        r = await s.results()
        window_s = (r["last_t"] - t_pub0) / 1e6 if r["last_t"] else math.nan
        m = out["metrics"]
        m["events_ok"] = pub.ok
        m["publish_s"] = pub_elapsed
        m["publish_rate_per_s"] = safe_div(pub.ok, pub_elapsed)
        m["http_latency_ms"] = latency_summary_us(pub.http_lat_us)
        m["deliveries"] = r["deliveries"]
        m["expected"] = expected
        m["delivery_ratio"] = safe_div(r["deliveries"], expected)
        m["per_conn_min_max"] = f"{r['min_per_conn']}/{r['max_per_conn']}"
        m["deliveries_per_s"] = safe_div(r["deliveries"], window_s)
        m["latency_ms"] = r["latency_ms"]
        m["server_cpu_s_per_million"] = _per_million(win.server_cpu, r["deliveries"])
        m["loadgen_cpu_s_per_million"] = _per_million(win.loadgen_cpu, r["deliveries"])
        out["resources"]["delivery"] = win.as_dict()
        out["errors"] = pub.errors + r["errors"]
        if r["deliveries"] != expected or not complete:
            _fail(
                out,
                f"delivery ratio {m['delivery_ratio']:.6f} ({r['deliveries']}/{expected})"
            )
        if r["min_per_conn"] != events or r["max_per_conn"] != events:
            _fail(
                out,
                f"per-connection deliveries {r['min_per_conn']}..{r['max_per_conn']}, "
                f"expected exactly {events}"
            )
        if pub.failed:
            _fail(out, f"{pub.failed} HTTP triggers failed")
        if r["unexpected_closes"]:
            _fail(out, f"{r['unexpected_closes']} connections closed unexpectedly")
        return out


async def run_idle(
    target: Target,
    common: Common,
    connections: int,
    channel: str = "idle-{i}",
    idle_seconds: float = 10.0,
    settle: float = 2.0,
) -> dict[str, Any]:
    """C subscribed connections: memory and CPU per connection, connect rate, idle CPU."""
    async with Session(target, common, connections) as s:
        out = _base(
            "idle",
            {"connections": connections, "channel": channel, "idle_s": idle_seconds},
            s,
        )
        meter = s.meter()
        await asyncio.sleep(settle)
        mem0 = meter.memory()
        meter.begin()
        ok, failed, took, errs = await s.connect(connections, channel)
        w_conn = meter.end()
        await asyncio.sleep(settle)
        mem1 = meter.memory()
        m = out["metrics"]
        m["connected"] = ok
        m["connect_subscribe_s"] = took
        m["connect_subscribe_per_s"] = safe_div(ok, took)
        m["server_cpu_ms_per_conn"] = safe_div(w_conn.server_cpu, ok) * 1e3
        if mem0 and mem1:
            m["server_rss_mib_before_after"] = f"{mem0[0] / 1024:.1f} -> {mem1[0] / 1024:.1f}"
            m["server_pss_mib_before_after"] = f"{mem0[1] / 1024:.1f} -> {mem1[1] / 1024:.1f}"
            m["rss_kib_per_conn"] = safe_div(mem1[0] - mem0[0], ok)
            m["pss_kib_per_conn"] = safe_div(mem1[1] - mem0[1], ok)
        out["resources"]["connect"] = w_conn.as_dict()
        s.progress(f"idle for {idle_seconds:.0f}s", force=True)
        meter.begin()
        await asyncio.sleep(idle_seconds)
        w_idle = meter.end()
        m["server_idle_cpu_pct_of_core"] = safe_div(w_idle.server_cpu, w_idle.wall) * 100
        out["resources"]["idle"] = w_idle.as_dict()
        r = await s.results()
        out["errors"] = errs + r["errors"]
        if failed:
            _fail(out, f"{failed} of {connections} connect+subscribe failed")
        if r["unexpected_closes"]:
            _fail(
                out,
                f"{r['unexpected_closes']} connections closed by the server while idle"
            )
        return out


async def run_presence(
    target: Target,
    common: Common,
    members: int,
    channel: str = "presence-bench",
) -> dict[str, Any]:
    """M members join one presence channel at once, then half leave; events must be exact."""
    async with Session(target, common, members) as s:
        out = _base("presence", {"members": members, "channel": channel}, s)
        m = out["metrics"]
        meter = s.meter()
        rss0 = meter.memory()
        peak = _PeakRss(meter)
        meter.begin()
        t0_us = time.monotonic_ns() // 1000
        ok, failed, took, errs = await s.connect(members, channel, members)
        m["join_subscribed_s"] = took
        m["join_per_s"] = safe_div(ok, took)
        if failed:
            _fail(out, f"{failed} of {members} presence subscriptions failed")
            out["errors"] = errs
            return out
        st_box: list[list[dict[str, Any]]] = []

        def join_progress(st: list[dict[str, Any]]) -> tuple[int, int]:
            st_box[:] = [st]
            return sum(x["join_complete"] for x in st), members

        joined = await s.wait_for("member views complete", join_progress, {"members": members})
        # Completion time as seen by the receivers (not rounded to the polling interval).
        m["join_complete_s"] = (max(x["join_last_t"] for x in st_box[0]) - t0_us) / 1e6
        out["resources"]["join"] = meter.end().as_dict()

        leavers = list(range(1, members, 2))
        remaining = members - len(leavers)
        meter.begin()
        t1_us = time.monotonic_ns() // 1000
        await s.p.call_all("leave", {"indices": leavers, "removed_expected": len(leavers)})

        def leave_progress(st: list[dict[str, Any]]) -> tuple[int, int]:
            st_box[:] = [st]
            return sum(x["leave_complete"] for x in st), remaining

        left = await s.wait_for(
            "member_removed seen", leave_progress, {"removed_expected": len(leavers)}
        )
        m["leave_complete_s"] = (max(x["leave_last_t"] for x in st_box[0]) - t1_us) / 1e6
        m["leave_per_s"] = safe_div(len(leavers), m["leave_complete_s"])
        out["resources"]["leave"] = meter.end().as_dict()
        # Give late duplicates a chance to show up before verifying exactness.
        await asyncio.sleep(0.5)
        peak_kib = await peak.stop()
        if rss0 is not None and peak_kib:
            m["server_rss_mib_before"] = rss0[0] / 1024
            m["server_rss_mib_peak"] = peak_kib / 1024
        r = await s.results(
            {
                "all_ids": [f"u{i}" for i in range(members)],
                "left_ids": [f"u{i}" for i in leavers],
            }
        )
        pres = r["presence"]
        m["members_with_wrong_join_view"] = pres["bad_join"]
        m["members_with_wrong_removed_events"] = pres["bad_leave"]
        m["member_added_expected"] = members * (members - 1) // 2
        out["errors"] = r["errors"]
        if not joined or pres["bad_join"]:
            _fail(out, f"{pres['bad_join']} members saw an inexact roster+member_added")
        if not left or pres["bad_leave"]:
            _fail(out, f"{pres['bad_leave']} members saw inexact member_removed")
        out["failures"].extend(pres["samples"][:5] if not out["ok"] else [])
        if r["unexpected_closes"]:
            _fail(out, f"{r['unexpected_closes']} connections closed unexpectedly")
        return out


class _PeakRss:
    """Samples the server tree's RSS every 0.2 s until stopped; keeps the largest."""

    def __init__(self, meter: Meter) -> None:
        self.meter = meter
        self.peak = 0
        self.task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            mem = await asyncio.to_thread(self.meter.memory)
            if mem is None:
                return
            self.peak = max(self.peak, mem[0])
            await asyncio.sleep(0.2)

    async def stop(self) -> int:
        """Stop sampling (after one last sample); the peak RSS in KiB (0: unknown)."""
        self.task.cancel()
        mem = self.meter.memory()
        if mem is not None:
            self.peak = max(self.peak, mem[0])
        return self.peak


async def run_client_events(
    target: Target,
    common: Common,
    clients: int,
    rate: float,
    duration: float,
    payload: int = 0,
    channel: str = "private-bench",
) -> dict[str, Any]:
    """N clients on one private channel each sending client events at ``rate``/s."""
    async with Session(target, common, clients) as s:
        out = _base(
            "client-events",
            {"clients": clients, "rate_per_client": rate, "duration_s": duration,
             "channel": channel, "payload_pad": payload},
            s,
        )
        _ok, failed, took, errs = await s.connect(clients, channel)
        out["metrics"]["connect_s"] = took
        if failed:
            _fail(out, f"{failed} of {clients} subscriptions failed")
            out["errors"] = errs
            return out
        meter = s.meter()
        meter.begin()
        t0 = time.monotonic_ns() // 1000
        args = [
            {"rate": rate, "duration": duration, "pad": payload, "offset": i / s.nprocs}
            for i in range(s.nprocs)
        ]
        send_task = asyncio.ensure_future(s.p.call_all("client_events", args))
        sent_total: list[int] = []

        def progress(st: list[dict[str, Any]]) -> tuple[int, int]:
            have = sum(x["deliveries"] for x in st)
            if send_task.done():
                if not sent_total:
                    sent_total.append(sum(x["sent"] for x in send_task.result()))
                return have, sent_total[0] * (clients - 1)
            want = int(time.monotonic_ns() // 1000 - t0) / 1e6 * rate * clients * (clients - 1)
            return have, max(int(want), have + 1)

        complete = await s.wait_for("client events delivered", progress, background=send_task)
        win = meter.end()
        r = await s.results()
        sent = r["client_sent"]
        expected = sent * (clients - 1)
        window_s = (r["last_t"] - t0) / 1e6 if r["last_t"] else math.nan
        m = out["metrics"]
        m["sent"] = sent
        m["deliveries"] = r["deliveries"]
        m["expected"] = expected
        m["delivery_ratio"] = safe_div(r["deliveries"], expected)
        m["deliveries_per_s"] = safe_div(r["deliveries"], window_s)
        m["latency_ms"] = r["latency_ms"]
        m["server_cpu_s_per_million"] = _per_million(win.server_cpu, r["deliveries"])
        m["loadgen_cpu_s_per_million"] = _per_million(win.loadgen_cpu, r["deliveries"])
        out["resources"]["delivery"] = win.as_dict()
        out["errors"] = r["errors"]
        if r["deliveries"] != expected or not complete:
            _fail(
                out,
                f"delivery ratio {m['delivery_ratio']:.6f} ({r['deliveries']}/{expected})"
            )
        if r["unexpected_closes"] or r["error_count"]:
            _fail(
                out,
                f"{r['unexpected_closes']} unexpected closes, {r['error_count']} protocol errors"
            )
        return out
