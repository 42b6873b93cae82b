"""Start a real ``vask run`` (supervisor, broker, workers) for a test, and stop it.

Every server listens on 127.0.0.1 on a free port, is started in its own process group
and is killed by process group at the end, whatever happened. Readiness is ``/ready``
answering 200 on every worker (polled until a hard deadline).

Each server gets a private scratch folder (its log, its config file, and ``TMPDIR`` for
the supervisor's runtime folder); it is removed when the server stops, unless the test
failed, in which case the log is printed and the folder is kept and named.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

APP_ID = "1"
APP_KEY = "app-key"
APP_SECRET = "app-secret"

#: every port this test process has handed out: never handed out twice
_HANDED_OUT: set[int] = set()
#: where free_port() looks first: below the kernel's ephemeral range, so that the source
#: port of some outgoing connection cannot take a port between free_port() and its use
_LOW_PORTS = (20000, 32767)
#: how many times run_vask tries another port when the chosen one was taken meanwhile
PORT_ATTEMPTS = 4


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(port: int) -> bool:
    """Whether a listener could bind 127.0.0.1:port now (as vask's own probe does)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now and that this process never handed out
    before (vask cannot listen on port 0, so a test must name a port).

    It is still only free *now*: another program may take it before the server binds it.
    :func:`run_vask` therefore retries with a new port when that happens.
    """
    lo, hi = _LOW_PORTS
    hi = min(hi, _ephemeral_low() - 1)
    for _ in range(200):
        if hi - lo > 1000:
            port = random.randint(lo, hi)
        else:  # odd ephemeral range: let the kernel choose
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = int(sock.getsockname()[1])
        if port not in _HANDED_OUT and _bindable(port):
            _HANDED_OUT.add(port)
            return port
    raise RuntimeError("no free TCP port found on 127.0.0.1 in 200 attempts")


@dataclass
class Server:
    """A running Vask under test."""

    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    workers: int = 0
    #: set (by tests/conftest.py) when a test failed while this server ran: keep its files
    failed: bool = False
    #: the CA file clients trust when the server speaks TLS (None: plain TCP)
    tls_ca: str | None = None

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/app/{APP_KEY}?protocol=7&client=test&version=1"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def pids(self) -> list[int]:
        """The supervisor and every process it started (by parent pid)."""
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.process.pid)],
                             capture_output=True, text=True, check=False).stdout
        return [self.process.pid] + [int(p) for p in out.split()]

    def children(self) -> list[int]:
        return self.pids()[1:]

    def stop(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=15)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5)


#: servers started by run_vask and not yet stopped (tests/conftest.py reports their logs)
RUNNING: list[Server] = []


def wait_ready(port: int, deadline: float, process: subprocess.Popen[bytes] | None = None,
               hits: int = 4, tls_ca: str | None = None) -> None:
    """Poll /ready until ``hits`` consecutive 200s (each may land on another worker: a
    worker that does not accept yet makes a probe time out, which resets the count).
    With ``tls_ca``, over https, trusting that CA file."""
    good = 0
    scheme, context = "http", None
    if tls_ca is not None:
        scheme, context = "https", ssl.create_default_context(cafile=tls_ca)
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"vask exited early with status {process.returncode}")
        try:
            with urllib.request.urlopen(f"{scheme}://127.0.0.1:{port}/ready", timeout=1,
                                        context=context) as r:
                good = good + 1 if r.status == 200 else 0
        except OSError:
            good = 0
        if good >= hits:
            return
        if good == 0:
            time.sleep(0.05)
    raise TimeoutError(f"vask on port {port} not ready in time")


def vask_env(scratch: Path, env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a ``vask`` subprocess: ours without any VASK_ setting, plus
    ``env``, with TMPDIR in ``scratch`` (the supervisor's runtime folder goes there) and
    the data directory (the webhook queue) there too, unless ``env`` names another."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("VASK_")}
    full_env["TMPDIR"] = str(scratch)
    full_env["VASK_DATA_DIR"] = str(scratch / "data")
    # No metrics listener unless a test asks for one: the default port is fixed, and
    # servers of concurrent tests would compete for it.
    full_env["VASK_METRICS_PORT"] = "0"
    full_env.update(env or {})
    return full_env


def scratch_dir() -> Path:
    """A fresh folder for one server's files. Short (under /tmp, not pytest's tmp_path)
    because the broker's ipc:// socket path inside it must stay under 108 bytes."""
    return Path(tempfile.mkdtemp(prefix="vask-test-"))


