"""The Pusher HTTP API endpoints, as the worker calls them.

The worker's HTTP layer parses a request into an :class:`ApiRequest` and answers it in
two steps. :func:`accept_api` runs at once, without waiting for anything, every check
that needs no broker: route, app, signature, enabled, body, rate limit. It returns
either the refusal or an :class:`Accepted` request, whose :meth:`Accepted.run` does
what is left: publish, or ask the broker. The worker holds an accepted publish back
while it is behind on deliveries (``ApiAdapter.handle``) between the two steps, so only
an authenticated request can ever wait. :func:`handle_api` is both steps in one; neither
raises for a client's mistake. Everything the API needs from the rest of the process comes
through an :class:`ApiContext`: the settings, ``publish``/``send`` to the broker (each
answered once the broker has routed it), a request/reply ``query`` and the clock. The
rules themselves (signatures, body validation, ``info`` attributes) live in
:mod:`vask.api_rules`.

Routes (``{app}`` is the app key or id; ``{channel}`` and ``{user}`` are
percent-decoded, while the signature covers the raw path as received)::

    POST /apps/{app}/events                          trigger
    POST /apps/{app}/batch_events                    batch trigger
    GET  /apps/{app}/channels                        occupied list
    GET  /apps/{app}/channels/{channel}              channel info
    GET  /apps/{app}/channels/{channel}/users        presence roster
    POST /apps/{app}/users/{user}/events             server-to-user
    POST /apps/{app}/users/{user}/terminate_connections
    POST /users/{user}/terminate_connections         (pusher-http-python; app by auth_key)

Checks run in this order: route (404, 405) → app (404) → signature (401) → app enabled
(403) → body size and content (400, 413) → backend rate limit (429), all in
:func:`accept_api`; then act, in :meth:`Accepted.run` (503 when the broker does not
answer, or refuses a publish while it recovers). Errors are ``{"error": message, "code": status}``.

Response bodies are JSON, except the empty body of a 204 CORS preflight; the worker adds
``Content-Type: application/json`` (:data:`CONTENT_TYPE`) and ``Content-Length``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from vask.api_rules import (
    CHANNEL_INFO,
    CHANNELS_INFO,
    ApiError,
    Event,
    TokenBucket,
    app_for_auth_key,
    app_for_segment,
    check_channel_info,
    check_channel_name,
    check_channels_info,
    check_user_id,
    decode_segment,
    load_json_object,
    parse_batch,
    parse_event,
    parse_info,
    parse_query,
    retry_after_seconds,
    verify_signature,
)
from vask.channels import kind_of
from vask.config import App, Settings
from vask.envelope import Publish, TerminateUser
from vask.metrics import rejections
from vask.workers.broker_link import BrokerUnavailable

__all__ = [
    "CONTENT_TYPE",
    "Accepted",
    "ApiContext",
    "ApiRequest",
    "ApiResponse",
    "BrokerUnavailable",
    "accept_api",
    "batch_events",
    "channel_info",
    "channel_users",
    "channels_list",
    "handle_api",
    "reset_rate_limits",
    "terminate_connections",
    "trigger_events",
    "user_events",
]

log = logging.getLogger(__name__)

CONTENT_TYPE = "application/json"


@dataclass(frozen=True, slots=True)
class ApiRequest:
    """One HTTP request as received.

    ``path`` is the raw path without the query, still percent-encoded; ``query`` the raw
    query string without ``?``; ``headers`` use lower-case names.
    """

    method: str
    path: str
    query: str
    headers: Mapping[str, str]
    body: bytes


@dataclass(frozen=True, slots=True)
class ApiResponse:
    """The answer: status, JSON body and any extra headers (CORS, Retry-After, Allow)."""

    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


class ApiContext(Protocol):
    """What the API needs from the worker process."""

    @property
    def settings(self) -> Settings:
        """The current settings (read on every request, so a reload takes effect)."""
        ...

    async def publish(self, messages: Sequence[Publish]) -> None:
        """Hand publishes to the broker and wait until it has routed them all: returns
        once every one is on its way to every worker that needs it; raises
        :class:`BrokerUnavailable` (answered 503) when that cannot be said."""
        ...

    async def send(self, msg: TerminateUser) -> None:
        """Send another request to the broker (e.g. :class:`TerminateUser`) and wait for
        its acknowledgement, like :meth:`publish`."""
        ...

    async def query(self, app_id: str, kind: str, args: dict[str, Any]) -> dict[str, Any]:
        """Ask the broker (``channels``, ``channel``, ``users``, ``counts``); raises
        :class:`BrokerUnavailable` when no reply comes in time."""
        ...

    def now(self) -> float:
        """Unix time in seconds."""
        ...


@dataclass(frozen=True, slots=True)
class _Call:
    """A request that passed routing, app resolution and authentication."""

    app: App
    request: ApiRequest
    params: Sequence[tuple[str, str]]
    arg: str  # the decoded {channel} or {user} path segment, "" when the route has none
    ctx: ApiContext


#: what is left of a request once it passed every check: publish, or ask the broker
_Act = Callable[[], Awaitable[ApiResponse]]
#: an endpoint: checks the request (raising :class:`ApiError`) and returns its act
_Handler = Callable[[_Call], _Act]

_OK_EMPTY = ApiResponse(200, b"{}")


def _json(value: object) -> ApiResponse:
    return ApiResponse(200, orjson.dumps(value))


def _error(
    status: int, message: str, headers: tuple[tuple[str, str], ...] = ()
) -> ApiResponse:
    return ApiResponse(status, orjson.dumps({"error": message, "code": status}), headers)


def _query_values(params: Sequence[tuple[str, str]]) -> dict[str, str]:
    """Query parameters by name; a repeated one keeps its last value."""
    return dict(params)


# --- backend rate limit (per app, per worker process) --------------------------------

_buckets: dict[str, TokenBucket] = {}


def reset_rate_limits() -> None:
    """Forget every app's token bucket (tests; a settings reload may call it too)."""
    _buckets.clear()


