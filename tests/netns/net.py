"""Simulated hosts for the cross-host tests: Linux network namespaces and veth pairs.

The layout (names are unique per test run; addresses exist only inside the namespaces
made here, so nothing touches the machine's own network)::

        ns "<p>b1" 10.77.0.1   ns "<p>b2" 10.77.0.2   ns "<p>h1" 10.77.0.11 ...
              | eth0              | eth0                 | eth0
              +------ veth -------+------- veth ---------+----
                        bridge "br0" in ns "<p>sw" (the switch)

A host's link is cut by setting its switch-side veth down (:meth:`Net.unplug`), which is
what a pulled cable or a dead switch port looks like to both ends: packets vanish, no
reset is sent. :meth:`Net.block` drops traffic between two given hosts only.

Processes run inside a namespace with ``ip netns exec``, in their own process group,
and are killed by group. The test process itself stays in the root namespace; a
socket it needs on a simulated host is created by a thread that entered that
namespace for the moment (:func:`inside`): a socket keeps the namespace it was created
in, whichever thread uses it afterwards.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

SUBNET = "10.77.0"
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
_counter = itertools.count(1)


def unavailable() -> str:
    """Why this machine cannot build namespaces ("" when it can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    name = f"vkprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True,
                          check=False, timeout=10)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False, timeout=10)
    return ""


def _ip(*args: str, ns: str | None = None) -> None:
    cmd = ["ip", *(["-n", ns] if ns else []), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=10)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {done.stderr.strip()}")




@contextlib.contextmanager
def inside(ns: str) -> Iterator[None]:
    """Run the block with this thread in namespace ``ns`` (sockets made here live
    there), and go back to the namespace it came from afterwards."""
    with open("/proc/thread-self/ns/net") as home, open(f"/run/netns/{ns}") as there:
        if _libc.setns(there.fileno(), CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {ns} failed")
        try:
            yield
        finally:
            if _libc.setns(home.fileno(), CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back failed")


@dataclass
class Proc:
    """A process running in a namespace (its own process group)."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self, signum: int = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signum)

    def stop(self, timeout: float = 15.0) -> None:
        if self.alive():
            self.kill(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=timeout)
        self.kill(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5)


@dataclass
class Net:
    """The namespaces of one test, and every process started in them."""

    prefix: str
    scratch: Path
    hosts: dict[str, str] = field(default_factory=dict)  # host name -> address
    procs: list[Proc] = field(default_factory=list)
    #: set when a test failed while this network existed (tests/netns/conftest.py)
    failed: bool = False
    _index: dict[str, int] = field(default_factory=dict)

    def ns(self, host: str) -> str:
        return f"{self.prefix}{host}"

    @property
    def switch(self) -> str:
        return f"{self.prefix}sw"

    def build(self, hosts: dict[str, int]) -> None:
        """Create the switch and one namespace per host (name -> last address byte)."""
        _ip("netns", "add", self.switch)
        _ip("link", "add", "br0", "type", "bridge", ns=self.switch)
        _ip("link", "set", "br0", "up", ns=self.switch)
        for i, (host, last) in enumerate(hosts.items()):
            ns = self.ns(host)
            side = f"{self.prefix}s{i}"
            _ip("netns", "add", ns)
            _ip("link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", side,
                "netns", self.switch)
            _ip("link", "set", side, "master", "br0", ns=self.switch)
            _ip("link", "set", side, "up", ns=self.switch)
            _ip("addr", "add", f"{SUBNET}.{last}/24", "dev", "eth0", ns=ns)
            _ip("link", "set", "eth0", "up", ns=ns)
            _ip("link", "set", "lo", "up", ns=ns)
            self.hosts[host] = f"{SUBNET}.{last}"
            self._index[host] = i

    def unplug(self, host: str) -> None:
        _ip("link", "set", f"{self.prefix}s{self._index[host]}", "down", ns=self.switch)

    def plug(self, host: str) -> None:
        _ip("link", "set", f"{self.prefix}s{self._index[host]}", "up", ns=self.switch)

    def block(self, a: str, b: str) -> None:
        """Drop every packet between hosts ``a`` and ``b`` (both directions)."""
        _ip("route", "add", "blackhole", f"{self.hosts[b]}/32", ns=self.ns(a))
        _ip("route", "add", "blackhole", f"{self.hosts[a]}/32", ns=self.ns(b))

    def unblock(self, a: str, b: str) -> None:
        _ip("route", "del", "blackhole", f"{self.hosts[b]}/32", ns=self.ns(a))
        _ip("route", "del", "blackhole", f"{self.hosts[a]}/32", ns=self.ns(b))

    def start(self, host: str, name: str, args: list[str],
              env: dict[str, str] | None = None) -> Proc:
        """``python -m vask.cli ARGS`` inside ``host``'s namespace."""
        log_path = self.scratch / f"{name}.log"
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("VASK_")}
        (self.scratch / name).mkdir(exist_ok=True)
        full_env["TMPDIR"] = str(self.scratch / name)
        full_env["VASK_DATA_DIR"] = str(self.scratch / name / "data")
        full_env.update(env or {})
        cmd = ["ip", "netns", "exec", self.ns(host), sys.executable, "-m", "vask.cli", *args]
        with open(log_path, "ab") as log_file:
            process = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT,
                                       env=full_env, start_new_session=True)
        proc = Proc(name, process, log_path)
        self.procs.append(proc)
        return proc

    def wait_ready(self, host: str, port: int, proc: Proc, deadline: float) -> None:
        """Poll ``http://host:port/ready`` from inside ``host`` until it answers 200."""
        url = f"http://{self.hosts[host]}:{port}/ready"
        good = 0
        while time.monotonic() < deadline:
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited early:\n{proc.log()}")
            try:
                with inside(self.ns(host)), urllib.request.urlopen(url, timeout=1) as r:
                    good = good + 1 if r.status == 200 else 0
            except OSError:
                good = 0
                time.sleep(0.1)
            if good >= 3:
                return
        raise TimeoutError(f"{proc.name} not ready in time:\n{proc.log()}")

    def teardown(self) -> None:
        for proc in self.procs:
            proc.stop(timeout=5)
        for name in [*(self.ns(h) for h in self.hosts), self.switch]:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False,
                           timeout=10)


#: networks that exist now (a failing test's report gets their processes' logs)
LIVE: list[Net] = []


@contextlib.contextmanager
def network(hosts: dict[str, int]) -> Iterator[Net]:
    """A fresh set of simulated hosts, torn down (processes, namespaces, veths) at the
    end whatever happens; logs are printed and kept when the block fails."""
    prefix = f"vk{os.getpid() % 100000}{next(_counter)}"
    scratch = Path(tempfile.mkdtemp(prefix="vask-netns-"))
    net = Net(prefix, scratch)
    LIVE.append(net)
    try:
        net.build(hosts)
        yield net
    except BaseException:
        net.failed = True
        raise
    finally:
        LIVE.remove(net)
        net.teardown()
        if net.failed:
            sys.stderr.write(f"--- netns test files kept in {scratch} ---\n")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
