"""Process-tree accounting on the test's own process, bottleneck attribution, servers."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from vask.bench.procstat import (
    cpu_seconds,
    machine_busy_seconds,
    process_tree,
    rss_pss_kb,
    sample_tree,
)
from vask.bench.report import bottleneck
from vask.bench.server import ManagedServer, free_port, substitute_ports


def test_tree_contains_children_and_cpu_grows() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        tree = process_tree(os.getpid())
        assert tree[0] == os.getpid()
        assert child.pid in tree
        before = cpu_seconds(os.getpid())
        t = time.process_time()
        while time.process_time() - t < 0.15:
            pass
        assert cpu_seconds(os.getpid()) - before >= 0.05
        s = sample_tree(os.getpid(), memory=True)
        assert child.pid in s.cpu and s.rss_kb > 1000 and 0 < s.pss_kb <= s.rss_kb + 1
    finally:
        child.kill()
        child.wait()
    assert process_tree(child.pid) == []
    assert rss_pss_kb(child.pid) == (0, 0)
    busy, total = machine_busy_seconds()
    assert 0 < busy <= total


def test_bottleneck_attribution() -> None:
    assert bottleneck(1.0, {1: 0.97}, {2: 0.3}, 1.3, 2).startswith("server")
    assert bottleneck(1.0, {1: 0.4}, {2: 0.95, 3: 0.1}, 1.5, 2).startswith("load generator")
    m = bottleneck(1.0, {1: 0.8}, {2: 0.6, 3: 0.5}, 1.95, 2)
    assert m.startswith("machine") and "load generator uses most" in m
    assert bottleneck(1.0, {1: 0.1}, {2: 0.1}, 0.3, 2).startswith("none")
    assert bottleneck(1.0, None, {2: 0.2}, 0.3, 2).startswith("none")


def test_ports_in_allowed_range() -> None:
    p = free_port()
    assert 17000 <= p <= 17999
    cmd, main = substitute_ports("srv --port {port} --metrics {port2}")
    assert f"--port {main}" in cmd and "{port2}" not in cmd and "{port}" not in cmd


@pytest.mark.timeout(30)
def test_managed_server_starts_and_stops_whole_tree() -> None:
    # A shell that starts a background grandchild and a listening server.
    code = (
        "import socket,subprocess,sys,time;"
        "subprocess.Popen([sys.executable,'-c','import time; time.sleep(60)']);"
        "s=socket.socket(); s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen();"
        "time.sleep(60)"
    )
    srv = ManagedServer(f"{sys.executable} -c \"{code}\" {{port}}", startup_timeout=15)
    srv.start()
    try:
        tree = process_tree(srv.pid)
        assert len(tree) >= 2  # the server and its grandchild at least
    finally:
        srv.stop(grace=2)
    time.sleep(0.1)
    for pid in tree:
        assert not os.path.exists(f"/proc/{pid}") or _zombie(pid)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True