def _charge(call: _Call, cost: int) -> None:
    """Spend ``cost`` points of the app's ``max_backend_events_per_second``; 429 if out.

    One point per (event, channel). The bucket lives in this process, so with N workers
    the effective cluster-wide limit is up to N times the configured one.
    """
    rate = call.app.max_backend_events_per_second
    if rate <= 0:
        return
    now = call.ctx.now()
    bucket = _buckets.get(call.app.id)
    if bucket is None or bucket.rate != rate:
        bucket = _buckets[call.app.id] = TokenBucket.full(float(rate), now)
    wait = bucket.take(cost, now)
    if wait > 0:
        rejections["backend_rate"] += 1
        seconds = retry_after_seconds(wait)
        raise ApiError(
            429,
            f"Too many events: this app may publish {rate} events per second "
            f"(one per channel); retry in {seconds} s.",
            retry_after=seconds,
        )


# --- publishing ----------------------------------------------------------------------


def _publishes(app: App, event: Event) -> list[Publish]:
    """One Publish per channel, each payload encoded once here (the hot path)."""
    name, data, exclude = event.name, event.data, event.socket_id
    out = []
    for channel in event.channels:
        payload = orjson.dumps({"event": name, "channel": channel, "data": data})
        ttl = app.cache_ttl if kind_of(channel).cache else 0.0
        out.append(Publish(app.id, channel, exclude, ttl, payload))
    return out


async def _ask(call: _Call, kind: str, args: dict[str, Any]) -> dict[str, Any]:
    """A broker query; a reply saying the query was malformed is our bug (→ 500)."""
    reply = await call.ctx.query(call.app.id, kind, args)
    if "error" in reply:
        raise RuntimeError(f"broker refused the {kind!r} query: {reply['error']}")
    return reply


async def _counts(call: _Call, channels: Sequence[str]) -> Mapping[str, Any]:
    reply = await _ask(call, "counts", {"channels": list(channels)})
    counts = reply.get("channels")
    return counts if isinstance(counts, dict) else {}


