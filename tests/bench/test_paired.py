"""``vask bench connect-pair``: the pure summary of paired blocks, the scheduler's CPU
figure it reads, and one small run against two real Vask servers."""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
import time

import pytest

from vask.bench.paired import format_pair, summarise_pairs
from vask.bench.procstat import run_seconds, tree_run_seconds


def test_ratio_of_totals_and_per_pair_spread() -> None:
    # A: 1.0 s and 3.0 s for 100 connections each -> 20 ms per connection;
    # B: 1.5 s and 3.0 s -> 22.5 ms: B / A = 1.125, per pair 1.5 and 1.0
    m = summarise_pairs([1.0, 3.0], [100, 100], [1.5, 3.0], [100, 100])
    assert m["pairs"] == 2
    assert m["A_cpu_ms_per_conn"] == pytest.approx(20.0)
    assert m["B_cpu_ms_per_conn"] == pytest.approx(22.5)
    assert m["ratio_B_over_A"] == pytest.approx(1.125)
    assert (m["pair_ratio_min"], m["pair_ratio_max"]) == pytest.approx((1.0, 1.5))
    assert m["pair_ratio_median"] == pytest.approx(1.25)
    # resampled pairs: every interval end is a ratio some resample can give
    assert 1.0 <= m["ratio_95_low"] <= m["ratio_B_over_A"] <= m["ratio_95_high"] <= 1.5


def test_counts_per_block_weigh_in() -> None:
    # a block with more connections counts for more in the totals
    m = summarise_pairs([1.0, 1.0], [100, 300], [2.0, 1.0], [100, 300])
    assert m["A_cpu_ms_per_conn"] == pytest.approx(2000 / 400)
    assert m["B_cpu_ms_per_conn"] == pytest.approx(3000 / 400)
    assert m["ratio_B_over_A"] == pytest.approx(1.5)


def test_identical_sides_give_one_and_a_point_interval() -> None:
    cpu = [0.2, 0.25, 0.3, 0.18]
    m = summarise_pairs(cpu, [50] * 4, cpu, [50] * 4)
    assert m["ratio_B_over_A"] == pytest.approx(1.0)
    assert m["ratio_95_low"] == pytest.approx(1.0)
    assert m["ratio_95_high"] == pytest.approx(1.0)


def test_the_interval_is_reproducible_and_widens_with_spread() -> None:
    a = [0.1] * 10
    steady = summarise_pairs(a, [10] * 10, [0.12] * 10, [10] * 10)
    noisy_b = [0.06, 0.2, 0.08, 0.18, 0.1, 0.14, 0.05, 0.19, 0.11, 0.09]
    noisy = summarise_pairs(a, [10] * 10, noisy_b, [10] * 10)
    again = summarise_pairs(a, [10] * 10, noisy_b, [10] * 10)
    assert (noisy["ratio_95_low"], noisy["ratio_95_high"]) == \
        (again["ratio_95_low"], again["ratio_95_high"])
    assert steady["ratio_95_high"] - steady["ratio_95_low"] == pytest.approx(0.0)
    assert noisy["ratio_95_high"] - noisy["ratio_95_low"] > 0.1


def test_blocks_without_connections_are_left_out_and_none_give_nan() -> None:
    m = summarise_pairs([1.0, 0.5], [0, 100], [1.0, 0.5], [100, 100])
    assert m["pairs"] == 1
    assert m["ratio_B_over_A"] == pytest.approx(1.0)
    empty = summarise_pairs([], [], [], [])
    assert empty["pairs"] == 0 and math.isnan(empty["ratio_B_over_A"])


def test_blocks_must_pair_up() -> None:
    with pytest.raises(ValueError):
        summarise_pairs([1.0], [1], [1.0, 2.0], [1, 1])


_BUSY_CHILD = """
import sys, time
end = time.process_time() + 0.2
while time.process_time() < end:
    pass
print(repr(time.process_time()), flush=True)
sys.stdin.read()  # asleep from here on, so the scheduler's sum for it is settled
"""


