"""The worker <-> broker envelope (version 1), specified in ``docs/envelope.md``.

Every message is a ZeroMQ multipart message::

    [verb, header]            or    [verb, header, payload]

``verb`` is a short ASCII tag, ``header`` an orjson-encoded JSON array holding the
verb's fields in declaration order, and ``payload`` (only for verbs that carry one) the
opaque client-facing bytes, which relays never parse. On the broker's ROUTER socket a
worker's identity frame precedes ``verb``.

Each verb is one frozen dataclass below; :func:`encode` and :func:`decode` are the only
ways messages are built or read, and ``tests/test_envelope.py`` round-trips every verb.
Fields named ``app`` + ``channel`` form the routing key of channel traffic, so a future
broker sharded by channel hash can route on them without reading anything else.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import orjson

ENVELOPE_VERSION = 1


class EnvelopeError(ValueError):
    """A message that does not follow the envelope (unknown verb, wrong field count)."""


@dataclass(frozen=True, slots=True)
class Verb:
    """Base of every message type."""

    VERB: ClassVar[bytes] = b""
    #: name of the field carried as the raw third frame instead of in the header
    PAYLOAD: ClassVar[str | None] = None


# --- lifecycle -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello(Verb):
    """Worker -> broker: I am ``worker`` (restart epoch ``epoch``), socket ids ``prefix.N``."""

    VERB = b"HELLO"
    version: int
    worker: str
    epoch: int
    prefix: int
    pid: int


@dataclass(frozen=True, slots=True)
class Welcome(Verb):
    """Broker -> worker: hello accepted (``ok``) or refused (e.g. prefix already in use)."""

    VERB = b"WELCOME"
    ok: bool
    broker_epoch: int
    reason: str


@dataclass(frozen=True, slots=True)
class Heartbeat(Verb):
    """Both ways, every ``heartbeat_interval``; carries the sender's epoch."""

    VERB = b"HB"
    epoch: int


@dataclass(frozen=True, slots=True)
class Resync(Verb):
    """Broker -> worker: I do not know you (I restarted); say hello and replay your state."""

    VERB = b"RESYNC"
    broker_epoch: int


@dataclass(frozen=True, slots=True)
class Bye(Verb):
    """Worker -> broker: I am stopping; purge my connections now."""

    VERB = b"BYE"
    worker: str


@dataclass(frozen=True, slots=True)
class ConnOpen(Verb):
    """A connection opened. With ``rid`` > 0 the worker waits for a :class:`Reply`
    ``{"ok": bool}`` (the app has a connection quota)."""

    VERB = b"OPEN"
    rid: int
    app: str
    socket_id: str
    max_connections: int


@dataclass(frozen=True, slots=True)
class ConnClose(Verb):
    """A connection closed: drop all its subscriptions, presence memberships, sign-in."""

    VERB = b"CLOSE"
    app: str
    socket_id: str


@dataclass(frozen=True, slots=True)
class Subscribe(Verb):
    """Connection ``socket_id`` subscribed to ``channel``.

    ``member`` is ``[user_id, user_info]`` for presence channels, else ``None``.
    With ``rid`` > 0 the worker waits for a :class:`Reply` (presence roster, cache
    content, or a refusal such as a full presence channel).
    """

    VERB = b"SUB"
    rid: int
    app: str
    channel: str
    socket_id: str
    member: list[Any] | None
    max_members: int


@dataclass(frozen=True, slots=True)
class Unsubscribe(Verb):
    """Connection ``socket_id`` left ``channel``."""

    VERB = b"UNSUB"
    app: str
    channel: str
    socket_id: str


@dataclass(frozen=True, slots=True)
class SignIn(Verb):
    """Connection ``socket_id`` signed in as ``user_id``, watching ``watchlist``."""

    VERB = b"SIGNIN"
    app: str
    socket_id: str
    user_id: str
    watchlist: list[str]


# --- traffic -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Publish(Verb):
    """An event for every subscriber of ``channel`` but ``exclude`` (a socket id or "").

    ``payload`` is the complete client-facing JSON text, encoded once at the origin.
    ``cache_ttl`` > 0 asks the broker to keep it as the channel's cached event.
    ``local_first``: the origin worker already delivered it to its own subscribers
    (client events); route it to the other workers only.
    """

    VERB = b"PUB"
    PAYLOAD = "payload"
    app: str
    channel: str
    exclude: str
    cache_ttl: float
    payload: bytes
    local_first: bool = False


@dataclass(frozen=True, slots=True)
class Deliver(Verb):
    """Broker -> worker: write ``payload`` to local subscribers of ``channel`` but ``exclude``."""

    VERB = b"DLV"
    PAYLOAD = "payload"
    app: str
    channel: str
    exclude: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class DeliverTo(Verb):
    """Broker -> worker: write ``payload`` to exactly these local connections."""

    VERB = b"DLVTO"
    PAYLOAD = "payload"
    socket_ids: list[str]
    payload: bytes


