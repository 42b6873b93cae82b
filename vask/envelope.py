"""The worker <-> broker envelope (version 4), specified in ``docs/envelope.md``.

Every message is a ZeroMQ multipart message (several of them travel packed into one
frame, see "batches" below)::

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
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from operator import attrgetter
from operator import call as _call
from typing import Any, ClassVar

import orjson

from vask.metrics import valid_snapshot

ENVELOPE_VERSION = 4


class EnvelopeError(ValueError):
    """A message that does not follow the envelope (unknown verb, wrong field count, a
    field of the wrong type or length)."""


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
class Synced(Verb):
    """Worker -> broker: my state is all yours (sent after the welcome, following the
    replay of every connection's subscriptions and sign-ins, if any)."""

    VERB = b"SYNCED"
    epoch: int


@dataclass(frozen=True, slots=True)
class Recovered(Verb):
    """Broker -> worker: my state was rebuilt from the workers' replays (after my start,
    or after a worker's resync); compare what your clients were told with it."""

    VERB = b"RECOVERED"
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
    ``rid`` > 0 (HTTP API publishes): answer with a :class:`Reply` once routed, so the
    API answers 2xx only for a publish that is on its way (``{"ok": false}`` while the
    broker recovers after a restart: then it is not routed at all).
    """

    VERB = b"PUB"
    PAYLOAD = "payload"
    app: str
    channel: str
    exclude: str
    cache_ttl: float
    payload: bytes
    local_first: bool = False
    rid: int = 0


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
    rid: int = 0  # > 0: answer with a Reply once the terminations are on their way


@dataclass(frozen=True, slots=True)
class Query(Verb):
    """Worker -> broker request; ``kind`` names the question, ``args`` its arguments.

    Kinds: ``channels`` {prefix}, ``channel`` {channel, cache}, ``users`` {channel},
    ``roster`` {channel} (presence members with their user_info), ``counts`` {channels}.
    Answered by a :class:`Reply` with the same ``rid``.
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


@dataclass(frozen=True, slots=True)
class Stats(Verb):
    """Worker -> broker, with every heartbeat: the worker's cumulative metrics
    (:meth:`vask.metrics.WorkerMetrics.snapshot`), summed by the broker for /metrics.

    A verb of its own rather than a field of :class:`Heartbeat`: a broker of an older
    release drops an unknown verb (and counts it) but would drop a heartbeat with an
    extra field, and then purge the worker for silence."""

    VERB = b"STATS"
    epoch: int
    stats: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Moved(Verb):
    """Worker -> broker: I now follow a broker earlier in my list of endpoints; forget
    me without any event (my clients are still connected, over there). A broker that
    gets it steps down for a while (docs/operations.md, "Several hosts")."""

    VERB = b"MOVED"
    worker: str


@dataclass(frozen=True, slots=True)
class Console(Verb):
    """Broker -> worker: the apps whose debug console someone watches now (empty: none).

    Sent once a heartbeat while any console is open, and once when the last one closes;
    a worker that hears nothing for a few heartbeats stops recording on its own, so a
    lost "off" costs little (docs/dashboard.md)."""

    VERB = b"CONSOLE"
    apps: list[str]


@dataclass(frozen=True, slots=True)
class Debug(Verb):
    """Worker -> broker: debug console records (small JSON objects, at most
    :data:`MAX_DEBUG_RECORDS`), sent only while the broker asked for them with
    :class:`Console`."""

    VERB = b"DEBUG"
    records: list[dict[str, Any]]


@dataclass(frozen=True, slots=True)
class Caught(Verb):
    """Worker -> broker: every numbered broker message up to ``seq`` is handled, and
    what it delivered is written to the clients' connections.

    Sent at the end of a drain that handled something new, only when
    ``max_delivery_lag`` > 0: the broker measures from it how far behind each worker
    is, and answers HTTP API publishes late while a worker they reach is further behind
    than the bound (docs/operations.md, "Back-pressure")."""

    VERB = b"CAUGHT"
    seq: int


VERBS: dict[bytes, type[Verb]] = {
    cls.VERB: cls
    for cls in (
        Hello, Welcome, Heartbeat, Resync, Synced, Recovered, Bye, ConnOpen, ConnClose, Subscribe,
        Unsubscribe, SignIn, Publish, Deliver, DeliverTo, Terminate, TerminateUser, Query,
        Reply, Stats, Moved, Console, Debug, Caught,
    )
}

_FIELDS: dict[type[Verb], tuple[str, ...]] = {
    cls: tuple(f.name for f in dataclasses.fields(cls)) for cls in VERBS.values()
}


# --- field validation -------------------------------------------------------------------
#
# ``decode`` checks every field of every verb, so whatever it returns can be handed to
# the broker state (or the worker) without further checks: a peer that sends a
# well-framed message with a wrong field (an empty presence member, a string TTL, a list
# where a name belongs) gets an ``EnvelopeError`` here instead of an exception deep
# inside the state, half-way through a change.

#: Longest name field (app id, channel, socket id, user id, worker name, query kind), in
#: characters. Far above anything legitimate (channel names default to at most 200,
#: user ids 128, socket ids about 20); it only keeps absurd keys out of the broker's maps.
MAX_NAME_LENGTH = 4096
#: Integers travel as JSON numbers; orjson reads at most 64 bits. Every integer field is
#: a count, an id, a time in microseconds or a close code, so none is negative.
_INT_LIMIT = 2**63


def _name(value: object) -> bool:
    return type(value) is str and 0 < len(value) <= MAX_NAME_LENGTH


def _name_or_empty(value: object) -> bool:
    return type(value) is str and len(value) <= MAX_NAME_LENGTH


def _names(value: object) -> bool:
    return type(value) is list and all(_name(v) for v in value)


def _text(value: object) -> bool:
    return type(value) is str


def _count(value: object) -> bool:
    # type() is int, not isinstance: JSON true/false decode to bool, a subclass of int
    return type(value) is int and 0 <= value < _INT_LIMIT


def _flag(value: object) -> bool:
    return type(value) is bool


def _seconds(value: object) -> bool:
    if type(value) is float:
        return math.isfinite(value) and value >= 0.0
    return _count(value)


def _object(value: object) -> bool:
    return type(value) is dict


def _member(value: object) -> bool:
    # [user_id, user_info]; user_info is any JSON value
    return value is None or (type(value) is list and len(value) == 2 and _name(value[0]))


def _payload(value: object) -> bool:
    return type(value) is bytes


def _snapshot(value: object) -> bool:
    return valid_snapshot(value)


#: most records in one :class:`Debug` message
MAX_DEBUG_RECORDS = 512


def _records(value: object) -> bool:
    return type(value) is list and len(value) <= MAX_DEBUG_RECORDS and \
        all(type(item) is dict for item in value)


_Check = Callable[[object], bool]
_WHAT: dict[_Check, str] = {
    _name: f"a non-empty string of at most {MAX_NAME_LENGTH} characters",
    _name_or_empty: f"a string of at most {MAX_NAME_LENGTH} characters",
    _names: f"a list of non-empty strings of at most {MAX_NAME_LENGTH} characters",
    _text: "a string",
    _count: "an integer from 0 to 2**63-1",
    _flag: "true or false",
    _seconds: "a finite number >= 0",
    _object: "a JSON object",
    _member: "null or [user_id, user_info] with a non-empty string user_id",
    _payload: "bytes",
    _snapshot: "a metrics snapshot (see vask.metrics)",
    _records: f"a list of at most {MAX_DEBUG_RECORDS} JSON objects",
}

#: one check per field, in declaration order (the payload field included)
_CHECKS: dict[type[Verb], tuple[_Check, ...]] = {
    Hello: (_count, _name, _count, _count, _count),
    Welcome: (_flag, _count, _text),
    Heartbeat: (_count,),
    Caught: (_count,),
    Resync: (_count,),
    Synced: (_count,),
    Recovered: (_count,),
    Bye: (_name,),
    ConnOpen: (_count, _name, _name, _count),
    ConnClose: (_name, _name),
    Subscribe: (_count, _name, _name, _name, _member, _count),
    Unsubscribe: (_name, _name, _name),
    SignIn: (_name, _name, _name, _names),
    Publish: (_name, _name, _name_or_empty, _seconds, _payload, _flag, _count),
    Deliver: (_name, _name, _name_or_empty, _payload),
    DeliverTo: (_names, _payload),
    Terminate: (_names, _count, _text),
    TerminateUser: (_name, _name, _count),
    Query: (_count, _name, _name, _object),
    Reply: (_count, _object),
    Stats: (_count, _snapshot),
    Moved: (_name,),
    Console: (_names,),
    Debug: (_records,),
}
assert _CHECKS.keys() == _FIELDS.keys()
assert all(len(_CHECKS[cls]) == len(_FIELDS[cls]) for cls in _CHECKS)


def _describe(value: object) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:40]}{'...' if len(text) > 40 else ''}"


