"""The Pusher rules for one connection, as a sans-I/O state machine.

A :class:`PusherSession` is fed each inbound text message (``receive``) and each broker
answer (``subscribe_answered``) and answers with a list of :data:`Action` values; the
worker's connection layer carries them out. Nothing here touches a socket or a clock:
``now`` is passed in. That keeps every rule testable by feeding messages in and reading
messages out (``tests/test_session.py``).

Rules (spec sections in brackets):

* Any frame must be a JSON object with a string ``event``; otherwise a
  ``pusher:error`` (code null) and the connection stays open. ``data`` of ``pusher:``
  events may be an object or a JSON string holding one.
* ``pusher:ping`` -> ``pusher:pong``; ``pusher:pong`` is accepted silently.
* ``pusher:subscribe``:
    - invalid name -> ``pusher:subscription_error`` InvalidChannel / 4009;
    - already subscribed (or pending) -> ``pusher:error`` "Existing subscription ...";
    - ``#server-to-user-{id}``: acknowledged only for the connection signed in as ``id``
      (sign-in already bound it), else AuthError / 4009;
    - one more channel than ``max_channels_per_connection`` (pending subscribes count,
      the sign-in's ``#server-to-user-`` binding does not) -> LimitReached / 4301;
    - no token left in the subscription bucket (below) -> LimitReached / 4301; more
      such refusals within one second than ``max_subscriptions_per_second`` -> close
      4100 (pusher-js reconnects after a back-off);
    - private/presence: ``auth`` must be ``key:HMAC`` of ``socket_id:channel`` or
      ``socket_id:channel:channel_data`` -> else AuthError / 401;
    - presence: ``channel_data`` JSON with ``user_id`` (string or integer, kept as
      string, ≤ 128 chars), at most ``max_presence_member_size_kb``; a signed-in
      connection may omit it (its ``user_data`` is used);
    - every subscribe is an :class:`Ask`: presence and cache channels need the broker's
      answer (roster / cached event / member limit); for other channels the worker may
      answer itself when the broker already routes the channel to it. Only the answer
      to the subscribe still pending settles it: after a leave and rejoin, the answer
      to the first subscribe is ignored.
* ``pusher:unsubscribe`` of a channel not subscribed is ignored. Any other
  unsubscribe is always honoured (refusing it would keep events flowing that the client
  asked to stop), but takes a token from the subscription bucket when one is there.
* The subscription bucket: per connection, refilled at ``max_subscriptions_per_second``,
  holding at most ``max_channels_per_connection`` tokens (200 when that is unlimited), so
  a reconnecting client can resubscribe everything at once while sustained churn, such as
  a presence join/leave loop that broadcasts to every member, is bounded. A subscribe
  pays after the name, duplicate and channel-count checks and before the signature check.
* ``pusher:signin``: ``auth`` over ``socket_id::user::user_data``; ``user_data``
  a JSON object with a non-empty ``id``; a connection keeps its first identity; the
  watchlist is cut to ``max_watchlist_size`` with a 4302 error.
* Client events: the app enables them; ``client-`` prefix; private or presence
  channel, not encrypted; sender subscribed; name and payload limits; at most
  ``max_client_events_per_second``; relayed to everyone else with the sender's presence
  ``user_id`` added on presence channels. Each violation is a ``pusher:error`` and the
  connection stays open.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson

from vask import frames
from vask.channels import ChannelKind, kind_of, name_problem, user_channel
from vask.config import App
from vask.envelope import Publish, SignIn, Subscribe, Unsubscribe, Verb
from vask.metrics import rejections
from vask.signing import channel_string, sign, user_string, verify_auth

MAX_USER_ID_LENGTH = 128
#: subscription bucket size when ``max_channels_per_connection`` is 0 (unlimited)
DEFAULT_SUBSCRIPTION_BURST = 200
#: close code for a connection that keeps subscribing without tokens: 4100-4199 makes
#: pusher-js reconnect after a back-off (Vask closes only with 4000-4299)
SUBSCRIPTION_FLOOD_CLOSE = 4100


@dataclass(frozen=True, slots=True)
class Send:
    """Write this frame to the connection."""

    frame: bytes


@dataclass(frozen=True, slots=True)
class Close:
    """Close the connection with this code after a ``pusher:error`` carrying ``reason``."""

    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class Tell:
    """Send this message to the broker (no answer expected)."""

    message: Verb


@dataclass(frozen=True, slots=True)
class Ask:
    """Send this subscribe to the broker (with a fresh request id) and hand the answer,
    together with this very ``message`` object, to :meth:`PusherSession.subscribe_answered`
    (``{"ok": true}`` may also come from the worker itself, see ``ask_subscribe``). The
    session tells answers apart by that object, not by the channel name."""

    message: Subscribe


@dataclass(frozen=True, slots=True)
class Bind:
    """Add (``on``) or remove the connection in the worker's local index for ``channel``."""

    channel: str
    on: bool