def _start(scratch: Path, workers: int, config: str | None, env: dict[str, str] | None,
           startup_timeout: float, extra_args: tuple[str, ...],
           fixed_port: int | None = None, tls_ca: str | None = None) -> Server:
    env = dict(env or {})
    if "stop_ready_delay" not in (config or "") and "VASK_STOP_READY_DELAY" not in env:
        # The default (2 s of /ready answering 503 before the listeners close) is for
        # load balancers; a test that does not look at it should not wait for it at
        # every teardown.
        env["VASK_STOP_READY_DELAY"] = "0"
    config_args: list[str] = []
    if config is not None:
        path = scratch / "vask.toml"
        path.write_text(config)
        config_args = ["--config", str(path)]
    for attempt in range(1, PORT_ATTEMPTS + 1):
        port = fixed_port or free_port()
        log_path = scratch / f"vask-{port}.log"
        args = [sys.executable, "-m", "vask.cli", "run", "--host", "127.0.0.1",
                "--port", str(port), "--workers", str(workers), *config_args, *extra_args]
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen(args, stdout=log_file, stderr=subprocess.STDOUT,
                                       env=vask_env(scratch, env), start_new_session=True)
        server = Server(port, process, log_path, workers, tls_ca=tls_ca)
        try:
            wait_ready(port, time.monotonic() + startup_timeout, process,
                       hits=max(4, 4 * workers), tls_ca=tls_ca)
            return server
        except BaseException:
            server.stop()
            # the port was free when chosen, but something took it since: another one
            if attempt < PORT_ATTEMPTS and fixed_port is None \
                    and "Address already in use" in server.log():
                continue
            sys.stderr.write(f"--- vask log ({log_path}) ---\n{server.log()}\n")
            raise
    raise AssertionError("unreachable")


@contextlib.contextmanager
def run_vask(workers: int = 2, config: str | None = None, env: dict[str, str] | None = None,
             startup_timeout: float = 30.0, extra_args: tuple[str, ...] = (),
             port: int | None = None, tls_ca: str | None = None) -> Iterator[Server]:
    """Context manager: a running ``vask run --workers N`` on a free port (or on
    ``port``: a test that restarts a server on the port it had).

    A server started with TLS (``--tls-cert``/``--tls-key`` in ``extra_args``, or in
    ``config`` or ``env``) needs ``tls_ca``: readiness is then polled over https.

    Its files (log, config, runtime folder) are deleted afterwards, unless the block
    raised or a test failed meanwhile: then the log is printed and the files are kept.
    """
    scratch = scratch_dir()
    keep = True
    try:
        server = _start(scratch, workers, config, env, startup_timeout, extra_args, port,
                        tls_ca)
        RUNNING.append(server)
        try:
            yield server
        except BaseException:
            server.failed = True
            sys.stderr.write(f"--- vask log ({server.log_path}) ---\n{server.log()}\n")
            raise
        finally:
            RUNNING.remove(server)
            server.stop()
        keep = server.failed
    finally:
        if keep:
            sys.stderr.write(f"--- vask files kept in {scratch} ---\n")
        else:
            shutil.rmtree(scratch, ignore_errors=True)


def process_name(pid: int) -> str:
    """``/proc/PID/comm``: children name themselves vask-broker / vask-worker-N."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def in_ci() -> bool:
    """Whether this run is CI's (``CI`` set to anything but empty/0/false/no; ``.ci/run``
    sets CI=true): there a missing tool is a failure, not a reason to skip."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
