"""Cluster-wide rules of the broker state, driven with envelope messages (no sockets),
and the broker loop (``broker/server.py``) driven turn by turn over in-process ZeroMQ
sockets: fair shares under a flood, bad input dropped and counted."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import zmq

from vask import envelope
from vask.broker import server
from vask.broker.server import NO_SEQ, Broker
from vask.broker.state import ClusterState
from vask.config import App, Settings, Webhook
from vask.envelope import (
    ENVELOPE_VERSION,
    ConnClose,
    ConnOpen,
    Deliver,
    DeliverTo,
    Heartbeat,
    Hello,
    Publish,
    Query,
    Recovered,
    Reply,
    SignIn,
    Subscribe,
    Terminate,
    TerminateUser,
    Unsubscribe,
    Verb,
    Welcome,
)

W1, W2, W3 = b"w1", b"w2", b"w3"
APP = App(id="1", key="k", secret="s", webhooks=(Webhook(url="http://127.0.0.1:1/h"),))


def cluster(**app_changes: Any) -> ClusterState:
    app = dataclasses.replace(APP, **app_changes)
    state = ClusterState(Settings(apps=(app,)), epoch=1, expected_workers=3)
    for n, worker in enumerate((W1, W2, W3)):
        assert state.hello(worker, Hello(ENVELOPE_VERSION, worker.decode(), 1, 100 + n, n),
                           0.0) == [(worker, Welcome(True, 1, ""))]
    assert state.synced(W1) == state.synced(W2) == []
    assert state.synced(W3) == [(w, Recovered(1)) for w in (W1, W2, W3)]
    return state


def connect(state: ClusterState, worker: bytes, socket_id: str) -> None:
    assert state.conn_open(worker, ConnOpen(0, "1", socket_id, 0)) == []


def sub(state: ClusterState, worker: bytes, socket_id: str, channel: str,
        member: list[Any] | None = None, rid: int = 0, max_members: int = 100) -> list[Any]:
    return state.subscribe(worker, Subscribe(rid, "1", channel, socket_id, member, max_members))


def delivered(out: list[Any]) -> list[tuple[bytes, str, str, dict[str, Any]]]:
    return [(w, m.channel, m.exclude, orjson.loads(m.payload)) for w, m in out
            if isinstance(m, Deliver)]


def hooks(state: ClusterState) -> list[dict[str, Any]]:
    events = [e for _, _, e in state.webhooks]
    state.webhooks.clear()
    return events


def test_publish_goes_once_to_each_worker_with_subscribers() -> None:
    state = cluster()
    for worker, sid in ((W1, "1.1"), (W1, "1.2"), (W2, "2.1")):
        connect(state, worker, sid)
        sub(state, worker, sid, "news")
    out = state.publish(W1, Publish("1", "news", "1.1", 0, b'{"event":"e"}'), 0)
    assert sorted(w for w, _ in out) == [W1, W2]  # W3 has nobody; W1 once for two sockets
    assert all(m == Deliver("1", "news", "1.1", b'{"event":"e"}') for _, m in out)


def test_occupied_and_vacated_follow_the_cluster_count() -> None:
    state = cluster()
    connect(state, W1, "1.1")
    connect(state, W2, "2.1")
    sub(state, W1, "1.1", "news")
    sub(state, W2, "2.1", "news")
    assert hooks(state) == [{"name": "channel_occupied", "channel": "news"}]
    state.unsubscribe(W1, Unsubscribe("1", "news", "1.1"))
    assert hooks(state) == []
    state.conn_close(W2, ConnClose("1", "2.1"))
    assert hooks(state) == [{"name": "channel_vacated", "channel": "news"}]
    assert state.publish(W1, Publish("1", "news", "", 0, b"{}"), 0) == []


def test_unsubscribe_of_unknown_channel_changes_nothing() -> None:
    state = cluster()
    connect(state, W1, "1.1")
    assert state.unsubscribe(W1, Unsubscribe("1", "news", "1.1")) == []
    assert hooks(state) == []


def test_presence_member_events_across_workers() -> None:
    state = cluster()
    for worker, sid in ((W1, "1.1"), (W2, "2.1"), (W3, "3.1")):
        connect(state, worker, sid)
    # Ada joins on W1: nobody else yet, roster has her
    out = sub(state, W1, "1.1", "presence-r", ["ada", {"n": 1}], rid=5)
    assert out == [(W1, Reply(5, {"ok": True, "presence": {
        "ids": ["ada"], "hash": {"ada": {"n": 1}}, "count": 1}}))]
    assert hooks(state) == [{"name": "channel_occupied", "channel": "presence-r"},
                            {"name": "member_added", "channel": "presence-r", "user_id": "ada"}]
    # Bob joins on W2: W1 gets member_added; W2 holds only Bob, so it is not woken
    out = sub(state, W2, "2.1", "presence-r", ["bob", None], rid=6)
    adds = delivered(out)
    assert {w for w, *_ in adds} == {W1}
    assert all(ex == "2.1" and f["event"] == "pusher_internal:member_added" for _, _, ex, f in adds)
    assert orjson.loads(adds[0][3]["data"]) == {"user_id": "bob", "user_info": None}
    reply = next(m for _, m in out if isinstance(m, Reply))
    assert reply.body["presence"]["count"] == 2
    assert reply.body["presence"]["hash"] == {"ada": {"n": 1}, "bob": None}
    # Bob's second tab on W3: no member_added anywhere
    out = sub(state, W3, "3.1", "presence-r", ["bob", None], rid=7)
    assert delivered(out) == []
    assert [m.body["presence"]["count"] for _, m in out if isinstance(m, Reply)] == [2]
    hooks(state)
    # Bob's first tab leaves: still one connection, no member_removed
    assert delivered(state.conn_close(W2, ConnClose("1", "2.1"))) == []
    # Bob's last tab goes with its whole worker: member_removed to the others
    out = state.purge(W3)
    removed = delivered(out)
    assert [(w, f["event"]) for w, _, _, f in removed] == [(W1, "pusher_internal:member_removed")]
    assert orjson.loads(removed[0][3]["data"]) == {"user_id": "bob"}
    assert hooks(state) == [{"name": "member_removed", "channel": "presence-r", "user_id": "bob"}]


def test_a_worker_with_subscribers_answers_a_join_from_its_told_roster() -> None:
    """The broker sends a presence roster only to a worker that has no subscriber on
    the channel yet; a worker that has one was sent every member event since, and the
    new member's member_added reaches it before the answer (same link, in order)."""
    state = cluster()
    for sid in ("1.1", "1.2", "1.3"):
        connect(state, W1, sid)
    connect(state, W2, "2.1")
    first = sub(state, W1, "1.1", "presence-r", ["ada", None], rid=1)
    assert first[-1][1].body["presence"]["ids"] == ["ada"]
    out = sub(state, W1, "1.2", "presence-r", ["bob", None], rid=2)
    assert [(w, type(m).__name__) for w, m in out] == [(W1, "Deliver"), (W1, "Reply")]
    assert delivered(out)[0][3]["event"] == "pusher_internal:member_added"
    assert out[-1][1].body == {"ok": True, "roster_known": True}
    # another worker's first subscriber still gets the whole roster
    out = sub(state, W2, "2.1", "presence-r", ["cy", None], rid=3)
    assert out[-1][1].body["presence"]["ids"] == ["ada", "bob", "cy"]
    # while member events are held back (a worker syncing), told rosters may be behind
    state.syncing.add(W3)
    out = sub(state, W1, "1.3", "presence-r", ["dee", None], rid=4)
    assert out[-1][1].body["presence"]["count"] == 4


