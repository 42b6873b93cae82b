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
  SIGHUP: reload the configuration (:mod:`vask.reload`): validated here, written to a
  file in the runtime directory, and each child is sent SIGHUP to read it.
  SIGUSR2: rolling restart. Slot by slot, a new worker starts on the same shard socket;
  once it reports ready (a line with its pid on the ready pipe, written when its
  ``/ready`` would answer 200) the old one is sent SIGUSR1: it stops accepting and
  closes its clients with 4200 spread over ``drain_window``. Its exit is expected, not
  a crash.
* When a worker dies the supervisor tells the broker at once (a control pipe), so its
  connections' presence members and channels are cleaned up without waiting for the
  heartbeat timeout.
* When an app has webhooks, a third kind of child, the webhook sender, is started (and
  restarted) beside the broker; it is stopped last, after the broker has handed over
  the events of the workers' final disconnections (docs/webhooks.md).
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
from pathlib import Path
from typing import Any

from vask.config import ConfigError, Settings, data_dir, wants_webhooks
from vask.logs import setup_logging
from vask.process import STARTUP_FAILURE, set_process_name
from vask.reload import reload_settings, write_settings_file

log = logging.getLogger("vask.supervisor")

EARLY_DEATH = 3.0
MAX_EARLY_DEATHS = 5
MAX_BACKOFF = 10.0

_fork = multiprocessing.get_context("fork")

#: extra seconds a stopping or retiring worker gets beyond its own deadline before
#: the supervisor kills it
KILL_SLACK = 2.0


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
        if self.role == "webhooks":
            return "webhook sender"
        return self.role if self.role == "broker" else f"worker {self.slot}"


