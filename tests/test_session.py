"""The per-connection Pusher rules, fed messages and read back actions (no sockets)."""

from __future__ import annotations

import dataclasses
from typing import Any

import orjson
import pytest

from vask.config import App
from vask.envelope import Publish, SignIn, Subscribe, Unsubscribe
from vask.session import Ask, Bind, PusherSession, Send, Tell, signed_subscribe
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


def subscribe(s: PusherSession, channel: str, channel_data: str | None = None) -> list[Any]:
    """Subscribe; plain channels are settled at once with the broker's {"ok": true}."""
    data = signed_subscribe(s.app, s.socket_id, channel, channel_data)
    actions = feed(s, {"event": "pusher:subscribe", "data": data})
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
    # spec §4.1 vector: 1234.1234:private-foobar
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
