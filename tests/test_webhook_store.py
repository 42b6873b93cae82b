"""The webhook sender's durable queue (webhooks/store.py) and what the sender does with
the broker's batches: de-duplication by epoch and sequence number, the bound, the
debounce, and a restart that resumes from the store. No sockets: the sender's
messages to the broker are collected in a list, and batches wait far longer than a
test runs so that nothing is sent."""

from __future__ import annotations

import asyncio
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson

from vask.config import App, Settings, Webhook
from vask.webhooks.sender import Sender
from vask.webhooks.store import Store

URL = "http://127.0.0.1:9/hooks"
EVERYTHING = ("channel_occupied", "channel_vacated", "member_added", "member_removed",
              "client_event", "cache_miss", "subscription_count")


def settings(max_queued: int = 100, leave_delay: float = 3600.0,
             hooks: tuple[Webhook, ...] = (Webhook(url=URL, event_types=EVERYTHING),),
             ) -> Settings:
    app = App(id="1", key="k", secret="s", webhooks=hooks, webhook_leave_delay=leave_delay,
              webhook_batch_max_events=1000, webhook_batch_max_wait=3600.0)
    return Settings(apps=(app,), webhook_max_queued=max_queued)


def occupied(seq: int, channel: str = "c", app: str = "1") -> list[Any]:
    return [seq, app, 1_000, {"name": "channel_occupied", "channel": channel}]


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), timeout=30))


class Harness:
    """A sender on a store at ``path``, its messages to the broker in ``sent``."""

    def __init__(self, path: Path, config: Settings) -> None:
        self.store = Store(path)
        self.sent: list[dict[str, Any]] = []
        self.sender = Sender(config, self.store, self.sent.append)
        self.loaded = self.sender.load()

    async def settle(self) -> None:
        for _ in range(5):
            await asyncio.sleep(0)

    async def close(self) -> None:
        await self.sender.stop(grace=0.1)
        self.store.close()

    def acks(self) -> list[tuple[int, int]]:
        return [(m["epoch"], m["seq"]) for m in self.sent if m["t"] == "ack"]


# --- the store itself -----------------------------------------------------------------


def test_the_store_keeps_every_table_and_the_position_across_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "dir" / "webhooks.sqlite"
    store = Store(path)
    assert store.position() == (0, 0)
    event = store.add_event("1", 5, b'{"name":"channel_vacated","channel":"c"}')
    out = store.add_outgoing("1", URL, "c", b'{"name":"x","channel":"c"}')
    out2 = store.add_outgoing("1", URL, "d", b'{"name":"y","channel":"d"}')
    request = store.form_request("1", URL, ("c", "d\n"), b"BODY", 77, 2, [out])
    store.record_attempts(request, 3)
    store.set_position(42, 9)
    store.commit()
    store.db.close()  # no commit on the way out: what is committed must be enough

    again = Store(path)
    assert again.position() == (42, 9)
    assert again.events() == [(event, "1", 5, b'{"name":"channel_vacated","channel":"c"}')]
    assert again.outgoing() == [(out2, "1", URL, "d", b'{"name":"y","channel":"d"}')]
    assert again.requests() == [(request, "1", URL, ("c", "d\n"), b"BODY", 77, 2, 3)]
    assert again.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    again.close()


def test_uncommitted_writes_are_lost_together(tmp_path: Path) -> None:
    store = Store(tmp_path / "q.sqlite")
    out = store.add_outgoing("1", URL, "c", b"{}")
    store.commit()
    store.form_request("1", URL, ("c",), b"B", 1, 1, [out])  # not committed
    store.db.close()
    again = Store(tmp_path / "q.sqlite")
    assert again.requests() == []
    assert [row[0] for row in again.outgoing()] == [out]
    again.close()


# --- the sender and the broker's batches -------------------------------------------------


def test_events_are_committed_then_acknowledged_and_repeats_skipped(tmp_path: Path) -> None:
    async def test() -> None:
        h = Harness(tmp_path / "q.sqlite", settings())
        h.sender.on_events(7, [occupied(1, "a"), occupied(2, "b"), occupied(3, "c")])
        assert h.acks() == [(7, 3)]
        assert h.store.position() == (7, 3)
        # The broker re-sends from 1 (after a hello or a stall): only 4 is new.
        h.sender.on_events(7, [occupied(1, "a"), occupied(2, "b"), occupied(3, "c"),
                               occupied(4, "d")])
        assert h.acks() == [(7, 3), (7, 4)]
        await h.settle()
        assert h.store.counts() == {"events": 0, "outbox": 4, "requests": 0}
        assert [row[3] for row in h.store.outgoing()] == ["a", "b", "c", "d"]
        # Nothing new at all is still acknowledged, or the broker would keep re-sending.
        h.sender.on_events(7, [occupied(2, "b")])
        assert h.acks()[-1] == (7, 4)
        await h.close()

        # A restarted sender remembers the position; a new broker epoch starts over.
        h = Harness(tmp_path / "q.sqlite", settings())
        assert h.loaded == 4
        h.sender.on_events(7, [occupied(3, "c"), occupied(4, "d")])
        assert h.acks() == [(7, 4)]
        h.sender.on_events(8, [occupied(1, "e")])
        assert h.acks() == [(7, 4), (8, 1)]
        await h.settle()
        assert [row[3] for row in h.store.outgoing()] == ["a", "b", "c", "d", "e"]
        await h.close()

    run(test)


