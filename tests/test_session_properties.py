"""Property tests of PusherSession: any sequence of inbound messages and broker answers.

A state machine (``SessionMachine``) feeds a session random steps: arbitrary bytes,
arbitrary JSON, and plausible Pusher messages (subscribe, unsubscribe, sign-in, client
events) with random fields, at times that only move forward; the answers to its ``Ask``
actions come back later, in any order, as random ok/error bodies. The session must never
raise, and after every step (``apply_message``, ``apply_answer``, ``check_state``):

* every ``Send`` frame is a JSON object with a string ``event``; every ``Close`` code is
  in 4000-4299;
* at most ``max_channels_per_connection`` channels are held, pending ones included;
* the channels bound by ``Bind`` actions are exactly ``local_channels()``;
* the pending channels are exactly those whose latest ``Ask`` is unanswered, and only
  that latest ``Ask``'s answer settles one (an older answer changes nothing);
* no more subscribes reach the broker than the token bucket allows.

Nothing here touches a socket.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from vask.channels import kind_of
from vask.config import App
from vask.envelope import Publish, SignIn, Subscribe, Unsubscribe
from vask.session import (
    DEFAULT_SUBSCRIPTION_BURST,
    Ask,
    Bind,
    Close,
    PusherSession,
    Send,
    Tell,
    signed_subscribe,
)
from vask.signing import sign, user_string

SOCKET = "1234.5678"
BASE = App(id="3", key="k3", secret="s3")

# --- strategies ------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)

apps = st.builds(
    lambda **kw: dataclasses.replace(BASE, **kw),
    enable_client_messages=st.booleans(),
    max_client_events_per_second=st.integers(1, 4),
    max_channels_per_connection=st.integers(0, 4),
    max_subscriptions_per_second=st.integers(0, 3),
    max_watchlist_size=st.integers(1, 3),
    max_channel_name_length=st.integers(10, 40),
    max_presence_member_size_kb=st.sampled_from([0.05, 1.0]),
    max_event_payload_kb=st.sampled_from([0.05, 10.0]),
    enable_watchlist_events=st.booleans(),
)

# Mostly names from a small pool, so that subscribes, unsubscribes, client events and
# answers meet the same channels; sometimes anything at all.
_POOL = st.sampled_from([
    "news", "other", "cache-x", "private-a", "private-b", "private-encrypted-e",
    "private-cache-c", "presence-r", "presence-cache-q", "#server-to-user-u1",
    "#server-to-user-u2", "bad name", "", "c" * 41, "ünï",
])
_FOCUSED = st.sampled_from(["private-a", "presence-r", "news", "cache-x"])


def channels(known: list[str], focused: bool = False) -> st.SearchStrategy[str]:
    """A channel name: often one the session holds (``known``), so that unsubscribes
    and client events hit; in a focused run, one of four valid channels."""
    if focused:
        return _FOCUSED
    pool = st.one_of(_POOL, _POOL, _POOL, _POOL, st.text(max_size=12))
    return st.sampled_from(known) | pool if known else pool

user_ids = st.sampled_from(["u1", "u2", "1", "", "a b"]) | st.integers(-5, 5) | json_values


@st.composite
def channel_data(draw: st.DrawFn) -> str | None:
    choice = draw(st.sampled_from(["member", "member", "none", "text"]))
    if choice == "none":
        return None
    if choice == "text":
        return draw(st.text(max_size=20))
    member: dict[str, Any] = {"user_id": draw(user_ids)}
    if draw(st.booleans()):
        member["user_info"] = draw(json_values)
    return orjson.dumps(member).decode()


def pusher_data(draw: st.DrawFn, data: dict[str, Any]) -> Any:
    """``data`` as an object or as a JSON string holding one (both are allowed)."""
    return orjson.dumps(data).decode() if draw(st.booleans()) else data


@st.composite
def subscribe_messages(draw: st.DrawFn, app: App, known: list[str],
                       focused: bool) -> dict[str, Any]:
    channel = draw(channels(known, focused))
    cd = '{"user_id":"u1"}' if focused else draw(channel_data())
    data = signed_subscribe(app, SOCKET, channel, cd)
    auth = "signed" if focused else draw(
        st.sampled_from(["signed", "signed", "signed", "none", "junk", "wrong"]))
    if auth == "none":
        data.pop("auth", None)
    elif auth == "junk":
        data["auth"] = draw(json_values)
    elif auth == "wrong":
        data["auth"] = f"{app.key}:{'0' * 64}"
    return {"event": "pusher:subscribe", "data": pusher_data(draw, data)}


@st.composite
def signin_messages(draw: st.DrawFn, app: App) -> dict[str, Any]:
    user: dict[str, Any] = {"id": draw(user_ids)}
    if draw(st.booleans()):
        user["watchlist"] = draw(st.lists(user_ids, max_size=5) | json_values)
    if draw(st.booleans()):
        user["user_info"] = draw(json_values)
    text = orjson.dumps(user).decode()
    if draw(st.integers(0, 5)) == 5:
        text = draw(st.text(max_size=9))
    auth: Any = f"{app.key}:{sign(app.secret, user_string(SOCKET, text))}"
    if draw(st.integers(0, 4)) == 4:
        auth = draw(json_values)
    return {"event": "pusher:signin", "data": pusher_data(draw, {"auth": auth, "user_data": text})}


# How often each kind of inbound message comes. Hypothesis favours the first entry
# (its "simplest" choice), so that is the one the rules are most about.
_KINDS = ["subscribe"] * 6 + ["unsubscribe"] * 4 + ["signin"] * 2 + ["client"] * 3 + \
    ["bytes", "json", "other"]
_FOCUSED_KINDS = ["subscribe"] * 3 + ["unsubscribe"] * 2 + ["client"] * 2


@st.composite
def messages(draw: st.DrawFn, app: App, known: list[str], talk: list[str],
             focused: bool) -> bytes:
    """One inbound message. ``known``: the session's channels now; ``talk``: those it
    may send client events on; ``focused``: only valid subscribes, unsubscribes and
    client events on four channels (to run buckets dry and get events through)."""
    kind = draw(st.sampled_from(_FOCUSED_KINDS if focused else _KINDS))
    if kind == "bytes":
        return draw(st.binary(max_size=40))
    if kind == "json":
        return orjson.dumps(draw(json_values))
    if kind == "subscribe":
        message = draw(subscribe_messages(app, known, focused))
    elif kind == "unsubscribe":
        message = {"event": "pusher:unsubscribe",
                   "data": pusher_data(draw, {"channel": draw(channels(known, focused))})}
    elif kind == "signin":
        message = draw(signin_messages(app))
    elif kind == "client":
        event = st.sampled_from(["client-x", "client-" + "y" * 300]) | st.text(max_size=10)
        channel = draw(st.sampled_from(talk) if talk and draw(st.integers(0, 3))
                       else channels(known))
        message = {"event": draw(event), "channel": channel, "data": draw(json_values)}
    else:
        message = {"event": draw(st.sampled_from(["pusher:ping", "pusher:pong", "pusher:x"])),
                   "data": draw(json_values)}
    if not focused and draw(st.integers(0, 7)) == 7:  # an extra random field
        message[draw(st.text(max_size=6))] = draw(json_values)
    return orjson.dumps(message)


cached_events = st.none() | st.builds(
    lambda d: orjson.dumps({"event": "e", "channel": "cache-x", "data": d}).decode(),
    st.text(max_size=5))

_OK_BODIES = st.fixed_dictionaries({"ok": st.just(True)},
                                   optional={"presence": json_values, "cache": cached_events})
answer_bodies = st.one_of(
    _OK_BODIES, _OK_BODIES,
    st.fixed_dictionaries({"ok": st.just(False)},
                          optional={"type": json_values, "error": json_values,
                                    "status": json_values}),
    st.dictionaries(st.sampled_from(["ok", "type", "error", "status", "presence"]),
                    json_values, max_size=4),
)

#: how far the clock moves: mostly not at all (the worker's clock is coarse, and the
#: buckets must run dry), sometimes a fraction of a second, sometimes enough to refill
ticks = st.sampled_from([0.0, 0.1, 0.5, 0.999, 1.0]) | st.floats(0, 3)


# --- the rules checked after every step -------------------------------------------------


@dataclasses.dataclass
class Model:
    """What the driver saw, to hold the session's actions and state against."""

    app: App
    start: float
    bound: set[str] = dataclasses.field(default_factory=set)
    outstanding: list[Subscribe] = dataclasses.field(default_factory=list)
    #: channel -> its latest Ask, while neither answered nor unsubscribed
    latest: dict[str, Subscribe] = dataclasses.field(default_factory=dict)
    asks: int = 0