def test_presence_member_limit_counts_users_not_connections() -> None:
    state = cluster()
    for sid in ("1.1", "1.2", "1.3"):
        connect(state, W1, sid)
    sub(state, W1, "1.1", "presence-r", ["a", None], rid=1, max_members=1)
    ok = sub(state, W1, "1.2", "presence-r", ["a", None], rid=2, max_members=1)
    assert ok[-1][1].body["ok"] is True
    full = sub(state, W1, "1.3", "presence-r", ["b", None], rid=3, max_members=1)
    assert full == [(W1, Reply(3, {
        "ok": False, "type": "LimitReached", "status": 4100,
        "error": "The maximum members per presence channel limit was reached"}))]
    assert state.channels[("1", "presence-r")].count == 2


def test_cache_channel_keeps_the_last_publish_with_ttl() -> None:
    state = cluster()
    connect(state, W1, "1.1")
    connect(state, W1, "1.2")
    miss = sub(state, W1, "1.1", "cache-x", rid=1)
    assert miss[-1][1].body == {"ok": True, "cache": None}
    assert {"name": "cache_miss", "channel": "cache-x"} in hooks(state)
    payload = b'{"event":"e","channel":"cache-x","data":"d"}'
    state.publish(W1, Publish("1", "cache-x", "", 60.0, payload), now=100.0)
    state.now = 101.0
    hit = sub(state, W1, "1.2", "cache-x", rid=2)
    assert hit[-1][1].body == {"ok": True, "cache": payload.decode()}
    info = state.query(W1, Query(3, "1", "channel", {"channel": "cache-x"}), now=130.0)
    assert info[0][1].body["cache"] == {"event": "e", "data": "d", "ttl": 30.0}
    connect(state, W1, "1.3")
    state.now = 161.0  # expired but not yet swept: a miss all the same
    assert sub(state, W1, "1.3", "cache-x", rid=4)[-1][1].body == {"ok": True, "cache": None}
    state.expire_cache(160.0)
    assert ("1", "cache-x") not in state.cache


