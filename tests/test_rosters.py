"""The presence rosters a worker's clients were told, and the difference after a resync."""

from __future__ import annotations

import orjson

from vask import frames
from vask.workers.rosters import Rosters

KEY = ("1", "presence-room")


def events(payloads: list[bytes]) -> list[tuple[str, str]]:
    out = []
    for payload in payloads:
        message = orjson.loads(payload)
        out.append((message["event"].rsplit(":", 1)[1], orjson.loads(message["data"])["user_id"]))
    return out


def told_after_subscribe() -> Rosters:
    rosters = Rosters()
    rosters.subscribed(KEY, {"ids": ["a", "b"], "hash": {"a": {"n": 1}, "b": None}, "count": 2})
    return rosters


def test_member_events_delivered_here_update_the_told_roster() -> None:
    rosters = told_after_subscribe()
    rosters.observe(KEY, frames.member_added("presence-room", "c", {"n": 3}))
    rosters.observe(KEY, frames.member_removed("presence-room", "a"))
    rosters.observe(KEY, b'{"event":"hello","channel":"presence-room","data":"{}"}')
    assert rosters.told[KEY] == {"b": None, "c": {"n": 3}}


def test_channels_without_local_subscribers_are_not_tracked() -> None:
    rosters = told_after_subscribe()
    rosters.left(KEY)
    rosters.observe(KEY, frames.member_added("presence-room", "c", None))
    assert KEY not in rosters.told
    assert rosters.diff(KEY, {"z": None}) == []


def test_the_diff_holds_only_the_difference() -> None:
    """Ghosts (left during the gap) are removed, newcomers added, nobody added twice."""
    rosters = told_after_subscribe()
    payloads = rosters.diff(KEY, {"b": None, "c": {"n": 3}})
    assert events(payloads) == [("member_removed", "a"), ("member_added", "c")]
    assert rosters.diff(KEY, {"b": None, "c": {"n": 3}}) == []  # converged: nothing more


def test_a_malformed_member_event_is_ignored() -> None:
    rosters = told_after_subscribe()
    rosters.observe(KEY, b'{"event":"pusher_internal:member_added","data":"not json')
    rosters.observe(KEY, b'{"event":"pusher_internal:member_added","data":{"x":1}}')
    assert rosters.told[KEY] == {"a": {"n": 1}, "b": None}


def test_a_first_subscriber_or_an_unchanged_roster_needs_no_events() -> None:
    rosters = Rosters()
    assert rosters.subscribed(KEY, {"hash": {"a": None}}) == []
    rosters.observe(KEY, frames.member_added("presence-room", "b", {"n": 2}))
    # the next answer holds what the earlier subscribers were told by member events
    assert rosters.subscribed(KEY, {"hash": {"a": None, "b": {"n": 2}}}) == []


def test_a_newer_roster_after_a_quiet_period_is_told_to_the_earlier_subscribers() -> None:
    # While the broker recovers it sends no member events: "c" joined and "a" left
    # without the earlier local subscribers hearing of it; the next answer shows both.
    rosters = told_after_subscribe()
    out = rosters.subscribed(KEY, {"hash": {"b": None, "c": {"n": 3}}})
    assert events(out) == [("member_removed", "a"), ("member_added", "c")]
    assert orjson.loads(orjson.loads(out[1])["data"])["user_info"] == {"n": 3}
    assert rosters.told[KEY] == {"b": None, "c": {"n": 3}}
    # after the recovery the comparison starts from the view everyone now has
    assert rosters.diff(KEY, {"b": None, "c": {"n": 3}}) == []
