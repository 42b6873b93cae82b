"""Webhook events in the broker: which are made, their exact shape, and the numbered,
acknowledged hand-over to the sender process (broker/webhook_link.py)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import zmq

from vask.broker.state import ClusterState
from vask.broker.webhook_link import RESEND_AFTER, WebhookLink
from vask.config import App, Settings, Webhook
from vask.envelope import (
    ENVELOPE_VERSION,
    ConnClose,
    ConnOpen,
    Hello,
    Publish,
    Subscribe,
    Unsubscribe,
)

W1, W2 = b"w1", b"w2"
EVERYTHING = ("channel_occupied", "channel_vacated", "member_added", "member_removed",
              "client_event", "cache_miss", "subscription_count")
APP = App(id="1", key="k", secret="s", enable_subscription_count=True,
          webhooks=(Webhook(url="http://127.0.0.1:1/h", event_types=EVERYTHING),))


def cluster(app: App = APP, recovered: bool = True) -> ClusterState:
    state = ClusterState(Settings(apps=(app,)), epoch=1, expected_workers=2)
    for n, worker in enumerate((W1, W2)):
        state.hello(worker, Hello(ENVELOPE_VERSION, worker.decode(), 1, 100 + n, n), 0.0)
        if recovered:
            state.synced(worker)
        state.conn_open(worker, ConnOpen(0, "1", f"{n + 1}.1", 0))
        state.conn_open(worker, ConnOpen(0, "1", f"{n + 1}.2", 0))
    return state


def taken(state: ClusterState) -> list[dict[str, Any]]:
    events = [e for _, _, e in state.webhooks]
    state.webhooks = []
    return events


def sub(state: ClusterState, worker: bytes, sid: str, channel: str,
        member: list[Any] | None = None, rid: int = 0) -> None:
    state.subscribe(worker, Subscribe(rid, "1", channel, sid, member, 100))


def test_events_carry_the_app_and_the_time_of_the_message_being_handled() -> None:
    state = cluster()
    state.wall_ms = 1_700_000_000_123
    sub(state, W1, "1.1", "news")
    assert state.webhooks == [("1", 1_700_000_000_123,
                               {"name": "channel_occupied", "channel": "news"})]


def test_only_events_some_endpoint_wants_are_made() -> None:
    app = dataclasses.replace(APP, webhooks=(
        Webhook(url="http://a/", event_types=("member_added",)),
        Webhook(url="http://b/", event_types=("channel_vacated",))))
    state = cluster(app)
    sub(state, W1, "1.1", "presence-r", ["u", None])
    state.unsubscribe(W1, Unsubscribe("1", "presence-r", "1.1"))
    assert [e["name"] for e in taken(state)] == ["member_added", "channel_vacated"]
    no_hooks = cluster(dataclasses.replace(APP, webhooks=()))
    sub(no_hooks, W1, "1.1", "news")
    assert no_hooks.webhooks == []


def test_client_event_webhook_has_pushers_fields() -> None:
    state = cluster()
    sub(state, W1, "1.1", "presence-r", ["7", None])
    sub(state, W2, "2.1", "presence-r", ["8", None])
    sub(state, W1, "1.2", "private-c")
    taken(state)
    frame = orjson.dumps({"event": "client-typing", "channel": "presence-r",
                          "data": {"on": True}, "user_id": "7"})
    state.publish(W1, Publish("1", "presence-r", "1.1", 0.0, frame, True), now=0.0)
    frame = orjson.dumps({"event": "client-x", "channel": "private-c", "data": "plain"})
    state.publish(W1, Publish("1", "private-c", "1.2", 0.0, frame, True), now=0.0)
    assert taken(state) == [
        {"name": "client_event", "channel": "presence-r", "event": "client-typing",
         "data": '{"on":true}', "socket_id": "1.1", "user_id": "7"},
        {"name": "client_event", "channel": "private-c", "event": "client-x",
         "data": "plain", "socket_id": "1.2"}]
    # an HTTP API publish is not a client event
    state.publish(W1, Publish("1", "private-c", "", 0.0, frame, False, 3), now=0.0)
    assert taken(state) == []


def test_cache_miss_once_per_empty_channel_until_written_or_vacated() -> None:
    state = cluster()
    for worker, sid in ((W1, "1.1"), (W2, "2.1"), (W2, "2.2")):
        sub(state, worker, sid, "cache-x", rid=1)
    assert [e["name"] for e in taken(state)].count("cache_miss") == 1
    state.publish(W1, Publish("1", "cache-x", "", 0.001, b'{"event":"e"}'), now=0.0)
    state.now = 1.0  # the entry has expired: empty again, so a miss is news again
    state.unsubscribe(W1, Unsubscribe("1", "cache-x", "1.1"))
    sub(state, W1, "1.1", "cache-x", rid=1)
    assert [e["name"] for e in taken(state)].count("cache_miss") == 1
    for worker, sid in ((W1, "1.1"), (W2, "2.1"), (W2, "2.2")):
        state.unsubscribe(worker, Unsubscribe("1", "cache-x", sid))
    taken(state)
    sub(state, W1, "1.1", "cache-x", rid=1)
    assert [e["name"] for e in taken(state)] == ["channel_occupied", "cache_miss"]


def test_a_rebuilt_state_makes_no_occupied_vacated_or_member_webhooks() -> None:
    state = cluster(recovered=False)  # a restarted broker: the workers replay
    sub(state, W1, "1.1", "presence-r", ["u", None])
    sub(state, W2, "2.1", "news")
    assert taken(state) == []
    state.synced(W1)
    state.synced(W2)
    assert not state.recovering
    # A resyncing worker is purged and replays: still nothing.
    state.hello(W2, Hello(ENVELOPE_VERSION, "w2", 1, 101, 1), 1.0)
    state.conn_open(W2, ConnOpen(0, "1", "2.1", 0))
    sub(state, W2, "2.1", "news")
    assert taken(state) == []
    state.synced(W2)
    # After that, real changes are news again.
    state.conn_close(W2, ConnClose("1", "2.1"))
    assert taken(state) == [{"name": "channel_vacated", "channel": "news"}]


def test_subscription_count_webhook_comes_with_the_coalesced_count() -> None:
    state = cluster()
    sub(state, W1, "1.1", "news")
    sub(state, W2, "2.1", "news")
    taken(state)
    state.flush_counts(10.0)
    assert taken(state) == [{"name": "subscription_count", "channel": "news",
                             "subscription_count": 2}]


# --- the link -----------------------------------------------------------------------


@pytest.fixture()
def link(tmp_path: Any) -> Iterator[tuple[WebhookLink, zmq.Socket[bytes]]]:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    hooks = WebhookLink(context, f"ipc://{tmp_path}/w.sock", epoch=42, max_queued=5)
    hooks.bind()
    sender = context.socket(zmq.DEALER)
    sender.setsockopt(zmq.LINGER, 0)
    sender.connect(hooks.endpoint)
    yield hooks, sender
    sender.close(0)
    hooks.close()
    context.term()


def _pump(hooks: WebhookLink, now: float) -> None:
    deadline = time.monotonic() + 5
    while not hooks.socket.poll(50):
        assert time.monotonic() < deadline, "nothing from the sender"
    hooks.read(now)


def _received(sender: zmq.Socket[bytes]) -> list[list[Any]]:
    assert sender.poll(5000), "nothing from the broker"
    message = orjson.loads(sender.recv())
    assert message["t"] == "events" and message["epoch"] == 42
    return list(message["events"])


def test_events_wait_for_a_sender_then_go_numbered_until_acknowledged(
        link: tuple[WebhookLink, zmq.Socket[bytes]]) -> None:
    hooks, sender = link
    hooks.add([("1", 5, {"name": "channel_occupied", "channel": "a"})], now=0.0)
    hooks.flush(0.0)  # nobody to send to: kept
    assert len(hooks.unacked) == 1
    sender.send(b'{"t":"hello"}')
    _pump(hooks, 0.1)
    assert _received(sender) == [[1, "1", 5, {"name": "channel_occupied", "channel": "a"}]]
    hooks.add([("1", 6, {"name": "channel_vacated", "channel": "a"})], now=0.2)
    hooks.flush(0.2)
    assert [e[0] for e in _received(sender)] == [2]
    sender.send(b'{"t":"ack","epoch":41,"seq":2}')  # another broker's epoch: ignored
    sender.send(b'{"t":"ack","epoch":42,"seq":1}')
    _pump(hooks, 0.3)
    assert [e[0] for e in hooks.unacked] == [2]
    # The acknowledgement stalls: everything unacknowledged goes again.
    hooks.flush(0.3 + RESEND_AFTER + 0.1)
    assert [e[0] for e in _received(sender)] == [2]
    # A restarted sender says hello again and gets the same.
    sender.send(b'{"t":"hello"}')
    _pump(hooks, 3.0)
    assert [e[0] for e in _received(sender)] == [2]
    sender.send(b'{"t":"stats","counters":{"sent":3,"queued":1,"bad":"x"}}')
    sender.send(b"not json")
    _pump(hooks, 3.1)
    assert hooks.stats == {"sent": 3, "queued": 1}


def test_the_queue_is_bounded_oldest_dropped_and_counted(
        link: tuple[WebhookLink, zmq.Socket[bytes]]) -> None:
    hooks, _ = link
    hooks.add([("1", i, {"name": "cache_miss", "channel": f"c{i}"}) for i in range(8)], 0.0)
    assert [e[0] for e in hooks.unacked] == [4, 5, 6, 7, 8]
    assert hooks.dropped == 3
    assert [e[0] for e in hooks.fresh] == [4, 5, 6, 7, 8]