def test_connection_quota_is_cluster_wide() -> None:
    state = cluster()
    assert state.conn_open(W1, ConnOpen(1, "1", "1.1", 2)) == [(W1, Reply(1, {"ok": True}))]
    assert state.conn_open(W2, ConnOpen(2, "1", "2.1", 2)) == [(W2, Reply(2, {"ok": True}))]
    assert state.conn_open(W3, ConnOpen(3, "1", "3.1", 2)) == [(W3, Reply(3, {"ok": False}))]
    state.conn_close(W1, ConnClose("1", "1.1"))
    assert state.conn_open(W3, ConnOpen(4, "1", "3.1", 2)) == [(W3, Reply(4, {"ok": True}))]


def test_sign_in_binds_the_user_channel_and_terminate_finds_every_tab() -> None:
    state = cluster()
    connect(state, W1, "1.1")
    connect(state, W2, "2.1")
    connect(state, W2, "2.2")
    state.sign_in(W1, SignIn("1", "1.1", "u", []))
    state.sign_in(W2, SignIn("1", "2.1", "u", []))
    sub(state, W2, "2.2", "presence-r", ["u", None])  # presence-only identity: untouched
    out = state.publish(W1, Publish("1", "#server-to-user-u", "", 0, b"{}"), 0)
    assert sorted(w for w, _ in out) == [W1, W2]
    terms = state.terminate_user(W1, TerminateUser("1", "u"))
    assert sorted((w, m.socket_ids) for w, m in terms) == [(W1, ["1.1"]), (W2, ["2.1"])]
    assert all(isinstance(m, Terminate) and m.code == 4200 for _, m in terms)
    # internal channels are not listed and make no webhooks
    assert state.query(W1, Query(1, "1", "channels", {"prefix": ""}), 0)[0][1].body == {
        "channels": {"presence-r": {"subscription_count": 1, "user_count": 1}}}
    assert not [h for h in hooks(state) if h.get("channel", "").startswith("#")]


