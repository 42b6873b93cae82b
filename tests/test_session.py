"""The per-connection Pusher rules, fed messages and read back actions (no sockets)."""

from __future__ import annotations

import dataclasses
from typing import Any

import orjson
import pytest

from vask.config import App
from vask.envelope import Publish, SignIn, Subscribe, Unsubscribe
from vask.session import (
    Ask,
    Bind,
    Close,
    PusherSession,
    Send,
    Subscriptions,
    Tell,
    signed_subscribe,
)
from vask.signing import sign, user_string

APP = App(id="3", key="278d425bdf160c739803", secret="7ad3773142a6692b25b8",
          enable_client_messages=True)
SOCKET = "1234.1234"


def session(**changes: Any) -> PusherSession:
    return PusherSession(dataclasses.replace(APP, **changes), SOCKET)


def feed(s: PusherSession, message: Any, now: float = 1000.0) -> list[Any]:
    return s.receive(orjson.dumps(message), now)


def sent(actions: list[Any]) -> list[dict[str, Any]]:
    return [orjson.loads(a.frame) for a in actions if isinstance(a, Send)]


def told(actions: list[Any]) -> list[Any]:
    return [a.message for a in actions if isinstance(a, Tell)]


def subscribe(s: PusherSession, channel: str, channel_data: str | None = None,
              now: float = 1000.0) -> list[Any]:
    """Subscribe; plain channels are settled at once with the broker's {"ok": true}."""
    data = signed_subscribe(s.app, s.socket_id, channel, channel_data)
    actions = feed(s, {"event": "pusher:subscribe", "data": data}, now)
    asks = [a for a in actions if isinstance(a, Ask)]
    if asks and asks[0].message.member is None and not channel.startswith(
            ("cache-", "private-cache-", "private-encrypted-cache-")):
        return actions + s.subscribe_answered(asks[0].message, {"ok": True})
    return actions


def settle(s: PusherSession, actions: list[Any], body: dict[str, Any]) -> list[Any]:
    (ask,) = [a for a in actions if isinstance(a, Ask)]
    return s.subscribe_answered(ask.message, body)


def signin(s: PusherSession, user_data: dict[str, Any]) -> list[Any]:
    text = orjson.dumps(user_data).decode()
    auth = f"{s.app.key}:{sign(s.app.secret, user_string(s.socket_id, text))}"
    return feed(s, {"event": "pusher:signin", "data": {"auth": auth, "user_data": text}})


# --- framing -------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [b"not json", b"\xff\xfe", b"[1,2]", b'{"event": 5}', b"{}"])
def test_malformed_messages_get_an_error_and_nothing_else(raw: bytes) -> None:
    actions = session().receive(raw, 0)
    (frame,) = sent(actions)
    assert frame["event"] == "pusher:error"
    assert frame["data"]["code"] is None and frame["data"]["message"]
    assert len(actions) == 1


def test_ping_gets_pong_with_string_data() -> None:
    assert sent(feed(session(), {"event": "pusher:ping", "data": {}})) == [
        {"event": "pusher:pong", "data": "{}"}]
    assert feed(session(), {"event": "pusher:pong"}) == []


def test_unknown_pusher_event_is_an_error() -> None:
    (frame,) = sent(feed(session(), {"event": "pusher:dance"}))
    assert "pusher:dance" in frame["data"]["message"]


# --- subscriptions -------------------------------------------------------------------


def test_public_subscribe_is_settled_by_an_answer() -> None:
    s = session()
    actions = feed(s, {"event": "pusher:subscribe", "data": {"channel": "news", "auth": ""}})
    assert actions == [Ask(Subscribe(0, "3", "news", SOCKET, None, 0))]
    assert not s.is_subscribed("news")
    done = s.subscribe_answered(actions[0].message, {"ok": True})
    assert Bind("news", True) in done
    assert sent(done) == [{"event": "pusher_internal:subscription_succeeded",
                           "channel": "news", "data": "{}"}]
    assert s.is_subscribed("news")


def test_subscribe_data_may_be_a_json_string() -> None:
    actions = feed(session(), {"event": "pusher:subscribe", "data": '{"channel":"news"}'})
    assert actions == [Ask(Subscribe(0, "3", "news", SOCKET, None, 0))]


