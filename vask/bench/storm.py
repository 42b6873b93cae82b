"""The reconnect-storm scenario: every client dropped at once, all reconnect at once.

A deploy or a network blip drops every connection of a server together, and every
client comes back within the same second; what that costs is what a connection costs,
times all of them. The scenario connects C clients (spread over the loadgen
processes, on ``--channels`` public channels), then drops them all in one of two ways:

* ``restart`` (any server): the server's whole process tree is killed with SIGKILL
  and the same command is started again on the same ports, as after a crash or the
  harshest deploy. Clients see their connections end at once and retry; a refused
  connect (nothing listens yet) is retried with a short, growing, jittered delay.
* ``signal`` (a server with a signal-driven restart, e.g. Vask's SIGUSR2 rolling
  restart): the signal goes to the server's root process and the server closes
  the connections itself (Vask sends 4200, "reconnect").

Each client reconnects and resubscribes as soon as it is dropped. The figures are the
time from the drop until the last client is subscribed again, the server CPU that
took, and the failed reconnects (anything but a refused connect). Correctness: every
client must come back, none may be dropped again after coming back, and one event
per channel, triggered afterwards, must reach every client exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import signal
import time
from typing import Any

from vask.bench.httppub import Publisher
from vask.bench.loadgen import now_us
from vask.bench.procstat import parent_map
from vask.bench.report import Meter
from vask.bench.scenarios import Common, Session, Target, _base, _fail
from vask.bench.stats import safe_div

MAX_CHANNELS_PER_TRIGGER = 100  # the Pusher HTTP API's limit


SHELLS = frozenset({"sh", "bash", "dash"})


def main_process(root: int) -> int:
    """The server's own root: below any shell that ``--server-cmd`` ran it under.

    ``/bin/sh -c CMD`` may fork rather than exec; a signal meant for the server (its
    restart signal) must reach the server's process, not the shell.
    """
    pid = root
    for _ in range(8):
        try:
            with open(f"/proc/{pid}/comm", encoding="utf-8") as f:
                comm = f.read().strip()
        except OSError:
            return pid
        kids = parent_map().get(pid, [])
        if comm not in SHELLS or len(kids) != 1:
            return pid
        pid = kids[0]
    return pid


async def _listening(host: str, port: int, deadline: float) -> bool:
    """Poll every 10 ms until ``host:port`` accepts TCP, or ``deadline`` passes."""
    while time.monotonic() < deadline:
        try:
            _r, w = await asyncio.open_connection(host, port)
        except OSError:
            await asyncio.sleep(0.01)
            continue
        w.close()
        with contextlib.suppress(OSError):
            await w.wait_closed()
        return True
    return False


async def run_storm(
    target: Target,
    common: Common,
    connections: int,
    channels: int = 100,
    mode: str = "restart",
    sig: str = "USR2",
    retry_min: float = 0.05,
    retry_max: float = 0.5,
    timeout: float = 120.0,
) -> dict[str, Any]:
    """C clients on ``channels`` channels are dropped at once; measure until all are back."""
    channels = max(1, min(channels, connections))
    async with Session(target, common, connections) as s:
        out = _base("storm", {"connections": connections, "channels": channels,
                              "mode": mode, "signal": sig if mode == "signal" else None,
                              "retry_min_s": retry_min, "retry_max_s": retry_max}, s)
        m = out["metrics"]
        _ok, failed, took, errs = await s.connect(connections, "storm-{g}",
                                                 groups=channels)
        m["connect_s"] = took
        if failed:
            _fail(out, f"{failed} of {connections} connect+subscribe failed")
            out["errors"] = errs
            return out
        await s.p.call_all("storm_arm", {"retry_min": retry_min, "retry_max": retry_max,
                                         "timeout": common.connect_timeout})
        lg = Meter(None, [os.getpid(), *s.p.pids])
        lg.begin()
        deadline = time.monotonic() + timeout
        t_drop = now_us()
        t_listen = t_drop  # when the (restarted) server accepts connections again
        listen_cpu = math.nan
        if mode == "restart":
            server = s.server
            if server is None:
                raise ValueError("--mode restart needs --server-cmd (the bench restarts it)")
            await asyncio.to_thread(server.kill)
            t_killed = now_us()
            server.launch()
            s.server_root = server.pid
            srv = Meter(server.pid, [])
            srv.begin()
            up = await _listening(target.host, s.t.port, deadline)
            t_listen = now_us()
            server.remember_tree()
            listen_cpu = srv.end().server_cpu
            m["kill_s"] = (t_killed - t_drop) / 1e6
            m["listen_after_drop_s"] = (t_listen - t_drop) / 1e6
            m["server_startup_cpu_s"] = listen_cpu
            if not up:
                _fail(out, "the restarted server did not listen in time")
                return out
        elif mode == "signal":
            if s.server_root is None:
                raise ValueError("--mode signal needs --server-cmd or --server-pid")
            srv = Meter(s.server_root, [])
            srv.begin()
            pid = main_process(s.server_root)
            out["params"]["signalled_pid"] = pid
            os.kill(pid, getattr(signal, f"SIG{sig.upper().removeprefix('SIG')}"))
        else:
            raise ValueError(f"unknown mode {mode!r}")
        st: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            if s.server is not None:
                s.server.remember_tree()  # workers started later are measured too
            st = await s.p.call_all("storm_status")
            ever = sum(x["ever"] for x in st)
            down = sum(x["down"] for x in st)
            s.progress(f"storm: {ever - down:,}/{connections:,} back "
                       f"({ever:,} dropped, {sum(x['failed'] for x in st)} failed)")
            if ever >= connections and down == 0:
                break
            await asyncio.sleep(0.02)
        win = srv.end()
        lg_win = lg.end()
        # Failures of attempts begun before the restarted server listened hit the dying
        # one (its listener can outlive the process by a moment): part of the outage.
        st = await s.p.call_all("storm_disarm", {"listen_t": t_listen})
        back_t = max(x["last_back_t"] for x in st)
        all_back = sum(x["ever"] for x in st) >= connections and not sum(x["down"] for x in st)
        m["all_back_s"] = (back_t - t_drop) / 1e6 if all_back else math.nan
        if mode == "restart":
            m["reconnect_after_listen_s"] = m["all_back_s"] - m["listen_after_drop_s"]
        m["dropped"] = sum(x["ever"] for x in st)
        m["reconnected"] = sum(x["back"] for x in st)
        m["attempts"] = sum(x["attempts"] for x in st)
        m["refused"] = sum(x["refused"] for x in st)
        m["failed_reconnects"] = sum(x["failed_after_listen"] for x in st)
        m["failed_before_listen"] = sum(x["failed"] for x in st) - m["failed_reconnects"]
        m["dropped_again"] = sum(x["redrops"] for x in st)
        m["server_cpu_s"] = win.server_cpu
        if mode == "restart":
            m["server_reconnect_cpu_s"] = win.server_cpu - listen_cpu
        m["server_cpu_ms_per_reconnect"] = safe_div(
            m.get("server_reconnect_cpu_s", win.server_cpu), m["reconnected"]) * 1e3
        m["loadgen_cpu_s"] = lg_win.loadgen_cpu
        out["resources"]["storm"] = win.as_dict()
        storm_errors = [e for x in st for e in x["errors"]][:10]
        if not all_back:
            _fail(out, f"{m['dropped'] - sum(x['down'] for x in st)} of {connections} "
                       f"back within {timeout:.0f}s")
        if m["failed_reconnects"]:
            _fail(out, f"{m['failed_reconnects']} failed reconnects")
        if m["dropped"] != connections:
            _fail(out, f"{m['dropped']} of {connections} clients were dropped")
        if mode == "restart" and m["dropped_again"]:
            _fail(out, f"{m['dropped_again']} clients dropped again after coming back")
        verified = await _verify(s, target, connections, channels, out) if all_back else False
        m["verified_exact_delivery"] = verified
        r = await s.results()
        out["errors"] = storm_errors + r["errors"]
        if r["unexpected_closes"]:
            _fail(out, f"{r['unexpected_closes']} connections closed after the storm")
        return out


async def _verify(s: Session, target: Target, connections: int, channels: int,
                  out: dict[str, Any]) -> bool:
    """One event per channel after the storm: every client must get exactly one."""
    await s.p.call_all("reset")
    pub = Publisher(target.host, s.t.port, target.app_id, target.key, target.secret, 1)
    names = [f"storm-{g}" for g in range(channels)]
    for i in range(0, channels, MAX_CHANNELS_PER_TRIGGER):
        data = f'{{"m":"~ts{now_us()}~"}}'
        try:
            await pub.trigger("bench", names[i:i + MAX_CHANNELS_PER_TRIGGER], data)
        except (RuntimeError, OSError) as e:
            _fail(out, f"verification trigger failed: {e}")
            return False
    complete = await s.wait_for("verify", lambda st: (sum(x["deliveries"] for x in st),
                                                       connections))
    r = await s.results()
    exact = (complete and r["deliveries"] == connections
             and r["min_per_conn"] == r["max_per_conn"] == 1)
    if not exact:
        _fail(out, f"after the storm {r['deliveries']}/{connections} deliveries, per client "
                   f"{r['min_per_conn']}..{r['max_per_conn']} (expected exactly 1)")
    return exact
