"""Property tests of the HTTP API rules: whatever a client sends, the answer is a 2xx or
a 4xx with a well-formed body, never a 500 or an exception; and nothing reaches the
broker unless the request was signed with the app's secret.

Requests go through ``handle_api`` with the in-memory ``FakeContext`` of
``tests/test_http_api.py`` (no sockets), whose broker always answers. Paths, query
strings and header values are Latin-1 text, as the worker decodes them.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from urllib.parse import parse_qsl, quote

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.test_http_api import KEY, SETTINGS, TS, FakeContext, sign_query
from vask.api_rules import parse_query
from vask.workers.http_api import ApiRequest, ApiResponse, accept_api, handle_api, reset_rate_limits

latin1 = st.characters(max_codepoint=255)
texts = st.text(latin1, max_size=16)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)

# The apps of SETTINGS by id or key (3 plain, 4 disabled, 5/6 CORS, 7 rate-limited),
# and some that are not there.
app_segments = st.sampled_from(["3", KEY, "4", "off-key", "5", "cors-key", "6", "7",
                                "lim-key", "nope", "", "%33", "3%00"])
channel_names = st.sampled_from([
    "a", "presence-a", "private-b", "cache-c", "presence-cache-d", "private-encrypted-e",
    "#server-to-user-1", "bad name", "", "x" * 250, "u@1", "ünï",
]) | texts
segments = st.one_of(channel_names.map(lambda c: quote(c, safe="")),
                     st.sampled_from(["%", "%zz", "%ff%fe", "a%2Fb", "%23"]), texts)

paths = st.one_of(
    st.builds("/apps/{}/events".format, app_segments),
    st.builds("/apps/{}/batch_events".format, app_segments),
    st.builds("/apps/{}/channels".format, app_segments),
    st.builds("/apps/{}/channels/{}".format, app_segments, segments),
    st.builds("/apps/{}/channels/{}/users".format, app_segments, segments),
    st.builds("/apps/{}/users/{}/events".format, app_segments, segments),
    st.builds("/apps/{}/users/{}/terminate_connections".format, app_segments, segments),
    st.builds("/users/{}/terminate_connections".format, segments),
    st.text(latin1, max_size=30).map(lambda t: "/" + t),
    st.text(latin1, max_size=30),
)
methods = st.sampled_from(["POST", "GET", "OPTIONS", "PUT", "DELETE", "HEAD", "post", "get"]) \
    | st.text(latin1, max_size=8)

events = st.fixed_dictionaries({}, optional={
    "name": st.sampled_from(["e", "my-event", "x" * 250]) | json_values,
    "channel": channel_names | json_values,
    "channels": st.lists(channel_names, max_size=4) | st.lists(channel_names, min_size=101,
                                                               max_size=102) | json_values,
    "data": st.sampled_from(["", "{}", "x" * 11000]) | json_values,
    "socket_id": st.sampled_from(["1.2", "12.34", "x", ""]) | json_values,
    "info": st.sampled_from(["user_count", "subscription_count", "cache",
                             "user_count,subscription_count", ""]) | json_values,
})
bodies = st.one_of(
    st.just(b""), st.just(b"{}"), st.binary(max_size=48),
    json_values.map(orjson.dumps),
    events.map(orjson.dumps),
    st.fixed_dictionaries({"batch": st.lists(events | json_values, max_size=12) | json_values}
                          ).map(orjson.dumps),
    st.just(b"[" * 2000),  # deeper than the JSON parser allows
)
_param_values = st.sampled_from(["user_count", "subscription_count", "cache", "presence-",
                                 "private-", "1.0", "2.0", "", "99999999999999999999",
                                 "-5"]) | texts
# Mostly the parameters endpoints read; sometimes an override of an auth_* one (signed
# over, so only the rules about its value can refuse it).
extra_params = st.one_of(
    st.dictionaries(st.sampled_from(["info", "filter_by_prefix", "x"]), _param_values,
                    max_size=2),
    st.dictionaries(st.sampled_from(["info", "filter_by_prefix", "auth_key", "auth_version",
                                     "body_md5", "auth_timestamp", "x"]), _param_values,
                    max_size=3),
)
# Header values never hold CR, LF or NUL: the HTTP parser refuses those before this.
header_values = st.text(st.characters(max_codepoint=255, exclude_characters="\r\n\x00"),
                        max_size=20)
headers = st.dictionaries(
    st.sampled_from(["origin", "access-control-request-headers", "content-type", "x-a"]),
    st.sampled_from(["https://dash.example", "https://evil.example", ""]) | header_values,
    max_size=3,
)
# Seconds between the signed auth_timestamp and the server clock: inside and just
# outside the window, and far beyond what a float or gmtime can hold.
clock_skews = st.sampled_from([599, -600, 601, 10**14, -(10**17), 10**20, 10**400]) \
    | st.integers(-(10**6), 10**6)


def broker_context(clock: float) -> FakeContext:
    """A FakeContext whose broker answers every query well."""
    ctx = FakeContext(SETTINGS, clock)
    ctx.replies["channels"] = {"channels": {
        "a": {"subscription_count": 2, "user_count": 0},
        "presence-a": {"subscription_count": 1, "user_count": 1},
        "#server-to-user-1": {"subscription_count": 1}}}
    ctx.replies["channel"] = {"occupied": True, "subscription_count": 2, "user_count": 1,
                              "cache": {"event": "e", "data": "d", "ttl": 3.2}}
    ctx.replies["users"] = {"users": ["1", "u2"]}
    ctx.replies["counts"] = lambda args: {"channels": {
        c: {"subscription_count": 1, "user_count": 1} for c in args["channels"]}}
    return ctx


def answer(request: ApiRequest, ctx: FakeContext) -> ApiResponse:
    reset_rate_limits()
    return asyncio.run(handle_api(request, ctx))


def check_response(response: ApiResponse) -> None:
    assert 200 <= response.status < 300 or 400 <= response.status < 500, response
    if response.status == 204:
        assert response.body == b""
    else:
        body = orjson.loads(response.body)
        assert isinstance(body, dict)
        if response.status >= 400:
            assert body["code"] == response.status
            assert isinstance(body["error"], str) and body["error"]
    for name, value in response.headers:
        assert "\r" not in name + value and "\n" not in name + value


@pytest.fixture(autouse=True)
def _no_internal_errors(caplog: pytest.LogCaptureFixture) -> Any:
    """A 500 is always logged ("HTTP API failed"): none may be."""
    with caplog.at_level(logging.ERROR, logger="vask.workers.http_api"):
        yield
    assert not [r for r in caplog.records if r.name == "vask.workers.http_api"]


@settings(max_examples=300, deadline=None, database=None)
@given(method=methods, path=paths, query=st.text(latin1, max_size=60) | extra_params.map(
    lambda p: "&".join(f"{k}={quote(v, safe='')}" for k, v in p.items())),
    head=headers, body=bodies)
def test_unsigned_requests_are_refused_without_side_effects(
        method: str, path: str, query: str, head: dict[str, str], body: bytes) -> None:
    ctx = broker_context(TS)
    request = ApiRequest(method, path, query, head, body)
    response = answer(request, ctx)
    check_response(response)
    # Without the secret nothing gets past the signature: no publish, no cast, no query.
    assert (ctx.published, ctx.sent, ctx.queries) == ([], [], [])
    assert response.status in (204, 401, 404, 405)
    # The same refusal comes from accept_api alone: nothing was waited for.
    if response.status != 204:
        assert accept_api(request, ctx) == response


# The apps of SETTINGS as (id, key, secret); 4 is disabled, 5/6 do CORS, 7 is limited.
APPS = [(app.id, app.key, app.secret) for app in SETTINGS.apps]
ROUTES = [
    ("POST", "/apps/{app}/events"), ("POST", "/apps/{app}/events"),
    ("POST", "/apps/{app}/batch_events"), ("GET", "/apps/{app}/channels"),
    ("GET", "/apps/{app}/channels/{arg}"), ("GET", "/apps/{app}/channels/{arg}/users"),
    ("POST", "/apps/{app}/users/{arg}/events"),
    ("POST", "/apps/{app}/users/{arg}/terminate_connections"),
    ("POST", "/users/{arg}/terminate_connections"),
]


@st.composite
def signed_requests(draw: st.DrawFn) -> ApiRequest:
    """A request signed the Pusher way, mostly with the right app, method and clock,
    and with any body: JSON or not, valid for the endpoint or not."""
    app_id, key, secret = draw(st.sampled_from(APPS))
    method, template = draw(st.sampled_from(ROUTES))
    segment = draw(st.sampled_from([app_id, key]) if draw(st.integers(0, 5)) else app_segments)
    path = template.format(app=segment, arg=draw(segments))
    if not draw(st.integers(0, 7)):
        method = draw(methods)
    if not draw(st.integers(0, 7)):
        path = draw(paths)
    body = draw(bodies) if method == "POST" or not draw(st.integers(0, 5)) else b""
    if not draw(st.integers(0, 7)):
        secret = "not-the-secret"
    skew = draw(clock_skews) if not draw(st.integers(0, 4)) else 0
    query = sign_query(method.upper(), path, body, draw(extra_params), key=key,
                       secret=secret, ts=TS + skew)
    return ApiRequest(method, path, query, draw(headers), body)


@settings(max_examples=400, deadline=None, database=None)
@given(request=signed_requests())
def test_signed_requests_with_any_body_are_answered_2xx_or_4xx(request: ApiRequest) -> None:
    ctx = broker_context(TS)
    response = answer(request, ctx)
    check_response(response)
    if response.status >= 400:
        assert ctx.published == [] and ctx.sent == []


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet="ab=&;%+2Fx ", max_size=30))
def test_query_parsing_agrees_with_parse_qsl(raw: str) -> None:
    """The split-only path for queries with nothing to decode gives what the standard
    library's parser gives, blanks and repeated '=' included."""
    assert parse_query(raw) == parse_qsl(raw, keep_blank_values=True)