@pytest.mark.parametrize("channel", ["", "a b", "ünï", "x" * 201, "#secret", 5])
def test_invalid_channel_names_are_refused(channel: Any) -> None:
    s = session()
    (frame,) = sent(feed(s, {"event": "pusher:subscribe", "data": {"channel": channel}}))
    assert frame["event"] == "pusher:subscription_error"
    assert frame["data"]["status"] == 4009 and frame["data"]["type"] == "InvalidChannel"
    assert not s.subscriptions


def test_duplicate_subscribe_is_an_error_and_keeps_one_subscription() -> None:
    s = session()
    subscribe(s, "news")
    actions = subscribe(s, "news")
    assert sent(actions)[0]["data"]["message"] == "Existing subscription to channel news"
    assert not told(actions)


def test_private_subscribe_with_the_spec_signature() -> None:
    #  vector: 1234.1234:private-foobar
    auth = "278d425bdf160c739803:58df8b0c36d6982b82c3ecf6b4662e34fe8c25bba48f5369f135bf843651c3a4"
    s = session()
    actions = feed(s, {"event": "pusher:subscribe",
                       "data": {"channel": "private-foobar", "auth": auth}})
    assert actions == [Ask(Subscribe(0, "3", "private-foobar", SOCKET, None, 0))]
    assert s.authorized


@pytest.mark.parametrize("auth", [None, "", "278d425bdf160c739803:00", "wrongkey:" + "0" * 64, 7])
def test_private_subscribe_with_bad_auth_is_refused(auth: Any) -> None:
    s = session()
    data: dict[str, Any] = {"channel": "private-foobar"}
    if auth is not None:
        data["auth"] = auth
    (frame,) = sent(feed(s, {"event": "pusher:subscribe", "data": data}))
    assert frame["event"] == "pusher:subscription_error"
    assert frame["data"]["type"] == "AuthError" and frame["data"]["status"] == 401
    assert not s.subscriptions and not s.authorized


def test_presence_subscribe_asks_the_broker_then_sends_the_roster() -> None:
    s = session()
    channel_data = '{"user_id":10,"user_info":{"name":"Mr. Channels"}}'
    actions = subscribe(s, "presence-foobar", channel_data)
    (ask,) = [a for a in actions if isinstance(a, Ask)]
    assert ask.message.member == ["10", {"name": "Mr. Channels"}]  # integer id as a string
    assert not sent(actions) and not s.is_subscribed("presence-foobar")
    roster = {"ids": ["10"], "hash": {"10": {"name": "Mr. Channels"}}, "count": 1}
    done = s.subscribe_answered(ask.message, {"ok": True, "presence": roster})
    assert Bind("presence-foobar", True) in done
    (frame,) = sent(done)
    assert orjson.loads(frame["data"]) == {"presence": roster}
    assert s.is_subscribed("presence-foobar")


def test_presence_signature_covers_channel_data_byte_for_byte() -> None:
    s = session()
    good = signed_subscribe(s.app, SOCKET, "presence-r", '{"user_id":"1"}')
    good["channel_data"] = '{"user_id": "1"}'  # same JSON, different bytes
    (frame,) = sent(feed(s, {"event": "pusher:subscribe", "data": good}))
    assert frame["data"]["type"] == "AuthError"


@pytest.mark.parametrize("channel_data, kind", [
    ("not json", "InvalidChannelData"),
    ('{"user_info":{}}', "InvalidChannelData"),
    ('{"user_id":""}', "InvalidChannelData"),
    ('{"user_id":true}', "InvalidChannelData"),
    ('{"user_id":"' + "u" * 129 + '"}', "InvalidChannelData"),
    ('{"user_id":"1","user_info":"' + "x" * 1100 + '"}', "LimitReached"),
])
def test_presence_channel_data_problems(channel_data: str, kind: str) -> None:
    (frame,) = sent(subscribe(session(), "presence-r", channel_data))
    assert frame["event"] == "pusher:subscription_error"
    assert frame["data"]["type"] == kind


def test_presence_without_channel_data_uses_the_signed_in_user() -> None:
    s = session()
    signin(s, {"id": "u7", "user_info": {"name": "Ann"}})
    actions = subscribe(s, "presence-r")
    (ask,) = [a for a in actions if isinstance(a, Ask)]
    assert ask.message.member == ["u7", {"name": "Ann"}]


def test_presence_without_channel_data_or_signin_is_refused() -> None:
    (frame,) = sent(subscribe(session(), "presence-r"))
    assert frame["data"]["type"] == "AuthError"