def _header_getter(cls: type[Verb]) -> Callable[[Verb], tuple[Any, ...]]:
    """A C-level getter of ``cls``'s header fields as a tuple (orjson writes a tuple
    as a JSON array), in declaration order, without the payload field."""
    names = tuple(n for n in _FIELDS[cls] if n != cls.PAYLOAD)
    if len(names) == 1:
        name = names[0]
        return lambda message: (getattr(message, name),)
    return attrgetter(*names)


_HEADERS = {cls: _header_getter(cls) for cls in _FIELDS}


def encode(message: Verb) -> list[bytes]:
    """The multipart frames for ``message`` (without any routing identity)."""
    return _frames(message, _HEADERS[type(message)](message))


#: verbs that carry a request id: where ``rid`` is in their header
REQUESTS = {cls: [n for n in names if n != cls.PAYLOAD].index("rid")
            for cls, names in _FIELDS.items() if "rid" in names}


def encode_request(message: Verb, rid: int) -> list[bytes]:
    """``encode(message)`` with its request id (the field ``rid``) set to ``rid``,
    without building a copy of the message for it."""
    cls = type(message)
    at = REQUESTS.get(cls)
    if at is None:
        raise TypeError(f"{cls.__name__} carries no request id")
    header = _HEADERS[cls](message)
    return _frames(message, (*header[:at], rid, *header[at + 1:]))


