"""Start a real ``vask run`` (supervisor, broker, workers) for a test, and stop it.

Every server listens on 127.0.0.1 on a free port, is started in its own process group
and is killed by process group at the end, whatever happened. Readiness is ``/ready``
answering 200 on every worker (polled until a hard deadline).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    """A running Vask under test."""

    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/app/{APP_KEY}?protocol=7&client=test&version=1"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

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


def wait_ready(port: int, deadline: float, process: subprocess.Popen[bytes] | None = None,
               hits: int = 4) -> None:
    """Poll /ready until ``hits`` consecutive 200s (each may land on another worker)."""
    good = 0
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"vask exited early with status {process.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=1) as r:
                good = good + 1 if r.status == 200 else 0
        except OSError:
            good = 0
        if good >= hits:
            return
        time.sleep(0.05)
    raise TimeoutError(f"vask on port {port} not ready in time")


@contextlib.contextmanager
def run_vask(workers: int = 2, config: str | None = None, env: dict[str, str] | None = None,
             startup_timeout: float = 30.0, extra_args: tuple[str, ...] = ()) -> Iterator[Server]:
    """Context manager: a running ``vask run --workers N`` on a free port."""
    port = free_port()
    log_file = tempfile.NamedTemporaryFile(  # noqa: SIM115 - the server writes to it
        prefix="vask-test-", suffix=".log", delete=False)
    args = [sys.executable, "-m", "vask.cli", "run", "--host", "127.0.0.1", "--port", str(port),
            "--workers", str(workers), *extra_args]
    if config is not None:
        with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as cfg:
            cfg.write(config)
        args += ["--config", cfg.name]
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("VASK_")}
    full_env.update(env or {})
    process = subprocess.Popen(args, stdout=log_file, stderr=subprocess.STDOUT,
                               env=full_env, start_new_session=True)
    server = Server(port, process, Path(log_file.name))
    try:
        wait_ready(port, time.monotonic() + startup_timeout, process)
        yield server
    except BaseException:
        sys.stderr.write(f"--- vask log ---\n{server.log()}\n")
        raise
    finally:
        server.stop()


def process_name(pid: int) -> str:
    """``/proc/PID/comm``: children name themselves vask-broker / vask-worker-N."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""