@dataclass(frozen=True, slots=True)
class Terminate(Verb):
    """Broker -> worker: close these connections with ``code`` after a pusher:error."""

    VERB = b"TERM"
    socket_ids: list[str]
    code: int
    message: str


@dataclass(frozen=True, slots=True)
class TerminateUser(Verb):
    """Worker -> broker: close every connection signed in as ``user_id`` (HTTP API)."""

    VERB = b"TERMUSER"
    app: str
    user_id: str


@dataclass(frozen=True, slots=True)
class Query(Verb):
    """Worker -> broker request; ``kind`` names the question, ``args`` its arguments.

    Kinds: ``channels`` {prefix}, ``channel`` {channel, cache}, ``users`` {channel},
    ``counts`` {channels}. Answered by a :class:`Reply` with the same ``rid``.
    """

    VERB = b"Q"
    rid: int
    app: str
    kind: str
    args: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Reply(Verb):
    """Broker -> worker: the answer to request ``rid``."""

    VERB = b"R"
    rid: int
    body: dict[str, Any]


VERBS: dict[bytes, type[Verb]] = {
    cls.VERB: cls
    for cls in (
        Hello, Welcome, Heartbeat, Resync, Bye, ConnOpen, ConnClose, Subscribe,
        Unsubscribe, SignIn, Publish, Deliver, DeliverTo, Terminate, TerminateUser, Query,
        Reply,
    )
}

_FIELDS: dict[type[Verb], tuple[str, ...]] = {
    cls: tuple(f.name for f in dataclasses.fields(cls)) for cls in VERBS.values()
}


def encode(message: Verb) -> list[bytes]:
    """The multipart frames for ``message`` (without any routing identity)."""
    cls = type(message)
    payload_field = cls.PAYLOAD
    names = _FIELDS[cls]
    if payload_field is None:
        return [cls.VERB, orjson.dumps([getattr(message, n) for n in names])]
    header = [getattr(message, n) for n in names if n != payload_field]
    return [cls.VERB, orjson.dumps(header), getattr(message, payload_field)]


def decode(frames: list[bytes]) -> Verb:
    """Parse multipart ``frames`` (without identity) back into a verb object."""
    if len(frames) < 2:
        raise EnvelopeError(f"expected at least 2 frames, got {len(frames)}")
    cls = VERBS.get(bytes(frames[0]))
    if cls is None:
        raise EnvelopeError(f"unknown verb {bytes(frames[0])[:20]!r}")
    try:
        header = orjson.loads(frames[1])
    except orjson.JSONDecodeError as exc:
        raise EnvelopeError(f"{cls.__name__}: header is not JSON ({exc})") from None
    if not isinstance(header, list):
        raise EnvelopeError(f"{cls.__name__}: header must be a JSON array")
    if cls.PAYLOAD is not None:
        if len(frames) != 3:
            raise EnvelopeError(f"{cls.__name__}: expected a payload frame")
        names = _FIELDS[cls]
        index = names.index(cls.PAYLOAD)
        header.insert(index, bytes(frames[2]))
    if len(header) != len(_FIELDS[cls]):
        raise EnvelopeError(
            f"{cls.__name__}: expected {len(_FIELDS[cls])} fields, got {len(header)}"
        )
    return cls(*header)


# --- batches ----------------------------------------------------------------------------
#
# Messages a peer produces within one event-loop turn travel as one ZeroMQ message:
#
#     [b"BATCH", counts, frames of message 1..., frames of message 2..., ...]
#
# ``counts`` is a JSON array with the number of frames of each message (2 or 3). One
# ZeroMQ message per turn instead of one per envelope message saves the per-message
# wake-ups and copies of ZeroMQ's I/O threads on both sides, which dominate small
# messages (a fan-out of K publishes to W workers becomes W sends, not K x W).

BATCH = b"BATCH"


def encode_batch(messages: list[list[bytes]]) -> list[bytes]:
    """Frames carrying several already-encoded messages (or one, unwrapped)."""
    if len(messages) == 1:
        return messages[0]
    out = [BATCH, orjson.dumps([len(m) for m in messages])]
    for frames in messages:
        out.extend(frames)
    return out


def decode_many(frames: list[bytes]) -> list[Verb]:
    """All messages in ``frames``: a batch, or a single message."""
    if bytes(frames[0]) != BATCH:
        return [decode(frames)]
    try:
        counts = orjson.loads(frames[1])
    except (orjson.JSONDecodeError, IndexError):
        raise EnvelopeError("BATCH: bad frame counts") from None
    if not isinstance(counts, list) or sum(counts) != len(frames) - 2 \
            or not all(isinstance(c, int) and c >= 2 for c in counts):
        raise EnvelopeError("BATCH: frame counts do not match the frames")
    out = []
    at = 2
    for count in counts:
        out.append(decode(frames[at:at + count]))
        at += count
    return out