def _attributes(channel: str, info: frozenset[str], entry: object) -> dict[str, int]:
    """The requested counts of one channel; ``user_count`` for presence only."""
    counts = entry if isinstance(entry, dict) else {}
    out: dict[str, int] = {}
    if "user_count" in info and kind_of(channel).presence:
        out["user_count"] = int(counts.get("user_count") or 0)
    if "subscription_count" in info:
        out["subscription_count"] = int(counts.get("subscription_count") or 0)
    return out


def _publish_and_answer(call: _Call, event: Event) -> _Act:
    _charge(call, len(event.channels))

    async def act() -> ApiResponse:
        await call.ctx.publish(_publishes(call.app, event))
        if not event.info:
            return _OK_EMPTY  # no broker round trip on the hot path
        counts = await _counts(call, event.channels)
        return _json({"channels": {ch: _attributes(ch, event.info, counts.get(ch))
                                   for ch in event.channels}})

    return act


# --- endpoints -----------------------------------------------------------------------


# Each endpoint checks its request at once (raising ApiError) and returns its act, the
# part that publishes or waits for the broker; see accept_api.


def trigger_events(call: _Call) -> _Act:
    """``POST /apps/{app}/events`` → ``{}`` or ``{"channels": {…}}``."""
    event = parse_event(call.app, load_json_object(call.request.body))
    return _publish_and_answer(call, event)


def batch_events(call: _Call) -> _Act:
    """``POST /apps/{app}/batch_events`` → ``{}`` or index-aligned
    ``{"batch": [{…}, {}, …]}`` when any item asked for ``info``."""
    events = parse_batch(call.app, load_json_object(call.request.body))
    _charge(call, len(events))

    async def act() -> ApiResponse:
        await call.ctx.publish([p for event in events for p in _publishes(call.app, event)])
        wanted = [event.channels[0] for event in events if event.info]
        if not wanted:
            return _OK_EMPTY
        counts = await _counts(call, list(dict.fromkeys(wanted)))
        return _json(
            {
                "batch": [
                    _attributes(e.channels[0], e.info, counts.get(e.channels[0]))
                    if e.info else {}
                    for e in events
                ]
            }
        )

    return act


def channels_list(call: _Call) -> _Act:
    """``GET /apps/{app}/channels``: occupied channels, optionally filtered by
    ``filter_by_prefix``, with ``info=user_count`` (presence prefixes only) and/or
    ``subscription_count``."""
    query = _query_values(call.params)
    prefix = query.get("filter_by_prefix", "")
    info = parse_info(query.get("info"), CHANNELS_INFO)
    check_channels_info(info, prefix)

    async def act() -> ApiResponse:
        reply = await _ask(call, "channels", {"prefix": prefix})
        listed = reply.get("channels")
        channels: dict[str, dict[str, int]] = {}
        if isinstance(listed, dict):
            for name, entry in listed.items():
                # The broker filters already; this only guards the contract: occupied
                # channels under the prefix, never an internal '#' channel.
                if not name.startswith(prefix) or name.startswith("#"):
                    continue
                if isinstance(entry, dict) and entry.get("subscription_count") == 0:
                    continue
                channels[name] = _attributes(name, info, entry)
        return _json({"channels": channels})

    return act


def channel_info(call: _Call) -> _Act:
    """``GET /apps/{app}/channels/{channel}``: ``occupied`` always, plus the
    requested ``subscription_count``, ``user_count`` (presence) and ``cache`` (cache
    channels; ``{event, data, ttl}`` with whole seconds left, or ``null``)."""
    channel = call.arg
    check_channel_name(call.app, channel)
    info = parse_info(_query_values(call.params).get("info"), CHANNEL_INFO)
    check_channel_info(info, channel)

    async def act() -> ApiResponse:
        reply = await _ask(call, "channel", {"channel": channel, "cache": "cache" in info})
        out: dict[str, Any] = {"occupied": bool(reply.get("occupied"))}
        out.update(_attributes(channel, info, reply))
        if "cache" in info:
            cached = reply.get("cache")
            if isinstance(cached, dict) and "data" in cached:
                entry: dict[str, Any] = {}
                if cached.get("event") is not None:
                    entry["event"] = cached["event"]
                entry["data"] = cached["data"]
                entry["ttl"] = max(0, math.ceil(float(cached.get("ttl") or 0)))
                out["cache"] = entry
            else:
                out["cache"] = None
        return _json(out)

    return act


