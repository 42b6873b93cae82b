"""A broker that stops answering (SIGSTOP) on a real `vask run --workers 1`: requests
waiting for it time out with their defined answers, and everything recovers on SIGCONT.

- a connection to an app with a quota (its admission asks the broker): close 4100;
- a subscribe the worker must ask the broker about: `pusher:subscription_error` 503;
- an HTTP API publish: 503 (never a 2xx for an event nobody routed).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import pusher
import pytest

from tests.pusher_client import PusherClient
from tests.servers import APP_ID, APP_KEY, APP_SECRET, process_name, run_vask, wait_ready

pytestmark = pytest.mark.timeout(120)

CONFIG = """
[server]
broker_timeout = 1.0
heartbeat_interval = 0.5
heartbeat_timeout = 30.0

[[apps]]
id = "1"
key = "app-key"
secret = "app-secret"

[[apps]]
id = "2"
key = "quota-key"
secret = "quota-secret"
max_connections = 10
"""


def test_requests_to_a_stopped_broker_time_out_with_their_answers() -> None:
    with run_vask(workers=1, config=CONFIG) as server:
        broker = next(p for p in server.children() if process_name(p) == "vask-broker")
        api = pusher.Pusher(app_id=APP_ID, key=APP_KEY, secret=APP_SECRET, host="127.0.0.1",
                            port=server.port, ssl=False, timeout=10)

        async def go() -> None:
            client = await PusherClient.connect(server.ws_url)
            os.kill(broker, signal.SIGSTOP)
            try:
                began = time.monotonic()
                frame = await client.subscribe("never-routed")
                assert frame["event"] == "pusher:subscription_error"
                data = frame["data"]
                assert (json.loads(data) if isinstance(data, str) else data)["status"] == 503
                assert time.monotonic() - began < 4.0

                quota_url = server.ws_url.replace(APP_KEY, "quota-key")
                quota = await PusherClient.connect(quota_url, key="quota-key",
                                                   secret="quota-secret", established=False)
                code, _ = await asyncio.wait_for(quota.closed, 8)
                assert code == 4100
                errors = quota.events("pusher:error")
                assert errors and errors[0]["data"]["code"] == 4100

                with pytest.raises(pusher.errors.PusherError) as refused:
                    await asyncio.to_thread(api.trigger, "news", "e", {"x": 1})
                assert str(refused.value).startswith("503")
            finally:
                os.kill(broker, signal.SIGCONT)
            # the same subscribe succeeds once the broker answers again
            wait_ready(server.port, time.monotonic() + 20)
            frame = await client.subscribe("routed-now")
            assert frame["event"] == "pusher_internal:subscription_succeeded"
            await client.close()

        asyncio.run(go())
