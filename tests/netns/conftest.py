"""The simulated cluster of the cross-host tests (see tests/netns/net.py for the network).

Two brokers, the active one on ``b1`` and a standby on ``b2``, each a ``vask broker``
bound to its host's address with CURVE keys; two hosts ``h1`` and ``h2``, each a whole
``vask run`` supervisor whose workers follow ``tcp://b1,tcp://b2`` in that order. Every
key is made by ``vask keys`` for this test and thrown away with it.

Skipped where namespaces cannot be built (not root, no ``ip``), except in CI, where that
is a failure: CI runs as root and must run these tests.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.netns.net import LIVE, Net, Proc, network, unavailable
from tests.servers import in_ci

PORT = 6001
BROKER_PORT = 7001
HEARTBEAT_INTERVAL = 0.5
HEARTBEAT_TIMEOUT = 2.0
ENV = {
    "VASK_HEARTBEAT_INTERVAL": str(HEARTBEAT_INTERVAL),
    "VASK_HEARTBEAT_TIMEOUT": str(HEARTBEAT_TIMEOUT),
    "VASK_LOG_LEVEL": "info",
}
HOSTS = {"b1": 1, "b2": 2, "h1": 11, "h2": 12, "x": 66}


LOG_TAIL = 4000


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item,
                              call: pytest.CallInfo[None]) -> Generator[None, object, None]:
    """A failing test's report gets the end of every simulated host's log, and the
    network's files are kept."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.failed:
        for net in LIVE:
            net.failed = True
            for proc in net.procs:
                report.sections.append((f"{proc.name} ({proc.log_path})",
                                        proc.log()[-LOG_TAIL:]))


@pytest.fixture(scope="session", autouse=True)
def _namespaces_available() -> None:
    why = unavailable()
    if why:
        if in_ci():
            pytest.fail(f"CI must run the network namespace tests, but {why}")
        pytest.skip(f"network namespace tests skipped: {why}")


@dataclass
class Cluster:
    net: Net
    keys: Path
    brokers: dict[str, Proc]
    hosts: dict[str, Proc]

    def addr(self, host: str) -> str:
        return self.net.hosts[host]

    @property
    def broker_list(self) -> str:
        return ",".join(f"tcp://{self.addr(b)}:{BROKER_PORT}" for b in ("b1", "b2"))

    def start_broker(self, name: str) -> Proc:
        proc = self.net.start(name, f"broker-{name}-{time.monotonic_ns()}", [
            "broker", "--bind", f"tcp://{self.addr(name)}:{BROKER_PORT}",
            "--curve-secret-key", str(self.keys / "broker.key_secret"),
            "--authorized-keys-dir", str(self.keys / "authorized")], ENV)
        self.brokers[name] = proc
        return proc

    def start_host(self, name: str) -> Proc:
        proc = self.net.start(name, f"vask-{name}-{time.monotonic_ns()}", [
            "run", "--host", "0.0.0.0", "--port", str(PORT), "--workers", "1",
            "--broker", self.broker_list,
            "--broker-public-key", str(self.keys / "broker.key"),
            "--curve-secret-key", str(self.keys / f"{name}.key_secret")], ENV)
        self.hosts[name] = proc
        return proc

    def wait_ready(self, name: str, timeout: float = 60.0) -> None:
        self.net.wait_ready(name, PORT, self.hosts[name], time.monotonic() + timeout)


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    with network(HOSTS) as net:
        keys = net.scratch / "keys"
        subprocess.run([sys.executable, "-m", "vask.cli", "keys", str(keys),
                        "--worker", "h1", "--worker", "h2", "--worker", "stranger"],
                       check=True, capture_output=True, timeout=30)
        # a key pair `vask keys` made but the brokers were never told about
        (keys / "authorized" / "stranger.key").unlink()
        c = Cluster(net, keys, {}, {})
        c.start_broker("b1")
        c.start_broker("b2")
        for host in ("h1", "h2"):
            c.start_host(host)
        for host in ("h1", "h2"):
            c.wait_ready(host)
        yield c
