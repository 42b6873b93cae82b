"""An HTTP API publish to a channel nobody is subscribed to is answered at once.

The broker answers a publish only after handing its deliveries to ZeroMQ, in its
flush; a publish that delivers to nobody produced no deliveries, and its answer used
to wait for the next flush that had some, in practice the next heartbeat (1 s).
"""

from __future__ import annotations

import statistics
import time

import pusher
import pytest

from tests.servers import APP_ID, APP_KEY, APP_SECRET, run_vask

pytestmark = pytest.mark.timeout(90)


def test_a_publish_to_an_empty_channel_is_answered_without_waiting_for_a_heartbeat() -> None:
    with run_vask(workers=1) as server:
        client = pusher.Pusher(app_id=APP_ID, key=APP_KEY, secret=APP_SECRET,
                               host="127.0.0.1", port=server.port, ssl=False, timeout=10)
        took = []
        for i in range(9):
            began = time.monotonic()
            assert client.trigger(f"nobody-{i}", "e", {"n": i}) == {}
            took.append(time.monotonic() - began)
    # the heartbeat is 1 s: waiting for it would put the median near 1 s
    assert statistics.median(took) < 0.3, took
