"""Client events between the workers of one `vask run`, straight and not via the broker
(workers/siblings.py), on a real `vask run --workers 3`.

The counters of /metrics tell which path an event took: ``vask_sibling_events_total``
counts each event once per receiving worker, at both ends.
"""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from tests.integration.test_metrics import Samples, get, until
from tests.pusher_client import PusherClient, close_all, connect_spread, workers_of
from tests.servers import Server, free_port, process_name, run_vask

pytestmark = pytest.mark.timeout(180)

CONFIG = """
[[apps]]
id = "1"
key = "app-key"
secret = "app-secret"
enable_client_messages = true

[[apps]]
id = "2"
key = "hooked-key"
secret = "hooked-secret"
enable_client_messages = true
webhooks = [{ url = "http://127.0.0.1:9/hook", event_types = ["client_event"] }]
"""


def sent(samples: Samples) -> float:
    return get(samples, "vask_sibling_events_total", direction="sent")


async def everyone_gets_everyone(clients: list[PusherClient], channel: str,
                                 tag: str) -> None:
    """Each client sends one client event; every other client gets each exactly once."""
    for client in clients:
        await client.subscribe(channel)
    for n, client in enumerate(clients):
        await client.send({"event": f"client-{tag}", "channel": channel, "data": {"n": n}})
    event = f"client-{tag}"
    for receiver in clients:
        want = sorted(n for n, c in enumerate(clients) if c is not receiver)
        count = len(want)
        await receiver.wait(lambda f, r=receiver, k=count: f.get("event") == event
                            and len(r.events(event)) >= k)
        assert sorted(f["data"]["n"] for f in receiver.events(event)) == want


def test_client_events_go_straight_to_the_siblings_and_survive_a_worker_restart() -> None:
    port = free_port()
    with run_vask(workers=3, config=CONFIG, env={"VASK_METRICS_PORT": str(port)}) as server:
        asyncio.run(scenario(server, port))


async def scenario(server: Server, port: int) -> None:
    clients = await connect_spread(server.ws_url, 3, 3)
    try:
        assert len(workers_of(clients)) == 3
        await everyone_gets_everyone(clients, "private-chat", "a")
        # 3 events, each to the 2 other workers; both ends count
        await until(port, lambda s: sent(s) == 6
                    and get(s, "vask_sibling_events_total", direction="received") == 6
                    and get(s, "vask_sibling_drops_total") == 0, "6 straight sends")
    finally:
        await close_all(clients)

    # An app whose client events make webhooks: through the broker, still delivered once.
    hooked_url = server.ws_url.replace("app-key", "hooked-key")
    clients = await connect_spread(hooked_url, 3, 3, key="hooked-key",
                                   secret="hooked-secret")
    try:
        await everyone_gets_everyone(clients, "private-hooked", "b")
        samples = await until(port, lambda s: sent(s) >= 6, "a scrape")
        assert sent(samples) == 6  # none of the hooked app's went straight
    finally:
        await close_all(clients)

    # A worker killed without cleaning up, and its replacement: the survivors stop
    # sending to it and the new one gets every event sent after it started.
    worker = next(pid for pid in server.children()
                  if process_name(pid).startswith("vask-worker"))
    os.kill(worker, signal.SIGKILL)
    await until(port, lambda s: get(s, "vask_worker_restarts_total") == 1
                and get(s, "vask_workers") == 3, "the worker restarted")
    clients = await connect_spread(server.ws_url, 3, 3)
    try:
        assert len(workers_of(clients)) == 3
        await everyone_gets_everyone(clients, "private-after", "c")
    finally:
        await close_all(clients)
