"""Suite-wide hooks.

A failing test that ran against a live ``vask run`` (tests/servers.py) gets the end of
that server's log in its report, and the server's files are kept for a look (a module
fixture's server outlives the test, so the test cannot print the log itself).
"""

from __future__ import annotations

import uuid
from collections.abc import Generator, Iterator

import pytest

from tests.servers import RUNNING
from vask.broker.server import Broker
from vask.config import App, Settings

LOG_TAIL = 6000


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item,
                              call: pytest.CallInfo[None]) -> Generator[None, object, None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.failed and RUNNING:
        for server in RUNNING:
            server.failed = True
            tail = server.log()[-LOG_TAIL:]
            report.sections.append(
                (f"vask log, port {server.port} ({server.log_path}), last {LOG_TAIL} chars",
                 tail))


@pytest.fixture
def broker() -> Iterator[Broker]:
    """A real broker loop on a private inproc endpoint, driven by calling ``turn()``;
    heartbeats are far apart so only what a test sends happens."""
    settings = Settings(apps=(App(id="1", key="k", secret="s"),), heartbeat_interval=3600.0,
                        heartbeat_timeout=7200.0)
    b = Broker(settings, f"inproc://broker-test-{uuid.uuid4().hex}")
    b.bind()
    yield b
    b.router.close(linger=0)
