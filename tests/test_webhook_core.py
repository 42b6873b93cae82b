"""The webhook sender's pure logic (webhooks/core.py): debounce, order per channel,
batching, concurrency, the retry policy. No sockets, no clock."""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import format_datetime

import orjson
import pytest

from vask.config import Webhook
from vask.webhooks.core import (
    SCAN_LIMIT,
    Debouncer,
    EndpointQueue,
    Outgoing,
    Pending,
    Request,
    backoff,
    describe,
    parse_retry_after,
    request_body,
    retry_delay,
    retryable,
)


class Feed:
    """Events into a Debouncer with increasing ids, leaves held for ``delay`` seconds
    after ``at`` (what the sender does with the broker's time_ms)."""

    def __init__(self, delay: float = 3.0) -> None:
        self.debouncer = Debouncer()
        self.delay = delay
        self.next_id = 1
        self.cancelled: list[tuple[int, str]] = []

    def add(self, name: str, channel: str, at: float = 0.0, user: str | None = None,
            app: str = "1") -> int | None:
        """The id the event got, or None if it cancelled a held leave."""
        gone = self.debouncer.cancels(app, name, channel, user)
        if gone is not None:
            self.cancelled.append((gone.id, gone.name))
            return None
        item_id = self.next_id
        self.next_id += 1
        hold = at + self.delay if name in ("member_removed", "channel_vacated") else 0.0
        raw = orjson.dumps({"name": name, "channel": channel, "user_id": user})
        self.debouncer.add(Pending(item_id, app, name, channel, user, raw, hold))
        return item_id

    def release(self, now: float) -> list[tuple[str, str]]:
        return [(p.name, p.channel) for p in self.debouncer.release(now)]


# --- debounce -------------------------------------------------------------------------


def test_events_other_than_leaves_are_released_at_once_in_arrival_order() -> None:
    feed = Feed()
    feed.add("channel_occupied", "b")
    feed.add("channel_occupied", "a")
    feed.add("client_event", "b")
    assert feed.release(0.0) == [("channel_occupied", "b"), ("channel_occupied", "a"),
                                 ("client_event", "b")]
    assert feed.debouncer.size == 0
    assert feed.debouncer.next_release() is None


def test_a_leave_is_held_for_the_delay_then_released() -> None:
    feed = Feed(delay=3.0)
    feed.add("channel_vacated", "c", at=10.0)
    assert feed.release(12.9) == []
    assert feed.debouncer.next_release() == 13.0
    assert feed.release(13.0) == [("channel_vacated", "c")]
    assert feed.debouncer.size == 0


def test_a_join_while_the_leave_is_held_drops_both() -> None:
    feed = Feed()
    feed.add("member_removed", "presence-x", at=0.0, user="7")
    feed.add("channel_vacated", "presence-x", at=0.0)
    assert feed.add("channel_occupied", "presence-x", at=1.0) is None
    assert feed.add("member_added", "presence-x", at=1.0, user="7") is None
    assert feed.cancelled == [(2, "channel_vacated"), (1, "member_removed")]
    assert feed.release(100.0) == []
    assert feed.debouncer.size == 0


def test_a_join_cancels_only_the_same_user_on_the_same_channel_and_app() -> None:
    feed = Feed()
    feed.add("member_removed", "presence-x", user="7")
    assert feed.add("member_added", "presence-x", user="8") is not None
    assert feed.add("member_added", "presence-y", user="7") is not None
    assert feed.add("member_added", "presence-x", user="7", app="2") is not None
    assert feed.cancelled == []
    # presence-y and app 2 are not behind the held leave; user 8 on presence-x is.
    assert sorted(feed.release(0.0)) == [("member_added", "presence-x"),
                                         ("member_added", "presence-y")]
    assert feed.release(3.0) == [("member_removed", "presence-x"),
                                 ("member_added", "presence-x")]


def test_a_leave_released_already_is_not_cancelled() -> None:
    feed = Feed(delay=1.0)
    feed.add("channel_vacated", "c", at=0.0)
    assert feed.release(1.0) == [("channel_vacated", "c")]
    assert feed.add("channel_occupied", "c", at=2.0) is not None
    assert feed.release(2.0) == [("channel_occupied", "c")]


def test_events_behind_a_held_leave_of_their_channel_wait_for_it() -> None:
    feed = Feed(delay=3.0)
    feed.add("member_removed", "presence-x", at=0.0, user="1")
    feed.add("member_added", "presence-x", at=0.5, user="2")
    feed.add("client_event", "presence-x", at=0.5)
    feed.add("client_event", "other", at=0.5)
    assert feed.release(1.0) == [("client_event", "other")]
    assert feed.release(3.0) == [("member_removed", "presence-x"),
                                 ("member_added", "presence-x"),
                                 ("client_event", "presence-x")]