def test_watchlist_online_offline_collapses_tabs() -> None:
    state = cluster()
    for worker, sid in ((W1, "1.1"), (W2, "2.1"), (W2, "2.2")):
        connect(state, worker, sid)
    # the watcher signs in first: it is told its watched user is offline
    out = state.sign_in(W1, SignIn("1", "1.1", "watcher", ["u"]))
    (w, m), = out
    assert w == W1 and isinstance(m, DeliverTo) and m.socket_ids == ["1.1"]
    assert orjson.loads(orjson.loads(m.payload)["data"]) == {
        "events": [{"name": "offline", "user_ids": ["u"]}]}
    # first tab of u: online
    (w, m), = state.sign_in(W2, SignIn("1", "2.1", "u", []))
    assert orjson.loads(orjson.loads(m.payload)["data"]) == {
        "events": [{"name": "online", "user_ids": ["u"]}]}
    # second tab: nothing; closing one tab: nothing; closing the last: offline
    assert state.sign_in(W2, SignIn("1", "2.2", "u", [])) == []
    assert state.conn_close(W2, ConnClose("1", "2.1")) == []
    (w, m), = state.conn_close(W2, ConnClose("1", "2.2"))
    assert w == W1
    assert orjson.loads(orjson.loads(m.payload)["data"])["events"][0]["name"] == "offline"


def test_subscription_counts_are_coalesced_and_skip_presence() -> None:
    state = cluster(enable_subscription_count=True)
    for n in range(3):
        connect(state, W1, f"1.{n}")
        sub(state, W1, f"1.{n}", "news")
    sub(state, W1, "1.0", "presence-r", ["a", None])
    out = delivered(state.flush_counts(10.0))
    assert len(out) == 1  # three changes, one event
    assert out[0][3] == {"event": "pusher_internal:subscription_count", "channel": "news",
                         "data": '{"subscription_count":3}'}
    assert state.flush_counts(10.1) == []


def test_busy_channel_counts_at_most_every_five_seconds() -> None:
    state = cluster(enable_subscription_count=True)
    for n in range(102):
        connect(state, W1, f"1.{n}")
        sub(state, W1, f"1.{n}", "news")
    assert len(delivered(state.flush_counts(100.0))) == 1
    state.unsubscribe(W1, Unsubscribe("1", "news", "1.0"))
    assert state.flush_counts(101.0) == []
    assert delivered(state.flush_counts(105.5))[0][3]["data"] == '{"subscription_count":101}'


def test_hello_with_a_prefix_in_use_is_refused_and_restart_purges() -> None:
    state = cluster()
    refused = state.hello(b"w4", Hello(ENVELOPE_VERSION, "w4", 1, 100, 9), 0)
    assert refused == [(b"w4", Welcome(False, 1, "socket id prefix in use"))]
    connect(state, W1, "1.1")
    sub(state, W1, "1.1", "news")
    state.hello(W1, Hello(ENVELOPE_VERSION, "w1", 2, 100, 10), 0)  # same identity, restarted
    assert ("1", "news") not in state.channels


def test_silent_workers_expire() -> None:
    state = cluster()
    state.seen(W1, 10.0)
    assert sorted(state.expired(10.0, 5.0)) == [W2, W3]


def test_queries() -> None:
    state = cluster()
    connect(state, W1, "1.1")
    sub(state, W1, "1.1", "presence-r", ["a", None])
    sub(state, W1, "1.1", "news")
    ask = lambda kind, args: state.query(W1, Query(1, "1", kind, args), 0)[0][1].body  # noqa: E731
    assert ask("users", {"channel": "presence-r"}) == {"users": ["a"]}
    assert ask("channels", {"prefix": "presence-"}) == {
        "channels": {"presence-r": {"subscription_count": 1, "user_count": 1}}}
    assert ask("channel", {"channel": "nope"}) == {
        "occupied": False, "subscription_count": 0, "user_count": 0, "cache": None}
    assert ask("counts", {"channels": ["news"]}) == {
        "channels": {"news": {"subscription_count": 1, "user_count": 0}}}
    assert "error" in ask("bogus", {})