def test_full_presence_channel_is_reported_and_not_subscribed() -> None:
    s = session()
    actions = subscribe(s, "presence-r", '{"user_id":"1"}')
    done = settle(s, actions, {"ok": False, "type": "LimitReached", "status": 4100,
                               "error": "The maximum members per presence channel limit "
                                        "was reached"})
    (frame,) = sent(done)
    assert frame["data"] == {"type": "LimitReached", "status": 4100,
                             "error": "The maximum members per presence channel limit was reached"}
    assert "presence-r" not in s.subscriptions


def test_cache_channel_replays_the_cached_event_after_success() -> None:
    s = session()
    actions = subscribe(s, "cache-x")
    cached = '{"event":"e","channel":"cache-x","data":"1"}'
    frames = sent(settle(s, actions, {"ok": True, "cache": cached}))
    assert [f["event"] for f in frames] == ["pusher_internal:subscription_succeeded", "e"]


def test_cache_channel_miss() -> None:
    s = session()
    frames = sent(settle(s, subscribe(s, "private-cache-x"), {"ok": True, "cache": None}))
    assert frames[1] == {"event": "pusher:cache_miss", "channel": "private-cache-x"}


def test_unsubscribe_while_the_answer_is_in_flight() -> None:
    s = session()
    actions = subscribe(s, "cache-x")
    left = feed(s, {"event": "pusher:unsubscribe", "data": {"channel": "cache-x"}})
    assert told(left) == [Unsubscribe("3", "cache-x", SOCKET)]
    assert not [a for a in left if isinstance(a, Bind)]
    assert settle(s, actions, {"ok": True, "cache": None}) == []


def test_unsubscribe_unknown_channel_is_ignored() -> None:
    assert feed(session(), {"event": "pusher:unsubscribe", "data": {"channel": "x"}}) == []


def test_unsubscribe() -> None:
    s = session()
    subscribe(s, "news")
    actions = feed(s, {"event": "pusher:unsubscribe", "data": {"channel": "news"}})
    assert actions == [Bind("news", False), Tell(Unsubscribe("3", "news", SOCKET))]


# --- sign-in -------------------------------------------------------------------------


def test_signin_with_the_spec_vector() -> None:
    s = session()
    auth = "278d425bdf160c739803:4708d583dada6a56435fb8bc611c77c359a31eebde13337c16ab43aa6de336ba"
    actions = feed(s, {"event": "pusher:signin",
                       "data": {"auth": auth, "user_data": '{"id":"12345"}'}})
    assert sent(actions) == [{"event": "pusher:signin_success",
                              "data": {"user_data": '{"id":"12345"}'}}]
    assert Bind("#server-to-user-12345", True) in actions
    assert told(actions) == [SignIn("3", SOCKET, "12345", [])]
    assert s.user_id == "12345" and s.authorized


def test_user_channel_subscribe_only_for_the_signed_in_user() -> None:
    s = session()
    refused = feed(s, {"event": "pusher:subscribe", "data": {"channel": "#server-to-user-1"}})
    assert sent(refused)[0]["event"] == "pusher:subscription_error"
    signin(s, {"id": "1"})
    ok = feed(s, {"event": "pusher:subscribe", "data": {"channel": "#server-to-user-1"}})
    assert sent(ok)[0]["event"] == "pusher_internal:subscription_succeeded"
    assert not told(ok)  # sign-in already bound it
    other = feed(s, {"event": "pusher:subscribe", "data": {"channel": "#server-to-user-2"}})
    assert sent(other)[0]["event"] == "pusher:subscription_error"


@pytest.mark.parametrize("user_data, problem", [
    ({"name": "no id"}, "non-empty 'id'"),
    ({"id": ""}, "non-empty 'id'"),
    ({"id": "a b"}, "may hold only"),
    ({"id": "1", "watchlist": "2"}, "watchlist"),
])
def test_signin_problems(user_data: dict[str, Any], problem: str) -> None:
    s = session()
    (frame,) = sent(signin(s, user_data))
    assert frame["event"] == "pusher:error" and frame["data"]["code"] == 4009
    assert problem in frame["data"]["message"]
    assert s.user_id is None


def test_signin_bad_signature() -> None:
    s = session()
    (frame,) = sent(feed(s, {"event": "pusher:signin",
                             "data": {"auth": "278d425bdf160c739803:00",
                                      "user_data": '{"id":"1"}'}}))
    assert frame["data"]["code"] == 4009 and s.user_id is None


