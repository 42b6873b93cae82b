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
from collections.abc import Sequence
from typing import Any

from vask.bench.pool import WorkerPool, split_counts
from vask.bench.procstat import tree_run_seconds
from vask.bench.report import Progress
from vask.bench.scenarios import Common, default_procs
from vask.bench.server import ManagedServer
from vask.bench.stats import median, percentile

BOOTSTRAP_SAMPLES = 2000


def summarise_pairs(a_cpu: Sequence[float], a_ok: Sequence[int], b_cpu: Sequence[float],
                    b_ok: Sequence[int], seed: int = 1) -> dict[str, Any]:
    """Pure: B's CPU per connection over A's, from per-block CPU seconds and
    connection counts (block k of A is paired with block k of B).

    Returns the totals, the ratio of totals, the per-pair ratios' median and range, and
    a 95 % bootstrap interval for the ratio of totals (pairs resampled with
    replacement; a fixed seed, so the same blocks give the same interval).
    """
    if not (len(a_cpu) == len(a_ok) == len(b_cpu) == len(b_ok)):
        raise ValueError("every block needs its CPU and its connection count on both sides")
    pairs = [(ac, ao, bc, bo) for ac, ao, bc, bo in zip(a_cpu, a_ok, b_cpu, b_ok, strict=True)
             if ao > 0 and bo > 0 and ac > 0]

    def ratio(chosen: Sequence[tuple[float, int, float, int]]) -> float:
        a = sum(p[0] for p in chosen) / sum(p[1] for p in chosen)
        b = sum(p[2] for p in chosen) / sum(p[3] for p in chosen)
        return b / a if a > 0 else math.nan

    out: dict[str, Any] = {
        "pairs": len(pairs),
        "A_cpu_ms_per_conn": math.nan, "B_cpu_ms_per_conn": math.nan,
        "ratio_B_over_A": math.nan, "pair_ratio_median": math.nan,
        "pair_ratio_min": math.nan, "pair_ratio_max": math.nan,
        "ratio_95_low": math.nan, "ratio_95_high": math.nan,
    }
    if not pairs:
        return out
    out["A_cpu_ms_per_conn"] = sum(p[0] for p in pairs) / sum(p[1] for p in pairs) * 1e3
    out["B_cpu_ms_per_conn"] = sum(p[2] for p in pairs) / sum(p[3] for p in pairs) * 1e3
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
    """One server under test with its own load generators."""

    def __init__(self, label: str, cmd: str, common: Common, connections: int,
                 key: str, secret: str, startup_timeout: float) -> None:
        self.label = label
        self.cmd = cmd
        self.startup_timeout = startup_timeout
        #: made at start: its free ports are picked once the other server listens
        self.server: ManagedServer | None = None
        self.nprocs = default_procs(connections, common.procs)
        self.common = common
        self.key, self.secret = key, secret
        self.pool: WorkerPool | None = None
        self.cpu: list[float] = []
        self.ok: list[int] = []
        self.failed = 0
        self.errors: list[str] = []
        self.opened = 0

    async def start(self, progress: Progress) -> None:
        server = self.server = ManagedServer(self.cmd, "127.0.0.1", self.startup_timeout)
        progress(f"starting {self.label}: {server.cmd}", force=True)
        await asyncio.to_thread(server.start)
        self.pool = WorkerPool(self.nprocs, {
            "host": "127.0.0.1", "port": server.port, "key": self.key,
            "secret": self.secret, "tls": False, "tls_ca": "", "sources": self.common.sources})
        await self.pool.start()

    async def block(self, count: int, channel: str, settle: float) -> None:
        """Open ``count`` more subscribed connections and charge the server's CPU, up to
        ``settle`` seconds after the last one subscribed (work a server defers, such as
        a garbage collection or a timer's flush, is its own)."""
        assert self.pool is not None and self.server is not None
        root = self.server.pid
        counts = split_counts(count, self.nprocs)
        args = [{"start": self.opened + sum(counts[:i]), "count": counts[i],
                 "channel": channel, "concurrency": self.common.connect_concurrency,
                 "timeout": self.common.connect_timeout} for i in range(self.nprocs)]
        before = tree_run_seconds(root)
        replies = await self.pool.call_all("connect", args)
        await asyncio.sleep(settle)
        used = tree_run_seconds(root) - before
        self.opened += count
        ok = sum(r["ok"] for r in replies)
        failed = sum(r["failed"] for r in replies)
        self.cpu.append(used)
        self.ok.append(ok)
        if failed:
            self.failed += failed
            res = await self.pool.call_all("results")
            self.errors += [e for r in res for e in r["errors"]][:5]

    async def stop(self) -> None:
        try:
            if self.pool is not None:
                await self.pool.stop()
        finally:
            if self.server is not None:
                await asyncio.to_thread(self.server.stop)


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
        for k, size in enumerate(sizes):
            # A B, then B A: a trend over the run weighs on both sides alike
            for side in ((a, b) if k % 2 == 0 else (b, a)):
                await side.block(size, channel, settle)
            progress(f"block {k + 1}/{blocks}: {a.opened} + {b.opened} connections")
    finally:
        for side in (a, b):
            await side.stop()
    out["metrics"] = summarise_pairs(a.cpu, a.ok, b.cpu, b.ok)
    out["blocks"] = {"A_cpu_s": a.cpu, "A_ok": a.ok, "B_cpu_s": b.cpu, "B_ok": b.ok}
    for side in (a, b):
        if side.failed:
            out["ok"] = False
            out["failures"].append(
                f"{side.label}: {side.failed} of {connections} connect+subscribe failed")
    out["errors"] = a.errors + b.errors
    return out


def format_pair(result: dict[str, Any]) -> str:
    """The result as a few lines of text."""
    m = result["metrics"]
    lines = [
        f"connect-pair: {result['params']['connections']} connections to each server in "
        f"{result['params']['blocks']} alternating blocks",
        f"A = {result['A']}",
        f"B = {result['B']}",
        f"A server CPU per connect+subscribe  {m['A_cpu_ms_per_conn']:.3f} ms",
        f"B server CPU per connect+subscribe  {m['B_cpu_ms_per_conn']:.3f} ms",
        f"B / A                               {m['ratio_B_over_A']:.3f}  "
        f"(95% bootstrap interval {m['ratio_95_low']:.3f}..{m['ratio_95_high']:.3f})",
        f"per pair of blocks: median {m['pair_ratio_median']:.3f}, "
        f"range {m['pair_ratio_min']:.3f}..{m['pair_ratio_max']:.3f} ({m['pairs']} pairs)",
    ]
    lines += [f"FAILED: {f}" for f in result["failures"]]
    return "\n".join(lines)