def test_local_first_publishes_skip_the_origin_worker() -> None:
    state = cluster()
    for worker, sid in ((W1, "1.1"), (W1, "1.2"), (W2, "2.1")):
        connect(state, worker, sid)
        sub(state, worker, sid, "private-chat")
    out = state.publish(W1, Publish("1", "private-chat", "1.1", 0, b"{}", True), 0)
    assert [w for w, _ in out] == [W2]  # W1 delivered to 1.2 itself
    out = state.publish(W1, Publish("1", "private-chat", "", 0, b"{}"), 0)
    assert sorted(w for w, _ in out) == [W1, W2]


# --- per-connection bookkeeping is O(1) per channel -------------------------------------


def test_a_connection_with_twenty_thousand_channels_closes_exactly() -> None:
    state = cluster()
    connect(state, W1, "1.1")
    connect(state, W2, "2.1")
    n = 20_000
    for i in range(n):
        sub(state, W1, "1.1", f"c{i}")
    for i in range(0, n, 1000):  # another worker shares every 1000th channel
        sub(state, W2, "2.1", f"c{i}")
    sub(state, W1, "1.1", "presence-r", ["ada", None])
    sub(state, W2, "2.1", "presence-r", ["bob", None])
    info = state.sockets[("1", "1.1")]
    # A mapping, not a list: membership, removal and the routing check cost O(1).
    assert isinstance(info.channels, dict)
    assert len(info.channels) == n + 1
    assert info.channels["presence-r"] == "ada" and info.channels["c7"] is None
    for i in range(1, n, 2):  # unsubscribe every odd channel
        state.unsubscribe(W1, Unsubscribe("1", f"c{i}", "1.1"))
    assert len(info.channels) == n // 2 + 1
    assert len(state.channels) == n // 2 + 1
    hooks(state)
    out = state.conn_close(W1, ConnClose("1", "1.1"))
    # exactly the channels 2.1 shares survive, with W2 as their only worker
    assert set(state.channels) == {("1", f"c{i}") for i in range(0, n, 1000)} | {
        ("1", "presence-r")}
    assert all(c.per_worker == {W2: 1} and c.count == 1 for c in state.channels.values())
    assert state.channels[("1", "presence-r")].members == {"bob": {"2.1": None}}
    assert ("1", "1.1") not in state.sockets
    assert not any(info.worker == W1 for info in state.sockets.values())
    assert state.connections["1"] == 1
    assert [(w, f["event"]) for w, _, _, f in delivered(out)] == [
        (W2, "pusher_internal:member_removed")]
    vacated = [h for h in hooks(state) if h["name"] == "channel_vacated"]
    assert len(vacated) == n // 2 - n // 1000


def test_purge_of_a_worker_with_many_sockets_leaves_nothing_behind() -> None:
    state = cluster()
    for s in range(200):
        connect(state, W1, f"1.{s}")
        for c in range(50):
            sub(state, W1, f"1.{s}", f"c{(s + c) % 300}")
    state.purge(W1)
    assert state.channels == {} and state.sockets == {} and W1 not in state.workers
    assert state.connections["1"] == 0


def test_sign_in_after_a_sub_to_the_own_user_channel_counts_once() -> None:
    state = cluster()
    connect(state, W1, "1.1")
    sub(state, W1, "1.1", "#server-to-user-u")
    state.sign_in(W1, SignIn("1", "1.1", "u", []))
    assert state.channels[("1", "#server-to-user-u")].count == 1
    state.conn_close(W1, ConnClose("1", "1.1"))
    assert state.channels == {}


def test_a_worker_cannot_unsubscribe_or_close_another_workers_connection() -> None:
    state = cluster()
    connect(state, W1, "1.1")
    sub(state, W1, "1.1", "news")
    assert state.unsubscribe(W2, Unsubscribe("1", "news", "1.1")) == []
    assert state.conn_close(W2, ConnClose("1", "1.1")) == []
    assert state.channels[("1", "news")].count == 1
    assert ("1", "1.1") in state.sockets


