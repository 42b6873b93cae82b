"""The webhooks scenario's receiver: signature check, latency parsing and counting.

Mostly pure (:class:`Tally` is fed bodies directly); one test runs the real receiver
process and posts to it over loopback.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import math

import aiohttp
import orjson
import pytest

from vask.bench.server import free_port
from vask.bench.webhooks import Receiver, Tally, latency_of, signature_ok, stamp_of

KEY = "app-key"
SECRET = "app-secret"


def sign(body: bytes, secret: str = SECRET) -> str:
    # Written out here rather than with the module's helper, so that a wrong helper
    # cannot agree with itself.
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def body(*events: tuple[str, str]) -> bytes:
    return orjson.dumps({"time_ms": 1, "events": [{"name": n, "channel": c} for n, c in events]})


def test_signature_ok_only_for_the_exact_body_and_secret() -> None:
    b = body(("channel_occupied", "wh-1-0-0"))
    assert signature_ok(SECRET, b, sign(b))
    assert not signature_ok(SECRET, b + b" ", sign(b))
    assert not signature_ok(SECRET, b, sign(b, "other-secret"))
    assert not signature_ok(SECRET, b, sign(b).upper())
    assert not signature_ok(SECRET, b, "")
    assert not signature_ok(SECRET, b, "not hex at all")


def test_stamp_of_parses_churned_channel_names_only() -> None:
    assert stamp_of("wh-123456789-7-42") == 123456789
    assert stamp_of("wh-5") == 5
    assert stamp_of("wh--1-2") is None
    assert stamp_of("wh-12x-1-2") is None
    assert stamp_of("wh-") is None
    assert stamp_of("whbench-churn") is None
    assert stamp_of("private-wh-1-2-3") is None


def test_tally_times_each_event_from_its_channel_name() -> None:
    t = Tally(KEY, SECRET)
    b = body(("channel_occupied", "wh-1000-0-0"), ("channel_vacated", "wh-1000-0-0"),
             ("channel_occupied", "wh-4000-1-0"))
    assert t.feed(b, KEY, sign(b), 6000) == 200
    snap = t.snapshot()
    assert (snap["events"], snap["phase_events"], snap["requests"]) == (3, 3, 1)
    occ = latency_of(snap["occupied_us"])
    assert occ["count"] == 2
    assert occ["max"] == 5.0  # 6000 - 1000 µs
    assert occ["p50"] == 2.0  # 6000 - 4000 µs
    vac = latency_of(snap["vacated_us"], minus_us=1000)
    assert vac["count"] == 1
    assert vac["max"] == 4.0  # 5000 µs less the 1000 µs leave delay
    assert snap["phase_first_t"] == snap["phase_last_t"] == 6000


def test_tally_refuses_bad_signatures_and_keys_and_counts_nothing_from_them() -> None:
    t = Tally(KEY, SECRET)
    b = body(("channel_occupied", "wh-1-0-0"))
    assert t.feed(b, KEY, sign(b, "wrong"), 10) == 401
    assert t.feed(b, "other-key", sign(b), 10) == 401
    tampered = b.replace(b"wh-1", b"wh-2")
    assert t.feed(tampered, KEY, sign(b), 10) == 401
    st = t.stats()
    assert (st["invalid"], st["requests"], st["events"]) == (3, 3, 0)
    assert st["errors"]


def test_tally_counts_malformed_bodies_duplicates_others_and_order() -> None:
    t = Tally(KEY, SECRET)
    for raw in (b"not json", b'{"no_events": []}', b'{"events": 3}'):
        assert t.feed(raw, KEY, sign(raw), 1) == 400
    first = body(("channel_vacated", "wh-1-0-0"), ("channel_occupied", "fanout"),
                 ("member_added", "wh-1-0-0"))
    again = body(("channel_occupied", "wh-1-0-0"), ("channel_vacated", "wh-1-0-0"))
    assert t.feed(first, KEY, sign(first), 5) == 200
    assert t.feed(again, KEY, sign(again), 6) == 200
    st = t.stats()
    assert st["malformed"] == 3
    assert st["events"] == 2  # the vacated (once) and the occupied
    assert st["duplicates"] == 1  # the vacated, a second time
    assert st["other"] == 2  # another channel, another event name
    assert st["vacated_first"] == 1


def test_snapshot_mark_starts_a_phase_but_remembers_what_was_seen() -> None:
    t = Tally(KEY, SECRET)
    b = body(("channel_occupied", "wh-1-0-0"))
    t.feed(b, KEY, sign(b), 3)
    assert latency_of(t.snapshot(mark=True)["occupied_us"])["count"] == 1
    t.feed(b, KEY, sign(b), 4)
    snap = t.snapshot()
    assert snap["phase_events"] == 0 and snap["phase_requests"] == 1
    assert math.isnan(latency_of(snap["occupied_us"])["p50"])
    assert (snap["events"], snap["duplicates"]) == (1, 1)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("fixed", [False, True], ids=["free-port", "fixed-port"])
def test_the_receiver_process_checks_and_counts_real_requests(fixed: bool) -> None:
    port = free_port() if fixed else 0

    async def main() -> tuple[list[int], dict[str, object]]:
        rx = Receiver("127.0.0.1", KEY, SECRET, port)
        try:
            await rx.start()
            assert 17000 <= rx.port <= 17999
            assert rx.port == port or not fixed
            good = body(("channel_occupied", "wh-1-0-0"), ("channel_vacated", "wh-1-0-0"))
            statuses = []
            timeout = aiohttp.ClientTimeout(total=20)
            async with aiohttp.ClientSession(timeout=timeout) as http:
                for sig in (sign(good), sign(good, "nope")):
                    headers = {"X-Pusher-Key": KEY, "X-Pusher-Signature": sig,
                               "Content-Type": "application/json"}
                    async with http.post(rx.url, data=good, headers=headers) as resp:
                        statuses.append(resp.status)
            return statuses, await rx.call("stats")
        finally:
            await rx.stop()
            assert rx.proc is None

    statuses, st = asyncio.run(main())
    assert statuses == [200, 401]
    assert (st["requests"], st["invalid"], st["events"]) == (2, 1, 2)