def test_cancelling_the_head_unblocks_the_events_behind_it() -> None:
    feed = Feed(delay=3.0)
    feed.add("member_removed", "presence-x", at=0.0, user="1")
    feed.add("client_event", "presence-x", at=0.1)
    assert feed.release(0.5) == []
    assert feed.add("member_added", "presence-x", at=0.6, user="1") is None
    assert feed.release(0.6) == [("client_event", "presence-x")]


def test_two_held_leaves_in_a_row_each_wait_their_own_time() -> None:
    feed = Feed(delay=3.0)
    feed.add("member_removed", "presence-x", at=0.0, user="1")
    feed.add("member_removed", "presence-x", at=2.0, user="2")
    assert feed.release(3.0) == [("member_removed", "presence-x")]
    assert feed.debouncer.next_release() == 5.0
    assert feed.release(4.9) == []
    assert feed.release(5.0) == [("member_removed", "presence-x")]


def test_describe_refuses_what_is_not_an_event() -> None:
    assert describe({"name": "member_added", "channel": "presence-a", "user_id": "3"}) == (
        "member_added", "presence-a", "3")
    assert describe({"name": "channel_occupied", "channel": "c"}) == (
        "channel_occupied", "c", None)
    assert describe({"name": 1, "channel": "c"}) is None
    assert describe({"name": "x"}) is None
    assert describe(["name"]) is None


def test_endpoint_filters_by_event_name_and_channel() -> None:
    hook = Webhook(url="http://h", event_types=("client_event",),
                   channel_name_starts_with="private-", channel_name_ends_with="-log")
    assert hook.wants("client_event", "private-a-log")
    assert not hook.wants("client_event", "private-a")
    assert not hook.wants("client_event", "presence-a-log")
    assert not hook.wants("channel_occupied", "private-a-log")


# --- batching and order per endpoint --------------------------------------------------


def outgoing(queue: EndpointQueue, channels: list[str], at: float = 0.0,
             start: int = 1) -> None:
    for n, channel in enumerate(channels, start):
        queue.push(Outgoing(n, channel, b'{"n":%d}' % n, at))


def form(queue: EndpointQueue, now: float, request_id: int) -> Request | None:
    batch, _ = queue.next_batch(now)
    if not batch:
        return None
    request = Request(request_id, tuple(dict.fromkeys(o.channel for o in batch)),
                      request_body(0, [o.raw for o in batch]), 0, len(batch))
    queue.formed(request)
    return request


def test_a_batch_is_formed_when_full() -> None:
    queue = EndpointQueue(max_events=3, max_wait=10.0, concurrency=8)
    outgoing(queue, ["a", "b", "c", "d"], at=0.0)
    batch, later = queue.next_batch(0.0)
    assert [o.id for o in batch] == [1, 2, 3] and later is None
    assert [o.id for o in queue.pending] == [4]


def test_a_partial_batch_waits_max_wait_after_its_oldest_event() -> None:
    queue = EndpointQueue(max_events=3, max_wait=0.5, concurrency=8)
    outgoing(queue, ["a"], at=10.0)
    outgoing(queue, ["b"], at=10.2, start=2)
    assert queue.next_batch(10.3) == ([], 10.5)
    batch, _ = queue.next_batch(10.5)
    assert [o.id for o in batch] == [1, 2]
    assert queue.next_batch(10.5) == ([], None)


def test_request_body_is_the_events_json_verbatim() -> None:
    body = request_body(1234, [b'{"name":"a","channel":"c"}', b'{"name":"b","channel":"c"}'])
    assert orjson.loads(body) == {"time_ms": 1234, "events": [
        {"name": "a", "channel": "c"}, {"name": "b", "channel": "c"}]}


def test_a_channel_in_an_unfinished_request_blocks_its_later_events_only() -> None:
    queue = EndpointQueue(max_events=2, max_wait=0.0, concurrency=8)
    outgoing(queue, ["a", "a"])
    first = form(queue, 0.0, 1)
    assert first is not None and first.channels == ("a",)
    outgoing(queue, ["a", "b", "a", "c"], start=3)
    second = form(queue, 0.0, 2)
    assert second is not None
    assert [orjson.loads(second.body)["events"][i]["n"] for i in range(2)] == [4, 6]
    assert [o.id for o in queue.pending] == [3, 5]  # both of channel a, in order
    assert form(queue, 0.0, 3) is None
    [started, _] = queue.start_due(0.0)
    assert started.id == 1
    queue.finish(started)  # channel a is free again
    third = form(queue, 0.0, 3)
    assert third is not None
    assert [e["n"] for e in orjson.loads(third.body)["events"]] == [3, 5]


