"""Resource metering, bottleneck attribution and human-readable output."""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from vask.bench.procstat import (
    TreeSample,
    cpu_delta,
    machine_busy_seconds,
    sample_pids,
    sample_tree,
)

SATURATED = 0.9  # fraction of a core (or of the machine) counted as "saturated"


def bottleneck(
    wall: float,
    server_cpu: dict[int, float] | None,
    loadgen_cpu: dict[int, float],
    machine_busy: float,
    ncpu: int,
) -> str:
    """Name what limited a measurement window from CPU use.

    Python load-generator processes and single-threaded servers (soketi) are
    each capped at one core, so a single process near 100% of a core is
    saturated even when the machine has idle cores. When the whole machine is
    busy, the measurement reflects the machine rather than either side.
    """
    if wall <= 0:
        return "unknown (empty window)"
    lg_total = sum(loadgen_cpu.values()) / wall
    lg_max = max(loadgen_cpu.values(), default=0.0) / wall
    mu = machine_busy / wall
    if server_cpu is None:
        srv_txt = "server not measured"
        srv_total = srv_max = math.nan
    else:
        srv_total = sum(server_cpu.values()) / wall
        srv_max = max(server_cpu.values(), default=0.0) / wall
        srv_txt = f"server {srv_total:.2f}"
    other = mu - lg_total - (0.0 if math.isnan(srv_total) else srv_total)
    usage = f"{srv_txt}, loadgen {lg_total:.2f}, other {max(other, 0.0):.2f} cores"
    if mu >= SATURATED * ncpu:
        heavier = "load generator" if math.isnan(srv_total) or lg_total > srv_total else "server"
        return f"machine: {mu:.2f} of {ncpu} cores busy ({usage}); {heavier} uses most"
    if not math.isnan(srv_max) and srv_max >= SATURATED:
        return f"server: one server process at {srv_max:.0%} of a core ({usage})"
    if lg_max >= SATURATED:
        return f"load generator: one loadgen process at {lg_max:.0%} of a core ({usage})"
    return f"none saturated: latency/rate-bound ({usage})"


@dataclass
class Window:
    """CPU accounting over a measurement window (server tree, loadgen, machine)."""

    wall: float
    server: dict[int, float] | None
    loadgen: dict[int, float]
    machine_busy: float
    ncpu: int = field(default_factory=lambda: os.cpu_count() or 1)

    @property
    def server_cpu(self) -> float:
        """Server CPU seconds in the window (nan if the server is not known)."""
        return math.nan if self.server is None else sum(self.server.values())

    @property
    def loadgen_cpu(self) -> float:
        """Load-generator CPU seconds (parent + workers) in the window."""
        return sum(self.loadgen.values())

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly summary."""
        return {
            "wall_s": round(self.wall, 4),
            "server_cpu_s": _r(self.server_cpu),
            "server_processes": None if self.server is None else len(self.server),
            "server_max_process_util": None
            if not self.server
            else _r(max(self.server.values()) / self.wall if self.wall else math.nan),
            "loadgen_cpu_s": _r(self.loadgen_cpu),
            "loadgen_processes": len(self.loadgen),
            "loadgen_max_process_util": _r(
                max(self.loadgen.values(), default=0.0) / self.wall if self.wall else math.nan
            ),
            "machine_busy_cores": _r(self.machine_busy / self.wall if self.wall else math.nan),
            "cpus": self.ncpu,
            "bottleneck": bottleneck(
                self.wall, self.server, self.loadgen, self.machine_busy, self.ncpu
            ),
        }


class Meter:
    """Takes begin/end samples of the server tree, the load generator and the machine."""

    def __init__(self, server_root: int | None, loadgen_pids: list[int]) -> None:
        self.server_root = server_root
        self.loadgen_pids = loadgen_pids
        self._t0 = 0.0
        self._srv0: TreeSample | None = None
        self._lg0: TreeSample | None = None
        self._m0 = 0.0

    def begin(self) -> None:
        """Start a window."""
        self._t0 = time.monotonic()
        self._srv0 = sample_tree(self.server_root) if self.server_root else None
        self._lg0 = sample_pids(self.loadgen_pids)
        self._m0 = machine_busy_seconds()[0]

    def end(self) -> Window:
        """Close the window and return the accounting."""
        wall = time.monotonic() - self._t0
        srv: dict[int, float] | None = None
        if self.server_root and self._srv0 is not None:
            srv = cpu_delta(self._srv0, sample_tree(self.server_root))
        assert self._lg0 is not None
        lg = cpu_delta(self._lg0, sample_pids(self.loadgen_pids))
        busy = machine_busy_seconds()[0] - self._m0
        return Window(wall, srv, lg, busy)

    def memory(self) -> tuple[int, int] | None:
        """(RSS, PSS) in KiB summed over the server tree, or None if unknown."""
        if not self.server_root:
            return None
        s = sample_tree(self.server_root, memory=True)
        return s.rss_kb, s.pss_kb


def _r(x: float, nd: int = 4) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(x, nd)


class Progress:
    """Throttled progress lines on stderr (one per second at most)."""

    def __init__(self, enabled: bool = True, every: float = 1.0) -> None:
        self.enabled = enabled
        self.every = every
        self._last = 0.0
        self._tty = sys.stderr.isatty()

    def __call__(self, text: str, force: bool = False) -> None:
        """Print ``text`` if enough time has passed (or ``force``)."""
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < self.every:
            return
        self._last = now
        if self._tty:
            sys.stderr.write("\r\x1b[K" + text)
            if force:
                sys.stderr.write("\n")
        else:
            sys.stderr.write(text + "\n")
        sys.stderr.flush()


def format_table(result: dict[str, Any]) -> str:
    """Render a result dict as an aligned two-column table."""
    rows: list[tuple[str, str]] = []
    status = "PASS" if result.get("ok") else "FAIL"
    rows.append(("scenario", f"{result['scenario']}  [{status}]"))
    if result.get("target"):
        rows.append(("target", str(result["target"])))
    for k, v in result.get("params", {}).items():
        rows.append((f"param.{k}", _fmt(v)))
    for k, v in result.get("metrics", {}).items():
        if isinstance(v, dict):
            rows.append((k, "  ".join(f"{kk}={_fmt(vv)}" for kk, vv in v.items())))
        else:
            rows.append((k, _fmt(v)))
    for phase, res in result.get("resources", {}).items():
        for k, v in res.items():
            rows.append((f"{phase}.{k}", _fmt(v)))
    for f in result.get("failures", []):
        rows.append(("FAILURE", f))
    for e in result.get("errors", [])[:5]:
        rows.append(("error", e))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "n/a"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    if v is None:
        return "n/a"
    return str(v)
