"""What this worker's clients were last told about each presence channel's members.

One roster per presence channel with local subscribers (not one per connection): the
``subscription_succeeded`` roster the broker last answered, plus every
``member_added`` / ``member_removed`` delivered here since. All of a channel's presence
events reach a worker in the broker's order on one link, so every local subscriber of the
channel has been told the same roster.

After the broker restarts (or this worker resyncs), the broker's roster is rebuilt from
the workers' replays, and what clients were told may be wrong: members who left during
the gap were never removed, members who joined were never added. :meth:`Rosters.diff`
compares the told roster with the broker's and yields only the difference as
``member_added`` / ``member_removed`` frames, so every client's view converges without
duplicates.

Only deliveries on presence channels whose payload starts like a member event are
parsed (rare); every other delivery is passed by with one ``startswith``.
"""

from __future__ import annotations

from typing import Any

import orjson

from vask import frames

Key = tuple[str, str]

_MEMBER_EVENT = b'{"event":"pusher_internal:member_'


def roster_body(members: dict[str, Any]) -> dict[str, Any]:
    """The ``presence`` object of ``subscription_succeeded`` for ``user_id -> info``
    (it holds ``members`` itself: it is serialized at once, not kept)."""
    return {"ids": list(members), "hash": members, "count": len(members)}


class Rosters:
    """``(app, presence channel) -> {user_id: user_info}`` as told to local clients."""

    __slots__ = ("told",)

    def __init__(self) -> None:
        self.told: dict[Key, dict[str, Any]] = {}

    def subscribed(self, key: Key, presence: dict[str, Any]) -> list[bytes]:
        """A local client was sent ``subscription_succeeded`` with this roster (the
        broker's ``{"ids", "hash", "count"}``): it is the newest view of the channel.

        Returns the member events that bring the channel's *other* local subscribers
        to the same view. Normally there are none: every join and leave reaches this
        worker as a member event before any later answer, so the told roster already
        equals the new one. While the broker is recovering (or this worker syncing) it
        sends no member events, and subscribers that joined earlier were never told of
        the members that joined or left since: without these events they would keep the
        older view, and the roster comparison after the recovery (:meth:`diff`, which
        assumes one view per channel) could not repair it.
        """
        hash_ = presence.get("hash")
        new = dict(hash_) if isinstance(hash_, dict) else {}
        old = self.told.get(key)
        self.told[key] = new
        if old is None or old.keys() == new.keys():
            return []
        channel = key[1]
        out = [frames.member_removed(channel, user_id) for user_id in old if user_id not in new]
        out += [frames.member_added(channel, user_id, info)
                for user_id, info in new.items() if user_id not in old]
        return out

    def left(self, key: Key) -> None:
        """The channel has no local subscriber any more."""
        self.told.pop(key, None)

    def observe(self, key: Key, payload: bytes) -> None:
        """A delivery to a presence channel with local subscribers."""
        roster = self.told.get(key)
        if roster is None or not payload.startswith(_MEMBER_EVENT):
            return
        try:
            message = orjson.loads(payload)
            data = message.get("data")
            data = orjson.loads(data) if isinstance(data, str) else data
            user_id = str(data["user_id"])
        except (orjson.JSONDecodeError, TypeError, KeyError, AttributeError):
            return
        if message.get("event") == "pusher_internal:member_added":
            roster[user_id] = data.get("user_info")
        elif message.get("event") == "pusher_internal:member_removed":
            roster.pop(user_id, None)

    def diff(self, key: Key, authoritative: dict[str, Any]) -> list[bytes]:
        """Member event payloads that bring the told roster to ``authoritative``
        (``user_id -> user_info``); the told roster becomes it."""
        roster = self.told.get(key)
        if roster is None:
            return []
        channel = key[1]
        out = [frames.member_removed(channel, user_id)
               for user_id in roster if user_id not in authoritative]
        out += [frames.member_added(channel, user_id, info)
                for user_id, info in authoritative.items() if user_id not in roster]
        self.told[key] = dict(authoritative)
        return out
