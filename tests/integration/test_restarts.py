"""Broker restarts on a real `vask run --workers 2`: nothing acknowledged is lost, every
client's presence roster converges, nobody is told a member twice.

Each round: public subscribers and presence members on both workers (placed by their
socket-id prefix), a publisher thread triggering numbered events through the HTTP API,
then ``kill -9`` of the broker (the supervisor starts a new one). During the gap one
member leaves (a would-be ghost) and afterwards one joins. Then:

* every event the HTTP API answered 2xx reached every subscriber;
* every remaining member's roster, as told by its events (subscription_succeeded roster,
  plus member_added, minus member_removed), equals the users endpoint within 3 s;
* no member was told ``member_added`` for a user already in its roster.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pusher
import pytest

from tests.pusher_client import PusherClient, close_all, join_presence
from tests.servers import APP_ID, APP_KEY, APP_SECRET, Server, process_name, run_vask, wait_ready

pytestmark = pytest.mark.timeout(240)

ROOM = "presence-room"
STREAM = "stream"
PUBLISH_INTERVAL = 0.02


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with run_vask(workers=2) as srv:
        yield srv


def sdk(server: Server) -> pusher.Pusher:
    return pusher.Pusher(app_id=APP_ID, key=APP_KEY, secret=APP_SECRET, host="127.0.0.1",
                         port=server.port, ssl=False, timeout=15)


def broker_pid(server: Server) -> int:
    pids = [p for p in server.children() if process_name(p) == "vask-broker"]
    assert len(pids) == 1, pids
    return pids[0]


def worker_of(client: PusherClient) -> str:
    return client.socket_id.split(".")[0]


async def placed(server: Server, per_worker: int) -> list[PusherClient]:
    """``per_worker`` connections on each of the two workers (extra ones closed)."""
    kept: dict[str, list[PusherClient]] = {}
    extra: list[PusherClient] = []
    for _ in range(60 * per_worker):
        client = await PusherClient.connect(server.ws_url)
        group = kept.setdefault(worker_of(client), [])
        (group if len(group) < per_worker else extra).append(client)
        if len(kept) == 2 and all(len(g) == per_worker for g in kept.values()):
            break
    await close_all(extra)
    assert len(kept) == 2 and all(len(g) == per_worker for g in kept.values()), \
        f"could not place clients: {[len(g) for g in kept.values()]}"
    return [c for group in kept.values() for c in group]


def told_roster(client: PusherClient) -> tuple[set[str], list[str]]:
    """The roster as the client's events tell it, and any duplicate member_added."""
    roster: set[str] = set()
    duplicates: list[str] = []
    for frame in client.frames:
        if frame.get("channel") != ROOM:
            continue
        event = frame.get("event")
        data = json.loads(frame["data"]) if isinstance(frame.get("data"), str) else {}
        if event == "pusher_internal:subscription_succeeded":
            roster = set(data["presence"]["ids"])
        elif event == "pusher_internal:member_added":
            if data["user_id"] in roster:
                duplicates.append(data["user_id"])
            roster.add(data["user_id"])
        elif event == "pusher_internal:member_removed":
            roster.discard(data["user_id"])
    return roster, duplicates


