"""A presence join answered from the worker's told roster (the broker's answer says
``roster_known`` instead of carrying the roster), without sockets: a real connection,
session, channel index and rosters on a minimal worker; a fake link records requests.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.test_connection_layer import FakeTransport, make_worker
from vask.envelope import Query, Subscribe, Unsubscribe, Verb
from vask.session import PusherSession
from vask.workers.broker_sync import BrokerSync
from vask.workers.index import ChannelIndex
from vask.workers.rosters import Rosters
from vask.workers.websocket import OPEN, PusherConnection

CHANNEL = "presence-room"


class FakeLink:
    def __init__(self) -> None:
        self.requests: list[tuple[Verb, Callable[[dict[str, Any] | None], None]]] = []
        self.sent: list[Verb] = []

    def request(self, message: Verb,
                callback: Callable[[dict[str, Any] | None], None]) -> None:
        # sent with a fresh request id, as BrokerLink.request does
        rid = len(self.requests) + 1
        self.requests.append((dataclasses.replace(message, rid=rid), callback))

    def send(self, message: Verb) -> None:
        self.sent.append(message)


@pytest.fixture
def worker() -> Iterator[Any]:
    loop = asyncio.new_event_loop()
    worker = make_worker(loop)
    worker.rosters = Rosters()
    worker.index = ChannelIndex(worker.corker, worker.rosters)
    worker.link = FakeLink()
    worker.by_socket_id = {}
    worker.ws_pool = []
    worker.held = {}
    worker.sync = BrokerSync(worker)
    yield worker
    loop.close()


def join(worker: Any, socket_id: str, user: str) -> tuple[PusherConnection, FakeTransport]:
    """A connection on this worker asks to join CHANNEL as ``user``."""
    transport = FakeTransport()
    conn = PusherConnection(worker, transport, 0, None)
    conn.phase = OPEN
    conn.socket_id = socket_id
    conn.app_id = worker.settings.apps[0].id
    conn.session = PusherSession(worker.settings.apps[0], socket_id)
    request = Subscribe(0, conn.app_id, CHANNEL, socket_id, [user, {"name": user}], 100)
    conn.session.subscriptions[CHANNEL] = request
    worker.sync.subscribe(conn, request)
    return conn, transport


def told_roster(transport: FakeTransport) -> dict[str, Any]:
    """The presence roster of the subscription_succeeded written to the client."""
    worker_frames = transport.text.split(b"\x81")
    for frame in worker_frames:
        start = frame.find(b"{")
        if start >= 0 and b"subscription_succeeded" in frame:
            message = json.loads(frame[start:])
            return dict(json.loads(message["data"])["presence"])
    raise AssertionError(f"no subscription_succeeded in {transport.text!r}")


def flush(worker: Any) -> None:
    worker.corker.flush()


def test_a_known_roster_is_answered_from_what_this_worker_told(worker: Any) -> None:
    _, first = join(worker, "1.1", "ada")
    rid_answer = worker.link.requests[-1][1]
    rid_answer({"ok": True, "presence": {"ids": ["ada"], "hash": {"ada": {"name": "ada"}},
                                         "count": 1}})
    flush(worker)
    assert told_roster(first)["ids"] == ["ada"]
    # bob joins here too: his member_added reaches this worker first, then the answer
    _, second = join(worker, "1.2", "bob")
    worker.rosters.observe(
        ("1", CHANNEL),
        b'{"event":"pusher_internal:member_added","channel":"presence-room",'
        b'"data":"{\\"user_id\\":\\"bob\\",\\"user_info\\":{\\"name\\":\\"bob\\"}}"}')
    worker.link.requests[-1][1]({"ok": True, "roster_known": True})
    flush(worker)
    assert told_roster(second) == {"ids": ["ada", "bob"], "count": 2,
                                   "hash": {"ada": {"name": "ada"}, "bob": {"name": "bob"}}}
    assert len(worker.link.requests) == 2  # no roster query was needed


def test_without_a_told_roster_the_worker_asks_for_the_brokers(worker: Any) -> None:
    # (the last local subscriber left while this join travelled: nothing is told here)
    _, transport = join(worker, "1.1", "bob")
    worker.link.requests[-1][1]({"ok": True, "roster_known": True})
    query, answer = worker.link.requests[-1]
    assert isinstance(query, Query) and query.kind == "roster"
    assert transport.text == b""  # nothing answered before the roster is in
    answer({"members": {"ada": {"name": "ada"}, "bob": {"name": "bob"}}})
    flush(worker)
    assert told_roster(transport)["ids"] == ["ada", "bob"]
    assert worker.rosters.told[("1", CHANNEL)] == {"ada": {"name": "ada"},
                                                   "bob": {"name": "bob"}}


def test_an_unanswered_roster_query_refuses_the_join(worker: Any) -> None:
    _, transport = join(worker, "1.1", "bob")
    worker.link.requests[-1][1]({"ok": True, "roster_known": True})
    worker.link.requests[-1][1](None)
    flush(worker)
    assert b"pusher:subscription_error" in transport.text
    assert b"503" in transport.text
    assert worker.link.sent == [Unsubscribe("1", CHANNEL, "1.1")]