Action = Send | Close | Tell | Ask | Bind

class Subscriptions:
    """A session's subscriptions: channel -> state, in subscription order, with the
    read and write operations of a dict that the session uses.

    Most connections hold one channel (a user's private channel), and a dict holding one
    entry costs 184 bytes (plus its GC header) for every idle connection of a worker.
    One entry is kept in two slots of this object instead (56 bytes in all); a dict is
    made for the second and kept from then on.
    """

    __slots__ = ("_channel", "_more", "_state")

    def __init__(self) -> None:
        self._channel: str | None = None
        self._state: str | Subscribe | None = None
        self._more: dict[str, str | Subscribe] | None = None

    def __contains__(self, channel: object) -> bool:
        more = self._more
        if more is not None:
            return channel in more
        return self._channel is not None and channel == self._channel

    def get(self, channel: str) -> str | Subscribe | None:
        more = self._more
        if more is not None:
            return more.get(channel)
        return self._state if channel == self._channel else None

    def __getitem__(self, channel: str) -> str | Subscribe:
        state = self.get(channel)
        if state is None:
            raise KeyError(channel)
        return state

    def __setitem__(self, channel: str, state: str | Subscribe) -> None:
        more = self._more
        if more is not None:
            more[channel] = state
        elif self._channel is None or channel == self._channel:
            self._channel, self._state = channel, state
        else:
            assert self._state is not None
            self._more = {self._channel: self._state, channel: state}
            self._channel = self._state = None

    def pop(self, channel: str) -> str | Subscribe:
        more = self._more
        if more is not None:
            return more.pop(channel)
        state = self._state
        if state is None or channel != self._channel:
            raise KeyError(channel)
        self._channel = self._state = None
        return state

    def __delitem__(self, channel: str) -> None:
        self.pop(channel)

    def __len__(self) -> int:
        more = self._more
        if more is not None:
            return len(more)
        return 0 if self._channel is None else 1

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def keys(self) -> Iterable[str]:
        more = self._more
        if more is not None:
            return more.keys()
        return () if self._channel is None else (self._channel,)

    def items(self) -> Iterable[tuple[str, str | Subscribe]]:
        more = self._more
        if more is not None:
            return more.items()
        if self._channel is None or self._state is None:
            return ()
        return ((self._channel, self._state),)


# Marks the acknowledged subscribe to the user's own #server-to-user channel. (A
# subscription whose answer is outstanding holds its Subscribe request instead.)
_USER_ACK = "\x00user"


def _data_object(value: Any) -> dict[str, Any] | None:
    """``data`` of a ``pusher:`` event: an object, or a JSON string holding one."""
    if isinstance(value, dict):
        return value
    if isinstance(value, str):
        try:
            parsed = orjson.loads(value)
        except orjson.JSONDecodeError:
            return None
        return parsed if isinstance(parsed, dict) else None
    return None


