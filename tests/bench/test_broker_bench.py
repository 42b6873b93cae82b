"""``vask bench broker``: a tiny run over each link kind. Only that every phase completed
(the bench times out with an error when an answer or a delivery is missing) and reports
its figures is asserted, never speed."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.parametrize("link", [("--endpoint", "ipc"), ("--endpoint", "tcp"), ("--curve",)])
def test_every_phase_completes_and_reports(link: tuple[str, ...]) -> None:
    argv = [sys.executable, "-m", "vask.cli", "bench", "broker", "-w", "2", "-n", "400",
            "--samples", "20", "--json", *link]
    done = subprocess.run(argv, capture_output=True, timeout=90, check=False)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    result = json.loads(done.stdout)
    assert result["endpoint"] == ("tcp + CURVE" if link == ("--curve",) else link[1])
    for phase in ("subscribes", "presence_joins", "publishes"):
        assert result[phase]["per_second"] > 0
    assert result["publishes"]["deliveries_per_second"] > 0
    assert result["hop_latency_us"]["samples"] == 20
    assert result["hop_latency_us"]["p99"] >= result["hop_latency_us"]["median"] > 0