class Supervisor:
    """Owns the shards and the children; see the module docstring."""

    def __init__(self, settings: Settings, overrides: dict[str, Any] | None = None) -> None:
        self.settings = settings
        self.runtime_dir = tempfile.mkdtemp(prefix="vask-")
        self.endpoint = settings.broker or f"ipc://{self.runtime_dir}/broker.sock"
        self.own_broker = not settings.broker  # else workers join an external broker
        #: the broker's link to the webhook sender ("" = no sender: no app has webhooks,
        #: or the broker is external and runs its own sender)
        #: the own broker's link to the webhook sender (even while no app has webhooks:
        #: a reload may add some; the sender itself runs only while one has)
        self.webhook_endpoint = f"ipc://{self.runtime_dir}/webhooks.sock" \
            if self.own_broker else ""
        #: where the workers' sockets for client events between them live, when they are
        #: the whole cluster (vask.workers.siblings); "" = an external broker may have
        #: workers on other hosts, so client events go through it
        self.siblings_dir = os.path.join(self.runtime_dir, "siblings") \
            if self.own_broker else ""
        if self.siblings_dir:
            os.mkdir(self.siblings_dir, 0o700)
        self.shards: list[socket.socket] = []
        self.children: list[Child] = []
        self.wake_r, self.wake_w = os.pipe()
        self.control_r, self.control_w = os.pipe()
        self.stopping = False
        self.reload_asked = False
        self.exit_status = 0
        self.pid = os.getpid()
        #: the command-line flags of the start, applied again on every reload
        self.overrides = dict(overrides or {})
        #: where a reload's settings are written for the children to read
        self.settings_path = os.path.join(self.runtime_dir, "settings.json")
        #: workers write "PID\n" here once they are ready (rolling restarts wait on it)
        self.ready_r, self.ready_w = os.pipe()
        self.ready_buffer = b""
        self.ready_pids: set[int] = set()
        self.roll_asked = False
        #: rolling restart: slots still to replace, the new worker being started (and
        #: its deadline), and old workers draining (with the time they get killed)
        self.roll_queue: list[int] = []
        self.incoming: Child | None = None
        self.incoming_deadline = 0.0
        self.retiring: list[tuple[BaseProcess, float, int]] = []
        self.pid_file_written = False

    # --- starting -------------------------------------------------------------------

    def start(self) -> None:
        s = self.settings
        self.shards = bind_shards(s.host, s.port, s.workers)
        self.port = self.shards[0].getsockname()[1]
        os.set_blocking(self.wake_w, False)
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.ready_r, False)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGHUP,
                       signal.SIGUSR2):
            signal.signal(signum, self._on_signal)
        if s.pid_file:
            write_pid_file(s.pid_file, self.pid)
            self.pid_file_written = True
        signal.set_wakeup_fd(self.wake_w)
        if self.own_broker:
            self.children.append(Child("broker", -1))
        if self.webhook_endpoint and wants_webhooks(s):
            self.children.append(Child("webhooks", -2))
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
        elif signum == signal.SIGUSR2:
            self.roll_asked = True

    def _spawn(self, child: Child) -> None:
        settings, endpoint, parent = self.settings, self.endpoint, self.pid
        if child.role == "broker":
            process = _fork.Process(
                target=_broker_main,
                args=(settings, endpoint, parent, self.control_r, self.webhook_endpoint),
                kwargs={"settings_path": self.settings_path},
                name="vask-broker", daemon=False)
        elif child.role == "webhooks":
            store = webhook_store(settings, f"webhooks-{self.port}")
            process = _fork.Process(
                target=_sender_main, args=(settings, self.webhook_endpoint, store, parent),
                name="vask-webhooks", daemon=False)
        else:
            fd = self.shards[child.slot].fileno()
            process = _fork.Process(
                target=_worker_main, args=(settings, endpoint, child.slot, fd, parent),
                kwargs={"settings_path": self.settings_path, "ready_fd": self.ready_w,
                        "siblings_dir": self.siblings_dir},
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
                    select.select([self.wake_r, self.ready_r], [], [], 0.5)
                with contextlib.suppress(BlockingIOError):
                    os.read(self.wake_r, 4096)
                self._read_ready()
                if self.reload_asked:
                    self.reload_asked = False
                    self.reload()
                if self.roll_asked:
                    self.roll_asked = False
                    self._start_roll()
                if not self.stopping:
                    self._check_children()
                if not self.stopping:
                    self._roll()
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
        self.ready_pids.discard(pid or 0)
        name = f"{socket.gethostname()}:{pid}:{child.slot}\n".encode()
        with contextlib.suppress(OSError):
            os.write(self.control_w, name)

    # --- reloading ------------------------------------------------------------------

    def reload(self) -> None:
        """SIGHUP: load and validate the configuration again; apply what may change
        while running (one log line per change), or keep everything as it is."""
        try:
            new, changes = reload_settings(self.settings, self.overrides)
        except ConfigError as exc:
            log.error("reload refused, keeping the running configuration: %s", exc)
            return
        if new == self.settings:
            if not new.tls_cert:
                log.info("reload: the configuration is unchanged")
                return
            # Same settings, but the certificate files may have been renewed in place:
            # the workers read them again.
            log.info("reload: the configuration is unchanged; workers re-read the TLS "
                     "certificate")
            write_settings_file(self.settings_path, new)
            self._hup(("worker",))
            return
        for line in changes:
            log.info("reload: %s", line)
        old, self.settings = self.settings, new  # children started from now on get it
        logging.getLogger().setLevel(new.log_level.upper())
        write_settings_file(self.settings_path, new)
        self._reload_sender(old, new)
        self._hup(("broker", "worker", "webhooks"))

    def _hup(self, roles: tuple[str, ...]) -> None:
        """SIGHUP to the running children of ``roles`` (a worker being started by a
        rolling restart counts as a worker): they read the settings file again."""
        processes = [c.process for c in self.children
                     if c.role in roles and c.process is not None]
        if "worker" in roles and self.incoming is not None \
                and self.incoming.process is not None:
            processes.append(self.incoming.process)
        for process in processes:
            if process.pid and process.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGHUP)

    def _reload_sender(self, old: Settings, new: Settings) -> None:
        """The webhook sender reads its settings once: start it when the first app
        gets webhooks, stop it when the last loses them, and restart it when what it
        uses changed. Its queue is on disk and the broker re-sends what it has not
        acknowledged, so a restart loses nothing."""
        if not self.webhook_endpoint:
            return
        child = next((c for c in self.children if c.role == "webhooks"), None)
        if not wants_webhooks(new):
            if child is not None:
                self.children.remove(child)
                if child.process is not None:
                    _terminate([child.process], 5.0)
                log.info("reload: no app has webhooks any more; webhook sender stopped")
            return
        if child is None:
            child = Child("webhooks", -2)
            self.children.append(child)
            self._spawn(child)
            log.info("reload: webhook sender started")
        elif _sender_view(old) != _sender_view(new) and child.process is not None:
            _terminate([child.process], 5.0)
            child.process = None
            self._spawn(child)
            log.info("reload: webhook sender restarted with the new configuration")

    # --- rolling restart ------------------------------------------------------------

    def _read_ready(self) -> None:
        try:
            data = os.read(self.ready_r, 4096)
        except BlockingIOError:
            return
        self.ready_buffer += data
        *lines, self.ready_buffer = self.ready_buffer.split(b"\n")
        for line in lines:
            with contextlib.suppress(ValueError):
                self.ready_pids.add(int(line))

    def _start_roll(self) -> None:
        if self.roll_queue or self.incoming is not None:
            log.warning("SIGUSR2: a rolling restart is already under way")
            return
        self.roll_queue = [c.slot for c in self.children if c.role == "worker"]
        log.info("rolling restart of %d worker(s) begins (drain_window %gs)",
                 len(self.roll_queue), self.settings.drain_window)

    def _roll(self) -> None:
        """One step of a rolling restart (called every loop turn)."""
        now = time.monotonic()
        for entry in list(self.retiring):
            process, kill_at, slot = entry
            if not process.is_alive():
                process.join(0)
                self.retiring.remove(entry)
                if process.exitcode != 0:  # a drained worker said BYE itself
                    self._tell_broker_dead(Child("worker", slot), process.pid)
                log.info("old worker %d (pid %s) drained and exited", slot, process.pid)
                if not self.roll_queue and self.incoming is None and not self.retiring:
                    log.info("rolling restart done")
            elif now >= kill_at and process.pid:
                log.warning("old worker (pid %s) still draining; killing it", process.pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGKILL)
                self.retiring.remove(entry)
                self.retiring.append((process, now + 5.0, slot))
        incoming = self.incoming
        if incoming is None:
            if self.roll_queue:
                slot = self.roll_queue.pop(0)
                self.incoming = Child("worker", slot)
                self._spawn(self.incoming)
                # a new worker gets as long as one starting from scratch (it exits
                # STARTUP_FAILURE after 6 x broker_timeout without a welcome), and more
                self.incoming_deadline = now + 6 * self.settings.broker_timeout + 10.0
            return
        fresh = incoming.process
        assert fresh is not None
        if fresh.pid in self.ready_pids:
            self._swap(incoming)
        elif not fresh.is_alive() or now >= self.incoming_deadline:
            if fresh.is_alive() and fresh.pid:
                os.kill(fresh.pid, signal.SIGKILL)
            fresh.join(1.0)
            self._tell_broker_dead(incoming, fresh.pid)
            log.error("rolling restart stopped: the new worker %d (pid %s) did not become "
                      "ready (exit status %s); the old worker %d keeps serving",
                      incoming.slot, fresh.pid, fresh.exitcode, incoming.slot)
            self.incoming = None
            self.roll_queue = []

    def _swap(self, incoming: Child) -> None:
        """The new worker is ready: it takes the slot, the old one drains."""
        child = next(c for c in self.children
                     if c.role == "worker" and c.slot == incoming.slot)
        old = child.process
        child.process = incoming.process
        child.started = incoming.started
        child.early_deaths = 0
        child.restart_at = 0.0
        self.incoming = None
        new_pid = incoming.process.pid if incoming.process else None
        if old is None or not old.is_alive():
            log.info("worker %d replaced (pid %s)", child.slot, new_pid)
            return
        s = self.settings
        with contextlib.suppress(ProcessLookupError):
            os.kill(old.pid or 0, signal.SIGUSR1)
        self.retiring.append(
            (old, time.monotonic() + s.drain_window + s.shutdown_grace + KILL_SLACK,
             child.slot))
        log.info("worker %d replaced (pid %s -> %s); the old one drains over %gs",
                 child.slot, old.pid, new_pid, s.drain_window)

    # --- stopping -------------------------------------------------------------------

    def stop(self) -> None:
        """Workers first (they close clients with 4200), then the broker (it hands the
        webhook events of those disconnections to the sender), then the sender."""
        log.info("stopping: workers close their clients (4200), then the broker")
        workers = [c.process for c in self.children if c.role == "worker" and c.process]
        workers += [process for process, _, _ in self.retiring]
        if self.incoming is not None and self.incoming.process is not None:
            workers.append(self.incoming.process)
        brokers = [c.process for c in self.children if c.role == "broker" and c.process]
        senders = [c.process for c in self.children if c.role == "webhooks" and c.process]
        s = self.settings
        grace = (s.stop_ready_delay + min(s.drain_window, s.shutdown_grace)
                 + s.shutdown_grace + KILL_SLACK)
        _terminate(workers, grace)
        _terminate(brokers, 5.0)
        _terminate(senders, 5.0)
        for sock in self.shards:
            sock.close()
        shutil.rmtree(self.runtime_dir, ignore_errors=True)
        signal.set_wakeup_fd(-1)
        if self.pid_file_written:
            remove_pid_file(s.pid_file, self.pid)
        log.info("stopped")


