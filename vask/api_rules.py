"""The rules of the Pusher HTTP API, with no sockets and no broker.

Everything here is a pure function of its arguments (the clock is passed in), so the
rules are tested by feeding requests in and reading decisions out:

* which app a request is for (:func:`app_for_segment`, :func:`app_for_auth_key`);
* whether its signature holds (:func:`verify_signature`);
* whether an event body is acceptable (:func:`parse_event`, :func:`parse_batch`);
* which ``info`` attributes may be asked for where (:func:`parse_info` and the
  ``check_*_info`` helpers);
* how many backend events an app may publish per second (:class:`TokenBucket`).

Every refusal is one exception type, :class:`ApiError`, carrying the HTTP status and a
message written for the developer reading it in their server logs. Nothing in this
module knows about response encoding; ``vask.workers.http_api`` turns an
:class:`ApiError` into ``{"error": message, "code": status}``.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote

import orjson

from vask.channels import USER_CHANNEL_PREFIX, kind_of, name_problem, user_channel
from vask.config import App, Settings
from vask.signing import body_md5, http_string_to_sign, sign, signatures_match

__all__ = [
    "CHANNELS_INFO",
    "CHANNEL_INFO",
    "EMPTY_BODY_MD5",
    "TIMESTAMP_WINDOW",
    "TRIGGER_INFO",
    "ApiError",
    "Event",
    "TokenBucket",
    "app_for_auth_key",
    "app_for_segment",
    "check_channel_info",
    "check_channel_name",
    "check_channels_info",
    "check_user_id",
    "decode_segment",
    "load_json_object",
    "parse_batch",
    "parse_event",
    "parse_info",
    "parse_query",
    "retry_after_seconds",
    "verify_signature",
]

#: a request is accepted only within this many seconds of the server clock.
TIMESTAMP_WINDOW = 600
#: MD5 of the empty body, which pusher-http-python signs even on GET.
EMPTY_BODY_MD5 = body_md5(b"")
#: ``info`` attributes each endpoint understands.
TRIGGER_INFO = frozenset({"subscription_count", "user_count"})
CHANNELS_INFO = frozenset({"subscription_count", "user_count"})
CHANNEL_INFO = frozenset({"subscription_count", "user_count", "cache"})

_SOCKET_ID_RE = re.compile(r"[0-9]+\.[0-9]+")
# Query parameters that must appear at most once: a repeated one would make it
# ambiguous which value was checked.
_AUTH_PARAMS = ("auth_key", "auth_timestamp", "auth_version", "auth_signature", "body_md5")


class ApiError(Exception):
    """A request the API refuses: HTTP ``status`` and a human-readable ``message``."""

    def __init__(self, status: int, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(status, message)
        self.status = status
        self.message = message
        #: seconds for a ``Retry-After`` header (429 only)
        self.retry_after = retry_after

    def __str__(self) -> str:
        return f"{self.status}: {self.message}"


# --- request parsing ---------------------------------------------------------------


def parse_query(raw_query: str) -> list[tuple[str, str]]:
    """The decoded ``(name, value)`` pairs of a raw query string, blanks kept (as
    ``parse_qsl(raw_query, keep_blank_values=True)``)."""
    if "%" in raw_query or "+" in raw_query:
        return parse_qsl(raw_query, keep_blank_values=True)
    # Nothing to decode (a signed trigger's query: hex, digits, names): split only.
    pairs = []
    for field in raw_query.split("&"):
        if field:
            name, _, value = field.partition("=")
            pairs.append((name, value))
    return pairs


def decode_segment(segment: str) -> str:
    """One percent-decoded path segment (a channel name or user id)."""
    return unquote(segment, errors="replace")


def load_json_object(body: bytes, what: str = "request body") -> dict[str, Any]:
    """Parse a JSON object body or raise 400 saying what is wrong with it."""
    if not body:
        raise ApiError(400, f"The {what} is empty; expected a JSON object.")
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"The {what} is not valid JSON: {exc}.") from None
    if not isinstance(value, dict):
        raise ApiError(400, f"The {what} must be a JSON object, not {_json_type(value)}.")
    return value


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


# --- app resolution ------------------------------------------------------------------


def app_for_segment(settings: Settings, segment: str) -> App:
    """The app named by the ``{app}`` path segment: its key or its id.

    Configuration guarantees no app's id equals another app's key, so the lookup is
    unambiguous. Unknown → 404.
    """
    name = decode_segment(segment)
    for app in settings.apps:
        if app.key == name or app.id == name:
            return app
    raise ApiError(404, f"Unknown app {name!r}: no app has this key or id.")


def app_for_auth_key(settings: Settings, params: Sequence[tuple[str, str]]) -> App:
    """The app of a path without ``/apps/{app}`` (pusher-http-python's
    ``/users/{id}/terminate_connections``), found by its ``auth_key``."""
    keys = [v for k, v in params if k.lower() == "auth_key"]
    if not keys:
        raise ApiError(401, "Missing auth_key query parameter: it names the app on this path.")
    app = settings.app_by_key(keys[-1])
    if app is None:
        raise ApiError(404, f"Unknown app key {keys[-1]!r}.")
    return app


# --- signatures --------------------------------------------------------


def _single_params(params: Sequence[tuple[str, str]]) -> dict[str, str]:
    found: dict[str, str] = {}
    for key, value in params:
        lowered = key.lower()
        if lowered in _AUTH_PARAMS:
            if lowered in found:
                raise ApiError(401, f"The {lowered} query parameter is given more than once.")
            found[lowered] = value
    return found


def _iso(timestamp: float) -> str:
    try:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))
    except (OverflowError, OSError, ValueError):
        # Beyond what the platform's time_t or calendar holds (any auth_timestamp a
        # client sends ends up here when it is far off): show the number instead.
        return str(timestamp)


def verify_signature(
    app: App,
    method: str,
    raw_path: str,
    params: Sequence[tuple[str, str]],
    body: bytes,
    now: float,
) -> None:
    """Check a request's authentication parameters; raise 401 naming what is wrong.

    The steps:

    1. ``auth_key``, ``auth_timestamp``, ``auth_version`` and ``auth_signature`` are
       present; ``auth_key`` is this app's key; ``auth_version`` is ``1.0``.
    2. ``auth_timestamp`` is within :data:`TIMESTAMP_WINDOW` seconds of ``now``.
    3. A non-empty body needs ``body_md5`` equal to the MD5 of its raw bytes; an empty
       body may carry ``body_md5`` (pusher-http-python always does) but then it must be
       the MD5 of nothing.
    4. ``auth_signature`` equals HMAC-SHA256 over ``METHOD\\nPATH\\nsorted params``,
       compared in constant time. ``PATH`` is the path exactly as received; if that
       fails and the path holds percent-escapes, the decoded path is tried too, since
       some clients sign the path before their HTTP library escapes it.
    """
    auth = _single_params(params)
    missing = [
        name
        for name in ("auth_key", "auth_timestamp", "auth_version", "auth_signature")
        if name not in auth
    ]
    if missing:
        raise ApiError(
            401,
            f"Missing authentication query parameter(s): {', '.join(missing)}. Sign the "
            "request as described in the Pusher HTTP API reference.",
        )
    if auth["auth_key"] != app.key:
        raise ApiError(401, f"auth_key {auth['auth_key']!r} is not the key of this app.")
    if auth["auth_version"] != "1.0":
        raise ApiError(
            401, f"Unsupported auth_version {auth['auth_version']!r}; only 1.0 is accepted."
        )

    try:
        timestamp = int(auth["auth_timestamp"])
    except ValueError:
        raise ApiError(
            401,
            f"auth_timestamp {auth['auth_timestamp']!r} is not a whole number of seconds.",
        ) from None
    try:
        skew = abs(now - timestamp)
    except OverflowError:  # an integer too large for a float: certainly outside
        skew = math.inf
    if skew > TIMESTAMP_WINDOW:
        raise ApiError(
            401,
            f"Timestamp expired: given timestamp ({_iso(timestamp)}) not within "
            f"{TIMESTAMP_WINDOW}s of server time ({_iso(now)}).",
        )

    given_md5 = auth.get("body_md5")
    if body or given_md5 is not None:
        actual = body_md5(body)
        if given_md5 is None:
            raise ApiError(401, "Missing body_md5 query parameter for a request with a body.")
        if not signatures_match(actual, given_md5):
            raise ApiError(
                401,
                f"body_md5 {given_md5!r} does not match the MD5 of the request body "
                f"({actual}).",
            )

    given = auth["auth_signature"]
    expected_text = http_string_to_sign(method, raw_path, params)
    if signatures_match(sign(app.secret, expected_text), given):
        return
    decoded_path = unquote(raw_path, errors="replace")
    if decoded_path != raw_path:
        decoded_text = http_string_to_sign(method, decoded_path, params)
        if signatures_match(sign(app.secret, decoded_text), given):
            return
    shown = expected_text.replace("\n", "\\n")
    raise ApiError(
        401,
        f'Invalid signature: you should have sent HmacSHA256Hex("{shown}", '
        f'your_secret_key), but you sent "{given}".',
    )


# --- info attributes ---------------------------------------------------


def parse_info(raw: object, allowed: frozenset[str]) -> frozenset[str]:
    """The attributes named by a comma-separated ``info`` value; unknown ones → 400."""
    if raw is None:
        return frozenset()
    if not isinstance(raw, str):
        raise ApiError(400, "info must be a comma-separated string of attribute names.")
    names = frozenset(part.strip() for part in raw.split(",") if part.strip())
    unknown = sorted(names - allowed)
    if unknown:
        raise ApiError(
            400,
            f"Unknown info attribute {unknown[0]!r}; allowed here: "
            f"{', '.join(sorted(allowed))}.",
        )
    return names


def check_channels_info(info: frozenset[str], prefix: str) -> None:
    """``GET /channels``: ``user_count`` only when the filter restricts to presence
    channels; ``subscription_count`` is a Vask extension allowed always."""
    if "user_count" in info and not prefix.startswith("presence-"):
        raise ApiError(
            400,
            "info=user_count is only available for presence channels: add "
            "filter_by_prefix=presence- (or a longer presence- prefix).",
        )


def check_channel_info(info: frozenset[str], channel: str) -> None:
    """``GET /channels/{channel}``: an attribute the channel kind lacks → 400."""
    kind = kind_of(channel)
    if "user_count" in info and not kind.presence:
        raise ApiError(400, f"info=user_count is only available for presence channels, "
                            f"and {channel!r} is not one.")
    if "cache" in info and not kind.cache:
        raise ApiError(400, f"info=cache is only available for cache channels, "
                            f"and {channel!r} is not one.")


def check_channel_name(app: App, channel: str, *, internal_ok: bool = False) -> None:
    """400 unless ``channel`` is a valid channel name.

    ``#server-to-user-…`` names are accepted only where ``internal_ok`` (triggers).
    """
    problem = name_problem(channel, app.max_channel_name_length)
    if problem is not None:
        raise ApiError(400, problem)
    if not internal_ok and channel.startswith(USER_CHANNEL_PREFIX):
        raise ApiError(400, f"{channel!r} is an internal channel and cannot be queried.")


def check_user_id(app: App, user_id: str) -> str:
    """400 unless ``user_id`` can name a user channel; returns that channel."""
    if not user_id:
        raise ApiError(400, "The user id in the path is empty.")
    channel = user_channel(user_id)
    problem = name_problem(channel, app.max_channel_name_length)
    if problem is not None:
        raise ApiError(
            400,
            f"Invalid user id {user_id!r}: user ids may hold only letters, digits and "
            f"- _ = @ , . ; and must fit a channel name of "
            f"{app.max_channel_name_length} characters.",
        )
    return channel


# --- event bodies ---------------------------------------------


@dataclass(frozen=True, slots=True)
class Event:
    """One validated event to publish: the same name and data on every channel."""

    name: str
    channels: tuple[str, ...]
    data: str
    socket_id: str  # "" = exclude nobody
    info: frozenset[str]


def _event_name(app: App, raw: Mapping[str, Any]) -> str:
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise ApiError(400, "The event name ('name') is missing or not a non-empty string.")
    if len(name) > app.max_event_name_length:
        raise ApiError(
            400,
            f"Event name is too long ({len(name)} characters). Maximum allowed size is "
            f"{app.max_event_name_length}.",
        )
    return name


def _event_data(app: App, raw: Mapping[str, Any]) -> str:
    if "data" not in raw:
        raise ApiError(400, "The event data ('data') is missing.")
    data = raw["data"]
    if not isinstance(data, str):
        raise ApiError(
            400,
            f"The event data must be a string (JSON-encode objects first), not "
            f"{_json_type(data)}.",
        )
    limit = app.max_event_payload_bytes
    # A str of n characters is n..4n UTF-8 bytes: skip the encode when that decides.
    if len(data) * 4 > limit:
        size = len(data.encode("utf-8"))  # orjson never yields lone surrogates
        if size > limit:
            raise ApiError(
                413,
                f"The event data is too large: {size} bytes of UTF-8, the limit is "
                f"{limit} bytes ({app.max_event_payload_kb:g} KB).",
            )
    return data


def _socket_id(raw: Mapping[str, Any]) -> str:
    socket_id = raw.get("socket_id")
    if socket_id is None:
        return ""
    if not isinstance(socket_id, str) or not _SOCKET_ID_RE.fullmatch(socket_id):
        raise ApiError(
            400, f"Invalid socket_id {socket_id!r}: expected digits.digits, e.g. '123.456'."
        )
    return socket_id


def _channels(app: App, raw: Mapping[str, Any]) -> tuple[str, ...]:
    # ``channels`` wins when both are present.
    if raw.get("channels") is not None:
        listed = raw["channels"]
        if not isinstance(listed, list):
            raise ApiError(400, "'channels' must be an array of channel names.")
        if not listed:
            raise ApiError(400, "'channels' is empty; give at least one channel.")
        if len(listed) > app.max_event_channels_at_once:
            raise ApiError(
                400,
                f"Cannot broadcast to more than {app.max_event_channels_at_once} channels "
                f"at once ({len(listed)} given).",
            )
        names: Iterable[object] = listed
    elif raw.get("channel") is not None:
        names = (raw["channel"],)
    else:
        raise ApiError(400, "Missing 'channel' or 'channels': say where to send the event.")
    # Unique, in the order given: the same channel twice would deliver the event twice.
    unique: dict[str, None] = {}
    for name in names:
        if not isinstance(name, str):
            raise ApiError(400, "Channel names must be strings.")
        check_channel_name(app, name, internal_ok=True)
        unique[name] = None
    channels = tuple(unique)
    if len(channels) > 1 and any(kind_of(ch).encrypted for ch in channels):
        # an encrypted channel's data is encrypted for that channel alone.
        raise ApiError(
            400,
            "An encrypted channel (private-encrypted-…) must be triggered alone, not "
            "together with other channels.",
        )
    return channels


def parse_event(
    app: App, raw: object, *, fixed_channel: str | None = None, where: str = ""
) -> Event:
    """Validate one event object (the ``/events`` body or one batch item).

    ``fixed_channel`` is for ``/users/{id}/events``: the channel comes from the path and
    the body must not name one. ``where`` prefixes messages (e.g. ``"batch[2]: "``).
    """
    try:
        if not isinstance(raw, dict):
            raise ApiError(400, f"Each event must be a JSON object, not {_json_type(raw)}.")
        name = _event_name(app, raw)
        if fixed_channel is None:
            channels = _channels(app, raw)
        else:
            if raw.get("channel") is not None or raw.get("channels") is not None:
                raise ApiError(
                    400, "This endpoint sends to the user in the path; drop 'channel(s)'."
                )
            channels = (fixed_channel,)
        data = _event_data(app, raw)
        socket_id = _socket_id(raw)
        info = parse_info(raw.get("info"), TRIGGER_INFO)
    except ApiError as exc:
        if where:
            raise ApiError(exc.status, where + exc.message) from None
        raise
    return Event(name=name, channels=channels, data=data, socket_id=socket_id, info=info)


def parse_batch(app: App, body: Mapping[str, Any]) -> list[Event]:
    """Validate a ``batch_events`` body; every item or none.

    Each item names exactly one channel (``channel``, or ``channels`` with one entry).
    """
    items = body.get("batch")
    if not isinstance(items, list):
        raise ApiError(400, "'batch' must be an array of events.")
    if len(items) > app.max_event_batch_size:
        raise ApiError(
            400,
            f"Cannot batch-send more than {app.max_event_batch_size} events at once "
            f"({len(items)} given).",
        )
    events = []
    for index, item in enumerate(items):
        event = parse_event(app, item, where=f"batch[{index}]: ")
        if len(event.channels) != 1:
            raise ApiError(400, f"batch[{index}]: a batch item takes exactly one channel.")
        events.append(event)
    return events


# --- backend rate limit --------------------


@dataclass(slots=True)
class TokenBucket:
    """A token bucket refilled at ``rate`` tokens per second, holding at most ``rate``.

    Each published (event, channel) pair costs one token. A request costing more than a
    full bucket is let through when the bucket is full and leaves it in debt, so a large
    trigger is slowed down rather than refused forever.
    """

    rate: float
    tokens: float
    stamp: float

    @classmethod
    def full(cls, rate: float, now: float) -> TokenBucket:
        return cls(rate=rate, tokens=rate, stamp=now)

    def take(self, cost: int, now: float) -> float:
        """Spend ``cost`` tokens and return 0, or return the seconds to wait."""
        elapsed = now - self.stamp
        if elapsed > 0:
            self.tokens = min(self.rate, self.tokens + elapsed * self.rate)
        self.stamp = now
        needed = min(float(cost), self.rate)
        if self.tokens + 1e-9 >= needed:  # tolerate float rounding of the refill
            self.tokens -= cost
            return 0.0
        return (needed - self.tokens) / self.rate


def retry_after_seconds(wait: float) -> int:
    """The ``Retry-After`` value for a wait: whole seconds, at least 1."""
    return max(1, math.ceil(wait))