def check_frames(actions: list[Any]) -> None:
    for action in actions:
        assert isinstance(action, Send | Close | Tell | Ask | Bind)
        if isinstance(action, Send):
            frame = orjson.loads(action.frame)
            assert isinstance(frame, dict) and isinstance(frame.get("event"), str)
            if frame["event"] == "pusher:subscription_error":
                data = frame["data"]
                assert isinstance(data["type"], str) and isinstance(data["error"], str)
                assert isinstance(data["status"], int) and isinstance(frame["channel"], str)
        elif isinstance(action, Close):
            assert 4000 <= action.code <= 4299 and action.reason


def check_state(s: PusherSession, m: Model, now: float) -> None:
    app = m.app
    if app.max_channels_per_connection:
        assert s.channel_count() <= app.max_channels_per_connection
    # The worker's index (built from Bind actions) is what the session says it holds.
    assert set(s.local_channels()) == m.bound
    # Every pending subscription is the latest Ask for its channel, and vice versa.
    assert {c for c in s.subscriptions if not s.is_subscribed(c)} == set(m.latest)
    # Each Ask spent a token: at most a full bucket plus the refill since the start.
    rate = app.max_subscriptions_per_second
    if rate:
        burst = app.max_channels_per_connection or DEFAULT_SUBSCRIPTION_BURST
        assert m.asks <= burst + rate * (now - m.start) + 1e-6
    for channel, member in (s.members or {}).items():
        assert s.is_subscribed(channel) and member[0] == s.subscriptions[channel]