def write_pid_file(path: str, pid: int) -> None:
    """Write ``pid`` to ``path`` (replacing it atomically, so a reader never sees half)."""
    tmp = f"{path}.{pid}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{pid}\n")
    os.replace(tmp, path)


def remove_pid_file(path: str, pid: int) -> None:
    """Remove the pid file if it still names ``pid`` (another instance may own it now)."""
    with contextlib.suppress(OSError, ValueError):
        with open(path) as f:
            if int(f.read().strip()) != pid:
                return
        os.unlink(path)


class SenderKeeper:
    """The webhook sender of a standalone broker (``vask broker``): started beside it,
    restarted with back-off when it dies (:meth:`check`, from the broker's timers),
    stopped after it (:meth:`stop`)."""

    def __init__(self, settings: Settings, store: Path) -> None:
        self.settings = settings
        self.store = store
        self.runtime_dir = tempfile.mkdtemp(prefix="vask-broker-")
        self.endpoint = f"ipc://{self.runtime_dir}/webhooks.sock"
        self.child = Child("webhooks", -2)

    def check(self) -> None:
        child, now = self.child, time.monotonic()
        process = child.process
        if process is not None:
            if process.is_alive():
                if now - child.started > EARLY_DEATH:
                    child.early_deaths = 0
                return
            process.join(0)
            child.process = None
            if now - child.started < EARLY_DEATH:
                child.early_deaths += 1
            delay = min(MAX_BACKOFF, 0.1 * (2 ** child.early_deaths))
            log.warning("webhook sender (pid %s) exited with status %s; restarting in %.1fs",
                        process.pid, process.exitcode, delay)
            child.restart_at = now + delay
        if now >= child.restart_at:
            process = _fork.Process(
                target=_sender_main,
                args=(self.settings, self.endpoint, self.store, os.getpid()),
                name="vask-webhooks", daemon=False)
            process.start()
            child.process, child.started = process, now

    def stop(self) -> None:
        if self.child.process is not None:
            _terminate([self.child.process], 5.0)
        shutil.rmtree(self.runtime_dir, ignore_errors=True)


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
    # A SIGHUP to the process group is for the supervisor, not a reason for children to
    # die; nor is a SIGUSR1/2 that arrives before the child installs its own handlers
    # (the worker: SIGHUP reloads, SIGUSR1 drains; the broker: SIGHUP reloads).
    for signum in (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(signum, signal.SIG_IGN)
    signal.set_wakeup_fd(-1)
    setup_logging(settings.log_level, role, settings.log_format)


def _sender_view(settings: Settings) -> tuple[object, ...]:
    """What the webhook sender uses of the settings (a change restarts it)."""
    apps = tuple((a.id, a.key, a.secret, a.webhooks, a.webhook_batch_max_events,
                  a.webhook_batch_max_wait, a.webhook_leave_delay) for a in settings.apps)
    return (apps, settings.webhook_timeout, settings.webhook_retry_window,
            settings.log_level)


def webhook_store(settings: Settings, name: str) -> Path:
    """The webhook sender's durable queue: one file per server (``name`` tells which),
    so two servers on one host never share, and a restarted one finds its own."""
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in name)
    return data_dir(settings) / f"{safe}.sqlite3"


