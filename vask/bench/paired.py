"""Connect cost of two servers measured side by side, in alternating blocks.

``vask bench compare`` runs whole scenarios one after the other. On a shared VM whose
speed drifts by 2x within minutes, the same build's CPU per connect moved from 0.51 to
0.78 ms between two compares an hour apart (docs/benchmarks.md, fifth pass), so a ratio
of two such runs carries the drift in it.

Here both servers run at once, each with its own load-generator processes, and the
connections are opened in blocks that alternate between them: A B B A A B B A ... Each
server is charged only for its own blocks: its CPU, read to the nanosecond from the
scheduler, before and after each block. A window ends a short ``settle`` after the
block's last subscribe, so that work a server defers (a garbage collection, a timer's
flush) is still its own, along with that moment's idle CPU. Consecutive blocks are a
fraction of a second apart, so a slow spell of the machine falls on both, and the ABBA
order also cancels a steady trend (a server that gets dearer per connection as it holds
more of them is measured the same way on both sides).

The figure is the ratio of the totals, B's CPU per connection over A's; the per-pair
ratios show the spread, and a bootstrap over pairs gives an interval for the ratio.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from array import array
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from vask.bench.httppub import Publisher, PublishRejected
from vask.bench.pool import WorkerPool, split_counts
from vask.bench.procstat import tree_run_seconds
from vask.bench.report import Progress
from vask.bench.scenarios import Common, _fail, default_procs, stamp_data
from vask.bench.server import ManagedServer
from vask.bench.stats import latency_summary_us, median, percentile
from vask.config import DEFAULT_APP_ID

BOOTSTRAP_SAMPLES = 2000


def summarise_pairs(a_cpu: Sequence[float], a_n: Sequence[int], b_cpu: Sequence[float],
                    b_n: Sequence[int], seed: int = 1, unit: str = "ms_per_conn",
                    scale: float = 1e3) -> dict[str, Any]:
    """Pure: B's CPU per unit of work over A's, from per-block CPU seconds and counts of
    work done (connections, deliveries); block k of A is paired with block k of B.

    Returns the CPU per unit of each side (seconds per unit times ``scale``, named
    ``A_cpu_<unit>``), the ratio of totals, the per-pair ratios' median and range, and a
    95 % bootstrap interval for the ratio of totals (pairs resampled with replacement; a
    fixed seed, so the same blocks give the same interval).
    """
    if not (len(a_cpu) == len(a_n) == len(b_cpu) == len(b_n)):
        raise ValueError("every block needs its CPU and its count of work on both sides")
    pairs = [(ac, an, bc, bn) for ac, an, bc, bn in zip(a_cpu, a_n, b_cpu, b_n, strict=True)
             if an > 0 and bn > 0 and ac > 0]

    def ratio(chosen: Sequence[tuple[float, int, float, int]]) -> float:
        a = sum(p[0] for p in chosen) / sum(p[1] for p in chosen)
        b = sum(p[2] for p in chosen) / sum(p[3] for p in chosen)
        return b / a if a > 0 else math.nan

    a_key, b_key = f"A_cpu_{unit}", f"B_cpu_{unit}"
    out: dict[str, Any] = {
        "pairs": len(pairs), "unit": unit, a_key: math.nan, b_key: math.nan,
        "ratio_B_over_A": math.nan, "pair_ratio_median": math.nan,
        "pair_ratio_min": math.nan, "pair_ratio_max": math.nan,
        "ratio_95_low": math.nan, "ratio_95_high": math.nan,
    }
    if not pairs:
        return out
    out[a_key] = sum(p[0] for p in pairs) / sum(p[1] for p in pairs) * scale
    out[b_key] = sum(p[2] for p in pairs) / sum(p[3] for p in pairs) * scale
    out["ratio_B_over_A"] = ratio(pairs)
    singles = sorted(ratio([p]) for p in pairs)
    out["pair_ratio_median"] = median(singles)
    out["pair_ratio_min"], out["pair_ratio_max"] = singles[0], singles[-1]
    rng = random.Random(seed)
    boot = sorted(ratio(rng.choices(pairs, k=len(pairs))) for _ in range(BOOTSTRAP_SAMPLES))
    out["ratio_95_low"] = percentile(boot, 2.5)
    out["ratio_95_high"] = percentile(boot, 97.5)
    return out


class _Side:
    """One server under test with its own load generators (and, for fan-out, its own
    publisher)."""

    def __init__(self, label: str, cmd: str, common: Common, connections: int,
                 key: str, secret: str, startup_timeout: float,
                 app_id: str = DEFAULT_APP_ID) -> None:
        self.label = label
        self.cmd = cmd
        self.startup_timeout = startup_timeout
        #: made at start: its free ports are picked once the other server listens
        self.server: ManagedServer | None = None
        self.nprocs = default_procs(connections, common.procs)
        self.common = common
        self.app_id, self.key, self.secret = app_id, key, secret
        self.pool: WorkerPool | None = None
        self.publisher: Publisher | None = None
        self.cpu: list[float] = []
        #: work done per block: connections opened, or deliveries received
        self.done: list[int] = []
        self.failed = 0
        self.errors: list[str] = []
        self.opened = 0
        self.published = 0

    async def start(self, progress: Progress) -> None:
        server = self.server = ManagedServer(self.cmd, "127.0.0.1", self.startup_timeout)
        progress(f"starting {self.label}: {server.cmd}", force=True)
        await asyncio.to_thread(server.start)
        self.pool = WorkerPool(self.nprocs, {
            "host": "127.0.0.1", "port": server.port, "key": self.key,
            "secret": self.secret, "tls": False, "tls_ca": "", "sources": self.common.sources})
        await self.pool.start()

    async def open(self, count: int, channel: str) -> int:
        """Open ``count`` more subscribed connections; return how many made it (the
        first few errors of those that did not are kept)."""
        assert self.pool is not None
        counts = split_counts(count, self.nprocs)
        args = [{"start": self.opened + sum(counts[:i]), "count": counts[i],
                 "channel": channel, "concurrency": self.common.connect_concurrency,
                 "timeout": self.common.connect_timeout} for i in range(self.nprocs)]
        replies = await self.pool.call_all("connect", args)
        self.opened += count
        failed = sum(r["failed"] for r in replies)
        if failed:
            self.failed += failed
            res = await self.pool.call_all("results")
            self.errors += [e for r in res for e in r["errors"]][:5]
        return int(sum(r["ok"] for r in replies))

    async def block(self, count: int, channel: str, settle: float) -> None:
        """Open ``count`` more subscribed connections and charge the server's CPU, up to
        ``settle`` seconds after the last one subscribed (work a server defers, such as
        a garbage collection or a timer's flush, is its own)."""
        assert self.server is not None
        before = tree_run_seconds(self.server.pid)
        ok = await self.open(count, channel)
        await asyncio.sleep(settle)
        self.cpu.append(tree_run_seconds(self.server.pid) - before)
        self.done.append(ok)

    async def deliveries(self) -> int:
        assert self.pool is not None
        return int(sum(s["deliveries"] for s in await self.pool.call_all("status")))

    async def publish_block(self, events: int, rate: float, channel: str, payload: int,
                            settle: float, stall: float) -> None:
        """Trigger ``events`` events at ``rate`` per second, wait until every subscriber
        has them all (or nothing arrived for ``stall`` seconds), and charge the server's
        CPU from the first trigger to ``settle`` seconds after the last delivery."""
        assert self.server is not None and self.publisher is not None
        want = self.opened * (self.published + events)
        start = await self.deliveries()
        before = tree_run_seconds(self.server.pid)
        await self.publisher.run(events, stamp_data(payload), channel, rate=rate)
        self.published += events
        have, last_change = start, time.monotonic()
        while have < want and time.monotonic() - last_change < stall:
            await asyncio.sleep(0.02)
            now = await self.deliveries()
            if now != have:
                have, last_change = now, time.monotonic()
        await asyncio.sleep(settle)
        self.cpu.append(tree_run_seconds(self.server.pid) - before)
        self.done.append(have - start)

    async def stop(self) -> None:
        try:
            if self.publisher is not None:
                self.publisher.close()
            if self.pool is not None:
                await self.pool.stop()
        finally:
            if self.server is not None:
                await asyncio.to_thread(self.server.stop)


async def _alternate(a: _Side, b: _Side, blocks: int,
                     run_block: Callable[[_Side, int], Awaitable[None]],
                     progress: Progress, what: Callable[[], str]) -> None:
    """Run block k of each side, A B, then B A, ...: a trend over the run weighs on both
    sides alike."""
    for k in range(blocks):
        for side in ((a, b) if k % 2 == 0 else (b, a)):
            await run_block(side, k)
        progress(f"block {k + 1}/{blocks}: {what()}")


async def run_connect_pair(cmd_a: str, cmd_b: str, common: Common, connections: int,
                           blocks: int, channel: str = "idle-{i}", key: str = "app-key",
                           secret: str = "app-secret", startup_timeout: float = 30.0,
                           settle: float = 0.25) -> dict[str, Any]:
    """Open ``connections`` subscribed connections to each of two servers in ``blocks``
    blocks, alternating A B B A ...; return the CPU per connect of each and their ratio."""
    blocks = max(1, min(blocks, connections))
    sizes = split_counts(connections, blocks)
    progress = Progress(common.progress)
    a = _Side("A", cmd_a, common, connections, key, secret, startup_timeout)
    b = _Side("B", cmd_b, common, connections, key, secret, startup_timeout)
    out: dict[str, Any] = {
        "scenario": "connect-pair", "A": cmd_a, "B": cmd_b,
        "params": {"connections": connections, "blocks": blocks, "channel": channel,
                   "connect_concurrency": common.connect_concurrency, "settle_s": settle},
        "ok": True, "failures": [],
    }
    try:
        for side in (a, b):
            await side.start(progress)
        await _alternate(a, b, blocks,
                         lambda side, k: side.block(sizes[k], channel, settle), progress,
                         lambda: f"{a.opened} + {b.opened} connections")
    finally:
        for side in (a, b):
            await side.stop()
    out["metrics"] = summarise_pairs(a.cpu, a.done, b.cpu, b.done)
    out["blocks"] = {"A_cpu_s": a.cpu, "A_ok": a.done, "B_cpu_s": b.cpu, "B_ok": b.done}
    for side in (a, b):
        if side.failed:
            _fail(out, f"{side.label}: {side.failed} of {connections} connect+subscribe failed")
    out["errors"] = a.errors + b.errors
    return out


async def run_fanout_pair(cmd_a: str, cmd_b: str, common: Common, subscribers: int,
                          rate: float, events: int, blocks: int, payload: int = 0,
                          channel: str = "bench", app_id: str = DEFAULT_APP_ID,
                          key: str = "app-key", secret: str = "app-secret",
                          inflight: int = 2, startup_timeout: float = 30.0,
                          settle: float = 0.25) -> dict[str, Any]:
    """Steady-rate fan-out of two servers side by side: ``subscribers`` on one channel of
    each, then ``blocks`` blocks per server of ``events`` events at ``rate`` per second,
    alternating A B B A ...; return the CPU per million deliveries of each and their
    ratio, with each side's delivery latency. Every subscriber must get every event."""
    progress = Progress(common.progress)
    a = _Side("A", cmd_a, common, subscribers, key, secret, startup_timeout, app_id)
    b = _Side("B", cmd_b, common, subscribers, key, secret, startup_timeout, app_id)
    out: dict[str, Any] = {
        "scenario": "fanout-pair", "A": cmd_a, "B": cmd_b,
        "params": {"subscribers": subscribers, "rate_per_s": rate, "events_per_block": events,
                   "blocks": blocks, "payload_pad": payload, "channel": channel,
                   "inflight": inflight, "settle_s": settle},
        "ok": True, "failures": [], "latency_ms": {},
        "metrics": summarise_pairs([], [], [], [], unit="s_per_million"),
    }
    try:
        for side in (a, b):
            await side.start(progress)
            assert side.server is not None
            side.publisher = Publisher("127.0.0.1", side.server.port, app_id, key, secret,
                                       inflight, keep=True)
            ok = await side.open(subscribers, channel)
            progress(f"{side.label}: {ok}/{subscribers} subscribed", force=True)
        if a.failed or b.failed:
            for side in (a, b):
                if side.failed:
                    _fail(out, f"{side.label}: {side.failed} of {subscribers} "
                               "subscriptions failed")
            out["errors"] = a.errors + b.errors
            return out
        try:
            await _alternate(
                a, b, blocks,
                lambda side, k: side.publish_block(events, rate, channel, payload, settle,
                                                   common.drain_timeout),
                progress, lambda: f"{a.published} + {b.published} events")
        except PublishRejected as exc:
            # a wrong app id or secret: every later trigger would get the same answer
            _fail(out, f"publishing stopped: {exc}")
            return out
        for side in (a, b):
            assert side.pool is not None and side.publisher is not None
            res = await side.pool.call_all("results")
            lat = array("q")
            for r in res:
                lat.frombytes(r["lat"])
            out["latency_ms"][side.label] = latency_summary_us(lat)
            counts = [(r["min_per_conn"], r["max_per_conn"]) for r in res if r["live"]]
            lo, hi = min(c[0] for c in counts), max(c[1] for c in counts)
            if (lo, hi) != (side.published, side.published):
                _fail(out, f"{side.label}: per-connection deliveries {lo}..{hi}, expected "
                           f"exactly {side.published}")
            if side.publisher.failed:
                _fail(out, f"{side.label}: {side.publisher.failed} HTTP triggers failed")
            closes = sum(r["unexpected_closes"] for r in res)
            if closes:
                _fail(out, f"{side.label}: {closes} connections closed unexpectedly")
            side.errors += side.publisher.errors + [e for r in res for e in r["errors"]][:5]
    finally:
        for side in (a, b):
            await side.stop()
    out["metrics"] = summarise_pairs(a.cpu, a.done, b.cpu, b.done, unit="s_per_million",
                                     scale=1e6)
    out["blocks"] = {"A_cpu_s": a.cpu, "A_deliveries": a.done, "B_cpu_s": b.cpu,
                     "B_deliveries": b.done}
    out["errors"] = a.errors + b.errors
    return out


def format_pair(result: dict[str, Any]) -> str:
    """The result as a few lines of text."""
    m = result["metrics"]
    p = result["params"]
    if result["scenario"] == "fanout-pair":
        head = (f"fanout-pair: {p['subscribers']} subscribers on each server, "
                f"{p['blocks']} alternating blocks of {p['events_per_block']} events at "
                f"{p['rate_per_s']:g}/s")
        what, unit, fmt = "CPU per million deliveries", "s", "{:.2f}"
    else:
        head = (f"connect-pair: {p['connections']} connections to each server in "
                f"{p['blocks']} alternating blocks")
        what, unit, fmt = "CPU per connect+subscribe", "ms", "{:.3f}"
    lines = [head, f"A = {result['A']}", f"B = {result['B']}"]
    for side in "AB":
        value = fmt.format(m[f"{side}_cpu_{m['unit']}"])
        lines.append(f"{side} server {what}  {value} {unit}")
    for side, lat in result.get("latency_ms", {}).items():
        lines.append(f"{side} latency ms  p50 {lat['p50']:.2f}  p99 {lat['p99']:.2f}  "
                     f"max {lat['max']:.2f}")
    lines += [
        f"B / A  {m['ratio_B_over_A']:.3f}  "
        f"(95% bootstrap interval {m['ratio_95_low']:.3f}..{m['ratio_95_high']:.3f})",
        f"per pair of blocks: median {m['pair_ratio_median']:.3f}, "
        f"range {m['pair_ratio_min']:.3f}..{m['pair_ratio_max']:.3f} ({m['pairs']} pairs)",
    ]
    lines += [f"FAILED: {f}" for f in result["failures"]]
    return "\n".join(lines)