def test_malformed_entries_are_skipped_but_acknowledged(tmp_path: Path) -> None:
    async def test() -> None:
        h = Harness(tmp_path / "q.sqlite", settings())
        h.sender.on_events(1, [
            occupied(1), "junk", [2, "1", 0, {"name": 3}], [3, "nope", 0, {"name": "x",
                                                                     "channel": "c"}],
            [4, "1", "not an int", {}], occupied(5, "d")])
        assert h.acks() == [(1, 5)]
        await h.settle()
        assert [row[3] for row in h.store.outgoing()] == ["c", "d"]
        await h.close()

    run(test)


def test_a_full_queue_refuses_the_newest_events(tmp_path: Path) -> None:
    async def test() -> None:
        h = Harness(tmp_path / "q.sqlite", settings(max_queued=3))
        h.sender.on_events(1, [occupied(n, f"c{n}") for n in range(1, 6)])
        assert h.acks() == [(1, 5)]
        assert h.sender.counters["dropped"] == 2
        await h.settle()
        assert [row[3] for row in h.store.outgoing()] == ["c1", "c2", "c3"]
        assert h.sender.stats()["queued"] == 3
        h.sender.on_events(1, [occupied(6, "c6")])
        assert h.sender.counters["dropped"] == 3
        await h.close()

    run(test)


def test_a_join_cancels_the_held_leave_in_the_store_too(tmp_path: Path) -> None:
    async def test() -> None:
        h = Harness(tmp_path / "q.sqlite", settings())
        removed = {"name": "member_removed", "channel": "presence-a", "user_id": "9"}
        added = {"name": "member_added", "channel": "presence-a", "user_id": "9"}
        h.sender.on_events(1, [[1, "1", 1_000, removed]])
        assert h.store.counts()["events"] == 1
        h.sender.on_events(1, [[2, "1", 2_000, added]])
        assert h.store.counts() == {"events": 0, "outbox": 0, "requests": 0}
        assert h.sender.counters["cancelled"] == 1
        await h.close()

    run(test)


def test_held_events_and_requests_survive_a_restart(tmp_path: Path) -> None:
    async def test() -> None:
        path = tmp_path / "q.sqlite"
        h = Harness(path, settings())
        vacated = {"name": "channel_vacated", "channel": "c"}
        h.sender.on_events(1, [[1, "1", 1_000, vacated]])
        h.store.form_request("1", URL, ("x",), b'{"time_ms":1,"events":[]}', 1, 1, [])
        h.store.commit()
        h.store.db.close()  # as if killed: no orderly stop

        h = Harness(path, settings())
        assert h.loaded == 2
        assert h.sender.debouncer.size == 1
        # The held leave keeps its place: a join now still cancels it.
        h.sender.on_events(2, [[1, "1", 2_000, {"name": "channel_occupied", "channel": "c"}]])
        assert h.sender.counters["cancelled"] == 1
        [endpoint] = h.sender.endpoints.values()
        assert endpoint.queue.busy == {"x": 1}
        await h.close()

        # A leave held past its time while the sender was down goes at once.
        h = Harness(path, settings(leave_delay=0.0))
        h.sender.on_events(3, [[1, "1", 1_000, vacated]])
        await h.settle()
        assert h.store.counts()["outbox"] == 1
        await h.close()

    run(test)


def test_items_of_endpoints_no_longer_configured_are_dropped_on_load(tmp_path: Path) -> None:
    async def test() -> None:
        path = tmp_path / "q.sqlite"
        store = Store(path)
        store.add_outgoing("1", "http://127.0.0.1:9/old", "c", b"{}")
        store.add_outgoing("1", URL, "c", b'{"name":"channel_occupied","channel":"c"}')
        store.form_request("1", "http://127.0.0.1:9/old", ("c",), b"{}", 1, 1, [])
        store.add_event("2", 0, b'{"name":"channel_occupied","channel":"c"}')
        store.close()
        h = Harness(path, settings())
        assert h.loaded == 1
        assert h.store.counts() == {"events": 0, "outbox": 1, "requests": 0}
        await h.close()

    run(test)


def test_released_events_go_to_the_endpoints_whose_filters_want_them(tmp_path: Path) -> None:
    async def test() -> None:
        hooks = (Webhook(url=URL, event_types=("channel_occupied",)),
                 Webhook(url=URL + "2", event_types=EVERYTHING,
                         channel_name_starts_with="private-"))
        h = Harness(tmp_path / "q.sqlite", settings(hooks=hooks))
        client = {"name": "client_event", "channel": "private-z", "event": "client-a",
                  "data": "{}", "socket_id": "1.1"}
        h.sender.on_events(1, [occupied(1, "public"), occupied(2, "private-z"),
                               [3, "1", 0, client]])
        await h.settle()
        rows = [(url, orjson.loads(raw)["name"], channel)
                for _, _, url, channel, raw in h.store.outgoing()]
        assert sorted(rows) == sorted([
            (URL, "channel_occupied", "public"),
            (URL, "channel_occupied", "private-z"),
            (URL + "2", "channel_occupied", "private-z"),
            (URL + "2", "client_event", "private-z")])
        await h.close()

    run(test)
