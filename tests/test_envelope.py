"""Every envelope verb survives encode -> decode unchanged, and bad input is refused."""

from __future__ import annotations

import dataclasses

import orjson
import pytest

from vask import envelope
from vask.envelope import (
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
    Welcome,
)

SAMPLES = [
    Hello(1, "host:12:0", 1700000000123, 123456789, 12),
    Welcome(True, 99, ""),
    Heartbeat(42),
    Resync(7),
    Synced(1700000000123),
    Recovered(99),
    Bye("host:12:0"),
    Moved("host:12:0:1"),
    ConnOpen(3, "1", "123.456", 100),
    ConnClose("1", "123.456"),
    Subscribe(5, "1", "presence-room", "123.456", ["u1", {"name": "Ada"}], 100),
    Subscribe(0, "1", "news", "123.456", None, 0),
    Unsubscribe("1", "news", "123.456"),
    SignIn("1", "123.456", "u1", ["u2", "u3"]),
    Publish("1", "news", "123.456", 1800.0, b'{"event":"e","channel":"news","data":"x"}'),
    Publish("1", "news", "", 0.0, b'{"event":"e","channel":"news","data":"x"}', False, 17),
    Deliver("1", "news", "", b'{"event":"e"}'),
    DeliverTo(["1.2", "3.4"], b'{"event":"e"}'),
    Terminate(["1.2"], 4200, "bye"),
    TerminateUser("1", "u1"),
    TerminateUser("1", "u1", 18),
    Query(9, "1", "channels", {"prefix": "presence-"}),
    Reply(9, {"channels": {"a": {"subscription_count": 1}}}),
    Stats(42, {"counters": {"vask_deliveries": {"1": 5}}, "gauges": {"vask_connected": {"1": 2}},
               "histograms": {"vask_broker_round_trip_seconds": [1, 0, 2, 1500]}}),
    Stats(42, {}),
    Console(["1", "2"]),
    Console([]),
    Debug([{"type": "connect", "app": "1", "socket_id": "1.2", "worker": 0, "time_ms": 1}]),
    Debug([]),
    Caught(7),
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
    assert len(frames) == 1 and frames[0].startswith(envelope.PACK)  # one packed frame
    assert envelope.decode_many(frames) == SAMPLES
    single = envelope.encode_batch(encoded[:1])
    assert single == encoded[0]
    assert envelope.decode_many(single) == SAMPLES[:1]


def test_the_multi_frame_batches_of_version_3_are_still_read() -> None:
    encoded = [envelope.encode(m) for m in SAMPLES]
    frames = [envelope.BATCH, orjson.dumps([len(m) for m in encoded])]
    for message in encoded:
        frames.extend(message)
    assert envelope.decode_many(frames) == SAMPLES


def _pack(*messages: list[bytes], count: int | None = None) -> bytes:
    out = envelope.PACK + (len(messages) if count is None else count).to_bytes(4, "big")
    for frames in messages:
        out += bytes([len(frames)])
        for frame in frames:
            out += len(frame).to_bytes(4, "big") + frame
    return out


_HB = [b"HB", b"[1]"]


@pytest.mark.parametrize("packed", [
    envelope.PACK,  # no count
    envelope.PACK + b"\x00\x00",  # a short count
    _pack(_HB, count=2),  # fewer messages than the count says
    _pack(_HB)[:-1],  # the last frame cut short
    _pack(_HB) + b"x",  # bytes after the last message
    _pack([b"HB"]),  # one frame
    _pack([b"HB", b"[1]", b"a", b"b"]),  # four frames
    _pack(_HB).replace(b"\x00\x00\x00\x03[1]", b"\x00\x00\x01\x00[1]"),  # a length past the end
])
def test_bad_packed_batches_are_refused(packed: bytes) -> None:
    with pytest.raises(EnvelopeError, match="PACK"):
        envelope.decode_many([packed])
    with pytest.raises(EnvelopeError, match="PACK"):
        envelope.Reader([packed])


def test_a_packed_batch_decodes_like_the_messages_in_it() -> None:
    encoded = [envelope.encode(m) for m in SAMPLES]
    assert envelope.decode_many([_pack(*encoded)]) == SAMPLES
    assert envelope.encode_batch(encoded) == [_pack(*encoded)]


@pytest.mark.parametrize("frames", [
    [b"BATCH", b"[2]"],
    [b"BATCH", b"[3]", b"HB", b"[1]"],
    [b"BATCH", b"{", b"HB", b"[1]"],
    [b"BATCH", b"[1]", b"HB"],
])
def test_bad_batches_are_refused(frames: list[bytes]) -> None:
    with pytest.raises(EnvelopeError, match="BATCH"):
        envelope.decode_many(frames)


@pytest.mark.parametrize(
    "frames, problem",
    [
        ([b"SUB", b'[1,"1","presence-r","1.1",[],100]'], "Subscribe.member"),
        ([b"SUB", b'[1,"1","presence-r","1.1",["",null],100]'], "Subscribe.member"),
        ([b"SUB", b'[1,"1","presence-r","1.1",[7,null],100]'], "Subscribe.member"),
        ([b"SUB", b'[1,"1","presence-r","1.1",["u",null,1],100]'], "Subscribe.member"),
        ([b"SUB", b'[1,"1","presence-r","1.1","u",100]'], "Subscribe.member"),
        ([b"SUB", b'[true,"1","c","1.1",null,0]'], "Subscribe.rid"),
        ([b"SUB", b'[1.5,"1","c","1.1",null,0]'], "Subscribe.rid"),
        ([b"SUB", b'[-1,"1","c","1.1",null,0]'], "Subscribe.rid"),
        ([b"SUB", b'[1,"","c","1.1",null,0]'], "Subscribe.app"),
        ([b"SUB", b'[1,"1",null,"1.1",null,0]'], "Subscribe.channel"),
        ([b"SUB", b'[1,"1","c","",null,0]'], "Subscribe.socket_id"),
        ([b"SUB", b'[1,"1","c","1.1",null,"5"]'], "Subscribe.max_members"),
        ([b"PUB", b'["1","news","","60",false,0]', b"{}"], "Publish.cache_ttl"),
        ([b"PUB", b'["1","news","",-1,false,0]', b"{}"], "Publish.cache_ttl"),
        ([b"PUB", b'["1","news","",false,false,0]', b"{}"], "Publish.cache_ttl"),
        ([b"PUB", b'["1","news","",0,"yes",0]', b"{}"], "Publish.local_first"),
        ([b"PUB", b'["1","news",null,0,false,0]', b"{}"], "Publish.exclude"),
        ([b"UNSUB", b'["1","' + b"c" * 4097 + b'","1.1"]'], "Unsubscribe.channel"),
        ([b"SIGNIN", b'["1","1.1","u",["a",""]]'], "SignIn.watchlist"),
        ([b"SIGNIN", b'["1","1.1","u","a"]'], "SignIn.watchlist"),
        ([b"Q", b'[1,"1","channels",[]]'], "Query.args"),
        ([b"Q", b'[1,"1","",{}]'], "Query.kind"),
        ([b"R", b'[1,[]]'], "Reply.body"),
        ([b"HELLO", b'[1,"w",1,100,"1"]'], "Hello.pid"),
        ([b"WELCOME", b'[1,1,""]'], "Welcome.ok"),
        ([b"TERM", b'[["1.1"],4200,null]'], "Terminate.message"),
        ([b"HB", b"[1]", b"extra"], "expected 2 frames"),
        ([b"HB", b"[18446744073709551615]"], "Heartbeat.epoch"),  # above 2**63 - 1
        ([b"STATS", b'[1,[]]'], "Stats.stats"),
        ([b"STATS", b'[1,{"other":{}}]'], "Stats.stats"),
        ([b"STATS", b'[1,{"counters":{"m":{"1":-1}}}]'], "Stats.stats"),
        ([b"STATS", b'[1,{"counters":{"m":{"1":1.5}}}]'], "Stats.stats"),
        ([b"STATS", b'[1,{"counters":{"m":{"1":true}}}]'], "Stats.stats"),
        ([b"STATS", b'[1,{"counters":{"m":[1,2]}}]'], "Stats.stats"),
        ([b"STATS", b'[1,{"counters":{"":{"1":1}}}]'], "Stats.stats"),
        ([b"STATS", b'[1,{"histograms":{"h":{"1":1}}}]'], "Stats.stats"),
        ([b"STATS", b'[1,{"histograms":{"h":[1]}}]'], "Stats.stats"),
        ([b"STATS", b'[1,{"gauges":{"g":{"1":"2"}}}]'], "Stats.stats"),
        ([b"CONSOLE", b'[["1",""]]'], "Console.apps"),
        ([b"CONSOLE", b'["1"]'], "Console.apps"),
        ([b"DEBUG", b'[[1]]'], "Debug.records"),
        ([b"DEBUG", b'[{"type":"x"}]'], "Debug.records"),
        ([b"DEBUG", b'[[' + b",".join([b"{}"] * 513) + b']]'], "Debug.records"),
    ],
)
def test_fields_of_the_wrong_type_or_length_are_refused(frames: list[bytes],
                                                        problem: str) -> None:
    with pytest.raises(EnvelopeError, match=problem):
        envelope.decode(frames)


def test_the_longest_names_and_zero_values_are_accepted() -> None:
    name = "c" * envelope.MAX_NAME_LENGTH
    for message in (Subscribe(0, name, name, name, [name, None], 0),
                    Publish("1", "c", "", 0, b""), Publish("1", "c", "", 0.0, b"", True),
                    Hello(0, "w", 0, 0, 0), Query(0, "1", "k", {}), Reply(0, {})):
        assert envelope.decode(envelope.encode(message)) == message


@pytest.mark.parametrize("frames", [
    [],
    [b"BATCH"],
    [b"BATCH", b'["x"]', b"HB", b"[1]"],  # (summing these used to raise TypeError)
    [b"BATCH", b"[true, true]", b"HB", b"[1]"],
    [b"BATCH", b"[4]", b"HB", b"[1]", b"a", b"b"],
])
def test_bad_framing_is_an_envelope_error(frames: list[bytes]) -> None:
    with pytest.raises(EnvelopeError):
        envelope.decode_many(frames)


def test_the_reader_decodes_one_message_at_a_time_and_steps_over_bad_ones() -> None:
    good = [envelope.encode(m) for m in SAMPLES[:3]]
    bad = [b"SUB", b'[1,"1","presence-r","1.1",[],100]']
    reader = envelope.Reader(envelope.encode_batch([good[0], bad, good[1], good[2]]))
    assert reader.remaining == 4
    assert reader.next() == SAMPLES[0]
    with pytest.raises(EnvelopeError, match="member"):
        reader.next()
    assert reader.remaining == 2
    assert [reader.next(), reader.next()] == SAMPLES[1:3]
    assert reader.remaining == 0
    single = envelope.Reader(good[0])
    assert single.remaining == 1 and single.next() == SAMPLES[0]
    # decode_many keeps its all-or-nothing contract
    with pytest.raises(EnvelopeError):
        envelope.decode_many(envelope.encode_batch([good[0], bad]))


def test_a_request_is_encoded_with_the_request_id_given() -> None:
    from vask.envelope import Query, Subscribe
    message = Subscribe(0, "1", "presence-r", "1.1", ["u", {"a": 1}], 100)
    assert envelope.encode_request(message, 42) == envelope.encode(
        Subscribe(42, "1", "presence-r", "1.1", ["u", {"a": 1}], 100))
    assert envelope.decode(envelope.encode_request(message, 7)).rid == 7  # type: ignore[attr-defined]
    query = Query(0, "1", "channels", {"filter_by_prefix": "presence-"})
    assert envelope.encode_request(query, 3) == envelope.encode(
        Query(3, "1", "channels", {"filter_by_prefix": "presence-"}))
    with pytest.raises(TypeError):
        envelope.encode_request(envelope.Heartbeat(1), 1)  # type: ignore[attr-defined]


REQUEST_SAMPLES = [m for m in SAMPLES if type(m) in envelope.REQUESTS]


def test_the_request_samples_cover_a_request_id_first_and_last() -> None:
    kinds = {type(m).__name__ for m in REQUEST_SAMPLES}
    assert {"Subscribe", "ConnOpen", "Query", "Publish", "TerminateUser"} <= kinds


@pytest.mark.parametrize("message", REQUEST_SAMPLES)
def test_every_request_verb_is_encoded_with_its_request_id_wherever_it_is(
        message: envelope.Verb) -> None:
    # (a Publish and a TerminateUser carry it last, a Subscribe first)
    assert envelope.encode_request(message, 99) == envelope.encode(
        dataclasses.replace(message, rid=99))  # type: ignore[call-arg]
