"""``vask bench webhooks``, tiny, against a real ``vask run`` with the configuration the
bench writes ({webhook_config}): every webhook event arrives, signed, and the fan-out
phases deliver exactly. Only correctness is asserted, never speed."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys


def test_smoke_webhooks() -> None:
    server = (f"{shlex.quote(sys.executable)} -m vask.cli run --workers 1 --host 127.0.0.1 "
              "--port {port} --config {webhook_config}")
    argv = [sys.executable, "-m", "vask.bench", "webhooks", "--server-cmd", server,
            "--app-id", "1", "-c", "10", "-r", "50", "-d", "1", "-s", "20", "-e", "40",
            "--startup-timeout", "20", "--drain-timeout", "10", "--json", "--quiet"]
    done = subprocess.run(argv, capture_output=True, timeout=120, check=False)
    assert done.stdout, done.stderr.decode()[-2000:]
    result = json.loads(done.stdout)
    assert result["ok"] and done.returncode == 0, (result["failures"], result["errors"])
    m = result["metrics"]
    assert m["webhook_events"] == m["webhook_events_expected"] == 100, m
    assert (m["invalid_requests"], m["missing_events"], m["vacated_before_occupied"]) \
        == (0, 0, 0), m