def test_run_seconds_follows_the_process_cpu_clock() -> None:
    """The scheduler's sum for a process equals its own CPU clock, to well under a clock
    tick (10 ms), where utime+stime would move in whole ticks. Read for a child that is
    asleep by then: a running thread's sum is brought up to date only at the next tick
    or switch, so reading one's own would lag by up to a tick."""
    child = subprocess.Popen([sys.executable, "-c", _BUSY_CHILD], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        clock = float(child.stdout.readline())
        time.sleep(0.05)
        ran = run_seconds(child.pid)
    finally:
        child.kill()
        child.wait()
    assert clock >= 0.2
    assert ran == pytest.approx(clock, abs=0.002)
    alone = run_seconds(os.getpid())  # read first: the tree's sum, read after, is later
    assert tree_run_seconds(os.getpid()) >= alone > 0
    assert run_seconds(2 ** 22 + 12345) == 0.0  # no such process


def _pair_run(command: str, workers: int, *options: str,
              timeout: float = 100) -> subprocess.CompletedProcess[bytes]:
    """``vask bench COMMAND`` with the same ``vask run`` on both sides, as JSON."""
    server = (f"{shlex.quote(sys.executable)} -m vask.cli run --workers {workers} "
              "--host 127.0.0.1 --port {port} --log-level warning --metrics-port 0")
    argv = [sys.executable, "-m", "vask.cli", "bench", command, server, server, *options,
            "--startup-timeout", "20", "--json", "--quiet"]
    return subprocess.run(argv, capture_output=True, timeout=timeout, check=False)


@pytest.mark.timeout(120)
def test_connect_pair_against_two_vask_servers() -> None:
    proc = _pair_run("connect-pair", 1, "-c", "60", "--blocks", "4", "--settle", "0.05",
                     "--connect-timeout", "10")
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    result = json.loads(proc.stdout)
    assert result["ok"], result["failures"]
    blocks = result["blocks"]
    assert blocks["A_ok"] == blocks["B_ok"] == [15, 15, 15, 15]
    # each block of each server was charged some CPU (subscribing 15 clients is work)
    assert all(c > 0 for c in blocks["A_cpu_s"] + blocks["B_cpu_s"])
    m = result["metrics"]
    assert m["pairs"] == 4
    assert m["ratio_B_over_A"] > 0 and m["ratio_95_low"] <= m["ratio_95_high"]
    assert "B / A" in format_pair(result)


def test_the_summary_names_its_unit_and_scales_it() -> None:
    m = summarise_pairs([2.0], [1_000_000], [1.0], [1_000_000], unit="s_per_million",
                        scale=1e6)
    assert m["unit"] == "s_per_million"
    assert m["A_cpu_s_per_million"] == pytest.approx(2.0)
    assert m["B_cpu_s_per_million"] == pytest.approx(1.0)
    assert m["ratio_B_over_A"] == pytest.approx(0.5)


@pytest.mark.timeout(120)
def test_fanout_pair_against_two_vask_servers() -> None:
    proc = _pair_run("fanout-pair", 2, "-s", "30", "-e", "5", "-r", "50", "--blocks", "4",
                     "--settle", "0.05")
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    result = json.loads(proc.stdout)
    assert result["ok"], result["failures"]
    blocks = result["blocks"]
    # every block delivered its 5 events to each of the 30 subscribers, no more, no less
    assert blocks["A_deliveries"] == blocks["B_deliveries"] == [150] * 4
    assert all(c > 0 for c in blocks["A_cpu_s"] + blocks["B_cpu_s"])
    assert result["latency_ms"]["A"]["count"] == result["latency_ms"]["B"]["count"] == 600
    m = result["metrics"]
    assert m["pairs"] == 4 and m["B_cpu_s_per_million"] > 0
    assert m["ratio_B_over_A"] > 0 and m["ratio_95_low"] <= m["ratio_95_high"]
    text = format_pair(result)
    assert "fanout-pair" in text and "per million deliveries" in text


@pytest.mark.timeout(60)
def test_fanout_pair_stops_on_a_rejected_publish() -> None:
    """A wrong app id is refused with a 4xx; the run fails and says so instead of
    waiting for deliveries that cannot come."""
    proc = _pair_run("fanout-pair", 1, "-s", "5", "-e", "2", "--blocks", "2",
                     "--app-id", "nope", timeout=50)
    assert proc.returncode == 1
    result = json.loads(proc.stdout)
    assert not result["ok"]
    assert result["failures"][0].startswith("publishing stopped: HTTP 404")
    assert b"Traceback" not in proc.stderr
