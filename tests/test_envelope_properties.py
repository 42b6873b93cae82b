"""Property tests (Hypothesis) for the envelope decoder.

* Whatever bytes or frames arrive, ``decode`` / ``decode_many`` / ``Reader`` either return
  verbs or raise ``EnvelopeError``: never another exception, which would reach (and,
  before the catch-all, end) the broker loop.
* Every verb built from valid field values survives encode -> decode unchanged, alone
  and in a batch.
* Whatever ``decode`` accepts is valid again: decoding its encoding gives the same value.

Example counts are kept modest so the file runs in a few seconds.
"""

from __future__ import annotations

import contextlib
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vask import envelope
from vask.envelope import (
    MAX_NAME_LENGTH,
    VERBS,
    Bye,
    Caught,
    ConnClose,
    ConnOpen,
    Console,
    Debug,
    Deliver,
    DeliverTo,
    EnvelopeError,
    Heartbeat,
    Hello,
    Moved,
    Publish,
    Query,
    Recovered,
    Reply,
    Resync,
    SignIn,
    Stats,
    Subscribe,
    Synced,
    Terminate,
    TerminateUser,
    Unsubscribe,
    Verb,
    Welcome,
)

FAST = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])

# --- field values -------------------------------------------------------------------

names = st.text(min_size=1, max_size=24)
long_names = st.text(min_size=MAX_NAME_LENGTH - 1, max_size=MAX_NAME_LENGTH,
                     alphabet="ab.")
name = st.one_of(names, long_names)
name_or_empty = st.one_of(st.just(""), names)
counts = st.integers(min_value=0, max_value=2**63 - 1)
seconds = st.one_of(st.floats(min_value=0.0, allow_nan=False, allow_infinity=False), counts)
json_values: st.SearchStrategy[Any] = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**64 - 1),
              st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12)),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12,
)
objects = st.dictionaries(st.text(max_size=8), json_values, max_size=4)
members = st.one_of(st.none(), st.tuples(name, json_values).map(list))
payloads = st.binary(max_size=64)

#: one strategy per verb, with valid field values
VERB_STRATEGIES: dict[type[Verb], st.SearchStrategy[Verb]] = {
    Hello: st.builds(Hello, counts, name, counts, counts, counts),
    Welcome: st.builds(Welcome, st.booleans(), counts, st.text(max_size=40)),
    Heartbeat: st.builds(Heartbeat, counts),
    Caught: st.builds(Caught, counts),
    Resync: st.builds(Resync, counts),
    Synced: st.builds(Synced, counts),
    Recovered: st.builds(Recovered, counts),
    Bye: st.builds(Bye, name),
    Moved: st.builds(Moved, name),
    ConnOpen: st.builds(ConnOpen, counts, name, name, counts),
    ConnClose: st.builds(ConnClose, name, name),
    Subscribe: st.builds(Subscribe, counts, name, name, name, members, counts),
    Unsubscribe: st.builds(Unsubscribe, name, name, name),
    SignIn: st.builds(SignIn, name, name, name, st.lists(name, max_size=5)),
    Publish: st.builds(Publish, name, name, name_or_empty, seconds, payloads, st.booleans(),
                       counts),
    Deliver: st.builds(Deliver, name, name, name_or_empty, payloads),
    DeliverTo: st.builds(DeliverTo, st.lists(name, max_size=5), payloads),
    Terminate: st.builds(Terminate, st.lists(name, max_size=5), counts, st.text(max_size=40)),
    TerminateUser: st.builds(TerminateUser, name, name, counts),
    Query: st.builds(Query, counts, name, name, objects),
    Reply: st.builds(Reply, counts, objects),
    Stats: st.builds(Stats, counts, st.fixed_dictionaries({}, optional={
        "counters": st.dictionaries(name.filter(lambda n: len(n) <= 200),
                                    st.dictionaries(name_or_empty, counts, max_size=3),
                                    max_size=3),
        "histograms": st.dictionaries(name.filter(lambda n: len(n) <= 200),
                                      st.lists(counts, min_size=2, max_size=16), max_size=2),
    })),
    Console: st.builds(Console, st.lists(name, max_size=5)),
    Debug: st.builds(Debug, st.lists(objects, max_size=5)),
}
verbs: st.SearchStrategy[Verb] = st.one_of(*VERB_STRATEGIES.values())

# --- hostile input --------------------------------------------------------------------

frame_lists = st.lists(st.binary(max_size=40), max_size=6)
verb_tags = st.sampled_from([*VERBS, envelope.BATCH, b"", b"hb"])


def json_frame(value: Any) -> bytes:
    return orjson.dumps(value)


