"""The worker's side of the dashboard's debug console (docs/dashboard.md).

Nothing is recorded unless the broker asked for it: it sends ``CONSOLE`` with the apps
whose console someone has open, and :meth:`ConsoleRecorder.watch` then hangs this
recorder on those apps' :class:`~vask.metrics.AppStats` (``stats.console``), which every
connection already holds. The places that record (a connection established or gone, a
client message handled, an error sent, an HTTP API publish) test that one attribute
for ``None``, so with no console open the hot path pays one attribute load and nothing
else: no dictionary lookup, no allocation, no timer.

While a console is open, the records are bounded and sampled: at most
:data:`PER_WINDOW` records per :data:`WINDOW` seconds leave this worker (the first ones
of each window; the rest are counted and reported in one ``sampled`` record), in one
``DEBUG`` message per window, together with whatever else the worker sends the broker
in that loop turn. So the console can never cost a busy worker more than a few hundred
small dictionaries a second, however much traffic it watches.

A worker that hears no ``CONSOLE`` for :data:`EXPIRE_BEATS` heartbeat intervals stops
recording on its own: a lost "off" (or a broker that went away) cannot leave it on.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import orjson

from vask.envelope import Debug, Publish, SignIn, Subscribe, Unsubscribe, Verb
from vask.session import Ask, Send, Tell

if TYPE_CHECKING:
    from vask.metrics import WorkerMetrics
    from vask.workers.websocket import PusherConnection

#: seconds of records gathered into one DEBUG message
WINDOW = 0.25
#: records per window at most (the rest are counted, not sent)
PER_WINDOW = 100
#: characters of an event's data kept in a record
DATA_CHARS = 300
#: heartbeat intervals without a CONSOLE after which recording stops by itself
EXPIRE_BEATS = 4


def _data_text(data: Any) -> str:
    text = data if isinstance(data, str) else orjson.dumps(data).decode()
    return text if len(text) <= DATA_CHARS else text[:DATA_CHARS] + "…"


def event_record(kind: str, app_id: str, payload: bytes, socket_id: str = "") -> dict[str, Any]:
    """A record for an event frame (the exact client-facing JSON a publish carries)."""
    record: dict[str, Any] = {"type": kind, "app": app_id}
    try:
        frame = orjson.loads(payload)
    except orjson.JSONDecodeError:
        frame = None
    if isinstance(frame, dict):
        record["channel"] = str(frame.get("channel", ""))
        record["event"] = str(frame.get("event", ""))
        record["data"] = _data_text(frame.get("data"))
    if socket_id:
        record["socket_id"] = socket_id
    return record


class ConsoleRecorder:
    """Bounded, sampled debug records of the apps the broker asked about."""

    def __init__(self, metrics: WorkerMetrics, slot: int, send: Callable[[Verb], None],
                 heartbeat_interval: float) -> None:
        self.metrics = metrics
        self.slot = slot
        self.send = send
        self.heartbeat_interval = heartbeat_interval
        #: apps being recorded now
        self.apps: frozenset[str] = frozenset()
        self.records: list[dict[str, Any]] = []
        #: records left out of the current window, per app
        self.left_out: dict[str, int] = {}
        self.flush_handle: asyncio.TimerHandle | None = None
        self.expire_handle: asyncio.TimerHandle | None = None
        self.last_told = 0.0

    # --- switching on and off ------------------------------------------------------------

    def watch(self, apps: Iterable[str]) -> None:
        """The broker's ``CONSOLE``: record exactly these apps from now on."""
        wanted = frozenset(a for a in apps if a in self.metrics.apps)
        self.last_told = time.monotonic()
        if wanted != self.apps:
            self.apps = wanted
            for app_id, stats in self.metrics.apps.items():
                stats.console = self if app_id in wanted else None
        if wanted and self.expire_handle is None:
            self._schedule_expiry()

    def _schedule_expiry(self) -> None:
        loop = asyncio.get_running_loop()
        self.expire_handle = loop.call_later(self.heartbeat_interval, self._expire)

    def _expire(self) -> None:
        self.expire_handle = None
        if not self.apps:
            return
        if time.monotonic() - self.last_told > EXPIRE_BEATS * self.heartbeat_interval:
            self.watch(())
            return
        self._schedule_expiry()

    def reload(self, metrics: WorkerMetrics) -> None:
        """The worker's apps changed (a reload): re-hang on the current AppStats."""
        self.metrics = metrics
        apps, self.apps = self.apps, frozenset()
        self.watch(apps)

    # --- recording -----------------------------------------------------------------------

    def add(self, record: dict[str, Any]) -> None:
        if len(self.records) >= PER_WINDOW:
            app_id = str(record.get("app", ""))
            self.left_out[app_id] = self.left_out.get(app_id, 0) + 1
            return
        record["time_ms"] = time.time_ns() // 1_000_000
        record["worker"] = self.slot
        self.records.append(record)
        if self.flush_handle is None:
            self.flush_handle = asyncio.get_running_loop().call_later(WINDOW, self.flush)

    def connection(self, kind: str, conn: PusherConnection) -> None:
        """``connect`` or ``disconnect``."""
        self.add({"type": kind, "app": conn.app_id, "socket_id": conn.socket_id})

    def error(self, conn: PusherConnection, code: int | None, message: str,
              channel: str | None = None) -> None:
        record: dict[str, Any] = {"type": "error", "app": conn.app_id,
                                  "socket_id": conn.socket_id, "code": code,
                                  "message": message[:DATA_CHARS]}
        if channel:
            record["channel"] = channel
        self.add(record)

    def actions(self, conn: PusherConnection, actions: list[Any]) -> None:
        """Record what a client message led to (subscribes, client events, errors)."""
        for action in actions:
            message = action.message if isinstance(action, Tell | Ask) else None
            if isinstance(message, Subscribe):
                record: dict[str, Any] = {"type": "subscribe", "app": message.app,
                                          "channel": message.channel,
                                          "socket_id": message.socket_id}
                if message.member is not None:
                    record["user_id"] = message.member[0]
                self.add(record)
            elif isinstance(message, Unsubscribe):
                self.add({"type": "unsubscribe", "app": message.app,
                          "channel": message.channel, "socket_id": message.socket_id})
            elif isinstance(message, Publish) and message.local_first:
                self.add(event_record("client_event", message.app, message.payload,
                                      message.exclude))
            elif isinstance(message, SignIn):
                self.add({"type": "signin", "app": message.app,
                          "socket_id": message.socket_id, "user_id": message.user_id})
            elif isinstance(action, Send) and (
                    action.frame.startswith(b'{"event":"pusher:error"')
                    or action.frame.startswith(b'{"event":"pusher:subscription_error"')):
                self._error_frame(conn, action.frame)

    def _error_frame(self, conn: PusherConnection, frame: bytes) -> None:
        parsed = orjson.loads(frame)
        data = parsed.get("data") or {}
        if parsed["event"] == "pusher:error":
            self.error(conn, data.get("code"), str(data.get("message", "")),
                       parsed.get("channel"))
        else:
            self.error(conn, data.get("status"),
                       f"{data.get('type', '')}: {data.get('error', '')}", parsed.get("channel"))

    def api_publishes(self, messages: Iterable[Publish]) -> None:
        for message in messages:
            self.add(event_record("api_message", message.app, message.payload))

    # --- sending -------------------------------------------------------------------------

    def flush(self) -> None:
        self.flush_handle = None
        records, self.records = self.records, []
        for app_id, count in self.left_out.items():
            records.append({"type": "sampled", "app": app_id, "left_out": count,
                            "worker": self.slot, "time_ms": time.time_ns() // 1_000_000})
        self.left_out = {}
        if records:
            self.send(Debug(records))
