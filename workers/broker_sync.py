"""The worker's side of the cluster state: what it tells the broker, and what it does
with what the broker sends.

* Subscribes are settled by the broker unless it already routes the channel here
  (:meth:`BrokerSync.subscribe`).
* Deliveries, user deliveries and terminations from the broker are carried out
  (:meth:`BrokerSync.on_messages`); runs of deliveries to one channel leave as one write
  per subscriber.
* After a broker restart the worker replays everything it holds (:meth:`replay`), so
  the broker's state can always be rebuilt from the workers.
* A connection that ends is announced (:meth:`connection_ended`).
* After the broker rebuilt its state (a restart, or this worker's resync), the presence
  rosters this worker's clients were told are brought to the broker's
  (:meth:`converge`, with :class:`~vask.workers.rosters.Rosters`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from vask.channels import kind_of
from vask.envelope import (
    ConnClose,
    ConnOpen,
    Deliver,
    DeliverTo,
    Query,
    SignIn,
    Subscribe,
    Terminate,
    Unsubscribe,
    Verb,
)
from vask.workers.rosters import roster_body
from vask.workers.websocket import OPEN, PusherConnection
from vask.workers.wsframe import text_frame

if TYPE_CHECKING:
    from vask.workers.server import Worker

log = logging.getLogger("vask.worker")

_OK: dict[str, Any] = {"ok": True}


class BrokerSync:
    """Keeps the broker's view of this worker's connections right."""

    __slots__ = ("worker",)

    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    # --- link events ------------------------------------------------------------------

    def on_welcome(self, replay: bool) -> None:
        self.worker.welcomed.set()
        if replay:
            self.replay()

    def replay(self) -> None:
        """Tell a restarted broker everything this worker holds."""
        worker = self.worker
        link = worker.link
        for conn in worker.connections:
            if type(conn) is not PusherConnection:
                continue
            session = conn.session
            if session is None or conn.phase != OPEN:
                continue
            conn.registered = True
            link.send(ConnOpen(0, session.app.id, session.socket_id, 0))
            for channel, member in session.replay_subscriptions():
                link.send(Subscribe(0, session.app.id, channel, session.socket_id, member, 0))
            if session.user_id is not None:
                link.send(SignIn(session.app.id, session.socket_id, session.user_id,
                                 session.watchlist))

    def on_messages(self, messages: list[Verb]) -> None:
        """One batch from the broker. Consecutive deliveries to the same channel (a busy
        channel's events) are framed and joined once, so each subscriber gets them in
        one write."""
        worker = self.worker
        fan_out = worker.index.fan_out
        rosters = worker.rosters
        by_socket_id = worker.by_socket_id
        i, n = 0, len(messages)
        while i < n:
            message = messages[i]
            i += 1
            if type(message) is Deliver:
                run = [message]
                while i < n:
                    after = messages[i]
                    if type(after) is not Deliver or after.channel != message.channel \
                            or after.app != message.app or after.exclude != message.exclude:
                        break
                    run.append(after)
                    i += 1
                if message.channel.startswith("presence-"):
                    key = (message.app, message.channel)
                    for m in run:
                        rosters.observe(key, m.payload)
                data = text_frame(message.payload) if len(run) == 1 else \
                    b"".join([text_frame(m.payload) for m in run])
                fan_out(message.app, message.channel, message.exclude, data, len(run))
            elif isinstance(message, DeliverTo):
                frame = text_frame(message.payload)
                size = len(frame)
                for socket_id in message.socket_ids:
                    conn = by_socket_id.get(socket_id)
                    if conn is not None:
                        stats = conn.stats
                        stats.deliveries += 1
                        stats.ws_messages_out += 1
                        stats.ws_bytes_out += size
                        conn.queue(frame)
            elif isinstance(message, Terminate):
                for socket_id in message.socket_ids:
                    conn = by_socket_id.get(socket_id)
                    if conn is not None:
                        conn.close(message.code, message.message)
            else:
                log.warning("unexpected %s from the broker", type(message).__name__)

    # --- what connections tell the broker ---------------------------------------------

    def subscribe(self, conn: PusherConnection, message: Subscribe) -> None:
        """Settle a subscribe: locally when the broker already routes a plain channel to
        this worker (it is in the index, see :mod:`vask.workers.index`), otherwise by
        asking the broker."""
        session = conn.session
        if session is None:
            return
        worker = self.worker
        index = worker.index
        link = worker.link
        key = (message.app, message.channel)
        if message.member is None and key in index and not kind_of(key[1]).cache:
            link.send(message)
            conn.apply(session.subscribe_answered(message, _OK))
            return

        def answered(body: dict[str, Any] | None) -> None:
            session = conn.session
            if session is None:
                return
            told = None
            if body is not None and body.pop("roster_known", False):
                told = worker.rosters.told.get(key)
                if told is None:
                    # Our last local subscriber left while this join was on its way:
                    # the roster went with it. Ask for the broker's (rare).
                    def got(members: dict[str, Any] | None, body: dict[str, Any] = body) -> None:
                        if members is not None:
                            body["presence"] = roster_body(members)
                        answered(body if members is not None else None)

                    self._ask_roster(key, got)
                    return
                # current already: every member event since reached it (no copy, no diff)
                body["presence"] = roster_body(told)
            if body is None:
                body = {"ok": False, "type": "ServerError", "status": 503,
                        "error": "The cluster did not answer in time; try again"}
                # the broker may still apply it later: take it back
                link.send(Unsubscribe(message.app, message.channel, message.socket_id))
            conn.apply(session.subscribe_answered(message, body))
            if told is None and body.get("ok") and key in index:
                presence = body.get("presence")
                if isinstance(presence, dict):
                    for payload in worker.rosters.subscribed(key, presence):
                        # to the subscribers that were there before this one
                        worker.index.fan_out(key[0], key[1], message.socket_id,
                                             text_frame(payload))

        link.request(message, answered)

    def _ask_roster(self, key: tuple[str, str],
                    then: Callable[[dict[str, Any] | None], None]) -> None:
        """Ask the broker for a presence channel's roster: ``then(user_id -> info)``,
        or ``then(None)`` if it does not answer (or answers something else)."""
        def got(answer: dict[str, Any] | None) -> None:
            members = answer.get("members") if answer is not None else None
            then(members if isinstance(members, dict) else None)

        self.worker.link.request(
            Query(0, key[0], "roster", {"channel": key[1]}), got)

    def converge(self) -> None:
        """Ask the broker for each local presence channel's roster and tell local
        subscribers only the difference from what they were told."""
        worker = self.worker
        for key in list(worker.rosters.told):
            def answered(members: dict[str, Any] | None, key: tuple[str, str] = key) -> None:
                if members is None:
                    return  # no answer: the next resync tries again
                for payload in worker.rosters.diff(key, members):
                    worker.index.fan_out(key[0], key[1], "", text_frame(payload))

            self._ask_roster(key, answered)

    def connection_ended(self, conn: PusherConnection) -> None:
        """A connection left (closing handshake started, or gone): drop it locally and
        tell the broker."""
        worker = self.worker
        session = conn.session
        if session is None:
            if conn.registered and conn.socket_id:
                # a quota check was sent (and perhaps counted) but never settled
                conn.registered = False
                worker.link.send(ConnClose(conn.app_id, conn.socket_id))
            return
        conn.session = None
        stats = conn.stats
        stats.connected -= 1
        stats.new_disconnections += 1
        if stats.console is not None:
            stats.console.connection("disconnect", conn)
        worker.by_socket_id.pop(session.socket_id, None)
        bind = worker.index.bind
        for channel in session.local_channels():
            bind(conn, channel, False)
        if conn.registered and (not worker.stopping or worker.link.up):
            worker.link.send(ConnClose(session.app.id, session.socket_id))