def test_signin_as_someone_else_keeps_the_first_identity() -> None:
    s = session()
    signin(s, {"id": "1"})
    (frame,) = sent(signin(s, {"id": "2"}))
    assert "already signed in" in frame["data"]["message"]
    assert s.user_id == "1"


def test_watchlist_is_cut_to_the_limit_with_4302() -> None:
    s = session(max_watchlist_size=2)
    actions = signin(s, {"id": "1", "watchlist": ["a", "b", "c"]})
    frames = sent(actions)
    assert frames[1]["data"]["code"] == 4302
    assert told(actions) == [SignIn("3", SOCKET, "1", ["a", "b"])]


# --- client events -------------------------------------------------------------------


def client_event(s: PusherSession, channel: str, now: float = 1000.0,
                 event: str = "client-typing", data: Any = None) -> list[Any]:
    return feed(s, {"event": event, "channel": channel,
                    "data": {"on": True} if data is None else data}, now)


def test_client_event_is_published_excluding_the_sender() -> None:
    s = session()
    subscribe(s, "private-chat")
    (message,) = told(client_event(s, "private-chat"))
    assert isinstance(message, Publish)
    assert message.exclude == SOCKET and message.cache_ttl == 0
    assert orjson.loads(message.payload) == {"event": "client-typing", "channel": "private-chat",
                                             "data": {"on": True}}


def test_client_event_on_presence_carries_the_senders_user_id_not_the_clients() -> None:
    s = session()
    actions = subscribe(s, "presence-chat", '{"user_id":"u1"}')
    settle(s, actions, {"ok": True, "presence": {"ids": ["u1"], "hash": {}, "count": 1}})
    actions = feed(s, {"event": "client-x", "channel": "presence-chat", "data": "d",
                       "user_id": "forged"})
    (message,) = told(actions)
    assert orjson.loads(message.payload)["user_id"] == "u1"


@pytest.mark.parametrize("setup, channel, code, words", [
    ({"enable_client_messages": False}, "private-chat", 4301, "not enabled"),
    ({}, "news", 4301, "only allowed on private and presence"),
    ({}, "private-encrypted-x", 4301, "only allowed on private and presence"),
    ({}, "private-other", None, "not subscribed to channel private-other"),
])
def test_client_event_violations(setup: dict[str, Any], channel: str, code: int | None,
                                 words: str) -> None:
    s = session(**setup)
    for c in ("news", "private-chat", "private-encrypted-x"):
        subscribe(s, c)
    actions = client_event(s, channel)
    assert not told(actions)
    (frame,) = sent(actions)
    assert frame["event"] == "pusher:error" and frame["channel"] == channel
    assert frame["data"]["code"] == code and words in frame["data"]["message"]


def test_client_event_limits() -> None:
    s = session(max_event_payload_kb=1, max_event_name_length=20)
    subscribe(s, "private-chat")
    big = sent(client_event(s, "private-chat", data="x" * 1025))[0]
    assert big["data"]["code"] == 4301 and "larger" in big["data"]["message"]
    long = sent(client_event(s, "private-chat", event="client-" + "x" * 20))[0]
    assert long["data"]["code"] == 4301 and "longer" in long["data"]["message"]


def test_client_event_rate_limit_per_second() -> None:
    s = session(max_client_events_per_second=3)
    subscribe(s, "private-chat")
    results = [bool(told(client_event(s, "private-chat", now=50.2))) for _ in range(5)]
    assert results == [True, True, True, False, False]
    rejected = sent(client_event(s, "private-chat", now=50.9))[0]
    assert rejected["data"] == {"code": 4301, "message": "Client event rejected due to rate limit"}
    assert told(client_event(s, "private-chat", now=51.0))  # a new second


def test_replay_lists_settled_subscriptions_with_members() -> None:
    s = session()
    subscribe(s, "news")
    actions = subscribe(s, "presence-r", '{"user_id":"u1","user_info":{"a":1}}')
    settle(s, actions, {"ok": True, "presence": {"ids": [], "hash": {}, "count": 0}})
    subscribe(s, "cache-pending")
    assert sorted(s.replay_subscriptions(), key=str) == sorted(
        [("news", None), ("presence-r", ["u1", {"a": 1}])], key=str)


# --- per-connection subscription limits ---------------------------------------------