def _user_id(value: Any) -> str | None:
    """Presence/sign-in user ids: non-empty strings, or integers in string form."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str) and value:
        return value
    return None


#: the watchlist of every connection that has none; never mutated (a sign-in assigns a
#: new list), so one object serves them all instead of an empty list per connection
_NO_WATCHLIST: list[str] = []


class PusherSession:
    """The Pusher-level state of one connection and the rules that change it."""

    __slots__ = (
        "app",
        "authorized",
        "members",
        "rate_count",
        "rate_second",
        "refused_count",
        "refused_since",
        "socket_id",
        "sub_stamp",
        "sub_tokens",
        "subscriptions",
        "user_data",
        "user_id",
        "user_info",
        "watchlist",
    )

    def __init__(self, app: App, socket_id: str) -> None:
        self.app = app
        self.socket_id = socket_id
        #: channel -> presence user id ("" for non-presence) or _USER_ACK once settled;
        #: the outstanding Subscribe request while pending. Holding the request itself
        #: lets an answer be matched to the subscribe it answers, not to a later one
        #: for the same channel (the worker keeps the request alive meanwhile anyway).
        self.subscriptions = Subscriptions()
        self.user_id: str | None = None
        self.user_info: Any = None
        self.user_data: str | None = None
        #: shared while empty (most connections never sign in): only ever replaced
        self.watchlist: list[str] = _NO_WATCHLIST
        #: presence channel -> [user_id, user_info] (kept to replay to a restarted broker)
        self.members: dict[str, list[Any]] | None = None
        #: True once signed in or subscribed to a private/presence channel
        self.authorized = False
        self.rate_second = 0
        self.rate_count = 0
        # The subscription bucket: two floats instead of an object per connection. A
        # stamp of -inf makes the first take() find the bucket full.
        self.sub_tokens = 0.0
        self.sub_stamp = -math.inf
        #: subscribes refused for want of a token since ``refused_since``
        self.refused_count = 0
        self.refused_since = -math.inf

    # --- inbound messages ---------------------------------------------------------

    def receive(self, text: bytes | bytearray | memoryview | str, now: float) -> list[Action]:
        """Apply the rules to one inbound text message."""
        try:
            message = orjson.loads(text)
        except orjson.JSONDecodeError:
            return [Send(frames.error(None, "Invalid message: not valid UTF-8 JSON"))]
        if not isinstance(message, dict):
            return [Send(frames.error(None, "Invalid message: expected a JSON object"))]
        event = message.get("event")
        if not isinstance(event, str) or not event:
            return [Send(frames.error(None, "Invalid message: 'event' must be a non-empty string"))]
        if event.startswith("client-"):
            return self._client_event(event, message, now)
        if event == "pusher:ping":
            return [Send(frames.PONG)]
        if event == "pusher:pong":
            return []
        if event == "pusher:subscribe":
            return self._subscribe(message.get("data"), now)
        if event == "pusher:unsubscribe":
            return self._unsubscribe(message.get("data"), now)
        if event == "pusher:signin":
            return self._signin(message.get("data"))
        return [Send(frames.error(None, f"Unsupported event {event[:200]!r}"))]

    # --- subscribe / unsubscribe --------------------------------------------------

    def _subscribe(self, raw: Any, now: float) -> list[Action]:
        data = _data_object(raw)
        if data is None:
            return [Send(frames.error(None, "pusher:subscribe needs data with a 'channel'"))]
        channel = data.get("channel")
        problem = name_problem(channel, self.app.max_channel_name_length)
        if problem is not None or not isinstance(channel, str):
            name = channel if isinstance(channel, str) else ""
            return [Send(frames.subscription_error(name, "InvalidChannel", str(problem), 4009))]
        if channel in self.subscriptions:
            return [Send(frames.error(None, f"Existing subscription to channel {channel}"))]
        kind = kind_of(channel)
        if kind.user:
            if self.user_id is not None and channel == user_channel(self.user_id):
                self.subscriptions[channel] = _USER_ACK
                return [Send(frames.subscription_succeeded(channel))]
            return [
                Send(
                    frames.subscription_error(
                        channel,
                        "AuthError",
                        "#server-to-user- channels are bound by pusher:signin and cannot be "
                        "subscribed to by other connections",
                        4009,
                    )
                )
            ]
        limit = self.app.max_channels_per_connection
        # len() first: the exact count (which builds the user channel name) is only
        # needed near the limit.
        if limit and len(self.subscriptions) >= limit and self.channel_count() >= limit:
            rejections["channels_per_connection"] += 1
            return [Send(frames.subscription_error(
                channel, "LimitReached",
                f"Too many channels on one connection: at most {limit}", 4301))]
        # The token is taken before the signature check, so a flood of badly signed
        # subscribes costs no more HMAC work than the rate allows.
        if not self._take_token(now):
            return self._refuse_for_rate(channel, now)
        member: list[Any] | None = None
        if kind.needs_auth:
            refusal, member = self._authorize(channel, kind, data)
            if refusal is not None:
                return [Send(refusal)]
            self.authorized = True
        # Success is only reported once the cluster routes the channel here: the
        # worker answers at once when it already holds a confirmed subscription to the
        # channel, and otherwise asks the broker (always for presence and cache).
        request = Subscribe(0, self.app.id, channel, self.socket_id, member,
                            self.app.max_presence_members_per_channel if kind.presence else 0)
        self.subscriptions[channel] = request
        return [Ask(request)]

    def _authorize(
        self, channel: str, kind: ChannelKind, data: dict[str, Any]
    ) -> tuple[bytes | None, list[Any] | None]:
        """(refusal frame or None, presence member [user_id, user_info] or None)."""
        auth = data.get("auth")
        channel_data = data.get("channel_data")
        if kind.presence and channel_data is None and self.user_id is None:
            return self._sub_error(channel, "AuthError",
                                   "Presence channels need channel_data (or a prior pusher:signin)",
                                   401), None
        if channel_data is not None and not isinstance(channel_data, str):
            return self._sub_error(channel, "InvalidChannelData",
                                   "channel_data must be a JSON-encoded string", 400), None
        signed = channel_string(self.socket_id, channel, channel_data if kind.presence else None)
        if not verify_auth(self.app.key, self.app.secret, auth, signed):
            given = auth.partition(":")[2] if isinstance(auth, str) else ""
            if isinstance(auth, str) and auth.partition(":")[0] != self.app.key:
                reason = f"Invalid key in auth: expected '{self.app.key}:<signature>'"
            else:
                reason = (f"Invalid signature: Expected HMAC SHA256 hex digest of {signed}, "
                          f"but got {given[:64]}")
            return self._sub_error(channel, "AuthError", reason, 401), None
        if not kind.presence:
            return None, None
        if channel_data is None:
            return None, [self.user_id, self.user_info]
        if len(channel_data.encode()) > self.app.max_presence_member_bytes:
            return self._sub_error(
                channel, "LimitReached",
                "The maximum size for a channel member is "
                f"{self.app.max_presence_member_size_kb:g} KB.",
                4301), None
        try:
            parsed = orjson.loads(channel_data)
        except orjson.JSONDecodeError:
            parsed = None
        if not isinstance(parsed, dict):
            return self._sub_error(channel, "InvalidChannelData",
                                   "channel_data must be a JSON object", 400), None
        user_id = _user_id(parsed.get("user_id"))
        if user_id is None:
            return self._sub_error(
                channel, "InvalidChannelData",
                "channel_data.user_id must be a non-empty string or an integer", 400), None
        if len(user_id) > MAX_USER_ID_LENGTH:
            return self._sub_error(channel, "InvalidChannelData",
                                   f"user_id is longer than {MAX_USER_ID_LENGTH} characters",
                                   400), None
        return None, [user_id, parsed.get("user_info")]

    @staticmethod
    def _sub_error(channel: str, kind: str, message: str, status: int) -> bytes:
        return frames.subscription_error(channel, kind, message, status)

    def subscribe_answered(self, request: Subscribe, body: dict[str, Any]) -> list[Action]:
        """The broker's answer to an :class:`Ask` subscribe (``request`` is the Ask's own
        message object; an answer to any other subscribe of the channel is ignored).

        ``body``: ``{"ok": true, "presence": {...}?, "cache": "<payload>"|null}`` or
        ``{"ok": false, "type": ..., "error": ..., "status": ...}``. A ``status`` that is
        not an integer reads as 500, a ``cache`` that is not a string as a miss.
        """
        channel = request.channel
        if self.subscriptions.get(channel) is not request:
            # Unsubscribed (and the broker told) while the answer was in flight, perhaps
            # subscribed again since: that newer subscribe gets its own answer, and only
            # it says whether the broker holds the subscription now.
            return []
        if not body.get("ok"):
            del self.subscriptions[channel]
            status = body.get("status")
            return [Send(frames.subscription_error(
                channel, str(body.get("type", "ServerError")),
                str(body.get("error", "subscription refused")),
                status if type(status) is int else 500))]
        member = request.member
        self.subscriptions[channel] = member[0] if member else ""
        if member:
            if self.members is None:
                self.members = {}
            self.members[channel] = member
        actions: list[Action] = [
            Bind(channel, True),
            Send(frames.subscription_succeeded(channel, body.get("presence"))),
        ]
        if kind_of(channel).cache:
            cached = body.get("cache")
            actions.append(Send(cached.encode() if cached and isinstance(cached, str)
                                else frames.cache_miss(channel)))
        return actions

    def channel_count(self) -> int:
        """Subscriptions held against ``max_channels_per_connection``: settled and
        pending ones, but not the acknowledged ``#server-to-user-`` channel, which the
        sign-in binds anyway."""
        count = len(self.subscriptions)
        if self.user_id is not None and user_channel(self.user_id) in self.subscriptions:
            count -= 1
        return count

    def _take_token(self, now: float) -> bool:
        """Take one token from the subscription bucket; False when it is empty."""
        rate = self.app.max_subscriptions_per_second
        if rate <= 0:
            return True
        tokens = self.sub_tokens
        elapsed = now - self.sub_stamp
        if elapsed > 0:
            burst = self.app.max_channels_per_connection or DEFAULT_SUBSCRIPTION_BURST
            tokens = min(float(burst), tokens + elapsed * rate)
        # Always move the stamp, also backwards: ``now`` is wall time, and a clock set
        # back must not leave the bucket without refill until it catches up again.
        self.sub_stamp = now
        if tokens >= 1.0:
            self.sub_tokens = tokens - 1.0
            return True
        self.sub_tokens = tokens
        return False

    def _refuse_for_rate(self, channel: str, now: float) -> list[Action]:
        """A subscribe without a token: an error, or a close for a client that keeps
        going (more refusals within one second than the rate)."""
        rate = self.app.max_subscriptions_per_second
        if not 0 <= now - self.refused_since < 1.0:
            self.refused_since = now
            self.refused_count = 0
        self.refused_count += 1
        rejections["subscription_rate"] += 1
        if self.refused_count > rate:
            return [Close(SUBSCRIPTION_FLOOD_CLOSE,
                          "Subscription rate limit exceeded; reconnect later")]
        return [Send(frames.subscription_error(
            channel, "LimitReached",
            f"Subscription rate limit exceeded: at most {rate} subscribe/unsubscribe "
            "per second", 4301))]

    def _unsubscribe(self, raw: Any, now: float) -> list[Action]:
        data = _data_object(raw)
        channel = data.get("channel") if data else None
        if not isinstance(channel, str) or channel not in self.subscriptions:
            return []
        state = self.subscriptions.pop(channel)
        if self.members is not None:
            self.members.pop(channel, None)
        if state == _USER_ACK:
            return []  # no broker work, like its subscribe: free
        self._take_token(now)  # honoured either way; the token only slows down churn
        actions: list[Action] = [Tell(Unsubscribe(self.app.id, channel, self.socket_id))]
        if isinstance(state, str):  # settled, so bound
            actions.insert(0, Bind(channel, False))
        return actions

    def is_subscribed(self, channel: str) -> bool:
        return isinstance(self.subscriptions.get(channel), str)

    # --- sign-in ------------------------------------------------------------------

    def _signin(self, raw: Any) -> list[Action]:
        data = _data_object(raw)
        if data is None:
            return [self._signin_error("pusher:signin needs data with 'auth' and 'user_data'")]
        user_data = data.get("user_data")
        if not isinstance(user_data, str):
            return [self._signin_error("user_data must be a JSON-encoded string")]
        if not verify_auth(self.app.key, self.app.secret, data.get("auth"),
                           user_string(self.socket_id, user_data)):
            return [self._signin_error("Invalid signature for pusher:signin user_data")]
        try:
            parsed = orjson.loads(user_data)
        except orjson.JSONDecodeError:
            parsed = None
        if not isinstance(parsed, dict):
            return [self._signin_error("user_data must be a JSON object")]
        user_id = _user_id(parsed.get("id"))
        if user_id is None:
            return [self._signin_error("user_data must contain a non-empty 'id'")]
        if len(user_id) > MAX_USER_ID_LENGTH or name_problem(user_id, MAX_USER_ID_LENGTH):
            return [self._signin_error(
                "user_data.id may hold only letters, digits and - _ = @ , . ; "
                f"(at most {MAX_USER_ID_LENGTH})")]
        if self.user_id is not None and self.user_id != user_id:
            return [self._signin_error(
                f"This connection is already signed in as user {self.user_id!r}")]
        watchlist_raw = parsed.get("watchlist", [])
        if not isinstance(watchlist_raw, list):
            return [self._signin_error("user_data.watchlist must be a list of user ids")]
        watchlist = [w for w in (_user_id(v) for v in watchlist_raw) if w is not None]
        actions: list[Action] = [Send(frames.signin_success(user_data))]
        limit = self.app.max_watchlist_size
        if len(watchlist) > limit:
            watchlist = watchlist[:limit]
            actions.append(Send(frames.error(
                4302, f"Watchlist limit exceeded; only the first {limit} user ids are watched: "
                + ",".join(watchlist))))
        first = self.user_id is None
        self.user_id = user_id
        self.user_info = parsed.get("user_info")
        self.user_data = user_data
        self.authorized = True
        if first:
            self.watchlist = watchlist if self.app.enable_watchlist_events else []
            actions.append(Bind(user_channel(user_id), True))
            actions.append(Tell(SignIn(self.app.id, self.socket_id, user_id, self.watchlist)))
        return actions

    @staticmethod
    def _signin_error(message: str) -> Send:
        return Send(frames.error(4009, message))

    # --- client events ------------------------------------------------------------

    def _client_event(self, event: str, message: dict[str, Any], now: float) -> list[Action]:
        channel = message.get("channel")
        where = channel if isinstance(channel, str) else None
        app = self.app
        if not app.enable_client_messages:
            return [Send(frames.error(4301, "Client events are not enabled for this app", where))]
        if where is None:
            return [Send(frames.error(4301, "Client events need a 'channel'"))]
        if not kind_of(where).client_events:
            return [Send(frames.error(
                4301,
                "Client events are only allowed on private and presence channels "
                "(not public, cache or encrypted ones)", where))]
        member = self.subscriptions.get(where)
        if not isinstance(member, str):  # not subscribed, or still pending
            return [Send(frames.error(
                None,
                f"Cannot broadcast client event (connection not subscribed to channel {where})",
                where))]
        if len(event) > app.max_event_name_length:
            return [Send(frames.error(
                4301, f"Event name is longer than {app.max_event_name_length} characters", where))]
        data = message.get("data")
        size = len(data.encode()) if isinstance(data, str) else len(orjson.dumps(data))
        if size > app.max_event_payload_bytes:
            rejections["client_event_size"] += 1
            return [Send(frames.error(
                4301, f"Client event data is larger than {app.max_event_payload_kb:g} KB", where))]
        second = int(now)
        if second != self.rate_second:
            self.rate_second = second
            self.rate_count = 0
        self.rate_count += 1
        if self.rate_count > app.max_client_events_per_second:
            rejections["client_event_rate"] += 1
            return [Send(frames.error(4301, "Client event rejected due to rate limit", where))]
        payload = frames.event(event, where, data, member or None)
        # Client events go to this worker's subscribers at once and through the broker
        # to the others (local_first): no broker round trip for the local audience.
        return [Tell(Publish(app.id, where, self.socket_id, 0.0, payload, True))]

    # --- end ----------------------------------------------------------------------

    def replay_subscriptions(self) -> list[tuple[str, list[Any] | None]]:
        """(channel, presence member or None) for every settled subscription."""
        members = self.members or {}
        return [(c, members.get(c)) for c, s in self.subscriptions.items()
                if isinstance(s, str) and s != _USER_ACK]

    def local_channels(self) -> list[str]:
        """Channels this connection sits in the worker's index for (for cleanup)."""
        out = [c for c, s in self.subscriptions.items()
               if isinstance(s, str) and s != _USER_ACK]
        if self.user_id is not None:
            out.append(user_channel(self.user_id))
        return out


def signed_subscribe(app: App, socket_id: str, channel: str,
                     channel_data: str | None = None) -> dict[str, Any]:
    """A correctly signed ``pusher:subscribe`` data object (for tests and tools)."""
    data: dict[str, Any] = {"channel": channel}
    kind = kind_of(channel)
    if kind.needs_auth:
        signed = channel_string(socket_id, channel, channel_data if kind.presence else None)
        data["auth"] = f"{app.key}:{sign(app.secret, signed)}"
    if channel_data is not None:
        data["channel_data"] = channel_data
    return data
