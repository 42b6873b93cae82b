"""``vask run``: bind the shards, start the broker and the workers, keep them alive.

* One SO_REUSEPORT listening socket per worker slot is bound here and stays open for the
  supervisor's whole life, so a restarted worker takes over the same socket and
  connections queued in its backlog meanwhile are not lost.
* Children are forked; each asks the kernel to signal it when the supervisor dies, so
  even ``kill -9`` of the supervisor leaves no orphan.
* A crashed child is restarted with exponential back-off. A child that exits with
  :data:`STARTUP_FAILURE`, or dies within :data:`EARLY_DEATH` seconds of starting
  :data:`MAX_EARLY_DEATHS` times in a row, stops the supervisor (exit status 1).
* Signal handlers only write to a wake-up pipe; the main loop does the work.
  SIGTERM/SIGINT: stop workers (they close clients with 4200), then the broker; exit 0.
* When a worker dies the supervisor tells the broker at once (a control pipe), so its
  connections' presence members and channels are cleaned up without waiting for the
  heartbeat timeout.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import multiprocessing
import os
import select
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess

from vask.config import Settings
from vask.logs import setup_logging
from vask.process import STARTUP_FAILURE, set_process_name

log = logging.getLogger("vask.supervisor")

EARLY_DEATH = 3.0
MAX_EARLY_DEATHS = 5
MAX_BACKOFF = 10.0

_fork = multiprocessing.get_context("fork")


def bind_shards(host: str, port: int, count: int) -> list[socket.socket]:
    """``count`` listening sockets on one port, each its own SO_REUSEPORT shard.

    SO_REUSEPORT would also let a second, unrelated ``vask run`` share the port and
    silently split clients between two clusters, so the port is first probed with a
    plain bind that fails if anything already listens there.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if port:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))  # raises EADDRINUSE when the port is taken
    shards = []
    for _ in range(count):
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
        sock.listen(4096)
        sock.set_inheritable(True)
        shards.append(sock)
        if port == 0:  # let the kernel pick once, then share it
            port = sock.getsockname()[1]
    return shards


@dataclass
class Child:
    """One supervised process slot (the broker, or worker ``slot``)."""

    role: str
    slot: int
    process: BaseProcess | None = None
    started: float = 0.0
    early_deaths: int = 0
    restart_at: float = 0.0
    history: list[float] = field(default_factory=list)

    @property
    def label(self) -> str:
        return self.role if self.role == "broker" else f"worker {self.slot}"