def channel_users(call: _Call) -> _Act:
    """``GET /apps/{app}/channels/{channel}/users``: the distinct user ids
    of a presence channel as ``{"users": [{"id": …}, …]}``."""
    channel = call.arg
    check_channel_name(call.app, channel)
    if not kind_of(channel).presence:
        raise ApiError(400, f"The channel must be a presence channel; {channel!r} is not.")

    async def act() -> ApiResponse:
        reply = await _ask(call, "users", {"channel": channel})
        users = reply.get("users")
        ids = users if isinstance(users, list) else []
        return _json({"users": [{"id": str(user_id)} for user_id in ids]})

    return act


def user_events(call: _Call) -> _Act:
    """``POST /apps/{app}/users/{user}/events``: an event for every
    connection signed in as ``user``, sent on its ``#server-to-user-{user}`` channel."""
    channel = check_user_id(call.app, call.arg)
    body = load_json_object(call.request.body)
    event = parse_event(call.app, body, fixed_channel=channel)
    return _publish_and_answer(call, event)


def terminate_connections(call: _Call) -> _Act:
    """``POST …/users/{user}/terminate_connections``: the broker closes every
    connection signed in as ``user`` (close code 4200); presence-only ones stay."""
    user_id = call.arg
    if not user_id:
        raise ApiError(400, "The user id in the path is empty.")
    if len(user_id) > call.app.max_channel_name_length:
        raise ApiError(400, "The user id in the path is too long.")
    if call.request.body:
        load_json_object(call.request.body)  # SDKs send {}; only its syntax matters

    async def act() -> ApiResponse:
        await call.ctx.send(TerminateUser(call.app.id, user_id))
        return _OK_EMPTY

    return act


# --- routing -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Route:
    method: str
    handler: _Handler
    app_segment: str | None  # None: the app comes from auth_key
    arg: str  # raw {channel} / {user} segment


def _route(path: str) -> _Route | None:
    """Match a raw path against the API routes (before any decoding)."""
    if not path.startswith("/"):
        return None
    match path[1:].split("/"):
        case ["apps", app, "events"]:
            return _Route("POST", trigger_events, app, "")
        case ["apps", app, "batch_events"]:
            return _Route("POST", batch_events, app, "")
        case ["apps", app, "channels"]:
            return _Route("GET", channels_list, app, "")
        case ["apps", app, "channels", channel]:
            return _Route("GET", channel_info, app, channel)
        case ["apps", app, "channels", channel, "users"]:
            return _Route("GET", channel_users, app, channel)
        case ["apps", app, "users", user, "events"]:
            return _Route("POST", user_events, app, user)
        case ["apps", app, "users", user, "terminate_connections"]:
            return _Route("POST", terminate_connections, app, user)
        case ["users", user, "terminate_connections"]:
            return _Route("POST", terminate_connections, None, user)
    return None


# --- CORS (opt-in per app) -------------------------------------------------------

_CORS_METHODS = "GET, POST, OPTIONS"
_CORS_HEADERS = "Content-Type, X-Pusher-Library"


def _cors_headers(app: App, request: ApiRequest) -> tuple[tuple[str, str], ...]:
    """``Access-Control-*`` headers when the app allows the request's Origin, else ()."""
    if not app.cors_origins:
        return ()
    origin = request.headers.get("origin")
    if not origin:
        return ()
    if "*" in app.cors_origins:
        return (("Access-Control-Allow-Origin", "*"),)
    if origin in app.cors_origins:
        return (("Access-Control-Allow-Origin", origin), ("Vary", "Origin"))
    return ()


def _preflight(app: App, request: ApiRequest) -> ApiResponse:
    cors = _cors_headers(app, request)
    if not cors:
        # No extra headers: the browser refuses the cross-origin request itself.
        return ApiResponse(204, b"")
    asked = request.headers.get("access-control-request-headers")
    return ApiResponse(
        204,
        b"",
        (
            *cors,
            ("Access-Control-Allow-Methods", _CORS_METHODS),
            ("Access-Control-Allow-Headers", asked or _CORS_HEADERS),
            ("Access-Control-Max-Age", "600"),
        ),
    )


