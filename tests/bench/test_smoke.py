"""Smoke tests: every scenario, tiny, against a real server started with --server-cmd.

The server command is ``$VASK_BENCH_SMOKE_CMD`` when set (e.g. soketi:
``PORT={port} METRICS_PORT={port2} CLUSTER_PORT={port3} USER_AUTH_TIMEOUT_MS=3600000
bash /work/shared/peers/soketi/run.sh``), else ``vask run --workers 1 --port {port}``
(app id ``1``, Vask's default app).
Only correctness is asserted (delivery ratio exactly 1.0, exact member events),
never speed.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from typing import Any

import pytest

# The interpreter running the tests, so no `vask` on PATH is needed.
SERVER_CMD = os.environ.get(
    "VASK_BENCH_SMOKE_CMD",
    f"{shlex.quote(sys.executable)} -m vask.cli run --workers 1 --host 127.0.0.1 --port {{port}}")
# Vask's default app has id "1", and so have the bench's defaults and bin/soketi-peer's.
# Override with VASK_BENCH_SMOKE_APP_ID.
APP_ID = os.environ.get("VASK_BENCH_SMOKE_APP_ID", "1")


def run_bench(*args: str, app_id: str | None = APP_ID,
              server_cmd: str = SERVER_CMD) -> dict[str, Any]:
    ids = ["--app-id", app_id] if app_id is not None else []
    argv = [sys.executable, "-m", "vask.bench", *args, "--server-cmd", server_cmd,
            *ids, "--startup-timeout", "10", "--drain-timeout", "3",
            "--connect-timeout", "5", "--json", "--quiet"]
    proc = subprocess.run(argv, capture_output=True, timeout=60, check=False)
    assert proc.stdout, proc.stderr.decode()[-2000:]
    result: dict[str, Any] = json.loads(proc.stdout)
    assert proc.returncode == (0 if result["ok"] else 1)
    return result


@pytest.mark.timeout(90)
def test_smoke_fanout() -> None:
    r = run_bench("fanout", "-s", "20", "-e", "20")
    assert r["metrics"]["delivery_ratio"] == 1.0, r["failures"]
    assert r["ok"], r["failures"]


@pytest.mark.timeout(90)
def test_smoke_fanout_rate() -> None:
    r = run_bench("fanout-rate", "-s", "20", "-r", "20", "-d", "1")
    assert r["metrics"]["delivery_ratio"] == 1.0, r["failures"]
    assert r["ok"], r["failures"]


@pytest.mark.timeout(90)
def test_smoke_idle() -> None:
    r = run_bench("idle", "-c", "50", "--idle-seconds", "1")
    assert r["metrics"]["connected"] == 50, r["failures"]
    assert r["ok"], r["failures"]


@pytest.mark.timeout(90)
def test_smoke_presence() -> None:
    r = run_bench("presence", "-m", "20")
    assert r["metrics"]["members_with_wrong_join_view"] == 0, r["failures"]
    assert r["metrics"]["members_with_wrong_removed_events"] == 0, r["failures"]
    assert r["ok"], r["failures"]


@pytest.mark.timeout(90)
def test_smoke_client_events() -> None:
    r = run_bench("client-events", "-n", "10", "-r", "5", "-d", "1")
    assert r["metrics"]["delivery_ratio"] == 1.0, r["failures"]
    assert r["ok"], r["failures"]


@pytest.mark.timeout(90)
def test_defaults_work_against_a_default_server() -> None:
    """No credentials given at all: the bench's defaults are the default app's."""
    r = run_bench("fanout", "-s", "5", "-e", "5", app_id=None)
    assert r["metrics"]["delivery_ratio"] == 1.0, r["failures"]
    assert r["ok"], r["failures"]


@pytest.mark.timeout(90)
def test_wrong_app_id_stops_at_the_first_4xx_with_the_servers_message() -> None:
    r = run_bench("fanout", "-s", "5", "-e", "50", app_id="no-such-app")
    assert not r["ok"]
    stopped = [f for f in r["failures"] if f.startswith("publishing stopped")]
    assert stopped, r["failures"]
    assert "HTTP 404" in stopped[0] and "/apps/no-such-app/events" in stopped[0], stopped
    assert "events_ok" not in r["metrics"]  # it gave up before the delivery phase


@pytest.mark.timeout(120)
def test_smoke_storm_restart() -> None:
    """Every client is dropped by a kill -9 of the server tree and comes back."""
    r = run_bench("storm", "-c", "60", "--channels", "7", "--storm-timeout", "60")
    m = r["metrics"]
    assert m["dropped"] == 60 and m["reconnected"] == 60, (m, r["failures"])
    assert m["verified_exact_delivery"] is True, r["failures"]
    assert m["failed_reconnects"] == 0 and m["dropped_again"] == 0, r["errors"]
    assert 0 < m["listen_after_drop_s"] <= m["all_back_s"], m
    assert r["ok"], r["failures"]


@pytest.mark.skipif("VASK_BENCH_SMOKE_CMD" in os.environ, reason="Vask's own SIGUSR2")
@pytest.mark.timeout(120)
def test_smoke_storm_rolling_restart_signal() -> None:
    """Vask's rolling restart (SIGUSR2 to the supervisor) drops every client with 4200."""
    # Two workers, so clients have somewhere to go.
    r = run_bench("storm", "-c", "40", "--channels", "3", "--mode", "signal",
                  "--storm-timeout", "60",
                  server_cmd=SERVER_CMD.replace("--workers 1", "--workers 2"))
    m = r["metrics"]
    assert m["dropped"] == 40 and m["verified_exact_delivery"] is True, (m, r["failures"])
    assert m["failed_reconnects"] == 0, r["errors"]
    assert r["ok"], r["failures"]


@pytest.mark.skipif("VASK_BENCH_SMOKE_CMD" in os.environ, reason="a Vask setting")
@pytest.mark.timeout(90)
def test_smoke_fanout_with_back_pressure_on() -> None:
    """With max_delivery_lag set, every publish is still answered 200 and delivered once."""
    r = run_bench("fanout", "-s", "40", "-e", "300", "-k", "4",
                  server_cmd="VASK_MAX_DELIVERY_LAG=0.01 "
                             + SERVER_CMD.replace("--workers 1", "--workers 2"))
    assert r["metrics"]["delivery_ratio"] == 1.0 and r["metrics"]["events_ok"] == 300, r
    assert r["ok"], r["failures"]


@pytest.mark.timeout(120)
def test_smoke_broker_bench_reports_every_phase() -> None:
    """`vask bench broker`: a real broker process and fake workers; every phase answers,
    and the round-trip phase reports the broker's CPU for each batch size."""
    argv = [sys.executable, "-m", "vask.cli", "bench", "broker", "-w", "2", "-n", "400",
            "--samples", "20", "--json"]
    proc = subprocess.run(argv, capture_output=True, timeout=110, check=False)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    result = json.loads(proc.stdout)
    for phase in ("subscribes", "presence_joins", "publishes"):
        assert result[phase]["per_second"] > 0
    trips = result["round_trip_cpu"]
    assert sorted(trips, key=int) == ["1", "8", "64"]
    for figures in trips.values():
        assert figures["round_trips"] > 0
        # CPU time is counted in clock ticks (10 ms): hundreds of round trips take
        # several, whatever the machine
        assert figures["broker_cpu_us_per_round_trip"] > 0
        assert 0 < figures["broker_cpu_us_per_subscribe"] \
            <= figures["broker_cpu_us_per_round_trip"]
    assert result["hop_latency_us"]["samples"] == 20