def test_cache_expiry_keeps_republished_entries_and_its_heap_stays_bounded() -> None:
    state = cluster()
    state.publish(W1, Publish("1", "cache-a", "", 10.0, b"{}"), now=0.0)
    state.publish(W1, Publish("1", "cache-b", "", 10.0, b"{}"), now=0.0)
    state.publish(W1, Publish("1", "cache-a", "", 10.0, b'{"v":2}'), now=5.0)  # until 15
    state.expire_cache(12.0)
    assert set(state.cache) == {("1", "cache-a")}
    state.expire_cache(15.0)
    assert state.cache == {}
    for t in range(10_000):  # one channel published to again and again
        state.publish(W1, Publish("1", "cache-a", "", 100.0, b"{}"), now=float(t))
    assert len(state.cache_expiry) <= 2 * len(state.cache) + 65
    state.expire_cache(10_098.0)
    assert set(state.cache) == {("1", "cache-a")}


def test_a_channel_query_survives_a_cached_payload_that_is_not_an_object() -> None:
    state = cluster()
    state.publish(W1, Publish("1", "cache-x", "", 60.0, b"[1, 2]"), now=0.0)
    body = state.query(W1, Query(1, "1", "channel", {"channel": "cache-x"}), 1.0)[0][1].body
    assert body["cache"] is None and "error" not in body


# --- the broker loop --------------------------------------------------------------------

FLOOD_BATCHES = 160
FLOOD_BATCH = 250  # envelope messages per batch: 40,000 in all


@pytest.fixture
def peers() -> Iterator[list[zmq.Socket[bytes]]]:
    made: list[zmq.Socket[bytes]] = []
    yield made
    for sock in made:
        sock.close(linger=0)


def dealer(broker: Broker, peers: list[zmq.Socket[bytes]], name: bytes) -> zmq.Socket[bytes]:
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, name)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(broker.endpoint)
    peers.append(sock)
    return sock


def received(sock: zmq.Socket[bytes]) -> list[Verb]:
    out: list[Verb] = []
    while sock.poll(0):
        out += envelope.decode_many(sock.recv_multipart()[1:])  # after the number
    return out


def welcomed(broker: Broker, sock: zmq.Socket[bytes], name: str, prefix: int) -> None:
    sock.send_multipart([NO_SEQ, *envelope.encode(Hello(ENVELOPE_VERSION, name, 1, prefix, 1))])
    for _ in range(100):
        broker.turn()
        if Welcome(True, broker.epoch, "") in received(sock):
            return
    raise AssertionError("no welcome")


