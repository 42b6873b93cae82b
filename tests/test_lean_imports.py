"""What each process loads decides part of its memory, and what the supervisor loads is
in every process it forks (each counts the inherited pages in its RSS). These tests keep
the optional heavy modules out of processes that do not use them: they run a fresh
interpreter, import what the process imports, and list what came with it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

#: loaded only with TLS, CURVE, /metrics or the dashboard (``docs/benchmarks.md``,
#: "Memory per idle connection")
OPTIONAL = ("ssl", "asyncio", "prometheus_client", "aiohttp", "zmq.auth.thread",
            "vask.bench")


def loaded_after(*modules: str) -> set[str]:
    code = ("import json, sys\n" + "".join(f"import {m}\n" for m in modules)
            + f"print(json.dumps([m for m in {OPTIONAL!r} if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    return set(json.loads(out))


def test_the_supervisor_loads_none_of_the_optional_modules() -> None:
    assert loaded_after("vask.cli", "vask.supervisor") == set()


def test_a_plain_broker_loads_none_of_the_optional_modules() -> None:
    assert loaded_after("vask.cli", "vask.supervisor", "vask.broker.server") == set()


@pytest.mark.parametrize(("module", "brings"), [
    ("vask.broker.metrics", {"prometheus_client"}),
    ("vask.broker.admin", {"aiohttp", "asyncio"}),
])
def test_the_serving_modules_bring_their_libraries(module: str, brings: set[str]) -> None:
    # the other side of the check above: the names are right, so its silence means
    # something
    assert brings <= loaded_after(module)


def test_a_worker_loads_what_it_serves_with_only() -> None:
    assert loaded_after("vask.cli", "vask.supervisor", "vask.workers.server") \
        == {"asyncio", "ssl"}
