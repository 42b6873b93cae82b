"""Server -> client Pusher frames, as the exact JSON bytes sent.

``data`` types follow the spec's table: JSON *strings* for connection_established,
subscription_succeeded, member events, pong, subscription_count and watchlist events;
an *object* for pusher:error, signin_success and subscription_error.
"""

from __future__ import annotations

from typing import Any

import orjson

PONG = b'{"event":"pusher:pong","data":"{}"}'
PING = b'{"event":"pusher:ping","data":"{}"}'


def connection_established(socket_id: str, activity_timeout: int) -> bytes:
    data = orjson.dumps({"socket_id": socket_id, "activity_timeout": activity_timeout})
    return orjson.dumps({"event": "pusher:connection_established", "data": data.decode()})


def error(code: int | None, message: str, channel: str | None = None) -> bytes:
    frame: dict[str, Any] = {"event": "pusher:error", "data": {"code": code, "message": message}}
    if channel is not None:
        frame["channel"] = channel
    return orjson.dumps(frame)


def subscription_error(channel: str, kind: str, message: str, status: int) -> bytes:
    return orjson.dumps(
        {
            "event": "pusher:subscription_error",
            "channel": channel,
            "data": {"type": kind, "error": message, "status": status},
        }
    )


def subscription_succeeded(channel: str, presence: dict[str, Any] | None = None) -> bytes:
    data = "{}" if presence is None else orjson.dumps({"presence": presence}).decode()
    return orjson.dumps(
        {"event": "pusher_internal:subscription_succeeded", "channel": channel, "data": data}
    )


def member_added(channel: str, user_id: str, user_info: Any) -> bytes:
    data = orjson.dumps({"user_id": user_id, "user_info": user_info}).decode()
    return orjson.dumps({"event": "pusher_internal:member_added", "channel": channel, "data": data})


def member_removed(channel: str, user_id: str) -> bytes:
    data = orjson.dumps({"user_id": user_id}).decode()
    return orjson.dumps(
        {"event": "pusher_internal:member_removed", "channel": channel, "data": data}
    )


def cache_miss(channel: str) -> bytes:
    return orjson.dumps({"event": "pusher:cache_miss", "channel": channel})


def subscription_count(channel: str, count: int) -> bytes:
    data = orjson.dumps({"subscription_count": count}).decode()
    return orjson.dumps(
        {"event": "pusher_internal:subscription_count", "channel": channel, "data": data}
    )


def signin_success(user_data: str) -> bytes:
    return orjson.dumps({"event": "pusher:signin_success", "data": {"user_data": user_data}})


def watchlist_events(online: list[str], offline: list[str]) -> bytes:
    events = []
    if online:
        events.append({"name": "online", "user_ids": online})
    if offline:
        events.append({"name": "offline", "user_ids": offline})
    data = orjson.dumps({"events": events}).decode()
    return orjson.dumps({"event": "pusher_internal:watchlist_events", "data": data})


def event(name: str, channel: str, data: Any, user_id: str | None = None) -> bytes:
    """A channel event (API-triggered or a relayed client event)."""
    frame: dict[str, Any] = {"event": name, "channel": channel, "data": data}
    if user_id is not None:
        frame["user_id"] = user_id
    return orjson.dumps(frame)
