"""Tests of vask.workers.http_api through handle_api with a fake ApiContext (no sockets).

The last part builds requests with the official pusher-http-python SDK (a custom
backend hands each signed request to handle_api after ``requests`` has prepared the
exact wire path), proving SDK compatibility without a server.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from types import SimpleNamespace
from typing import Any
from urllib.parse import quote

import orjson
import pusher
import pytest
import requests
from pusher.errors import PusherBadAuth, PusherBadRequest, PusherBadStatus, PusherForbidden
from pusher.http import process_response

from vask.config import App, Settings
from vask.envelope import Publish, TerminateUser, Verb
from vask.metrics import WorkerMetrics
from vask.workers.api_adapter import ApiAdapter
from vask.workers.http import http_response
from vask.workers.http_api import (
    CONTENT_TYPE,
    ApiContext,
    ApiRequest,
    ApiResponse,
    BrokerUnavailable,
    handle_api,
    reset_rate_limits,
)

KEY = "278d425bdf160c739803"
SECRET = "7ad3773142a6692b25b8"
TS = 1353088179
APP = App(id="3", key=KEY, secret=SECRET)
OFF = App(id="4", key="off-key", secret="off-secret", enabled=False)
CORS = App(id="5", key="cors-key", secret="cors-secret",
           cors_origins=("https://dash.example",))
ANY_ORIGIN = App(id="6", key="any-key", secret="any-secret", cors_origins=("*",))
LIMITED = App(id="7", key="lim-key", secret="lim-secret", max_backend_events_per_second=3)
SETTINGS = Settings(apps=(APP, OFF, CORS, ANY_ORIGIN, LIMITED), max_http_body_bytes=16384)

Reply = dict[str, Any] | Exception | Callable[[dict[str, Any]], dict[str, Any]]


class FakeContext:
    """An ApiContext recording what the API casts and answering queries from a table."""

    def __init__(self, settings: Settings = SETTINGS, clock: float = TS) -> None:
        self._settings = settings
        self.clock = clock
        self.published: list[Publish] = []
        self.sent: list[Verb] = []
        self.queries: list[tuple[str, str, dict[str, Any]]] = []
        self.replies: dict[str, Reply] = {}

    @property
    def settings(self) -> Settings:
        return self._settings

    async def publish(self, messages: Sequence[Publish]) -> None:
        self.published.extend(messages)

    async def send(self, msg: Verb) -> None:
        self.sent.append(msg)

    async def query(self, app_id: str, kind: str, args: dict[str, Any]) -> dict[str, Any]:
        self.queries.append((app_id, kind, args))
        reply = self.replies[kind]
        if isinstance(reply, Exception):
            raise reply
        if callable(reply):
            return reply(args)
        return reply

    def now(self) -> float:
        return self.clock


def _protocol_check(ctx: FakeContext) -> ApiContext:
    return ctx  # mypy proves the fake satisfies the Protocol


@pytest.fixture(autouse=True)
def _fresh_rate_limits() -> None:
    reset_rate_limits()


def sign_query(
    method: str,
    path: str,
    body: bytes = b"",
    extra: Mapping[str, str] | None = None,
    *,
    key: str = KEY,
    secret: str = SECRET,
    ts: float = TS,
) -> str:
    """A raw query string signed the Pusher way (an independent implementation)."""
    params = {"auth_key": key, "auth_timestamp": str(int(ts)), "auth_version": "1.0"}
    params.update(extra or {})
    if body:
        params["body_md5"] = hashlib.md5(body).hexdigest()
    text = "&".join(f"{k}={v}" for k, v in sorted(params.items()))
    params["auth_signature"] = hmac.new(
        secret.encode(), f"{method}\n{path}\n{text}".encode(), hashlib.sha256
    ).hexdigest()
    return "&".join(f"{k}={quote(v, safe='')}" for k, v in params.items())


def request(
    method: str,
    path: str,
    body: object = None,
    extra: Mapping[str, str] | None = None,
    *,
    app: App = APP,
    headers: Mapping[str, str] | None = None,
    ts: float = TS,
    sign_path: str | None = None,
) -> ApiRequest:
    raw = body if isinstance(body, bytes) else (b"" if body is None else orjson.dumps(body))
    query = sign_query(method, sign_path or path, raw, extra,
                       key=app.key, secret=app.secret, ts=ts)
    return ApiRequest(method, path, query, dict(headers or {}), raw)


def run(req: ApiRequest, ctx: FakeContext) -> ApiResponse:
    return asyncio.run(handle_api(req, ctx))


def body_of(resp: ApiResponse) -> Any:
    return orjson.loads(resp.body)


def assert_error(resp: ApiResponse, status: int, contains: str = "") -> str:
    assert resp.status == status, resp.body
    body = body_of(resp)
    assert body["code"] == status
    assert isinstance(body["error"], str) and body["error"]
    assert contains in body["error"]
    return str(body["error"])


# --- POST /apps/{app}/events ------------------------------------------------------------


def test_trigger_publishes_once_per_channel_and_answers_empty() -> None:
    ctx = FakeContext()
    resp = run(request("POST", "/apps/3/events",
                       {"name": "ev", "channels": ["a", "cache-b", "a"], "data": "d\u00e9"}), ctx)
    assert (resp.status, resp.body, resp.headers) == (200, b"{}", ())
    assert ctx.queries == []  # no info: no broker round trip
    assert ctx.published == [
        Publish("3", "a", "", 0.0,
                orjson.dumps({"event": "ev", "channel": "a", "data": "d\u00e9"})),
        Publish("3", "cache-b", "", 1800.0,
                orjson.dumps({"event": "ev", "channel": "cache-b", "data": "d\u00e9"})),
    ]
    assert orjson.loads(ctx.published[0].payload) == {"event": "ev", "channel": "a",
                                                      "data": "d\u00e9"}


def test_trigger_by_app_key_in_path_and_single_channel() -> None:
    ctx = FakeContext()
    resp = run(request("POST", f"/apps/{KEY}/events",
                       {"name": "ev", "channel": "private-x", "data": "{}",
                        "socket_id": "12.34"}), ctx)
    assert resp.status == 200
    [pub] = ctx.published
    assert (pub.app, pub.channel, pub.exclude, pub.cache_ttl) == ("3", "private-x", "12.34", 0.0)


def test_trigger_cache_ttl_follows_app() -> None:
    app = App(id="8", key="k8", secret="s8", cache_ttl=60.0)
    ctx = FakeContext(Settings(apps=(app,)))
    channels = ["cache-a", "private-cache-b", "presence-cache-c", "private-encrypted-cache-d",
                "my-cache-e"]
    for ch in channels:
        assert run(request("POST", "/apps/8/events", {"name": "e", "channel": ch, "data": ""},
                           app=app), ctx).status == 200
    assert [p.cache_ttl for p in ctx.published] == [60.0, 60.0, 60.0, 60.0, 0.0]


def test_trigger_to_server_to_user_channel() -> None:
    ctx = FakeContext()
    resp = run(request("POST", "/apps/3/events",
                       {"name": "ev", "channels": ["#server-to-user-42"], "data": "x"}), ctx)
    assert resp.status == 200
    assert [p.channel for p in ctx.published] == ["#server-to-user-42"]


def test_trigger_with_info() -> None:
    ctx = FakeContext()
    ctx.replies["counts"] = {"channels": {
        "presence-a": {"subscription_count": 3, "user_count": 2},
        "b": {"subscription_count": 5, "user_count": 0},
    }}
    resp = run(request("POST", "/apps/3/events",
                       {"name": "ev", "channels": ["presence-a", "b", "c"], "data": "x",
                        "info": "user_count,subscription_count"}), ctx)
    assert resp.status == 200
    assert body_of(resp) == {"channels": {
        "presence-a": {"user_count": 2, "subscription_count": 3},
        "b": {"subscription_count": 5},
        "c": {"subscription_count": 0},
    }}
    assert ctx.queries == [("3", "counts", {"channels": ["presence-a", "b", "c"]})]
    assert len(ctx.published) == 3


def test_trigger_info_user_count_only() -> None:
    ctx = FakeContext()
    ctx.replies["counts"] = {"channels": {"presence-a": {"subscription_count": 3,
                                                          "user_count": 2}}}
    resp = run(request("POST", "/apps/3/events",
                       {"name": "ev", "channels": ["presence-a", "b"], "data": "x",
                        "info": "user_count"}), ctx)
    assert body_of(resp) == {"channels": {"presence-a": {"user_count": 2}, "b": {}}}


@pytest.mark.parametrize(
    ("body", "status", "contains"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b"", 400, "empty"),
        (b"[]", 400, "JSON object"),
        ({"channel": "a", "data": "x"}, 400, "'name'"),
        ({"name": "e" * 201, "channel": "a", "data": "x"}, 400, "Event name is too long"),
        ({"name": "e", "data": "x"}, 400, "Missing 'channel' or 'channels'"),
        ({"name": "e", "channels": [f"c{i}" for i in range(101)], "data": "x"}, 400,
         "more than 100 channels"),
        ({"name": "e", "channel": "bad name", "data": "x"}, 400, "not allowed"),
        ({"name": "e", "channels": ["private-encrypted-a", "b"], "data": "x"}, 400,
         "must be triggered alone"),
        ({"name": "e", "channel": "a", "data": {"x": 1}}, 400, "must be a string"),
        ({"name": "e", "channel": "a"}, 400, "'data'"),
        ({"name": "e", "channel": "a", "data": "x" * 10241}, 413, "too large"),
        ({"name": "e", "channel": "a", "data": "x", "socket_id": "abc"}, 400,
         "Invalid socket_id"),
        ({"name": "e", "channel": "a", "data": "x", "info": "cache"}, 400,
         "Unknown info attribute"),
    ],
)
def test_trigger_refusals(body: object, status: int, contains: str) -> None:
    ctx = FakeContext()
    assert_error(run(request("POST", "/apps/3/events", body), ctx), status, contains)
    assert ctx.published == []


def test_request_body_over_server_limit_is_413() -> None:
    ctx = FakeContext()
    body = {"name": "e", "channel": "a", "data": "x" * 20000}
    assert_error(run(request("POST", "/apps/3/events", body), ctx), 413,
                 "the limit is 16384 bytes (max_http_body_bytes)")


# --- POST /apps/{app}/batch_events -------------------------------------------------------


def test_batch_without_info() -> None:
    ctx = FakeContext()
    batch = [{"channel": "a", "name": "e1", "data": "1"},
             {"channel": "cache-b", "name": "e2", "data": "2", "socket_id": "1.2"}]
    resp = run(request("POST", "/apps/3/batch_events", {"batch": batch}), ctx)
    assert (resp.status, resp.body) == (200, b"{}")
    published = [(p.channel, p.exclude, p.cache_ttl, orjson.loads(p.payload))
                 for p in ctx.published]
    assert published == [
        ("a", "", 0.0, {"event": "e1", "channel": "a", "data": "1"}),
        ("cache-b", "1.2", 1800.0, {"event": "e2", "channel": "cache-b", "data": "2"}),
    ]
    assert ctx.queries == []


def test_batch_with_info_is_index_aligned() -> None:
    ctx = FakeContext()
    ctx.replies["counts"] = {"channels": {"a": {"subscription_count": 1},
                                          "presence-b": {"subscription_count": 4,
                                                         "user_count": 2}}}
    batch = [{"channel": "a", "name": "e", "data": "1", "info": "subscription_count"},
             {"channel": "x", "name": "e", "data": "2"},
             {"channel": "presence-b", "name": "e", "data": "3",
              "info": "user_count,subscription_count"}]
    resp = run(request("POST", "/apps/3/batch_events", {"batch": batch}), ctx)
    assert body_of(resp) == {"batch": [{"subscription_count": 1}, {},
                                       {"user_count": 2, "subscription_count": 4}]}
    assert ctx.queries == [("3", "counts", {"channels": ["a", "presence-b"]})]


def test_batch_is_all_or_nothing() -> None:
    ctx = FakeContext()
    batch = [{"channel": "a", "name": "e", "data": "1"},
             {"channel": "a", "name": "e", "data": 2}]
    assert_error(run(request("POST", "/apps/3/batch_events", {"batch": batch}), ctx),
                 400, "batch[1]: ")
    assert ctx.published == []


def test_batch_too_big() -> None:
    ctx = FakeContext()
    batch = [{"channel": "a", "name": "e", "data": "1"}] * 11
    assert_error(run(request("POST", "/apps/3/batch_events", {"batch": batch}), ctx),
                 400, "more than 10 events")


def test_batch_missing_batch() -> None:
    ctx = FakeContext()
    assert_error(run(request("POST", "/apps/3/batch_events", {"events": []}), ctx),
                 400, "'batch' must be an array")


# --- GET /apps/{app}/channels --------------------------------------------------------------


def test_channels_list_plain() -> None:
    ctx = FakeContext()
    ctx.replies["channels"] = {"channels": {"a": {"subscription_count": 2, "user_count": 0},
                                            "presence-b": {"subscription_count": 3,
                                                           "user_count": 1},
                                            "#server-to-user-1": {"subscription_count": 1}}}
    resp = run(request("GET", "/apps/3/channels"), ctx)
    assert resp.status == 200
    assert body_of(resp) == {"channels": {"a": {}, "presence-b": {}}}
    assert ctx.queries == [("3", "channels", {"prefix": ""})]


def test_channels_list_presence_user_count() -> None:
    ctx = FakeContext()
    ctx.replies["channels"] = {"channels": {"presence-b": {"subscription_count": 3,
                                                           "user_count": 1}}}
    resp = run(request("GET", "/apps/3/channels",
                       extra={"filter_by_prefix": "presence-", "info": "user_count"}), ctx)
    assert body_of(resp) == {"channels": {"presence-b": {"user_count": 1}}}
    assert ctx.queries == [("3", "channels", {"prefix": "presence-"})]


def test_channels_list_subscription_count_extension() -> None:
    ctx = FakeContext()
    ctx.replies["channels"] = {"channels": {"private-a": {"subscription_count": 7,
                                                          "user_count": 0}}}
    resp = run(request("GET", "/apps/3/channels",
                       extra={"filter_by_prefix": "private-", "info": "subscription_count"}), ctx)
    assert body_of(resp) == {"channels": {"private-a": {"subscription_count": 7}}}


def test_channels_list_user_count_needs_presence_filter() -> None:
    ctx = FakeContext()
    assert_error(run(request("GET", "/apps/3/channels", extra={"info": "user_count"}), ctx),
                 400, "presence")
    assert ctx.queries == []


def test_channels_list_unknown_info() -> None:
    ctx = FakeContext()
    assert_error(run(request("GET", "/apps/3/channels", extra={"info": "cache"}), ctx),
                 400, "Unknown info attribute 'cache'")


# --- GET /apps/{app}/channels/{channel} -------------------------------------------------------


def test_channel_info_occupied_only() -> None:
    ctx = FakeContext()
    ctx.replies["channel"] = {"occupied": True, "subscription_count": 4, "user_count": 0,
                              "cache": None}
    resp = run(request("GET", "/apps/3/channels/my-channel"), ctx)
    assert body_of(resp) == {"occupied": True}
    assert ctx.queries == [("3", "channel", {"channel": "my-channel", "cache": False})]


def test_channel_info_presence_counts() -> None:
    ctx = FakeContext()
    ctx.replies["channel"] = {"occupied": True, "subscription_count": 4, "user_count": 2,
                              "cache": None}
    resp = run(request("GET", "/apps/3/channels/presence-room",
                       extra={"info": "user_count,subscription_count"}), ctx)
    assert body_of(resp) == {"occupied": True, "user_count": 2, "subscription_count": 4}


def test_channel_info_unoccupied_counts_are_zero() -> None:
    ctx = FakeContext()
    ctx.replies["channel"] = {"occupied": False, "subscription_count": 0, "user_count": 0,
                              "cache": None}
    resp = run(request("GET", "/apps/3/channels/a", extra={"info": "subscription_count"}), ctx)
    assert body_of(resp) == {"occupied": False, "subscription_count": 0}


def test_channel_info_cache_hit_and_miss() -> None:
    ctx = FakeContext()
    ctx.replies["channel"] = {"occupied": False, "subscription_count": 0, "user_count": 0,
                              "cache": {"event": "loc", "data": "{\"x\":1}", "ttl": 59.2}}
    resp = run(request("GET", "/apps/3/channels/cache-loc", extra={"info": "cache"}), ctx)
    assert body_of(resp) == {"occupied": False,
                             "cache": {"event": "loc", "data": "{\"x\":1}", "ttl": 60}}
    assert ctx.queries[-1] == ("3", "channel", {"channel": "cache-loc", "cache": True})
    ctx.replies["channel"] = {"occupied": True, "subscription_count": 1, "user_count": 0,
                              "cache": None}
    resp = run(request("GET", "/apps/3/channels/cache-loc", extra={"info": "cache"}), ctx)
    assert body_of(resp) == {"occupied": True, "cache": None}


def test_channel_info_percent_decoded_channel_signed_over_raw_path() -> None:
    ctx = FakeContext()
    ctx.replies["channel"] = {"occupied": True, "subscription_count": 1, "user_count": 1,
                              "cache": None}
    resp = run(request("GET", "/apps/3/channels/presence-a%40b%3Bc"), ctx)
    assert resp.status == 200
    assert ctx.queries == [("3", "channel", {"channel": "presence-a@b;c", "cache": False})]


@pytest.mark.parametrize(
    ("path", "info", "contains"),
    [
        ("/apps/3/channels/private-a", "user_count", "presence"),
        ("/apps/3/channels/a", "cache", "cache channels"),
        ("/apps/3/channels/a", "bogus", "Unknown info attribute"),
        ("/apps/3/channels/bad%20name", "", "not allowed"),
        ("/apps/3/channels/%23server-to-user-1", "", "internal channel"),
    ],
)
def test_channel_info_refusals(path: str, info: str, contains: str) -> None:
    ctx = FakeContext()
    extra = {"info": info} if info else None
    assert_error(run(request("GET", path, extra=extra), ctx), 400, contains)
    assert ctx.queries == []


# --- GET /apps/{app}/channels/{channel}/users -------------------------------------------------


def test_users_of_presence_channel() -> None:
    ctx = FakeContext()
    ctx.replies["users"] = {"users": ["1", "two"]}
    resp = run(request("GET", "/apps/3/channels/presence-room/users"), ctx)
    assert body_of(resp) == {"users": [{"id": "1"}, {"id": "two"}]}
    assert ctx.queries == [("3", "users", {"channel": "presence-room"})]


def test_users_of_empty_presence_channel() -> None:
    ctx = FakeContext()
    ctx.replies["users"] = {"users": []}
    assert body_of(run(request("GET", "/apps/3/channels/presence-cache-x/users"), ctx)) == {
        "users": []}


def test_users_needs_presence_channel() -> None:
    ctx = FakeContext()
    assert_error(run(request("GET", "/apps/3/channels/private-room/users"), ctx), 400,
                 "must be a presence channel")


# --- users: events and terminate -----------------------------------------------------------


def test_user_events() -> None:
    ctx = FakeContext()
    resp = run(request("POST", "/apps/3/users/user%401/events",
                       {"name": "note", "data": "hi", "socket_id": "5.6"}), ctx)
    assert (resp.status, resp.body) == (200, b"{}")
    assert ctx.published == [Publish("3", "#server-to-user-user@1", "5.6", 0.0, orjson.dumps(
        {"event": "note", "channel": "#server-to-user-user@1", "data": "hi"}))]


def test_user_events_refusals() -> None:
    ctx = FakeContext()
    assert_error(run(request("POST", "/apps/3/users/a%20b/events",
                             {"name": "n", "data": "x"}), ctx), 400, "Invalid user id")
    assert_error(run(request("POST", "/apps/3/users/u1/events",
                             {"name": "n", "data": "x", "channel": "c"}), ctx), 400,
                 "drop 'channel(s)'")
    assert_error(run(request("POST", "/apps/3/users/u1/events", {"name": "n"}), ctx), 400,
                 "'data'")
    assert ctx.published == []


def test_terminate_connections() -> None:
    ctx = FakeContext()
    resp = run(request("POST", "/apps/3/users/12345/terminate_connections", b"{}"), ctx)
    assert (resp.status, resp.body) == (200, b"{}")
    assert ctx.sent == [TerminateUser("3", "12345")]


def test_terminate_connections_empty_body_and_decoded_id() -> None:
    ctx = FakeContext()
    resp = run(request("POST", "/apps/3/users/a%2Bb/terminate_connections"), ctx)
    assert resp.status == 200
    assert ctx.sent == [TerminateUser("3", "a+b")]


def test_terminate_connections_bad_body() -> None:
    ctx = FakeContext()
    assert_error(run(request("POST", "/apps/3/users/1/terminate_connections", b"{"), ctx),
                 400, "not valid JSON")
    assert ctx.sent == []


def test_terminate_without_apps_prefix_uses_auth_key() -> None:
    ctx = FakeContext()
    resp = run(request("POST", "/users/9/terminate_connections", b"{}"), ctx)
    assert resp.status == 200
    assert ctx.sent == [TerminateUser("3", "9")]


def test_terminate_without_apps_prefix_unknown_or_missing_key() -> None:
    ctx = FakeContext()
    req = request("POST", "/users/9/terminate_connections", b"{}",
                  app=App(id="99", key="nokey", secret="x"))
    assert_error(run(req, ctx), 404, "Unknown app key 'nokey'")
    req = ApiRequest("POST", "/users/9/terminate_connections", "", {}, b"{}")
    assert_error(run(req, ctx), 401, "auth_key")


# --- routing, authentication, app state -------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/apps", "/apps/3", "/apps/3/events/", "/apps/3/nope",
                                  "/apps/3/channels/a/b", "/app/3/events", "apps/3/events",
                                  "/users/9/events"])
def test_unknown_path_is_404(path: str) -> None:
    assert_error(run(request("POST", path, b"{}"), FakeContext()), 404, "Unknown path")


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [("GET", "/apps/3/events", "POST"), ("POST", "/apps/3/channels", "GET"),
     ("DELETE", "/apps/3/channels/a", "GET"), ("PUT", "/apps/3/batch_events", "POST"),
     ("GET", "/users/1/terminate_connections", "POST")],
)
def test_wrong_method_is_405(method: str, path: str, allowed: str) -> None:
    resp = run(request(method, path), FakeContext())
    assert_error(resp, 405, f"use {allowed}")
    assert ("Allow", allowed) in resp.headers


def test_unknown_app_is_404_before_signature() -> None:
    resp = run(ApiRequest("GET", "/apps/nope/channels", "", {}, b""), FakeContext())
    assert_error(resp, 404, "Unknown app 'nope'")


def test_bad_signature_is_401() -> None:
    req = request("GET", "/apps/3/channels", app=App(id="3", key=KEY, secret="wrong"))
    assert_error(run(req, FakeContext()), 401, "Invalid signature")


def test_unsigned_request_is_401() -> None:
    resp = run(ApiRequest("GET", "/apps/3/channels", "", {}, b""), FakeContext())
    assert_error(resp, 401, "Missing authentication query parameter(s): auth_key")


def test_stale_timestamp_is_401() -> None:
    ctx = FakeContext(clock=TS + 601)
    assert_error(run(request("GET", "/apps/3/channels"), ctx), 401, "Timestamp expired")


def test_tampered_body_is_401() -> None:
    req = request("POST", "/apps/3/events", {"name": "e", "channel": "a", "data": "x"})
    req = ApiRequest(req.method, req.path, req.query, req.headers, req.body.replace(b"x", b"y"))
    ctx = FakeContext()
    assert_error(run(req, ctx), 401, "body_md5")
    assert ctx.published == []


def test_key_of_another_app_is_401() -> None:
    req = request("GET", "/apps/3/channels", app=CORS)  # signed with app 5's credentials
    assert_error(run(req, FakeContext()), 401, "is not the key of this app")


def test_disabled_app_is_403_after_signature() -> None:
    ctx = FakeContext()
    body = {"name": "e", "channel": "a", "data": "x"}
    assert_error(run(request("POST", "/apps/4/events", body, app=OFF), ctx), 403, "disabled")
    bad = request("POST", "/apps/4/events", body, app=App(id="4", key="off-key", secret="no"))
    assert_error(run(bad, ctx), 401)
    assert ctx.published == []


def test_validation_comes_after_authentication() -> None:
    req = request("POST", "/apps/3/events", b"{broken",
                  app=App(id="3", key=KEY, secret="wrong"))
    assert_error(run(req, FakeContext()), 401)


def test_broker_unavailable_is_503() -> None:
    ctx = FakeContext()
    ctx.replies["channels"] = BrokerUnavailable()
    assert_error(run(request("GET", "/apps/3/channels"), ctx), 503, "broker")


def test_broker_unavailable_after_publish_with_info_is_503() -> None:
    ctx = FakeContext()
    ctx.replies["counts"] = BrokerUnavailable()
    body = {"name": "e", "channel": "a", "data": "x", "info": "subscription_count"}
    assert_error(run(request("POST", "/apps/3/events", body), ctx), 503)


def test_internal_bug_is_500_without_details(caplog: pytest.LogCaptureFixture) -> None:
    ctx = FakeContext()

    def broken(args: dict[str, Any]) -> dict[str, Any]:
        return {"users": 1 / 0}

    ctx.replies["users"] = broken
    resp = run(request("GET", "/apps/3/channels/presence-a/users"), ctx)
    message = assert_error(resp, 500)
    assert "division" not in message
    assert "HTTP API failed" in caplog.text


def test_broker_refusing_a_query_is_500() -> None:
    ctx = FakeContext()
    ctx.replies["channels"] = {"error": "bad query: 'prefix'"}
    assert_error(run(request("GET", "/apps/3/channels"), ctx), 500, "Internal server error")


def test_channels_list_drops_unoccupied_entries() -> None:
    ctx = FakeContext()
    ctx.replies["channels"] = {"channels": {"a": {"subscription_count": 0, "user_count": 0},
                                            "b": {"subscription_count": 1, "user_count": 0},
                                            "x-other": {"subscription_count": 1}}}
    resp = run(request("GET", "/apps/3/channels", extra={"filter_by_prefix": "b"}), ctx)
    assert body_of(resp) == {"channels": {"b": {}}}


def test_settings_are_read_per_request() -> None:
    ctx = FakeContext(Settings(apps=(OFF,)))
    body = {"name": "e", "channel": "a", "data": "x"}
    assert run(request("POST", "/apps/3/events", body), ctx).status == 404
    ctx._settings = SETTINGS
    assert run(request("POST", "/apps/3/events", body), ctx).status == 200


def test_every_answer_is_a_json_object_sent_as_content_type() -> None:
    """Whatever the outcome, the body is a JSON object and the wire response that the
    worker builds from it (``http_response``) declares ``CONTENT_TYPE``."""
    ctx = FakeContext()
    ctx.replies["channels"] = {"channels": {"a": {"subscription_count": 1}}}
    event = {"name": "e", "channel": "a", "data": "x"}
    answers = [
        (200, run(request("POST", "/apps/3/events", event), ctx)),
        (200, run(request("GET", "/apps/3/channels"), ctx)),
        (401, run(ApiRequest("GET", "/apps/3/channels", "", {}, b""), ctx)),
        (404, run(ApiRequest("GET", "/apps/nope/channels", "", {}, b""), ctx)),
        (400, run(request("POST", "/apps/3/events", b"not json"), ctx)),
    ]
    for expected, resp in answers:
        assert resp.status == expected, resp
        assert isinstance(orjson.loads(resp.body), dict), resp.body
        wire = http_response(resp.status, resp.body, True, resp.headers)
        head = wire.partition(b"\r\n\r\n")[0].split(b"\r\n")
        assert head[0].startswith(f"HTTP/1.1 {resp.status} ".encode())
        assert f"Content-Type: {CONTENT_TYPE}".encode() in head[1:]
        assert f"Content-Length: {len(resp.body)}".encode() in head[1:]


# --- rate limit -----------------------------------------------------------------------------


def test_backend_rate_limit_counts_channels() -> None:
    ctx = FakeContext()
    two = {"name": "e", "channels": ["a", "b"], "data": "x"}
    assert run(request("POST", "/apps/7/events", two, app=LIMITED), ctx).status == 200
    resp = run(request("POST", "/apps/7/events", two, app=LIMITED), ctx)
    assert_error(resp, 429, "3 events per second")
    assert ("Retry-After", "1") in resp.headers
    assert len(ctx.published) == 2
    ctx.clock += 1  # refilled
    assert run(request("POST", "/apps/7/events", two, app=LIMITED, ts=ctx.clock),
               ctx).status == 200


def test_backend_rate_limit_applies_to_batches_and_user_events() -> None:
    ctx = FakeContext()
    batch = {"batch": [{"channel": "a", "name": "e", "data": "1"}] * 3}
    assert run(request("POST", "/apps/7/batch_events", batch, app=LIMITED), ctx).status == 200
    user = {"name": "e", "data": "x"}
    assert_error(run(request("POST", "/apps/7/users/1/events", user, app=LIMITED), ctx), 429)
    assert len(ctx.published) == 3


def test_rate_limit_not_charged_for_invalid_requests() -> None:
    ctx = FakeContext()
    bad = {"name": "e", "channels": ["a", "b", "c"], "data": 1}
    for _ in range(5):
        assert run(request("POST", "/apps/7/events", bad, app=LIMITED), ctx).status == 400
    good = {"name": "e", "channels": ["a", "b", "c"], "data": "x"}
    assert run(request("POST", "/apps/7/events", good, app=LIMITED), ctx).status == 200


def test_unlimited_by_default() -> None:
    ctx = FakeContext()
    body = {"name": "e", "channels": [f"c{i}" for i in range(100)], "data": "x"}
    for _ in range(20):
        assert run(request("POST", "/apps/3/events", body), ctx).status == 200
    assert len(ctx.published) == 2000


# --- CORS -----------------------------------------------------------------------------------


def test_cors_off_by_default() -> None:
    ctx = FakeContext()
    ctx.replies["channels"] = {"channels": {}}
    resp = run(request("GET", "/apps/3/channels", headers={"origin": "https://x"}), ctx)
    assert resp.status == 200 and resp.headers == ()
    resp = run(ApiRequest("OPTIONS", "/apps/3/events", "", {"origin": "https://x"}, b""), ctx)
    assert_error(resp, 405, "CORS is not enabled")


def test_cors_allowed_origin_on_success_and_error() -> None:
    ctx = FakeContext()
    ctx.replies["channels"] = {"channels": {}}
    origin = {"origin": "https://dash.example"}
    resp = run(request("GET", "/apps/5/channels", app=CORS, headers=origin), ctx)
    assert resp.status == 200
    assert ("Access-Control-Allow-Origin", "https://dash.example") in resp.headers
    assert ("Vary", "Origin") in resp.headers
    resp = run(request("GET", "/apps/5/channels", extra={"info": "user_count"}, app=CORS,
                       headers=origin), ctx)
    assert resp.status == 400
    assert ("Access-Control-Allow-Origin", "https://dash.example") in resp.headers


def test_cors_other_origin_gets_no_headers() -> None:
    ctx = FakeContext()
    ctx.replies["channels"] = {"channels": {}}
    resp = run(request("GET", "/apps/5/channels", app=CORS,
                       headers={"origin": "https://evil.example"}), ctx)
    assert resp.status == 200 and resp.headers == ()


def test_cors_preflight() -> None:
    ctx = FakeContext()
    req = ApiRequest("OPTIONS", "/apps/cors-key/events", "",
                     {"origin": "https://dash.example",
                      "access-control-request-method": "POST",
                      "access-control-request-headers": "content-type"}, b"")
    resp = run(req, ctx)
    assert (resp.status, resp.body) == (204, b"")
    headers = dict(resp.headers)
    assert headers["Access-Control-Allow-Origin"] == "https://dash.example"
    assert headers["Access-Control-Allow-Methods"] == "GET, POST, OPTIONS"
    assert headers["Access-Control-Allow-Headers"] == "content-type"
    wrong = ApiRequest("OPTIONS", "/apps/5/events", "", {"origin": "https://evil"}, b"")
    assert run(wrong, ctx) == ApiResponse(204, b"")
    unknown = ApiRequest("OPTIONS", "/apps/zzz/events", "", {"origin": "https://x"}, b"")
    assert_error(run(unknown, ctx), 404)


def test_cors_wildcard() -> None:
    ctx = FakeContext()
    ctx.replies["channels"] = {"channels": {}}
    resp = run(request("GET", "/apps/6/channels", app=ANY_ORIGIN,
                       headers={"origin": "https://anything"}), ctx)
    assert resp.headers == (("Access-Control-Allow-Origin", "*"),)


# --- back-pressure: only authenticated publishes wait (workers/api_adapter.py) -------------


def behind_adapter() -> tuple[ApiAdapter, asyncio.Event, list[Verb]]:
    """An ApiAdapter over a fake worker that is behind on deliveries (caught_up clear)."""
    caught_up = asyncio.Event()
    sent: list[Verb] = []
    async def ask(message: Verb) -> dict[str, Any]:
        sent.append(message)
        return {"ok": True}

    link = SimpleNamespace(caught_up=caught_up, up=True, send=sent.append, ask=ask)
    worker: Any = SimpleNamespace(settings=SETTINGS, link=link,
                                  metrics=WorkerMetrics([app.id for app in SETTINGS.apps]))
    return ApiAdapter(worker), caught_up, sent


def adapter_call(adapter: ApiAdapter, req: ApiRequest) -> Awaitable[bytes]:
    headers = [(k.encode(), v.encode()) for k, v in req.headers.items()]
    return adapter.handle(req.method, req.path, req.query, headers, req.body, True)


EVENT = {"name": "e", "channel": "a", "data": "x"}


@pytest.mark.parametrize("kind", ["unsigned", "bad signature", "stale", "bad body_md5",
                                  "unknown app"])
def test_unauthenticated_post_is_refused_at_once_while_the_worker_is_behind(kind: str) -> None:
    now = time.time()
    req = {
        "unsigned": ApiRequest("POST", "/apps/3/events", "", {}, orjson.dumps(EVENT)),
        "bad signature": request("POST", "/apps/3/events", EVENT, ts=now,
                                 app=App(id="3", key=KEY, secret="wrong")),
        "stale": request("POST", "/apps/3/events", EVENT, ts=now - 3600),
        "bad body_md5": dataclasses.replace(
            request("POST", "/apps/3/events", EVENT, ts=now), body=b'{"name":"other"}'),
        "unknown app": request("POST", "/apps/99/events", EVENT, ts=now),
    }[kind]

    async def go() -> bytes:
        adapter, caught_up, sent = behind_adapter()
        assert not caught_up.is_set()
        # Far below BACKPRESSURE_WAIT (5 s): answered without waiting at all.
        response = await asyncio.wait_for(adapter_call(adapter, req), 0.5)
        assert sent == []
        return response

    response = asyncio.run(go())
    status = 404 if kind == "unknown app" else 401
    assert response.startswith(f"HTTP/1.1 {status} ".encode())


def test_invalid_authenticated_post_is_refused_at_once_too() -> None:
    req = request("POST", "/apps/3/events", {"name": "e", "data": "x"}, ts=time.time())

    async def go() -> bytes:
        adapter, _, _ = behind_adapter()
        return await asyncio.wait_for(adapter_call(adapter, req), 0.5)

    assert asyncio.run(go()).startswith(b"HTTP/1.1 400 ")


def test_authenticated_publish_waits_until_the_worker_caught_up() -> None:
    req = request("POST", "/apps/3/events", EVENT, ts=time.time())

    async def go() -> None:
        adapter, caught_up, sent = behind_adapter()
        task = asyncio.ensure_future(adapter_call(adapter, req))
        await asyncio.sleep(0.1)
        assert not task.done() and sent == []  # held back, nothing published yet
        caught_up.set()
        response = await asyncio.wait_for(task, 1)
        assert response.startswith(b"HTTP/1.1 200 ")
        assert [type(m) for m in sent] == [Publish]

    asyncio.run(go())


def test_authenticated_query_does_not_wait_for_back_pressure() -> None:
    req = request("GET", "/apps/3/channels/presence-a/users", ts=time.time())

    async def ask(message: Verb) -> dict[str, Any]:
        return {"users": ["u1"]}

    async def go() -> bytes:
        adapter, _, _ = behind_adapter()
        adapter.worker.link.ask = ask
        return await asyncio.wait_for(adapter_call(adapter, req), 0.5)

    response = asyncio.run(go())
    assert response.startswith(b"HTTP/1.1 200 ")
    assert response.endswith(b'{"users":[{"id":"u1"}]}')


# --- the official pusher-http-python SDK --------------------------------------------------


class HandleApiBackend:
    """A pusher-http-python backend that sends each request to handle_api in-process.

    ``requests`` prepares the request exactly as it would go on the wire, so the path
    and query reaching handle_api are what a real server would receive.
    """

    def __init__(self, client: Any, ctx: FakeContext) -> None:
        self.client = client
        self.ctx = ctx
        self.seen: list[ApiRequest] = []

    def send_request(self, sdk_request: Any) -> Any:
        prepared = requests.Request(
            sdk_request.method, sdk_request.url, headers=sdk_request.headers,
            data=sdk_request.body,
        ).prepare()
        path, _, query = prepared.path_url.partition("?")
        headers = {k.lower(): v for k, v in prepared.headers.items()}
        body = prepared.body if isinstance(prepared.body, bytes) else b""
        api_request = ApiRequest(sdk_request.method, path, query, headers, body)
        self.seen.append(api_request)
        response = asyncio.run(handle_api(api_request, self.ctx))
        return process_response(response.status, response.body.decode())


def sdk(ctx: FakeContext, app: App = APP, secret: str | None = None) -> pusher.Pusher:
    ctx.clock = time.time()  # the SDK stamps requests with the real clock
    return pusher.Pusher(app_id=app.id, key=app.key, secret=secret or app.secret,
                         host="127.0.0.1", port=6001, ssl=False,
                         backend=HandleApiBackend, ctx=ctx)


def test_sdk_trigger_single_and_many_channels() -> None:
    ctx = FakeContext()
    client = sdk(ctx)
    assert client.trigger("my-channel", "my-event", {"message": "hello"}) == {}
    assert client.trigger(["a", "presence-b@x=1,2;3"], "ev", "raw text",
                          socket_id="123.456") == {}
    assert [(p.channel, p.exclude) for p in ctx.published] == [
        ("my-channel", ""), ("a", "123.456"), ("presence-b@x=1,2;3", "123.456")]
    first = orjson.loads(ctx.published[0].payload)
    assert first == {"event": "my-event", "channel": "my-channel",
                     "data": '{"message": "hello"}'}


def test_sdk_trigger_encrypted_channel() -> None:
    ctx = FakeContext()
    ctx.clock = time.time()
    client = pusher.Pusher(app_id="3", key=KEY, secret=SECRET, host="127.0.0.1", port=6001,
                           ssl=False, backend=HandleApiBackend, ctx=ctx,
                           encryption_master_key_base64="MDEyMzQ1Njc4OTAxMjM0NTY3ODkwMTIzNDU2Nzg5MDE=")
    assert client.trigger("private-encrypted-room", "ev", {"secret": 1}) == {}
    [pub] = ctx.published
    data = orjson.loads(orjson.loads(pub.payload)["data"])
    assert set(data) == {"nonce", "ciphertext"}  # relayed as-is, never decrypted


def test_sdk_send_to_user() -> None:
    ctx = FakeContext()
    assert sdk(ctx).send_to_user("user-1", "note", {"x": 1}) == {}
    [pub] = ctx.published
    assert pub.channel == "#server-to-user-user-1"


def test_sdk_trigger_batch() -> None:
    ctx = FakeContext()
    result = sdk(ctx).trigger_batch([
        {"channel": "a", "name": "e1", "data": {"n": 1}},
        {"channel": "cache-b", "name": "e2", "data": "two", "socket_id": "1.1"},
    ])
    assert result == {}
    assert [(p.channel, p.exclude, p.cache_ttl) for p in ctx.published] == [
        ("a", "", 0.0), ("cache-b", "1.1", 1800.0)]


def test_sdk_channels_info_signs_body_md5_on_get() -> None:
    ctx = FakeContext()
    ctx.replies["channels"] = {"channels": {"presence-r": {"subscription_count": 2,
                                                           "user_count": 1}}}
    client = sdk(ctx)
    result = client.channels_info(prefix_filter="presence-", attributes=["user_count"])
    assert result == {"channels": {"presence-r": {"user_count": 1}}}
    seen = client._pusher_client.http.seen[-1]
    assert "body_md5=d41d8cd98f00b204e9800998ecf8427e" in seen.query
    assert seen.method == "GET" and seen.body == b""


def test_sdk_channels_info_two_attributes_raw_comma() -> None:
    ctx = FakeContext()
    ctx.replies["channels"] = {"channels": {"presence-r": {"subscription_count": 2,
                                                           "user_count": 1}}}
    result = sdk(ctx).channels_info(prefix_filter="presence-",
                                    attributes=["user_count", "subscription_count"])
    assert result == {"channels": {"presence-r": {"user_count": 1, "subscription_count": 2}}}


def test_sdk_channel_info_and_users() -> None:
    ctx = FakeContext()
    ctx.replies["channel"] = {"occupied": True, "subscription_count": 3, "user_count": 2,
                              "cache": None}
    ctx.replies["users"] = {"users": ["1", "2"]}
    client = sdk(ctx)
    assert client.channel_info("presence-a@b", ["user_count", "subscription_count"]) == {
        "occupied": True, "user_count": 2, "subscription_count": 3}
    assert ctx.queries[-1][2]["channel"] == "presence-a@b"
    assert client.users_info("presence-a@b") == {"users": [{"id": "1"}, {"id": "2"}]}


def test_sdk_terminate_user_connections_without_apps_prefix() -> None:
    ctx = FakeContext()
    client = sdk(ctx)
    assert client.terminate_user_connections("user-7") == {}
    assert ctx.sent == [TerminateUser("3", "user-7")]
    assert client._pusher_client.http.seen[-1].path == "/users/user-7/terminate_connections"


def test_sdk_sees_errors() -> None:
    ctx = FakeContext()
    with pytest.raises(PusherBadAuth, match="Invalid signature"):
        sdk(ctx, secret="wrong-secret").trigger("a", "e", "x")
    with pytest.raises(PusherForbidden, match="disabled"):
        sdk(ctx, app=OFF).trigger("a", "e", "x")
    with pytest.raises(PusherBadRequest, match="presence"):
        sdk(ctx).channels_info(attributes=["user_count"])
    with pytest.raises(PusherBadRequest, match="presence channel"):
        sdk(ctx).users_info("private-x")
    with pytest.raises(PusherBadStatus, match="413"):
        sdk(ctx).trigger("a", "e", "x" * 10241)
    ctx.replies["channels"] = BrokerUnavailable()
    with pytest.raises(PusherBadStatus, match="503"):
        sdk(ctx).channels_info()
    assert ctx.published == []


def test_sdk_stale_clock_is_refused() -> None:
    ctx = FakeContext()
    client = sdk(ctx)
    ctx.clock += 3600  # the server's clock is an hour ahead of the SDK's
    with pytest.raises(PusherBadAuth, match="Timestamp expired"):
        client.trigger("a", "e", "x")