class Supervisor:
    """Owns the shards and the children; see the module docstring."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.runtime_dir = tempfile.mkdtemp(prefix="vask-")
        self.endpoint = settings.broker or f"ipc://{self.runtime_dir}/broker.sock"
        self.own_broker = not settings.broker  # else workers join an external broker
        self.shards: list[socket.socket] = []
        self.children: list[Child] = []
        self.wake_r, self.wake_w = os.pipe()
        self.control_r, self.control_w = os.pipe()
        self.stopping = False
        self.reload_asked = False
        self.exit_status = 0
        self.pid = os.getpid()

    # --- starting -------------------------------------------------------------------

    def start(self) -> None:
        s = self.settings
        self.shards = bind_shards(s.host, s.port, s.workers)
        self.port = self.shards[0].getsockname()[1]
        os.set_blocking(self.wake_w, False)
        os.set_blocking(self.wake_r, False)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGHUP):
            signal.signal(signum, self._on_signal)
        signal.set_wakeup_fd(self.wake_w)
        if self.own_broker:
            self.children.append(Child("broker", -1))
        self.children += [Child("worker", i) for i in range(s.workers)]
        # Children share the supervisor's heap copy-on-write; keep the collector from
        # touching (and so un-sharing) those pages in every child.
        gc.collect()
        gc.freeze()
        for child in self.children:
            self._spawn(child)

    def _on_signal(self, signum: int, frame: object) -> None:
        # Only note it; the wake-up fd wakes the main loop, which acts.
        if signum in (signal.SIGTERM, signal.SIGINT):
            self.stopping = True
        elif signum == signal.SIGHUP:
            self.reload_asked = True

    def _spawn(self, child: Child) -> None:
        settings, endpoint, parent = self.settings, self.endpoint, self.pid
        if child.role == "broker":
            process = _fork.Process(
                target=_broker_main, args=(settings, endpoint, parent, self.control_r),
                name="vask-broker", daemon=False)
        else:
            fd = self.shards[child.slot].fileno()
            process = _fork.Process(
                target=_worker_main, args=(settings, endpoint, child.slot, fd, parent),
                name=f"vask-worker-{child.slot}", daemon=False)
        process.start()
        child.process = process
        child.started = time.monotonic()
        log.debug("started %s (pid %s)", child.label, process.pid)

    # --- running --------------------------------------------------------------------

    def run(self) -> int:
        try:
            while not self.stopping:
                with contextlib.suppress(InterruptedError):
                    select.select([self.wake_r], [], [], 0.5)
                with contextlib.suppress(BlockingIOError):
                    os.read(self.wake_r, 4096)
                if self.reload_asked:
                    self.reload_asked = False
                    log.warning("SIGHUP: configuration reload is not supported yet; "
                                "restart vask to apply changes")
                if not self.stopping:
                    self._check_children()
        finally:
            self.stop()
        return self.exit_status

    def _check_children(self) -> None:
        now = time.monotonic()
        for child in self.children:
            process = child.process
            if process is None:
                if child.restart_at and now >= child.restart_at:
                    child.restart_at = 0.0
                    self._spawn(child)
                continue
            if process.is_alive():
                if now - child.started > EARLY_DEATH:
                    child.early_deaths = 0
                continue
            code = process.exitcode
            process.join(0)
            child.process = None
            if child.role == "worker":
                self._tell_broker_dead(child, process.pid)
            if code == STARTUP_FAILURE:
                log.error("%s failed to start (see its error above); stopping", child.label)
                self.exit_status = 1
                self.stopping = True
                return
            if now - child.started < EARLY_DEATH:
                child.early_deaths += 1
            if child.early_deaths >= MAX_EARLY_DEATHS:
                log.error("%s keeps dying at startup (exit status %s); stopping",
                          child.label, code)
                self.exit_status = 1
                self.stopping = True
                return
            delay = min(MAX_BACKOFF, 0.1 * (2 ** child.early_deaths)) if child.early_deaths else 0
            log.warning("%s (pid %s) exited with status %s; restarting in %.1fs",
                        child.label, process.pid, code, delay)
            child.restart_at = now + delay
            if delay == 0:
                child.restart_at = 0.0
                self._spawn(child)

    def _tell_broker_dead(self, child: Child, pid: int | None) -> None:
        if not self.own_broker:
            return  # an external broker notices through missing heartbeats
        name = f"{socket.gethostname()}:{pid}:{child.slot}\n".encode()
        with contextlib.suppress(OSError):
            os.write(self.control_w, name)

    # --- stopping -------------------------------------------------------------------

    def stop(self) -> None:
        """Workers first (they close clients with 4200), then the broker; nothing left."""
        workers = [c.process for c in self.children if c.role == "worker" and c.process]
        brokers = [c.process for c in self.children if c.role == "broker" and c.process]
        log.info("stopping: %d worker(s), then the broker", len(workers))
        grace = self.settings.shutdown_grace + 2.0
        _terminate(workers, grace)
        _terminate(brokers, 3.0)
        for sock in self.shards:
            sock.close()
        shutil.rmtree(self.runtime_dir, ignore_errors=True)
        signal.set_wakeup_fd(-1)
        log.info("stopped")


def _terminate(processes: list[BaseProcess], grace: float) -> None:
    for process in processes:
        if process.is_alive() and process.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive() and process.pid:
            os.kill(process.pid, signal.SIGKILL)
            process.join(1.0)


def _child_setup(role: str, settings: Settings) -> None:
    set_process_name(f"vask-{role}")
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
        signal.signal(signum, signal.SIG_DFL)
    # a SIGHUP to the process group is for the supervisor, not a reason for children to die
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.set_wakeup_fd(-1)
    setup_logging(settings.log_level, role, settings.log_format)


def _broker_main(settings: Settings, endpoint: str, parent: int, control_fd: int) -> None:
    _child_setup("broker", settings)
    from vask.broker.server import serve

    try:
        serve(settings, endpoint, parent_pid=parent, control_fd=control_fd)
    except Exception:
        log.exception("the broker failed")
        sys.exit(1)


def _worker_main(settings: Settings, endpoint: str, slot: int, fd: int, parent: int) -> None:
    _child_setup(f"worker-{slot}", settings)
    from vask.workers.server import run_worker

    run_worker(settings, endpoint, slot, fd, parent)
