"""Starting, waiting for and stopping a server under test (``--server-cmd``).

The server runs in its own process group so that it can be stopped as a whole; any
descendant that escaped the group is killed afterwards by PID. It stays in the bench's
session: Linux's autogroup scheduling (``/proc/sys/kernel/sched_autogroup_enabled``)
shares the CPU between sessions first, so a server in a session of its own would get
one group's share against the load generator's, however many processes it runs. On a
2-core machine that capped a 4-process Vask at about one core and turned its saturated
fan-out p99 from about 0.2 s into about 4 s (docs/benchmarks.md, "Scheduling").
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time

from vask.bench.procstat import process_tree

PORT_RANGE = (17000, 17999)


def free_port(exclude: set[int] | None = None) -> int:
    """Pick a port in 17000-17999 that is currently free for TCP and UDP on 127.0.0.1.

    Starts at a random offset because other people may be binding ports in the
    same range at the same time.
    """
    exclude = exclude or set()
    lo, hi = PORT_RANGE
    ports = list(range(lo, hi + 1))
    random.shuffle(ports)
    for port in ports:
        if port in exclude:
            continue
        ok = True
        for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
            s = socket.socket(socket.AF_INET, kind)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                ok = False
            finally:
                s.close()
            if not ok:
                break
        if ok:
            return port
    raise RuntimeError("no free port in 17000-17999")


def substitute_ports(cmd: str) -> tuple[str, int]:
    """Replace ``{port}`` (and ``{port2}``..``{port9}``) with distinct free ports.

    Returns the command and the main port. Extra placeholders exist because
    some servers (soketi) open further ports (metrics, discovery) that must
    stay in the allowed range too.
    """
    used: set[int] = set()
    main = free_port(used)
    used.add(main)
    cmd = cmd.replace("{port}", str(main))
    for i in range(2, 10):
        ph = f"{{port{i}}}"
        if ph in cmd:
            p = free_port(used)
            used.add(p)
            cmd = cmd.replace(ph, str(p))
    return cmd, main


def wait_for_port(
    host: str, port: int, timeout: float, proc: subprocess.Popen[bytes] | None
) -> None:
    """Block until ``host:port`` accepts TCP connections; raise on timeout or early exit."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with status {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.1)
    raise RuntimeError(f"server did not listen on {host}:{port} within {timeout:.0f}s")


def listening_ports() -> set[int]:
    """TCP ports with a socket in LISTEN state on this host (from /proc/net/tcp, tcp6)."""
    ports: set[int] = set()
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(name, encoding="ascii") as f:
            next(f, None)
            for line in f:
                fields = line.split()
                if len(fields) > 3 and fields[3] == "0A":  # TCP_LISTEN
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().decode("ascii", "replace").rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def _start_time(pid: int) -> str | None:
    fields = _stat_fields(pid)
    return fields[19] if fields is not None else None


class ManagedServer:
    """A server started from a shell command in its own process group."""

    def __init__(self, cmd: str, host: str = "127.0.0.1", startup_timeout: float = 30.0,
                 log_path: str | None = None) -> None:
        self.cmd, self.port = substitute_ports(cmd)
        self.host = host
        self.startup_timeout = startup_timeout
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        # pid -> start time (jiffies since boot): guards against killing a reused PID.
        self._known: dict[int, str] = {}

    @property
    def pid(self) -> int:
        """PID of the root process (the shell running the command, or what it exec'd)."""
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        """Start the command and wait until its port accepts connections."""
        self.launch()
        try:
            wait_for_port(self.host, self.port, self.startup_timeout, self.proc)
        except Exception:
            self.stop()
            raise
        self.remember_tree()

    def launch(self) -> None:
        """Start the command (same ports as before) without waiting for it to listen."""
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(
            ["/bin/sh", "-c", self.cmd],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out if self.log_path else sys.stderr,
            process_group=0,  # own process group, pgid == pid; same session (see above)
        )
        if self.log_path and not isinstance(out, int):
            out.close()

    def kill(self) -> None:
        """SIGKILL the whole tree at once, as a crash would: every connection drops.

        Used by the reconnect-storm scenario, which then has :meth:`launch` start the same
        command on the same ports. Waits until every known process is gone, so the
        port is free for the restart.
        """
        if self.proc is None:
            return
        self.remember_tree()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        for pid in self._alive_known():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self._alive_known():
            time.sleep(0.01)
        # The listening socket can outlive its process for a moment (e.g. while an
        # io_uring instance releases its file references); a restart must not start
        # before it is gone, or the probe for "listening again" would hit the old one.
        while time.monotonic() < deadline and self.port in listening_ports():
            time.sleep(0.005)
        self._known.clear()
        self.proc = None

    def remember_tree(self) -> None:
        """Record the current tree so escaped descendants can still be killed by PID."""
        if self.proc is not None:
            for pid in process_tree(self.proc.pid):
                st = _start_time(pid)
                if st is not None:
                    self._known.setdefault(pid, st)

    def stop(self, grace: float = 5.0) -> None:
        """Stop the whole tree: SIGTERM the group, wait, then SIGKILL leftovers by PID."""
        if self.proc is None:
            return
        self.remember_tree()
        pgid = self.proc.pid
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
            self.proc.wait(timeout=grace)
        # Children may outlive the shell (e.g. re-parented workers); give them
        # a moment after SIGTERM, then kill any that are still ours by PID.
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and self._alive_known():
            time.sleep(0.1)
        for pid in self._alive_known():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)  # anything else still in the group
        self.proc = None

    def _alive_known(self) -> list[int]:
        alive = []
        for pid, started in self._known.items():
            fields = _stat_fields(pid)
            # Same PID *and* same start time, i.e. still the process we saw.
            if fields is not None and fields[0] != "Z" and fields[19] == started:
                alive.append(pid)
        return alive

    def __enter__(self) -> ManagedServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