class Publisher(threading.Thread):
    """Triggers numbered events until stopped; records what was acknowledged."""

    def __init__(self, server: Server) -> None:
        super().__init__(daemon=True)
        self.client = sdk(server)
        self.acked: list[int] = []
        self.refused: list[tuple[int, str]] = []
        #: (monotonic time the call was made, acknowledged?)
        self.answers: list[tuple[float, bool]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        n = 0
        while not self.halt.is_set():
            began = time.monotonic()
            try:
                self.client.trigger(STREAM, "tick", {"n": n})
                self.acked.append(n)
                self.answers.append((began, True))
            except Exception as exc:  # the SDK raises several kinds
                self.refused.append((n, f"{type(exc).__name__}: {exc}"))
                self.answers.append((began, False))
            n += 1
            time.sleep(PUBLISH_INTERVAL)


def received(client: PusherClient) -> set[int]:
    return {json.loads(f["data"])["n"] for f in client.events("tick", STREAM)}


async def one_round(server: Server, round_no: int) -> dict[str, Any]:
    subscribers = await placed(server, 2)
    for client in subscribers:
        await client.subscribe(STREAM)
    members = await placed(server, 2)
    deadline = time.monotonic() + 20
    for i, member in enumerate(members):
        await join_presence(member, ROOM, f"r{round_no}-u{i}", deadline)
    for member in members:  # everyone has seen everyone before the restart
        await member.wait(lambda _, m=member: len(told_roster(m)[0]) == len(members),
                          timeout=5)

    publisher = Publisher(server)
    publisher.start()
    await asyncio.sleep(1.0)
    killed_at = time.monotonic()
    os.kill(broker_pid(server), signal.SIGKILL)
    await asyncio.sleep(0.1)
    leaver = members.pop(1)  # leaves while the broker is down: must not stay a ghost
    await leaver.close()
    ghost = f"r{round_no}-u1"
    ghost_gone = asyncio.ensure_future(until(
        lambda: not any(ghost in told_roster(m)[0] for m in members)))
    await asyncio.sleep(1.0)
    newcomer = (await placed(server, 1))[0]
    await join_presence(newcomer, ROOM, f"r{round_no}-new", time.monotonic() + 20)
    members.append(newcomer)
    await asyncio.sleep(2.0)
    publisher.halt.set()
    await asyncio.to_thread(publisher.join, 20)

    # (a) every acknowledged event reached every subscriber
    acked = set(publisher.acked)
    assert acked, f"nothing was acknowledged: {publisher.refused[:3]}"
    for client in subscribers:
        end = time.monotonic() + 5
        while not acked <= received(client) and time.monotonic() < end:
            await asyncio.sleep(0.05)
        missing = sorted(acked - received(client))
        assert not missing, (f"round {round_no}: {client.socket_id} missed acknowledged "
                             f"events {missing[:20]} (of {len(acked)})")

    # how long after the kill a new publish was acknowledged again; how long the
    # member who left during the gap stayed in the others' rosters
    after = [t for t, ok in publisher.answers if ok and t > killed_at]
    assert after, "no publish was acknowledged after the restart"
    ghost_s = (await asyncio.wait_for(ghost_gone, 5)) - killed_at

    # (b) rosters converge to the users endpoint; (c) no duplicate member_added
    api = sdk(server)
    expected = {u["id"] for u in api.users_info(ROOM)["users"]}
    assert expected == {f"r{round_no}-u0", f"r{round_no}-u2", f"r{round_no}-u3",
                        f"r{round_no}-new"}
    end = time.monotonic() + 3
    while True:
        views = {m.socket_id: told_roster(m)[0] for m in members}
        if all(view == expected for view in views.values()):
            break
        assert time.monotonic() < end, f"round {round_no}: rosters {views} != {expected}"
        await asyncio.sleep(0.05)
    for member in members:
        duplicates = told_roster(member)[1]
        assert not duplicates, f"round {round_no}: {member.socket_id} told twice: {duplicates}"

    await close_all(subscribers + members)
    return {"acked": len(acked), "refused_503": len(publisher.refused),
            "acked_again_after_s": round(after[0] - killed_at, 3),
            "ghost_removed_after_s": round(ghost_s, 3)}


async def until(condition: Callable[[], bool], step: float = 0.01) -> float:
    """Poll ``condition``; the monotonic time it first held."""
    while not condition():
        await asyncio.sleep(step)
    return time.monotonic()


def test_broker_kill_loses_nothing_acknowledged_and_rosters_converge(server: Server) -> None:
    results = []
    for round_no in range(5):
        wait_ready(server.port, time.monotonic() + 30)
        results.append(asyncio.run(one_round(server, round_no)))
    print("broker restart rounds:", results)
