"""The broker's recovery after a start or a worker's resync (broker/state.py "Recovery")."""

from __future__ import annotations

import orjson

from vask.broker.state import ClusterState
from vask.config import App, Settings
from vask.envelope import (
    ENVELOPE_VERSION,
    Deliver,
    DeliverTo,
    Hello,
    Publish,
    Recovered,
    Reply,
    SignIn,
    Subscribe,
    TerminateUser,
)

W1, W2 = b"w1", b"w2"
APP = App(id="1", key="k", secret="s", enable_subscription_count=True)


def started(expected: int = 2) -> ClusterState:
    state = ClusterState(Settings(apps=(APP,), heartbeat_interval=1.0), epoch=7,
                         expected_workers=expected)
    for n, worker in enumerate((W1, W2)):
        state.hello(worker, Hello(ENVELOPE_VERSION, worker.decode(), 1, 100 + n, n), 0.0)
    return state


def join(state: ClusterState, worker: bytes, socket_id: str, user: str) -> list[object]:
    return list(state.subscribe(worker, Subscribe(0, "1", "presence-r", socket_id,
                                                  [user, {"n": user}], 100)))


def test_while_recovering_api_publishes_are_refused_unrouted() -> None:
    state = started()
    state.subscribe(W2, Subscribe(0, "1", "news", "2.1", None, 0))
    out = state.publish(W1, Publish("1", "news", "", 0.0, b"{}", False, 5), now=0.0)
    assert out == [(W1, Reply(5, {"ok": False, "error": "The cluster is recovering from a "
                                  "broker restart; retry shortly."}))]
    assert state.terminate_user(W1, TerminateUser("1", "u", 6))[0][1].body["ok"] is False
    # client events (no rid) are routed as usual
    assert state.publish(W1, Publish("1", "news", "1.1", 0.0, b"{}", True), now=0.0) == [
        (W2, Deliver("1", "news", "1.1", b"{}"))]


def test_replayed_joins_are_quiet_and_recovery_ends_when_every_worker_synced() -> None:
    state = started()
    assert join(state, W1, "1.1", "a") == []
    assert state.synced(W1) == []  # one of two
    assert join(state, W2, "2.1", "b") == []  # no member_added for a replay
    out = state.synced(W2)
    assert (W1, Recovered(7)) in out and (W2, Recovered(7)) in out
    assert not state.recovering
    # from now on a join is news
    added = join(state, W2, "2.2", "c")
    assert any(isinstance(m, Deliver) and b"member_added" in m.payload for _, m in added)
    # and an API publish is acknowledged after its deliveries
    out = state.publish(W1, Publish("1", "presence-r", "", 0.0, b"{}", False, 9), now=0.0)
    assert out[-1] == (W1, Reply(9, {"ok": True})) and len(out) == 3


def test_a_standalone_broker_ends_its_recovery_after_the_window() -> None:
    state = started(expected=0)
    state.synced(W1)
    state.synced(W2)
    assert state.recovering
    assert state.tick(10.0) == []  # the window starts
    assert state.tick(10.0 + state.recovery_window - 0.1) == []
    out = state.tick(10.0 + state.recovery_window)
    assert sorted(w for w, m in out if m == Recovered(7)) == [W1, W2]


def test_a_resyncing_worker_is_purged_and_replayed_quietly() -> None:
    state = started()
    state.synced(W1)
    state.synced(W2)
    join(state, W1, "1.1", "a")
    join(state, W2, "2.1", "b")
    # W1 lost messages and says hello again: its old state goes without member_removed
    out = state.hello(W1, Hello(ENVELOPE_VERSION, "w1", 1, 100, 0), 1.0)
    assert not any(isinstance(m, Deliver) for _, m in out)
    assert join(state, W1, "1.1", "a") == []  # its replay: no member_added either
    assert {w for w, m in state.synced(W1) if m == Recovered(7)} == {W1, W2}


def test_watchers_get_their_whole_view_once_recovered() -> None:
    """A watched user who went offline while the broker was down is never replayed: the
    watcher learns it from the view sent at the end of the recovery."""
    state = started()
    watcher = SignIn("1", "1.1", "me", ["gone", "here"])
    assert state.sign_in(W1, watcher) == []  # a replay: nothing yet
    state.sign_in(W2, SignIn("1", "2.1", "here", []))
    state.synced(W1)
    out = state.synced(W2)
    views = [m for w, m in out if isinstance(m, DeliverTo)]
    assert len(views) == 1 and views[0].socket_ids == ["1.1"]
    data = orjson.loads(orjson.loads(views[0].payload)["data"])
    assert data == {"events": [{"name": "online", "user_ids": ["here"]},
                               {"name": "offline", "user_ids": ["gone"]}]}


def test_subscription_counts_wait_for_the_recovery_and_are_all_sent_then() -> None:
    state = started()
    state.subscribe(W1, Subscribe(0, "1", "news", "1.1", None, 0))
    state.subscribe(W2, Subscribe(0, "1", "news", "2.1", None, 0))
    assert state.flush_counts(1.0) == []  # partial counts are not sent
    state.synced(W1)
    state.synced(W2)
    sent = state.flush_counts(2.0)
    assert sent and all(b'"subscription_count":2' in m.payload.replace(b"\\", b"")
                        for _, m in sent if isinstance(m, Deliver))