def test_a_retrying_request_keeps_its_channels_blocked() -> None:
    queue = EndpointQueue(max_events=1, max_wait=0.0, concurrency=8)
    outgoing(queue, ["a", "a"])
    first = form(queue, 0.0, 1)
    assert first is not None
    assert queue.start_due(0.0) == [first]
    queue.retry_later(first, due=5.0)
    assert form(queue, 1.0, 2) is None
    assert queue.start_due(4.9) == []
    assert queue.next_due() == 5.0
    assert queue.start_due(5.0) == [first]
    queue.finish(first)
    assert form(queue, 5.0, 2) is not None
    assert queue.busy == {"a": 1}


def test_at_most_concurrency_requests_are_in_flight() -> None:
    queue = EndpointQueue(max_events=1, max_wait=0.0, concurrency=2)
    outgoing(queue, ["a", "b", "c"])
    for n in (1, 2, 3):
        assert form(queue, 0.0, n) is not None
    started = queue.start_due(0.0)
    assert [r.id for r in started] == [1, 2]
    assert queue.in_flight == 2
    assert queue.start_due(0.0) == []
    assert queue.next_due() is None  # nothing can start until one finishes
    queue.finish(started[0])
    assert [r.id for r in queue.start_due(0.0)] == [3]


def test_unfinished_requests_are_bounded_and_the_rest_stays_queued() -> None:
    queue = EndpointQueue(max_events=1, max_wait=0.0, concurrency=1)
    outgoing(queue, [f"c{n}" for n in range(10)])
    formed = 0
    while form(queue, 0.0, formed + 1) is not None:
        formed += 1
    assert formed == queue.max_unfinished == 4
    assert len(queue.pending) == 6
    assert queue.queued == 10


def test_the_scan_for_a_batch_is_bounded() -> None:
    queue = EndpointQueue(max_events=5, max_wait=0.0, concurrency=8)
    queue.busy["blocked"] = 1
    outgoing(queue, ["blocked"] * SCAN_LIMIT + ["free"])
    assert queue.next_batch(0.0) == ([], None)
    assert len(queue.pending) == SCAN_LIMIT + 1


# --- retry policy ---------------------------------------------------------------------


@pytest.mark.parametrize(("status", "retry"), [
    (500, True), (502, True), (503, True), (599, True), (408, True), (429, True),
    (400, False), (401, False), (404, False), (410, False), (301, False), (302, False),
])
def test_which_statuses_are_retried(status: int, retry: bool) -> None:
    assert retryable(status) is retry


def test_backoff_is_full_jitter_doubling_from_one_second_capped_at_sixty() -> None:
    ceilings = [backoff(n, lambda lo, hi: hi) for n in range(1, 10)]
    assert ceilings == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    assert backoff(3, lambda lo, hi: lo) == 0
    assert backoff(10_000, lambda lo, hi: hi) == 60


def test_retry_after_seconds_and_http_date() -> None:
    assert parse_retry_after("7", now=0.0) == 7.0
    when = datetime(2030, 1, 1, 0, 0, 30, tzinfo=UTC)
    now = datetime(2030, 1, 1, 0, 0, 0, tzinfo=UTC).timestamp()
    assert parse_retry_after(format_datetime(when, usegmt=True), now) == 30.0
    assert parse_retry_after(format_datetime(when, usegmt=True), now + 60) == 0.0
    for bad in (None, "", "soon", "-3", "1.5"):
        assert parse_retry_after(bad, 0.0) is None


def test_retries_stop_at_the_end_of_the_window() -> None:
    top = lambda lo, hi: hi  # noqa: E731
    assert retry_delay(1, 500, None, formed=0.0, now=1.0, window=300.0, uniform=top) == 1.0
    # the last retry is cut short to land inside the window
    assert retry_delay(9, 500, None, formed=0.0, now=290.0, window=300.0, uniform=top) == 10.0
    assert retry_delay(9, 500, None, formed=0.0, now=300.0, window=300.0, uniform=top) is None
    assert retry_delay(1, None, None, formed=0.0, now=301.0, window=300.0, uniform=top) is None


def test_retry_after_is_obeyed_on_429_and_503_within_the_window() -> None:
    top = lambda lo, hi: hi  # noqa: E731
    assert retry_delay(1, 429, 20.0, formed=0.0, now=1.0, window=300.0, uniform=top) == 20.0
    assert retry_delay(1, 503, 20.0, formed=0.0, now=1.0, window=300.0, uniform=top) == 20.0
    # beyond the window: given up rather than sent before the receiver asked
    assert retry_delay(1, 429, 400.0, formed=0.0, now=1.0, window=300.0, uniform=top) is None
    # only on 429 and 503
    assert retry_delay(1, 500, 20.0, formed=0.0, now=1.0, window=300.0, uniform=top) == 1.0