def apply_message(s: PusherSession, m: Model, raw: bytes, now: float) -> list[Any]:
    before = dict(s.subscriptions)
    actions = s.receive(raw, now)
    check_frames(actions)
    for action in actions:
        if isinstance(action, Ask):
            request = action.message
            assert request.channel not in before and request.socket_id == SOCKET
            m.outstanding.append(request)
            m.latest[request.channel] = request
            m.asks += 1
        elif isinstance(action, Tell) and isinstance(action.message, Unsubscribe):
            channel = action.message.channel
            assert channel in before and channel not in s.subscriptions
            m.latest.pop(channel, None)
        elif isinstance(action, Tell):
            assert isinstance(action.message, Publish | SignIn)
            if isinstance(action.message, Publish):
                assert s.is_subscribed(action.message.channel)
        elif isinstance(action, Bind):
            if action.on:  # only sign-in binds during receive
                assert action.channel == f"#server-to-user-{s.user_id}"
                assert action.channel not in m.bound
                m.bound.add(action.channel)
            else:
                assert action.channel in m.bound
                m.bound.discard(action.channel)
    if len(actions) > 1:
        assert sum(isinstance(a, Ask) for a in actions) <= 1
    return actions


def apply_answer(s: PusherSession, m: Model, pick: int, body: dict[str, Any]) -> list[Any]:
    request = m.outstanding.pop(pick % len(m.outstanding))
    current = m.latest.get(request.channel) is request
    actions = s.subscribe_answered(request, body)
    check_frames(actions)
    if not current:
        # Stale: unsubscribed meanwhile, or superseded by a newer subscribe.
        assert actions == []
        return actions
    del m.latest[request.channel]
    frames = [orjson.loads(a.frame) for a in actions if isinstance(a, Send)]
    if body.get("ok"):
        assert actions[0] == Bind(request.channel, True)
        assert request.channel not in m.bound
        m.bound.add(request.channel)
        assert frames[0]["event"] == "pusher_internal:subscription_succeeded"
        assert s.is_subscribed(request.channel)
    else:
        assert [f["event"] for f in frames] == ["pusher:subscription_error"]
        assert request.channel not in s.subscriptions
    return actions


