"""/metrics on a real `vask run --workers 3`: one scrape sums every worker and the broker.

Clients are placed on all three workers (``connect_spread``), so the figures can only
be right if the broker added up every worker's snapshot. Snapshots travel once a
heartbeat, so every check polls the scrape until it matches or a deadline passes. Each
scrape is parsed by prometheus_client's own parser, which proves the format.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import urllib.request
from collections.abc import Callable

import pusher
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.pusher_client import close_all, connect_spread, workers_of
from tests.servers import APP_ID, APP_KEY, APP_SECRET, Server, free_port, process_name, run_vask

pytestmark = pytest.mark.timeout(180)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
DEADLINE = 30.0  # seconds for a figure to show up (a busy 2-core machine)
CLIENTS = 6


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def get(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), -1.0)


async def until(port: int, check: Callable[[Samples], bool], what: str) -> Samples:
    """Scrape until ``check`` passes; fail with the last scrape after the deadline."""
    deadline = time.monotonic() + DEADLINE
    while True:
        samples = await asyncio.to_thread(scrape, port)
        if check(samples):
            return samples
        if time.monotonic() > deadline:
            interesting = {k: v for k, v in samples.items() if "vask_" in k[0]}
            raise AssertionError(f"{what}: not within {DEADLINE}s; last scrape {interesting}")
        await asyncio.sleep(0.2)


def app(samples: Samples, name: str) -> float:
    return get(samples, name, app_id=APP_ID)


async def scenario(server: Server, port: int) -> None:
    clients = await connect_spread(server.ws_url, CLIENTS, 3)
    try:
        assert len(workers_of(clients)) == 3
        await until(port, lambda s: app(s, "vask_connected") == CLIENTS
                    and get(s, "vask_workers") == 3, "every client counted")
        for client in clients:
            await client.subscribe("news")
        await until(port, lambda s: app(s, "vask_subscriptions") == CLIENTS
                    and app(s, "vask_channels") == 1, "subscriptions counted")
        api = pusher.Pusher(app_id=APP_ID, key=APP_KEY, secret=APP_SECRET, host="127.0.0.1",
                            port=server.port, ssl=False, timeout=10)
        await asyncio.to_thread(api.trigger, "news", "hello", {"n": 1})
        for client in clients:
            await client.wait_for("hello", "news")
        after_publish = await until(
            port, lambda s: app(s, "vask_deliveries_total") == CLIENTS
            and app(s, "vask_http_calls_received_total") == 1
            and get(s, "vask_publish_write_seconds_count") == 1,
            "the publish counted")
        assert app(after_publish, "vask_http_received_bytes_total") > 0
        assert app(after_publish, "vask_http_transmitted_bytes_total") > 0
        # subscribes and the publish waited for the broker
        assert get(after_publish, "vask_broker_round_trip_seconds_count") >= 1
        assert app(after_publish, "vask_ws_messages_received_total") >= CLIENTS
        assert app(after_publish, "vask_ws_messages_sent_total") >= 3 * CLIENTS
        assert app(after_publish, "vask_socket_transmitted_bytes_total") > 0
        assert app(after_publish, "vask_socket_received_bytes_total") > 0
    finally:
        await close_all(clients)
    await until(port, lambda s: app(s, "vask_connected") == 0
                and app(s, "vask_new_disconnections_total")
                == app(s, "vask_new_connections_total") >= CLIENTS, "disconnections counted")


def test_one_scrape_sums_every_worker_and_survives_a_worker_restart() -> None:
    port = free_port()
    with run_vask(workers=3, env={"VASK_METRICS_PORT": str(port)}) as server:
        asyncio.run(scenario(server, port))
        before = scrape(port)
        assert get(before, "vask_worker_restarts_total") == 0
        worker = next(pid for pid in server.children()
                      if process_name(pid).startswith("vask-worker"))
        os.kill(worker, signal.SIGKILL)

        async def restarted() -> Samples:
            return await until(port, lambda s: get(s, "vask_worker_restarts_total") == 1
                               and get(s, "vask_workers") == 3, "the restart counted")

        after = asyncio.run(restarted())
        for key, figure in before.items():
            if key[0].endswith(("_total", "_count", "_bucket", "_sum")):
                assert after.get(key, -1.0) >= figure, f"{key} went from {figure} down"