@st.composite
def well_framed(draw: st.DrawFn) -> list[bytes]:
    """A known verb, a JSON header of about the right length with any values, and
    perhaps a payload frame: the shape that gets past framing to the field checks."""
    tag = draw(st.sampled_from(list(VERBS)))
    width = len(envelope._FIELDS[VERBS[tag]])
    header = draw(st.lists(json_values, min_size=max(0, width - 2), max_size=width + 1))
    frames = [tag, json_frame(header)]
    if draw(st.booleans()):
        frames.append(draw(payloads))
    return frames


@st.composite
def batches(draw: st.DrawFn) -> list[bytes]:
    """A BATCH whose counts may or may not match, around messages that may be bad."""
    parts = draw(st.lists(st.one_of(well_framed(), frame_lists), max_size=4))
    frames = [f for part in parts for f in part]
    counts: Any = draw(st.one_of(
        st.just([len(p) for p in parts]),
        json_values,
        st.lists(st.one_of(st.integers(-3, 5), st.booleans(), st.text(max_size=2)), max_size=5),
    ))
    return [envelope.BATCH, json_frame(counts), *frames]


def only_envelope_errors(frames: list[bytes]) -> list[Verb] | None:
    try:
        return envelope.decode_many(frames)
    except EnvelopeError:
        return None


@FAST
@given(frame_lists)
def test_arbitrary_frames_raise_only_envelope_errors(frames: list[bytes]) -> None:
    only_envelope_errors(frames)
    with contextlib.suppress(EnvelopeError):
        envelope.decode(frames)


@FAST
@given(verb_tags, st.binary(max_size=60), st.lists(st.binary(max_size=20), max_size=2))
def test_known_verbs_with_arbitrary_headers_raise_only_envelope_errors(
        tag: bytes, header: bytes, rest: list[bytes]) -> None:
    only_envelope_errors([tag, header, *rest])


@FAST
@given(well_framed())
def test_well_framed_messages_with_any_field_values(frames: list[bytes]) -> None:
    decoded = only_envelope_errors(frames)
    if decoded is not None:
        # whatever is accepted is valid: it encodes and decodes to itself
        (message,) = decoded
        assert envelope.decode(envelope.encode(message)) == message


@FAST
@given(batches())
def test_batches_raise_only_envelope_errors_and_the_reader_skips_bad_messages(
        frames: list[bytes]) -> None:
    only_envelope_errors(frames)
    try:
        reader = envelope.Reader(frames)
    except EnvelopeError:
        return
    taken = 0
    while reader.remaining:
        taken += 1
        with contextlib.suppress(EnvelopeError):
            reader.next()
    assert taken == len(orjson.loads(frames[1]))


@FAST
@given(st.binary(max_size=80), st.lists(st.lists(st.binary(max_size=12), min_size=0,
                                                  max_size=4), max_size=4),
       st.integers(0, 6), st.booleans())
def test_packed_batches_raise_only_envelope_errors(
        noise: bytes, messages: list[list[bytes]], count: int, well_framed: bool) -> None:
    """Any packed frame, well framed or not: an EnvelopeError or messages, and the
    reader steps over bad ones."""
    if well_framed:
        body = b"".join(bytes([len(m) % 256]) + b"".join(
            len(f).to_bytes(4, "big") + f for f in m) for m in messages)
        packed = envelope.PACK + count.to_bytes(4, "big") + body
    else:
        packed = envelope.PACK + noise
    only_envelope_errors([packed])
    try:
        reader = envelope.Reader([packed])
    except EnvelopeError:
        return
    while reader.remaining:
        with contextlib.suppress(EnvelopeError):
            reader.next()


# --- round trips ----------------------------------------------------------------------


@FAST
@given(verbs)
def test_every_valid_verb_round_trips(message: Verb) -> None:
    frames = envelope.encode(message)
    assert envelope.decode(frames) == message
    assert envelope.decode_many(frames) == [message]


@FAST
@given(st.lists(verbs, min_size=1, max_size=6))
def test_batches_of_valid_verbs_round_trip(messages: list[Verb]) -> None:
    frames = envelope.encode_batch([envelope.encode(m) for m in messages])
    assert envelope.decode_many(frames) == messages


# --- whatever decode accepts, the broker can handle -------------------------------------
#
# Small alphabets, so that generated messages collide on the same connections and
# channels (joins, leaves, presence members, caches, sign-ins on one socket).

apps = st.sampled_from(["1", "1", "1", "2"])  # (repeats weight the choice)
channels = st.sampled_from(["news", "presence-r", "presence-r", "cache-x", "private-a",
                            "#server-to-user-u", "#server-to-user-u", "presence-cache-y"])