def sub_error(channel: str, kind: str, error: str, status: int) -> list[Any]:
    """The exact actions of a refused subscribe."""
    return [Send(orjson.dumps({"event": "pusher:subscription_error", "channel": channel,
                               "data": {"type": kind, "error": error, "status": status}}))]


def raw_subscribe(s: PusherSession, channel: str, now: float = 1000.0) -> list[Any]:
    """A signed subscribe, left unsettled."""
    return feed(s, {"event": "pusher:subscribe",
                    "data": signed_subscribe(s.app, s.socket_id, channel)}, now)


def unsubscribe(s: PusherSession, channel: str, now: float = 1000.0) -> list[Any]:
    return feed(s, {"event": "pusher:unsubscribe", "data": {"channel": channel}}, now)


def asked(actions: list[Any]) -> bool:
    return [type(a) for a in actions] == [Ask]


def test_channel_limit_refuses_the_one_over_and_keeps_the_connection() -> None:
    s = session(max_channels_per_connection=2, max_subscriptions_per_second=0)
    subscribe(s, "a")
    raw_subscribe(s, "private-b")  # still pending: counts too
    assert raw_subscribe(s, "c") == sub_error(
        "c", "LimitReached", "Too many channels on one connection: at most 2", 4301)
    assert set(s.subscriptions) == {"a", "private-b"}
    unsubscribe(s, "private-b")  # a pending one leaving frees its place
    assert asked(raw_subscribe(s, "c"))


def test_channel_limit_default_is_200_and_named_in_the_error() -> None:
    s = session()
    for i in range(200):  # also within the default burst (200 tokens)
        assert asked(raw_subscribe(s, f"c{i}"))
    assert raw_subscribe(s, "one-more") == sub_error(
        "one-more", "LimitReached", "Too many channels on one connection: at most 200", 4301)
    assert len(s.subscriptions) == 200


def test_channel_limit_does_not_count_the_signin_user_channel() -> None:
    s = session(max_channels_per_connection=2, max_subscriptions_per_second=0)
    signin(s, {"id": "u1"})
    ok = feed(s, {"event": "pusher:subscribe", "data": {"channel": "#server-to-user-u1"}})
    assert sent(ok)[0]["event"] == "pusher_internal:subscription_succeeded"
    subscribe(s, "a")
    subscribe(s, "b")
    assert s.channel_count() == 2 and s.is_subscribed("b")
    assert sent(raw_subscribe(s, "c"))[0]["data"]["type"] == "LimitReached"


def test_channel_limit_zero_is_unlimited() -> None:
    s = session(max_channels_per_connection=0, max_subscriptions_per_second=0)
    for i in range(300):
        subscribe(s, f"c{i}")
    assert s.channel_count() == 300


def test_channel_limit_is_checked_before_the_rate_and_costs_no_token() -> None:
    # A client at the limit hears the true reason however often it asks, and is not
    # closed for it: those refusals take no token.
    s = session(max_channels_per_connection=1, max_subscriptions_per_second=1)
    subscribe(s, "a")
    for _ in range(5):
        assert raw_subscribe(s, "b") == sub_error(
            "b", "LimitReached", "Too many channels on one connection: at most 1", 4301)


RATE_ERROR = "Subscription rate limit exceeded: at most 2 subscribe/unsubscribe per second"


def test_subscribe_without_a_token_is_refused_and_not_forwarded() -> None:
    s = session(max_channels_per_connection=3, max_subscriptions_per_second=2)
    for channel in ("a", "b", "c"):  # the burst: the bucket holds 3
        subscribe(s, channel)
    # No token left, but an unsubscribe is honoured anyway.
    assert unsubscribe(s, "a") == [Bind("a", False), Tell(Unsubscribe("3", "a", SOCKET))]
    assert raw_subscribe(s, "private-a") == sub_error(
        "private-a", "LimitReached", RATE_ERROR, 4301)
    assert "private-a" not in s.subscriptions and not s.authorized  # auth not even looked at
    assert sent(raw_subscribe(s, "a", now=1000.49))[0]["data"]["error"] == RATE_ERROR
    assert asked(raw_subscribe(s, "a", now=1000.5))  # 0.5 s at 2/s refill one token


def test_unsubscribe_takes_a_token_when_there_is_one() -> None:
    s = session(max_channels_per_connection=3, max_subscriptions_per_second=2)
    subscribe(s, "a")  # 2 tokens left
    unsubscribe(s, "a")  # 1
    subscribe(s, "a")  # 0
    assert told(unsubscribe(s, "a")) == [Unsubscribe("3", "a", SOCKET)]  # none to take
    assert raw_subscribe(s, "a") == sub_error("a", "LimitReached", RATE_ERROR, 4301)


