"""The sender's durable queue: one SQLite file (stdlib :mod:`sqlite3`).

Every item the sender is responsible for lives here until it is done, in one of three
tables, and moves between them inside a transaction so that a crash never loses or
half-moves one:

* ``events``: received from the broker and not yet released (held by the debounce or
  queued behind a held event of the same channel);
* ``outbox``: released, one row per endpoint that wants the event, not yet in a request;
* ``requests``: formed requests (their exact body) not yet delivered or given up.

``position`` holds the broker epoch and the last sequence number committed, which is
what the sender acknowledges and how it recognises events it already has.

WAL mode with ``synchronous=NORMAL``: a commit is a write to the log without an fsync,
so it survives the process being killed (``kill -9``) but not necessarily a power cut
or kernel crash; that is the trade for commits cheap enough to run on the event loop.
Writes are grouped: the sender opens a transaction with its first write of a loop turn
and commits once at the end of the turn (:meth:`Store.commit`), and commits at once
before acknowledging events to the broker.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from pathlib import Path

import orjson

SCHEMA = """
CREATE TABLE IF NOT EXISTS position (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    epoch INTEGER NOT NULL,
    seq INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    app_id TEXT NOT NULL,
    time_ms INTEGER NOT NULL,
    event BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    app_id TEXT NOT NULL,
    url TEXT NOT NULL,
    channel TEXT NOT NULL,
    event BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    app_id TEXT NOT NULL,
    url TEXT NOT NULL,
    channels TEXT NOT NULL,  -- JSON array of channel names
    body BLOB NOT NULL,
    formed_ms INTEGER NOT NULL,
    events INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0
);
"""

EventRow = tuple[int, str, int, bytes]
OutboxRow = tuple[int, str, str, str, bytes]
RequestRow = tuple[int, str, str, tuple[str, ...], bytes, int, int, int]


class Store:
    """The SQLite queue. Not thread-safe; used from the sender's event loop only."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if not path.parent.exists():
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # isolation_level=None: transactions are opened and committed explicitly
        self.db = sqlite3.connect(str(path), isolation_level=None)
        with contextlib.suppress(OSError):
            os.chmod(path, 0o600)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)
        self.in_transaction = False

    def close(self) -> None:
        self.commit()
        self.db.close()

    # --- transactions ---------------------------------------------------------------

    def _begin(self) -> None:
        if not self.in_transaction:
            self.db.execute("BEGIN")
            self.in_transaction = True

    def commit(self) -> None:
        if self.in_transaction:
            self.db.execute("COMMIT")
            self.in_transaction = False

    # --- the broker position ----------------------------------------------------------

    def position(self) -> tuple[int, int]:
        """``(epoch, seq)`` last committed; ``(0, 0)`` for a new store."""
        row = self.db.execute("SELECT epoch, seq FROM position WHERE id = 1").fetchone()
        return (int(row[0]), int(row[1])) if row else (0, 0)

    def set_position(self, epoch: int, seq: int) -> None:
        self._begin()
        self.db.execute("INSERT INTO position (id, epoch, seq) VALUES (1, ?, ?) "
                        "ON CONFLICT (id) DO UPDATE SET epoch = excluded.epoch, "
                        "seq = excluded.seq", (epoch, seq))

    # --- events -----------------------------------------------------------------------

    def add_event(self, app_id: str, time_ms: int, event: bytes) -> int:
        self._begin()
        cursor = self.db.execute("INSERT INTO events (app_id, time_ms, event) VALUES (?, ?, ?)",
                                 (app_id, time_ms, event))
        assert cursor.lastrowid is not None
        return cursor.lastrowid

    def delete_events(self, ids: list[int]) -> None:
        if ids:
            self._begin()
            self.db.executemany("DELETE FROM events WHERE id = ?", [(i,) for i in ids])

    def events(self) -> list[EventRow]:
        return [(int(r[0]), r[1], int(r[2]), bytes(r[3])) for r in self.db.execute(
            "SELECT id, app_id, time_ms, event FROM events ORDER BY id")]

    # --- outbox -----------------------------------------------------------------------

    def add_outgoing(self, app_id: str, url: str, channel: str, event: bytes) -> int:
        self._begin()
        cursor = self.db.execute(
            "INSERT INTO outbox (app_id, url, channel, event) VALUES (?, ?, ?, ?)",
            (app_id, url, channel, event))
        assert cursor.lastrowid is not None
        return cursor.lastrowid

    def delete_outgoing(self, ids: list[int]) -> None:
        if ids:
            self._begin()
            self.db.executemany("DELETE FROM outbox WHERE id = ?", [(i,) for i in ids])

    def outgoing(self) -> list[OutboxRow]:
        return [(int(r[0]), r[1], r[2], r[3], bytes(r[4])) for r in self.db.execute(
            "SELECT id, app_id, url, channel, event FROM outbox ORDER BY id")]

    # --- requests ---------------------------------------------------------------------

    def form_request(self, app_id: str, url: str, channels: tuple[str, ...], body: bytes,
                     formed_ms: int, events: int, outgoing_ids: list[int]) -> int:
        """Store a request and remove the outbox rows it was made of, atomically."""
        self.delete_outgoing(outgoing_ids)
        cursor = self.db.execute(
            "INSERT INTO requests (app_id, url, channels, body, formed_ms, events) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (app_id, url, orjson.dumps(channels).decode(), body, formed_ms, events))
        assert cursor.lastrowid is not None
        return cursor.lastrowid

    def record_attempts(self, request_id: int, attempts: int) -> None:
        self._begin()
        self.db.execute("UPDATE requests SET attempts = ? WHERE id = ?", (attempts, request_id))

    def delete_request(self, request_id: int) -> None:
        self._begin()
        self.db.execute("DELETE FROM requests WHERE id = ?", (request_id,))

    def requests(self) -> list[RequestRow]:
        return [(int(r[0]), r[1], r[2], tuple(orjson.loads(r[3])),
                 bytes(r[4]), int(r[5]), int(r[6]), int(r[7]))
                for r in self.db.execute(
                    "SELECT id, app_id, url, channels, body, formed_ms, events, attempts "
                    "FROM requests ORDER BY id")]

    def counts(self) -> dict[str, int]:
        """Rows per table (for logs and tests)."""
        return {table: int(self.db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])
                for table in ("events", "outbox", "requests")}