def _broker_main(settings: Settings, endpoint: str, parent: int, control_fd: int,
                 webhook_endpoint: str, settings_path: str = "") -> None:
    # Its own process group, like the webhook sender: a SIGINT/SIGTERM sent to the
    # whole group (Ctrl-C, a container runtime) would stop the broker at once, before the
    # workers have told it about the clients they are closing (their leaves, webhooks).
    # The supervisor stops it after the workers, by pid; PR_SET_PDEATHSIG still stops
    # it if the supervisor dies.
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)
    _child_setup("broker", settings)
    from vask.broker.server import serve

    try:
        serve(settings, endpoint, parent_pid=parent, control_fd=control_fd,
              webhook_endpoint=webhook_endpoint, settings_path=settings_path)
    except Exception:
        log.exception("the broker failed")
        sys.exit(1)


def _sender_main(settings: Settings, endpoint: str, store: Path, parent: int) -> None:
    # Its own process group (see _broker_main): it must not stop while the broker is
    # still handing it the last events. The supervisor stops it last, by pid.
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)
    _child_setup("webhooks", settings)
    from vask.webhooks.sender import run_sender

    try:
        run_sender(settings, endpoint, store, parent_pid=parent)
    except Exception:
        log.exception("the webhook sender failed")
        sys.exit(1)


def _worker_main(settings: Settings, endpoint: str, slot: int, fd: int, parent: int,
                 settings_path: str = "", ready_fd: int = -1, siblings_dir: str = "") -> None:
    _child_setup(f"worker-{slot}", settings)
    from vask.workers.server import run_worker

    run_worker(settings, endpoint, slot, fd, parent, settings_path=settings_path,
               ready_fd=ready_fd, siblings_dir=siblings_dir)
