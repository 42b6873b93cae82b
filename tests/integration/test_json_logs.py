"""``--log-format json`` on a real ``vask run``: every process writes one JSON object
per line, and the supervisor logs the start and the end of a graceful stop."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from tests.servers import run_vask

pytestmark = pytest.mark.timeout(90)


def test_every_process_logs_json_lines_and_the_stop_is_logged() -> None:
    with run_vask(workers=2, extra_args=("--log-format", "json")) as server:
        # only the supervisor: it stops its children in order and logs both ends
        os.kill(server.process.pid, signal.SIGTERM)
        server.process.wait(timeout=30)
        log = server.log()
    records = []
    for line in log.splitlines():
        if line.startswith("{"):
            records.append(json.loads(line))
        else:  # the banner (click.echo) is not a log record
            assert line.startswith(("Vask ", "  app ", "    WebSocket", "    HTTP API")), line
    roles = {r["role"] for r in records}
    assert {"supervisor", "broker", "worker-0", "worker-1"} <= roles, roles
    for r in records:
        assert set(r) >= {"time", "level", "role", "pid", "logger", "message"}, r
        time.strptime(r["time"][:19], "%Y-%m-%dT%H:%M:%S")
    supervisor = [r["message"] for r in records if r["role"] == "supervisor"]
    stopping = supervisor.index("stopping: workers close their clients (4200), then the broker")
    assert supervisor[-1] == "stopped" and stopping < len(supervisor) - 1, supervisor
