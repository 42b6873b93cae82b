"""Every envelope verb survives encode -> decode unchanged, and bad input is refused."""

from __future__ import annotations

import pytest

from vask import envelope
from vask.envelope import (
    VERBS,
    Bye,
    ConnClose,
    ConnOpen,
    Deliver,
    DeliverTo,
    EnvelopeError,
    Heartbeat,
    Hello,
    Publish,
    Query,
    Reply,
    Resync,
    SignIn,
    Subscribe,
    Terminate,
    TerminateUser,
    Unsubscribe,
    Welcome,
)

SAMPLES = [
    Hello(1, "host:12:0", 1700000000123, 123456789, 12),
    Welcome(True, 99, ""),
    Heartbeat(42),
    Resync(7),
    Bye("host:12:0"),
    ConnOpen(3, "1", "123.456", 100),
    ConnClose("1", "123.456"),
    Subscribe(5, "1", "presence-room", "123.456", ["u1", {"name": "Ada"}], 100),
    Subscribe(0, "1", "news", "123.456", None, 0),
    Unsubscribe("1", "news", "123.456"),
    SignIn("1", "123.456", "u1", ["u2", "u3"]),
    Publish("1", "news", "123.456", 1800.0, b'{"event":"e","channel":"news","data":"x"}'),
    Deliver("1", "news", "", b'{"event":"e"}'),
    DeliverTo(["1.2", "3.4"], b'{"event":"e"}'),
    Terminate(["1.2"], 4200, "bye"),
    TerminateUser("1", "u1"),
    Query(9, "1", "channels", {"prefix": "presence-"}),
    Reply(9, {"channels": {"a": {"subscription_count": 1}}}),
]


def test_samples_cover_every_verb() -> None:
    assert {type(s) for s in SAMPLES} == set(VERBS.values())


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(message: envelope.Verb) -> None:
    frames = envelope.encode(message)
    assert frames[0] == type(message).VERB
    assert envelope.decode(frames) == message


def test_payload_travels_as_its_own_frame_untouched() -> None:
    payload = b'{"event":"x","data":"\\u00e9 not parsed"}'
    frames = envelope.encode(Deliver("1", "c", "", payload))
    assert frames[2] is payload or frames[2] == payload
    assert b"not parsed" not in frames[1]


@pytest.mark.parametrize(
    "frames, problem",
    [
        ([b"NOPE", b"[]"], "unknown verb"),
        ([b"HB"], "at least 2 frames"),
        ([b"HB", b"{"], "not JSON"),
        ([b"HB", b"{}"], "JSON array"),
        ([b"HB", b"[1,2]"], "expected 1 fields"),
        ([b"DLV", b'["1","c",""]'], "payload frame"),
    ],
)
def test_bad_messages_are_refused(frames: list[bytes], problem: str) -> None:
    with pytest.raises(EnvelopeError, match=problem):
        envelope.decode(frames)


def test_batches_round_trip_and_single_messages_stay_unwrapped() -> None:
    encoded = [envelope.encode(m) for m in SAMPLES]
    frames = envelope.encode_batch(encoded)
    assert frames[0] == envelope.BATCH
    assert envelope.decode_many(frames) == SAMPLES
    single = envelope.encode_batch(encoded[:1])
    assert single == encoded[0]
    assert envelope.decode_many(single) == SAMPLES[:1]


@pytest.mark.parametrize("frames", [
    [b"BATCH", b"[2]"],
    [b"BATCH", b"[3]", b"HB", b"[1]"],
    [b"BATCH", b"{", b"HB", b"[1]"],
    [b"BATCH", b"[1]", b"HB"],
])
def test_bad_batches_are_refused(frames: list[bytes]) -> None:
    with pytest.raises(EnvelopeError, match="BATCH"):
        envelope.decode_many(frames)