def _frames(message: Verb, header: tuple[Any, ...]) -> list[bytes]:
    cls = type(message)
    payload_field = cls.PAYLOAD
    if payload_field is None:
        return [cls.VERB, orjson.dumps(header)]
    return [cls.VERB, orjson.dumps(header), getattr(message, payload_field)]


def decode(frames: list[bytes]) -> Verb:
    """Parse multipart ``frames`` (without identity) back into a verb object.

    Raises :class:`EnvelopeError` for anything that is not a valid message, including a
    field of the wrong type, an empty name or an over-long one (``docs/envelope.md``).
    """
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
    names = _FIELDS[cls]
    if cls.PAYLOAD is not None:
        if len(frames) != 3:
            raise EnvelopeError(f"{cls.__name__}: expected a payload frame")
        header.insert(names.index(cls.PAYLOAD), bytes(frames[2]))
    elif len(frames) != 2:
        raise EnvelopeError(f"{cls.__name__}: expected 2 frames, got {len(frames)}")
    if len(header) != len(names):
        raise EnvelopeError(
            f"{cls.__name__}: expected {len(names)} fields, got {len(header)}"
        )
    checks = _CHECKS[cls]
    if not all(map(_call, checks, header)):  # C-level loop: this is on the hot path
        for check, value, name in zip(checks, header, names, strict=True):
            if not check(value):
                raise EnvelopeError(
                    f"{cls.__name__}.{name}: expected {_WHAT[check]}, got {_describe(value)}")
    return cls(*header)


# --- batches ----------------------------------------------------------------------------
#
# Messages a peer produces within one event-loop turn travel as one ZeroMQ message of one
# frame, a packed batch:
#
#     b"PACK" count(u32) { frames(u8: 2 or 3) { length(u32) bytes }* }*
#
# (all integers big-endian). One ZeroMQ message per turn instead of one per envelope
# message saves the per-message wake-ups and copies of ZeroMQ's I/O threads on both
# sides, which dominate small messages (a fan-out of K publishes to W workers becomes W
# sends, not K x W); one frame instead of one per envelope frame saves a send, a
# receive and a "more frames?" query per frame in each process (a connect storm's
# batches carry dozens of two-frame subscribes and as many answers).
#
# Readers also take the multi-frame form of envelope version 3:
#
#     [b"BATCH", counts, frames of message 1..., frames of message 2..., ...]