# --- entry points --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Accepted:
    """A request that passed every check :func:`accept_api` makes; :meth:`run` acts."""

    method: str
    path: str
    act: _Act
    cors: tuple[tuple[str, str], ...]

    @property
    def publishes(self) -> bool:
        """A POST: it publishes, so the worker's back-pressure may hold it."""
        return self.method == "POST"

    async def run(self) -> ApiResponse:
        """Publish or ask the broker; the response. Never raises for the client's doing."""
        cors = self.cors
        try:
            response = await self.act()
        except ApiError as exc:
            return _refusal(exc, cors)
        except BrokerUnavailable as exc:
            return _error(503, str(exc) or "The broker did not answer in time; try again "
                          "shortly.", cors)
        except Exception:
            # Our bug, not the client's: log it, never show its text (STYLE "whose fault").
            log.exception("HTTP API failed on %s %s", self.method, self.path)
            return _error(500, "Internal server error.", cors)
        if cors:
            return dataclasses.replace(response, headers=(*response.headers, *cors))
        return response


def _refusal(exc: ApiError, cors: tuple[tuple[str, str], ...]) -> ApiResponse:
    headers = cors
    if exc.retry_after is not None:
        headers = (*headers, ("Retry-After", str(exc.retry_after)))
    return _error(exc.status, exc.message, headers)


async def handle_api(request: ApiRequest, ctx: ApiContext) -> ApiResponse:
    """Answer one HTTP API request (:func:`accept_api`, then :meth:`Accepted.run`).
    Never raises for anything the client did wrong."""
    accepted = accept_api(request, ctx)
    if isinstance(accepted, ApiResponse):
        return accepted
    return await accepted.run()


def accept_api(request: ApiRequest, ctx: ApiContext) -> ApiResponse | Accepted:
    """Check one HTTP API request without waiting for anything: the refusal (or the
    CORS preflight answer), or the :class:`Accepted` request.

    Everything a client can get wrong is decided here, so that nothing unauthenticated
    or invalid can be held by back-pressure or wait on the broker.
    """
    route = _route(request.path)
    if route is None:
        return _error(404, f"Unknown path {request.path!r}: not a Pusher HTTP API endpoint.")
    method = request.method.upper()
    if method != route.method and method != "OPTIONS":
        return _error(
            405,
            f"Method {method} is not allowed on {request.path}; use {route.method}.",
            (("Allow", route.method),),
        )
    cors: tuple[tuple[str, str], ...] = ()
    try:
        settings = ctx.settings
        params = parse_query(request.query)
        if route.app_segment is not None:
            app = app_for_segment(settings, route.app_segment)
        else:
            app = app_for_auth_key(settings, params)
        if method == "OPTIONS":
            if not app.cors_origins:
                return _error(
                    405,
                    f"Method OPTIONS is not allowed on {request.path}: CORS is not enabled "
                    "for this app (cors_origins).",
                    (("Allow", route.method),),
                )
            return _preflight(app, request)
        cors = _cors_headers(app, request)
        verify_signature(app, method, request.path, params, request.body, ctx.now())
        if not app.enabled:
            raise ApiError(403, f"App {app.id!r} is disabled.")
        if len(request.body) > settings.max_http_body_bytes:
            raise ApiError(
                413,
                f"The request body is too large: {len(request.body)} bytes, the limit is "
                f"{settings.max_http_body_bytes} bytes (max_http_body_bytes).",
            )
        arg = decode_segment(route.arg)
        act = route.handler(_Call(app, request, params, arg, ctx))
    except ApiError as exc:
        return _refusal(exc, cors)
    except Exception:
        # Our bug, not the client's: log it, never show its text (STYLE "whose fault").
        log.exception("HTTP API failed on %s %s", method, request.path)
        return _error(500, "Internal server error.", cors)
    return Accepted(method, request.path, act, cors)