class SessionMachine(RuleBasedStateMachine):
    """Drives one session (a fresh one after each close, as after a reconnect) with
    random messages, answers and clock ticks; checks the rules after every step."""

    def __init__(self) -> None:
        super().__init__()
        self.app = BASE
        self.now = 0.0
        self.session = PusherSession(BASE, SOCKET)
        self.model = Model(BASE, 0.0)

    @initialize(app=apps, start=st.floats(0, 2e9))
    def connect(self, app: App, start: float) -> None:
        self.app = app
        self.now = start
        self.reconnect()

    def reconnect(self) -> None:
        self.session = PusherSession(self.app, SOCKET)
        self.model = Model(self.app, self.now)

    def feed(self, raw: bytes) -> None:
        actions = apply_message(self.session, self.model, raw, self.now)
        if any(isinstance(a, Close) for a in actions):
            self.reconnect()  # the worker closes it; pusher-js comes back later

    def known(self) -> list[str]:
        return sorted(self.session.subscriptions)

    def talk(self) -> list[str]:
        s = self.session
        return [c for c in sorted(s.subscriptions)
                if s.is_subscribed(c) and kind_of(c).client_events]

    # --- rules ---

    @rule(dt=ticks)
    def tick(self, dt: float) -> None:
        self.now += dt

    @rule(data=st.data())
    def any_message(self, data: st.DataObject) -> None:
        self.feed(data.draw(messages(self.app, self.known(), self.talk(), False)))

    @rule(data=st.data())
    def valid_message(self, data: st.DataObject) -> None:
        """Signed subscribes, unsubscribes and client events on four good channels."""
        self.feed(data.draw(messages(self.app, self.known(), self.talk(), True)))

    @precondition(lambda self: self.talk())
    @rule(data=st.data())
    def client_event_where_subscribed(self, data: st.DataObject) -> None:
        channel = data.draw(st.sampled_from(self.talk()))
        event = data.draw(st.sampled_from(["client-x", "client-typing"]))
        self.feed(orjson.dumps({"event": event, "channel": channel,
                                "data": data.draw(json_values)}))

    @precondition(lambda self: self.model.latest)
    @rule(data=st.data())
    def leave_and_rejoin_while_pending(self, data: st.DataObject) -> None:
        """The client leaves a channel whose answer is still out and joins it again at
        once: the old answer must not settle the new subscribe."""
        channel = data.draw(st.sampled_from(sorted(self.model.latest)))
        self.feed(orjson.dumps({"event": "pusher:unsubscribe", "data": {"channel": channel}}))
        member = orjson.dumps({"user_id": data.draw(st.sampled_from(["u1", "u2"]))}).decode()
        self.feed(orjson.dumps({"event": "pusher:subscribe", "data": signed_subscribe(
            self.app, SOCKET, channel, member if kind_of(channel).presence else None)}))

    @precondition(lambda self: self.model.outstanding)
    @rule(pick=st.integers(0, 2**16), body=answer_bodies)
    def answer(self, pick: int, body: dict[str, Any]) -> None:
        apply_answer(self.session, self.model, pick, body)

    @precondition(lambda self: self.model.outstanding)
    @rule(pick=st.integers(0, 2**16), body=_OK_BODIES)
    def answer_ok(self, pick: int, body: dict[str, Any]) -> None:
        apply_answer(self.session, self.model, pick, body)

    @invariant()
    def consistent(self) -> None:
        check_state(self.session, self.model, self.now)


SessionMachine.TestCase.settings = settings(
    max_examples=80, stateful_step_count=60, deadline=None, database=None)
test_any_sequence_keeps_the_session_consistent = SessionMachine.TestCase


@settings(max_examples=60, deadline=None, database=None)
@given(app=apps, churn=st.lists(st.tuples(st.floats(0, 0.3), st.booleans()), max_size=120))
def test_subscribe_churn_is_bounded_by_the_bucket(app: App,
                                                   churn: list[tuple[float, bool]]) -> None:
    """A client that only joins and leaves presence channels as fast as it likes: what
    reaches the broker stays within the bucket, and a persistent one is closed."""
    app = dataclasses.replace(app, max_channels_per_connection=max(
        app.max_channels_per_connection, 2))
    s = PusherSession(app, SOCKET)
    now = start = 1000.0
    asks = refusals = 0
    for dt, join in churn:
        now += dt
        channel = "presence-a" if join else "presence-b"
        member = orjson.dumps({"user_id": "u"}).decode()
        actions = s.receive(orjson.dumps({"event": "pusher:subscribe",
                                          "data": signed_subscribe(app, SOCKET, channel, member)}),
                            now)
        for action in actions:
            if isinstance(action, Ask):
                asks += 1
                s.subscribe_answered(action.message, {"ok": True, "presence": {}})
            elif isinstance(action, Close):
                assert action.code == 4100
                assert refusals >= app.max_subscriptions_per_second >= 1
                return
            elif isinstance(action, Send) and b"rate limit" in action.frame:
                refusals += 1
        s.receive(orjson.dumps({"event": "pusher:unsubscribe",
                                "data": {"channel": channel}}), now)
    rate = app.max_subscriptions_per_second
    if rate:
        assert asks <= app.max_channels_per_connection + math.ceil(rate * (now - start)) + 1