def test_unsubscribe_of_an_unknown_channel_costs_nothing() -> None:
    s = session(max_channels_per_connection=1, max_subscriptions_per_second=1)
    for _ in range(10):
        assert unsubscribe(s, "nope") == []
    assert asked(raw_subscribe(s, "a"))


def test_the_user_channel_ack_costs_no_token() -> None:
    s = session(max_channels_per_connection=1, max_subscriptions_per_second=1)
    signin(s, {"id": "u1"})
    for _ in range(5):
        feed(s, {"event": "pusher:subscribe", "data": {"channel": "#server-to-user-u1"}})
        assert unsubscribe(s, "#server-to-user-u1") == []
    assert asked(raw_subscribe(s, "a"))


def test_refill_is_capped_at_the_bucket_size() -> None:
    s = session(max_channels_per_connection=3, max_subscriptions_per_second=2)
    subscribe(s, "a", now=0.0)
    # An hour later the bucket holds 3 tokens, not 7200.
    unsubscribe(s, "a", now=3600.0)
    subscribe(s, "a", now=3600.0)
    unsubscribe(s, "a", now=3600.0)
    assert raw_subscribe(s, "a", now=3600.0) == sub_error(
        "a", "LimitReached", RATE_ERROR, 4301)


def test_bucket_holds_200_when_channels_are_unlimited() -> None:
    s = session(max_channels_per_connection=0, max_subscriptions_per_second=1)
    for i in range(200):
        assert asked(raw_subscribe(s, f"c{i}"))
    assert raw_subscribe(s, "c200") == sub_error(
        "c200", "LimitReached",
        "Subscription rate limit exceeded: at most 1 subscribe/unsubscribe per second", 4301)


def test_zero_rate_is_unlimited() -> None:
    s = session(max_channels_per_connection=1, max_subscriptions_per_second=0)
    for _ in range(1000):
        subscribe(s, "a")
        unsubscribe(s, "a")
    assert asked(raw_subscribe(s, "a"))


def test_a_clock_set_back_does_not_starve_the_bucket() -> None:
    s = session(max_channels_per_connection=1, max_subscriptions_per_second=2)
    subscribe(s, "a", now=5000.0)
    unsubscribe(s, "a", now=5000.0)  # empty
    assert sent(raw_subscribe(s, "a", now=1000.0))[0]["data"]["error"] == RATE_ERROR
    assert asked(raw_subscribe(s, "a", now=1000.5))  # refills from the new reading


def drained(rate: int) -> PusherSession:
    """A session with a bucket of one token, spent at t=1000."""
    s = session(max_channels_per_connection=1, max_subscriptions_per_second=rate)
    subscribe(s, "a")
    unsubscribe(s, "a")
    return s


FLOOD_CLOSE = [Close(4100, "Subscription rate limit exceeded; reconnect later")]


def test_more_refusals_within_a_second_than_the_rate_close_with_4100() -> None:
    s = drained(rate=2)
    assert raw_subscribe(s, "a") == sub_error("a", "LimitReached", RATE_ERROR, 4301)
    assert raw_subscribe(s, "a", now=1000.2) == sub_error(
        "a", "LimitReached", RATE_ERROR, 4301)  # exactly the rate: still only errors
    assert raw_subscribe(s, "a", now=1000.4) == FLOOD_CLOSE


def test_refusal_window_is_one_second_from_its_first_refusal() -> None:
    s = drained(rate=2)
    raw_subscribe(s, "a", now=1000.0)  # refusal 1 of the window [1000, 1001)
    raw_subscribe(s, "a", now=1000.0)  # refusal 2
    assert asked(raw_subscribe(s, "a", now=1000.9))  # 1.8 tokens refilled, capped at 1
    unsubscribe(s, "a", now=1000.9)  # the bucket is empty again
    # 1001.0: 0.2 tokens, a refusal, but in a new window: count 1.
    assert raw_subscribe(s, "a", now=1001.0) == sub_error(
        "a", "LimitReached", RATE_ERROR, 4301)
    assert raw_subscribe(s, "a", now=1001.0) == sub_error(
        "a", "LimitReached", RATE_ERROR, 4301)
    assert raw_subscribe(s, "a", now=1001.0) == FLOOD_CLOSE