sockets = st.sampled_from(["100.1", "100.2", "200.1"])
users = st.sampled_from(["u", "u", "v"])
query_args = st.dictionaries(
    st.sampled_from(["prefix", "channel", "channels", "user_id", "cache"]),
    st.one_of(json_values, channels, st.lists(channels, max_size=3)), max_size=3)
traffic: st.SearchStrategy[Verb] = st.one_of(
    st.builds(ConnOpen, st.integers(0, 3), apps, sockets, st.integers(0, 2)),
    st.builds(ConnClose, apps, sockets),
    st.builds(Subscribe, st.integers(0, 3), apps, channels, sockets,
              st.one_of(st.none(), st.tuples(users, json_values).map(list)),
              st.integers(0, 2)),
    st.builds(Unsubscribe, apps, channels, sockets),
    st.builds(SignIn, apps, sockets, users, st.lists(users, max_size=3)),
    st.builds(Publish, apps, channels, st.one_of(st.just(""), sockets), seconds,
              st.sampled_from([b"{}", b"[]", b"not json", b'{"event":"e","data":1}']),
              st.booleans(), st.integers(0, 3)),
    st.builds(TerminateUser, apps, users, st.integers(0, 3)),
    st.builds(Synced, counts),
    st.builds(Query, st.integers(1, 3), apps,
              st.sampled_from(["channels", "channel", "users", "counts", "user", "nope"]),
              query_args),
    st.builds(Heartbeat, counts),
    st.builds(Deliver, apps, channels, st.just(""), payloads),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 4), traffic), min_size=8, max_size=40),
       st.lists(well_framed(), max_size=4))
def test_the_broker_handles_whatever_decode_accepts(
        sequence: list[tuple[int, Verb]], hostile: list[list[bytes]]) -> None:
    from vask.broker.server import Broker
    from vask.config import App, Settings

    app = App(id="1", key="k", secret="s", enable_subscription_count=True)
    broker = Broker(Settings(apps=(app,)), "inproc://unused")
    try:
        for n, identity in enumerate((b"w1", b"w2")):
            broker.handle_one(identity, Hello(1, identity.decode(), 1, 100 * (n + 1), 1), 0.0)
        now = 0.0
        for foreign, message in sequence:
            # Mostly from the worker whose prefix the socket id has; sometimes not.
            socket_id = getattr(message, "socket_id", "100")
            identity = b"w1" if socket_id.startswith("100") != (foreign == 0) else b"w2"
            now += 0.5
            # through the wire format, as the broker receives it
            decoded = envelope.decode(envelope.encode(message))
            broker.handle_one(identity, decoded, now)  # must not raise
            broker.timers(now)
        for frames in hostile:
            decoded_many = only_envelope_errors(frames)
            for message in decoded_many or []:
                broker.handle_one(b"w1", message, now)
        check_invariants(broker.state)
        # a worker leaving takes exactly its own connections with it
        broker.handle_one(b"w1", Bye("w1"), now)
        check_invariants(broker.state)
        assert all(info.worker == b"w2" for info in broker.state.sockets.values())
    finally:
        broker.router.close(linger=0)


def check_invariants(state: Any) -> None:
    """The channel table agrees with the connections' own records."""
    expected: dict[tuple[str, str], dict[bytes, int]] = {}
    for (app_id, _), info in state.sockets.items():
        for channel, _ in info.joined():
            per = expected.setdefault((app_id, channel), {})
            per[info.worker] = per.get(info.worker, 0) + 1
    assert {k: c.per_worker for k, c in state.channels.items()} == expected
    for key, channel in state.channels.items():
        assert channel.count == sum(channel.per_worker.values()) > 0
        for user_id, conns in (channel.members or {}).items():
            assert conns, key
            for socket_id in conns:
                assert dict(state.sockets[(key[0], socket_id)].joined())[key[1]] == user_id
    for (app_id, socket_id), info in state.sockets.items():
        for channel, user_id in info.joined():
            if user_id is not None:
                members = state.channels[(app_id, channel)].members
                assert socket_id in members[user_id]
        if info.user_id is not None:
            assert socket_id in state.online[(app_id, info.user_id)]
    for app_id in ("1", "2"):
        assert state.connections.get(app_id, 0) == sum(1 for a, _ in state.sockets if a == app_id)
    for identity, worker in state.workers.items():
        assert all(state.sockets[k].worker == identity for k in worker.sockets)
    assert sum(len(w.sockets) for w in state.workers.values()) == len(state.sockets)



def test_the_round_trip_strategies_cover_every_verb() -> None:
    assert set(VERB_STRATEGIES) == set(VERBS.values())