PACK = b"PACK"
BATCH = b"BATCH"
_U32 = struct.Struct(">I")
_FRAME_COUNTS = {2: b"\x02", 3: b"\x03"}


def encode_batch(messages: list[list[bytes]]) -> list[bytes]:
    """Frames carrying several already-encoded messages (one packed frame), or one
    message unwrapped."""
    if len(messages) == 1:
        return messages[0]
    pack = _U32.pack
    counts = _FRAME_COUNTS
    parts = [PACK, pack(len(messages))]
    append = parts.append
    for frames in messages:
        append(counts[len(frames)])
        for frame in frames:
            append(pack(len(frame)))
            append(frame)
    return [b"".join(parts)]


def _unpack(data: bytes) -> tuple[list[int], list[bytes]]:
    """The frame counts and the frames of a packed batch; :class:`EnvelopeError` if its
    framing is wrong anywhere (then nothing in it can be trusted)."""
    end = len(data)
    if end < 8:
        raise EnvelopeError("PACK: truncated")
    (count,) = _U32.unpack_from(data, 4)
    unpack = _U32.unpack_from
    counts: list[int] = []
    frames: list[bytes] = []
    pos = 8
    for _ in range(count):
        if pos >= end:
            raise EnvelopeError("PACK: fewer messages than its count")
        n = data[pos]
        if n != 2 and n != 3:
            raise EnvelopeError("PACK: a message must have 2 or 3 frames")
        pos += 1
        counts.append(n)
        for _ in range(n):
            if pos + 4 > end:
                raise EnvelopeError("PACK: truncated")
            (size,) = unpack(data, pos)
            pos += 4
            if pos + size > end:
                raise EnvelopeError("PACK: truncated")
            frames.append(data[pos:pos + size])
            pos += size
    if pos != end:
        raise EnvelopeError("PACK: bytes after its last message")
    return counts, frames


class Reader:
    """The envelope messages in one ZeroMQ message (a batch or a single message), decoded
    one at a time.

    The constructor checks the batch framing (and raises :class:`EnvelopeError` if it is
    wrong: then nothing in the ZeroMQ message can be trusted). Each :meth:`next` decodes
    one message; a bad one raises :class:`EnvelopeError` but the reader moves past it, so
    the caller may drop it and go on. Decoding lazily lets the broker spread one huge
    batch over several loop turns instead of decoding it all at once.
    """

    __slots__ = ("_at", "_counts", "_frames", "_index")

    def __init__(self, frames: list[bytes]) -> None:
        if not frames:
            raise EnvelopeError("empty message")
        self._frames = frames
        self._index = 0
        self._at = 0
        first = bytes(frames[0])
        if first[:4] == PACK and len(frames) == 1:
            self._counts, self._frames = _unpack(first)
            return
        if first != BATCH:
            self._counts = [len(frames)]
            return
        if len(frames) < 2:
            raise EnvelopeError("BATCH: bad frame counts")
        try:
            counts = orjson.loads(frames[1])
        except orjson.JSONDecodeError:
            raise EnvelopeError("BATCH: bad frame counts") from None
        # Types first: sum() of anything but ints would raise TypeError.
        if not isinstance(counts, list) \
                or not all(type(c) is int and 2 <= c <= 3 for c in counts) \
                or sum(counts) != len(frames) - 2:
            raise EnvelopeError("BATCH: frame counts do not match the frames")
        self._counts = counts
        self._at = 2

    @property
    def remaining(self) -> int:
        """Messages not yet taken."""
        return len(self._counts) - self._index

    def next(self) -> Verb:
        """Decode the next message (the caller checks :attr:`remaining` first)."""
        count = self._counts[self._index]
        at = self._at
        self._index += 1
        self._at = at + count
        return decode(self._frames[at:at + count])


def decode_many(frames: list[bytes]) -> list[Verb]:
    """All messages in ``frames``: a batch, or a single message. Any bad message makes
    the whole ZeroMQ message an :class:`EnvelopeError`."""
    reader = Reader(frames)
    return [reader.next() for _ in range(reader.remaining)]