def test_a_flooding_worker_gets_its_share_and_the_others_are_answered_meanwhile(
        broker: Broker, peers: list[zmq.Socket[bytes]]) -> None:
    flooder, other = dealer(broker, peers, b"a"), dealer(broker, peers, b"b")
    welcomed(broker, flooder, "a", 100)
    welcomed(broker, other, "b", 200)
    total = FLOOD_BATCHES * FLOOD_BATCH
    for b in range(FLOOD_BATCHES):
        flooder.send_multipart([NO_SEQ, *envelope.encode_batch([
            envelope.encode(Subscribe(0, "1", f"c{b * FLOOD_BATCH + i}", "100.1", None, 0))
            for i in range(FLOOD_BATCH)])])
    flooder.send_multipart([NO_SEQ, *envelope.encode(Query(1, "1", "counts", {"channels": []}))])
    other.send_multipart([NO_SEQ, *envelope.encode(Query(2, "1", "counts", {"channels": []}))])

    # Each peer gets one share per turn, in turn. (A turn may end after the flooder's
    # share if that took TURN_SECONDS on a busy machine; the next turn starts with the
    # other peer, so its answer comes in one of the first two turns.)
    answered: list[Verb] = []
    for _ in range(2):
        broker.turn()
        answered += [m for m in received(other) if isinstance(m, Reply)]
        if answered:
            break
    assert answered == [Reply(2, {"channels": {}})]
    assert 0 < len(broker.state.channels) <= 2 * server.PEER_SHARE
    assert received(flooder) == []
    # Timers run in every turn while the flood is being worked through.
    broker.next_beat = 0.0
    broker.turn()
    assert Heartbeat(broker.epoch) in received(other)
    assert len(broker.state.channels) < total
    # The flood is then handled completely, in order, and its own query answered last.
    answer: list[Verb] = []
    for _ in range(total // server.PEER_SHARE * 4):
        broker.turn()
        answer = [m for m in received(flooder) if isinstance(m, Reply)]
        if answer:
            break
    assert answer == [Reply(1, {"channels": {}})]
    assert len(broker.state.channels) == total
    assert broker.buffered == 0 and broker.inboxes == {} and not broker.ready


def test_reading_stops_at_the_buffer_limit(
        broker: Broker, peers: list[zmq.Socket[bytes]], monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(server, "BUFFER_LIMIT", 1000)
    flooder = dealer(broker, peers, b"a")
    welcomed(broker, flooder, "a", 100)
    for _ in range(20):
        flooder.send_multipart([NO_SEQ, *envelope.encode_batch(
            [envelope.encode(Heartbeat(1))] * 100)])
    assert flooder.poll(0) == 0
    broker.poller.poll(1000)
    assert broker.read(0.0) is True  # stopped at the limit, more queued
    assert broker.buffered == 1000
    assert sum(r.remaining for r in broker.inboxes[b"a"]) == 1000


def bad_frames() -> list[list[bytes]]:
    """Well-framed messages with wrong contents, and a few that are not even that."""
    pub = envelope.encode(Publish("1", "news", "", 0.0, b"{}"))
    return [
        [b"SUB", b'[1,"1","presence-r","1.1",[],100]'],  # empty member
        [b"SUB", b'[1,"1","presence-r","1.1",[null,{}],100]'],  # null user id
        [b"PUB", b'["1","news","","60",false]', b"{}"],  # string cache_ttl
        [b"PUB", b'["1","news","",true,false]', b"{}"],  # bool cache_ttl
        [b"SUB", b'[true,"1","c","1.1",null,0]'],  # bool rid
        [b"SUB", b'[1,"","c","1.1",null,0]'],  # empty app
        [b"SUB", b'[1,"1",["c"],"1.1",null,0]'],  # channel not a string
        [b"SIGNIN", b'["1","1.1","u",[1,2]]'],  # watchlist of ints
        [b"OPEN", b'[1,"1","1.1",-5]'],  # negative quota
        [b"Q", b'[1,"1","channels",[]]'],  # args not an object
        [b"UNSUB", b'["1","' + b"c" * 5000 + b'","1.1"]'],  # channel too long
        [b"SUB", b"{not json"],
        [b"NOPE", b"[]"],
        [b"HB"],
        [*pub, b"extra"],
        [b"BATCH", b'["x"]', b"HB", b"[1]"],
        [b"DLV", b'["1","news",""]', b"{}"],  # a broker -> worker verb
    ]


def test_bad_messages_are_dropped_and_counted_and_the_broker_goes_on(
        caplog: pytest.LogCaptureFixture) -> None:
    b = Broker(Settings(apps=(APP,)), "inproc://unused")
    try:
        b.handle([W1, *envelope.encode(Hello(ENVELOPE_VERSION, "w1", 1, 100, 1))], 0.0)
        b.outboxes.clear()
        caplog.set_level(logging.WARNING, "vask.broker")
        bad = bad_frames()
        for frames in bad:
            b.handle([W1, *frames], 0.0)
        assert b.dropped_bad == len(bad)
        assert b.handler_errors == 0
        assert len(caplog.records) == 1  # rate-limited: one line per LOG_INTERVAL
        b.bad_log.tick(5.0)
        assert f"{len(bad) - 1} more bad messages dropped" in caplog.records[-1].getMessage()
        # A batch with one bad message among good ones: the good ones are handled.
        good = envelope.encode(Subscribe(0, "1", "news", "1.1", None, 0))
        b.handle([W1, *envelope.encode_batch([good, bad[0], envelope.encode(
            Subscribe(7, "1", "other", "1.1", None, 0))])], 0.0)
        assert b.dropped_bad == len(bad) + 1
        assert set(b.state.channels) == {("1", "news"), ("1", "other")}
        assert b.outboxes[W1] == [envelope.encode(Reply(7, {"ok": True}))]
    finally:
        b.router.close(linger=0)


def test_an_exception_while_handling_one_message_is_logged_and_counted(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    b = Broker(Settings(apps=(APP,)), "inproc://unused")
    try:
        b.handle([W1, *envelope.encode(Hello(ENVELOPE_VERSION, "w1", 1, 100, 1))], 0.0)

        def broken(*_: object) -> None:
            raise RuntimeError("a bug")

        monkeypatch.setattr(b.state, "publish", broken)
        pub = envelope.encode(Publish("1", "news", "", 0.0, b"{}"))
        query = envelope.encode(Query(3, "1", "counts", {"channels": []}))
        for _ in range(50):
            b.handle([W1, *envelope.encode_batch([pub, query])], 0.0)
        assert b.handler_errors == 50
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1 and errors[0].exc_info is not None
        # every query after a failing publish was still answered
        assert b.outboxes[W1].count(envelope.encode(Reply(3, {"channels": {}}))) == 50
    finally:
        b.router.close(linger=0)


def test_unknown_peers_get_one_resync_per_flush() -> None:
    b = Broker(Settings(apps=(APP,)), "inproc://unused")
    try:
        beat = envelope.encode(Heartbeat(1))
        b.handle([b"ghost", *envelope.encode_batch([beat] * 100)], 0.0)
        assert len(b.outboxes[b"ghost"]) == 1
    finally:
        b.router.close(linger=0)


def test_the_frame_limit_follows_the_settings() -> None:
    assert server.max_frame_bytes(Settings()) == server.MAX_FRAME_BYTES
    big = Settings(max_http_body_bytes=100 * 1024 * 1024)
    assert server.max_frame_bytes(big) > 400 * 1024 * 1024


def test_one_channel_and_one_worker_are_stored_compactly_and_grow_back() -> None:
    """A connection in one plain channel keeps just its name, a channel on one worker
    just that worker; both become the general forms on a second entry and return."""
    state = cluster()
    for worker, sid in ((W1, "1.1"), (W1, "1.2"), (W2, "2.1")):
        connect(state, worker, sid)
    sub(state, W1, "1.1", "c")
    info, channel = state.sockets[("1", "1.1")], state.channels[("1", "c")]
    assert info.channels == "c" and channel.workers == W1 and channel.count == 1
    sub(state, W1, "1.2", "c")
    assert channel.workers == W1 and channel.per_worker == {W1: 2}
    sub(state, W2, "2.1", "c")
    assert channel.per_worker == {W1: 2, W2: 1} and channel.on_worker(W2) == 1
    assert len(delivered(state.publish(W2, Publish("1", "c", "", 0, b"{}"), 0))) == 2
    sub(state, W1, "1.1", "presence-p", ["ada", None])
    assert info.channels == {"c": None, "presence-p": "ada"}
    state.unsubscribe(W2, Unsubscribe("1", "c", "2.1"))
    assert channel.workers == W1 and channel.on_worker(W1) == 2 and channel.on_worker(W2) == 0
    state.unsubscribe(W1, Unsubscribe("1", "c", "1.1"))
    assert info.channels == {"presence-p": "ada"} and channel.per_worker == {W1: 1}
    state.conn_close(W1, ConnClose("1", "1.2"))
    assert ("1", "c") not in state.channels
    state.conn_close(W1, ConnClose("1", "1.1"))
    assert state.channels == {} and ("1", "1.1") not in state.sockets