def test_a_presence_join_leave_loop_is_bounded() -> None:
    # Each join/leave would broadcast to every member: after the burst at most
    # `rate` of them per second get through, and a client that keeps trying is closed.
    s = session(max_channels_per_connection=4, max_subscriptions_per_second=2)
    data = signed_subscribe(s.app, SOCKET, "presence-r", '{"user_id":"u"}')
    forwarded = 0
    closed = False
    for i in range(200):
        now = 1000.0 + i * 0.01  # 100 attempts per second for 2 s
        actions = feed(s, {"event": "pusher:subscribe", "data": data}, now)
        if any(isinstance(a, Close) for a in actions):
            closed = True
            break
        for a in actions:
            if isinstance(a, Ask):
                forwarded += 1
                s.subscribe_answered(a.message, {"ok": True, "presence": {}})
        unsubscribe(s, "presence-r", now)
    assert closed
    assert forwarded == 2  # the bucket (4) paid for join, leave, join, leave


def test_an_old_answer_does_not_settle_a_newer_subscribe_to_the_same_channel() -> None:
    # Leave while the answer is out, join again at once: the broker sees SUB, UNSUB,
    # SUB and answers each SUB. The first answer says nothing about the second SUB
    # (refused, or ok before the broker even saw it), so only the second may settle it.
    s = session()
    first = raw_subscribe_presence(s, '{"user_id":"u1","user_info":{"v":1}}')
    unsubscribe(s, "presence-r")
    second = raw_subscribe_presence(s, '{"user_id":"u1","user_info":{"v":2}}')
    assert s.subscribe_answered(first, {"ok": False, "type": "LimitReached",
                                        "error": "full", "status": 4100}) == []
    assert s.subscribe_answered(first, {"ok": True, "presence": {}}) == []
    assert not s.is_subscribed("presence-r") and "presence-r" in s.subscriptions
    done = s.subscribe_answered(second, {"ok": True, "presence": {}})
    assert Bind("presence-r", True) in done
    assert s.replay_subscriptions() == [("presence-r", ["u1", {"v": 2}])]


def raw_subscribe_presence(s: PusherSession, channel_data: str) -> Subscribe:
    (ask,) = feed(s, {"event": "pusher:subscribe", "data": signed_subscribe(
        s.app, s.socket_id, "presence-r", channel_data)})
    assert isinstance(ask, Ask)
    return ask.message


@pytest.mark.parametrize(("body", "expected"), [
    ({"ok": False}, {"type": "ServerError", "error": "subscription refused", "status": 500}),
    ({"ok": False, "type": "T", "error": "E", "status": "503"},
     {"type": "T", "error": "E", "status": 500}),
    ({"ok": False, "status": True}, {"type": "ServerError", "error": "subscription refused",
                                     "status": 500}),
])
def test_a_malformed_refusal_from_the_broker_still_gives_a_well_formed_error(
        body: dict[str, Any], expected: dict[str, Any]) -> None:
    s = session()
    (frame,) = sent(settle(s, raw_subscribe(s, "news"), body))
    assert frame == {"event": "pusher:subscription_error", "channel": "news", "data": expected}


def test_a_cache_answer_that_is_not_a_payload_counts_as_a_miss() -> None:
    s = session()
    frames = sent(settle(s, raw_subscribe(s, "cache-x"), {"ok": True, "cache": {"x": 1}}))
    assert frames[1] == {"event": "pusher:cache_miss", "channel": "cache-x"}


def test_the_subscriptions_mapping_keeps_one_channel_without_a_dict() -> None:
    subs = Subscriptions()
    assert len(subs) == 0 and "a" not in subs and list(subs.items()) == []
    subs["a"] = ""
    assert subs._more is None and "a" in subs and subs["a"] == "" and list(subs) == ["a"]
    subs["a"] = "u1"  # the same channel again: replaced in place
    assert subs._more is None and subs.get("a") == "u1" and subs.get("b") is None
    subs["b"] = ""
    assert list(subs.items()) == [("a", "u1"), ("b", "")] and len(subs) == 2
    assert subs.pop("a") == "u1" and dict(subs) == {"b": ""}
    with pytest.raises(KeyError):
        subs.pop("a")
    del subs["b"]
    assert not subs
    one = Subscriptions()
    one["c"] = "x"
    assert one.pop("c") == "x" and not one and "c" not in one
    with pytest.raises(KeyError):
        one["c"]
