"""Cluster-wide rules of the broker state, driven with envelope messages (no sockets)."""

from __future__ import annotations

import dataclasses
from typing import Any

import orjson

from vask.broker.state import ClusterState
from vask.config import App, Settings, Webhook
from vask.envelope import (
    ENVELOPE_VERSION,
    ConnClose,
    ConnOpen,
    Deliver,
    DeliverTo,
    Hello,
    Publish,
    Query,
    Reply,
    SignIn,
    Subscribe,
    Terminate,
    TerminateUser,
    Unsubscribe,
    Welcome,
)

W1, W2, W3 = b"w1", b"w2", b"w3"
APP = App(id="1", key="k", secret="s", webhooks=(Webhook(url="http://127.0.0.1:1/h"),))


def cluster(**app_changes: Any) -> ClusterState:
    app = dataclasses.replace(APP, **app_changes)
    state = ClusterState(Settings(apps=(app,)), epoch=1)
    for n, worker in enumerate((W1, W2, W3)):
        assert state.hello(worker, Hello(ENVELOPE_VERSION, worker.decode(), 1, 100 + n, n),
                           0.0) == [(worker, Welcome(True, 1, ""))]
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
    events = [e for _, e in state.webhooks]
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
    terms = state.terminate_user(TerminateUser("1", "u"))
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
