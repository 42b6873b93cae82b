"""The authoritative cluster state, as pure code (no sockets, no clock of its own).

:class:`ClusterState` takes decoded envelope messages from workers and returns what to
send in answer: a list of ``(worker_identity, message)`` pairs (:data:`Out`). Webhook
events it implies are appended to :attr:`ClusterState.webhooks`.

Rules it owns (the ones that need cluster-wide knowledge; docs/architecture.md):

* Routing: a channel's publishes go once to each worker with at least one subscriber
  there, never per recipient. Per-channel order is the order publishes arrive here.
* Occupancy: a channel is occupied while its subscription count (all workers) is > 0;
  0 -> 1 is ``channel_occupied``, 1 -> 0 ``channel_vacated``.
* Presence: membership is per user id. ``member_added`` goes out when a user's
  first connection joins the channel anywhere, ``member_removed`` when its last one
  leaves (unsubscribe, close, or its worker's purge); never to the connection that
  caused it. A new user over ``max_members`` is refused (LimitReached, 4100).
* Sign-in binds a connection to ``#server-to-user-{id}``. A user is online while at
  least one connection is signed in as it; watchers get ``watchlist_events`` on each
  online/offline change, and their current view right after signing in.
* Cache channels keep the last published payload with a TTL.
* Quotas: per-app connection counts across the cluster.
* A worker that says bye, is purged by the supervisor, or stops heartbeating is removed
  with exactly the events its departure implies.
* Recovery: the state is rebuilt from the workers' replays after the broker starts (and
  a single worker's state after it resyncs). Until every expected worker has said
  ``SYNCED`` (or ``recovery_window`` has passed), the broker is *recovering*: HTTP API
  publishes are refused (``{"ok": false}``, the API answers 503) instead of being routed
  with half the routes, and no presence member event is sent; nor while a worker is
  syncing. When that ends, every worker is sent ``RECOVERED`` and compares the rosters
  its clients were told with this state, sending only the difference. So no client is
  told a member twice, and members who left meanwhile are removed. A broker that had no
  worker left and gets one again (a standby taking over, a preferred broker the workers
  return to) recovers the same way, since the other workers are still on their way.
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson

from vask import frames
from vask.channels import kind_of, user_channel
from vask.config import App, Settings
from vask.envelope import (
    ENVELOPE_VERSION,
    ConnClose,
    ConnOpen,
    Deliver,
    DeliverTo,
    Hello,
    Publish,
    Query,
    Recovered,
    Reply,
    SignIn,
    Subscribe,
    Terminate,
    TerminateUser,
    Unsubscribe,
    Verb,
    Welcome,
)

Out = list[tuple[bytes, Verb]]
_ROUTED: dict[str, Any] = {"ok": True}
_RECOVERING: dict[str, Any] = {
    "ok": False, "error": "The cluster is recovering from a broker restart; retry shortly."}
#: subscription_count events are sent at most this often for channels above
SUBSCRIPTION_COUNT_BUSY = 100
SUBSCRIPTION_COUNT_BUSY_INTERVAL = 5.0


@dataclass(slots=True)
class WorkerInfo:
    identity: bytes
    name: str
    epoch: int
    prefix: int
    last_seen: float


@dataclass(slots=True)
class SocketInfo:
    """One connection. Kept small: there is one per client in the cluster."""

    worker: bytes
    #: The channels this connection is in, read through the methods below. Most
    #: connections are in one plain channel (a user's private channel): that is stored
    #: as the channel name itself, which the channel table's key already holds, so it
    #: costs nothing. Otherwise a dict, channel -> the user id this connection joined it
    #: as (presence channels), else None: O(1) subscribe, unsubscribe and routing check
    #: however many channels the connection holds (a list made one with N channels cost
    #: O(N^2) to build and tear down), the subscription order kept (a close's events come
    #: out in a fixed order), and the presence user ids without a second container. A
    #: one-entry dict is 184 bytes; the broker's record of an idle subscribed connection
    #: was 677 traced bytes with it. None: no channel.
    channels: str | dict[str, str | None] | None = None
    user_id: str | None = None
    watchlist: tuple[str, ...] = ()

    def has(self, channel: str) -> bool:
        c = self.channels
        if type(c) is str:
            return c == channel
        return c is not None and channel in c

    def add(self, channel: str, user_id: str | None) -> None:
        """Enter ``channel`` (the caller checked :meth:`has`)."""
        c = self.channels
        if c is None:
            self.channels = channel if user_id is None else {channel: user_id}
        elif type(c) is str:
            self.channels = {c: None, channel: user_id}
        else:
            c[channel] = user_id  # type: ignore[index]

    def remove(self, channel: str) -> str | None:
        """Leave ``channel`` (the caller checked :meth:`has`); the user id it was
        joined as."""
        c = self.channels
        if type(c) is str:
            self.channels = None
            return None
        return c.pop(channel)  # type: ignore[union-attr]

    def joined(self) -> Iterable[tuple[str, str | None]]:
        """``(channel, user id or None)`` of every channel, in subscription order."""
        c = self.channels
        if c is None:
            return ()
        if type(c) is str:
            return ((c, None),)
        return c.items()  # type: ignore[union-attr]


@dataclass(slots=True)
class ChannelState:
    #: The workers with subscribers and their numbers of subscribed connections. Most
    #: channels (a user's private channel) live on one worker: then this is that
    #: worker's identity alone, whose count is ``count`` (a list of two would cost 72
    #: bytes). Otherwise a flat list ``[identity, n, identity, n, ...]``, not a dict (184
    #: bytes): a lookup scans at most one entry per worker. Identities are bytes and
    #: counts ints, so ``list.index(identity)`` never matches a count. b"": none. Read
    #: and changed through the methods below.
    workers: bytes | list[bytes | int] = b""
    count: int = 0
    #: presence only: user id -> {socket_id: user_info}
    members: dict[str, dict[str, Any]] | None = None
    last_count_sent: float = 0.0

    @property
    def per_worker(self) -> dict[bytes, int]:
        """Worker identity -> its subscribed connections (a copy, for reading)."""
        w = self.workers
        if isinstance(w, bytes):
            return {w: self.count} if w else {}
        return {w[i]: w[i + 1] for i in range(0, len(w), 2)}  # type: ignore[misc]

    def worker_ids(self) -> Iterable[bytes]:
        w = self.workers
        if isinstance(w, bytes):
            return (w,) if w else ()
        return w[::2]  # type: ignore[return-value]

    def on_worker(self, identity: bytes) -> int:
        """How many of ``identity``'s connections are subscribed."""
        w = self.workers
        if isinstance(w, bytes):
            return self.count if w == identity else 0
        try:
            return w[w.index(identity) + 1]  # type: ignore[return-value]
        except ValueError:
            return 0

    def enter(self, identity: bytes) -> None:
        """One more subscribed connection on ``identity``."""
        w = self.workers
        if isinstance(w, bytes):
            if not w or w == identity:
                self.workers = identity
            else:
                self.workers = [w, self.count, identity, 1]
        elif identity in w:
            w[w.index(identity) + 1] += 1  # type: ignore[operator]
        else:
            w += (identity, 1)
        self.count += 1

    def exit(self, identity: bytes) -> None:
        """One subscribed connection fewer on ``identity``."""
        self.count -= 1
        w = self.workers
        if isinstance(w, bytes):
            if not self.count:
                self.workers = b""
            return
        try:
            at = w.index(identity)
        except ValueError:
            return
        if w[at + 1] == 1:
            del w[at:at + 2]
            if len(w) == 2 and w[1] == self.count:
                self.workers = w[0]  # type: ignore[assignment]
        else:
            w[at + 1] -= 1  # type: ignore[operator]


@dataclass(slots=True)
class CacheEntry:
    payload: bytes
    #: on the broker's monotonic clock
    expires: float


class ClusterState:
    """Everything the broker knows; see the module docstring for the rules."""

    def __init__(self, settings: Settings, epoch: int, expected_workers: int = 0) -> None:
        self.epoch = epoch
        #: see "Recovery" in the module docstring
        self.recovering = True
        #: workers whose replay should arrive (0: unknown, wait for the window)
        self.expected_workers = expected_workers
        self.recovery_window = 2 * settings.heartbeat_interval + 1.0
        self.recovery_deadline: float | None = None
        #: welcomed workers whose SYNCED has not arrived yet
        self.syncing: set[bytes] = set()
        #: the time of the message being handled (set by the broker loop)
        self.now = 0.0
        self.apps: dict[str, App] = {}
        self.workers: dict[bytes, WorkerInfo] = {}
        self.sockets: dict[tuple[str, str], SocketInfo] = {}
        self.channels: dict[tuple[str, str], ChannelState] = {}
        self.online: dict[tuple[str, str], set[str]] = {}
        self.watchers: dict[tuple[str, str], set[str]] = defaultdict(set)
        self.cache: dict[tuple[str, str], CacheEntry] = {}
        #: heap of (expires, key), one per cache write; an item whose entry has been
        #: replaced or removed since is skipped when it comes up (see expire_cache)
        self.cache_expiry: list[tuple[float, tuple[str, str]]] = []
        self.connections: dict[str, int] = defaultdict(int)
        self.count_dirty: set[tuple[str, str]] = set()
        #: (app_id, time_ms, event object) for the webhook sender, taken by the loop
        self.webhooks: list[tuple[str, int, dict[str, Any]]] = []
        #: wall-clock milliseconds of the message being handled (webhook ``time_ms``)
        self.wall_ms = 0
        #: per app, the webhook event names at least one of its endpoints wants
        self.hook_events: dict[str, frozenset[str]] = {}
        self.set_apps(settings.apps)
        #: cache channels that produced a cache_miss webhook since they were last
        #: written or vacated: one webhook per empty channel, not one per subscriber
        self.cache_missed: set[tuple[str, str]] = set()

    def set_apps(self, apps: Iterable[App]) -> None:
        """The apps (at start, and again on a reload)."""
        self.apps = {app.id: app for app in apps}
        #: each app id to one string object: the keys of the connections and channels
        #: share it instead of holding the copy each decoded message brings (~50 bytes
        #: per connection and per channel)
        self.app_ids = {app.id: app.id for app in self.apps.values()}
        self.hook_events = {
            app.id: frozenset(name for hook in app.webhooks for name in hook.event_types)
            for app in self.apps.values()}

    # --- workers ------------------------------------------------------------------

    def hello(self, identity: bytes, msg: Hello, now: float) -> Out:
        if msg.version != ENVELOPE_VERSION:
            return [(identity, Welcome(False, self.epoch,
                                       f"envelope version {msg.version} != {ENVELOPE_VERSION}"))]
        out: Out = []
        if identity in self.workers:
            # The same worker again: it resyncs (it lost messages, or it restarted with
            # its identity). Its replay follows; until its SYNCED, nothing it held or
            # replays produces member events (the others compare rosters then).
            self.syncing.add(identity)
            out += self.purge(identity)
        for other in self.workers.values():
            if other.prefix == msg.prefix:
                self.syncing.discard(identity)
                return [*out, (identity, Welcome(False, self.epoch, "socket id prefix in use"))]
        if not self.workers and not self.recovering:
            # The first worker of a broker that had none: a standby taking over, or a
            # preferred broker that workers come back to. The others are on their way
            # with their replays; until they are in (the recovery window), routing with
            # half the routes would acknowledge events some subscribers never get.
            self.recovering = True
            self.recovery_deadline = None
        self.workers[identity] = WorkerInfo(identity, msg.worker, msg.epoch, msg.prefix, now)
        self.syncing.add(identity)
        return [*out, (identity, Welcome(True, self.epoch, ""))]

    def synced(self, identity: bytes) -> Out:
        """The worker's replay is complete."""
        if identity not in self.workers:
            return []
        self.syncing.discard(identity)
        if not self.recovering:
            # A late or single-worker resync: everyone compares rosters again.
            return self._recovered()
        if self.expected_workers and \
                len(self.workers) - len(self.syncing) >= self.expected_workers:
            return self._recovered()
        return []

    def tick(self, now: float) -> Out:
        """End the recovery once its window has passed (called by the broker loop)."""
        if not self.recovering:
            return []
        if self.recovery_deadline is None:
            self.recovery_deadline = now + self.recovery_window
        elif now >= self.recovery_deadline:
            return self._recovered()
        return []

    def _recovered(self) -> Out:
        """The state is whole again: workers compare presence rosters (RECOVERED),
        every watcher gets its whole watchlist view again (a watched user who went
        offline in the gap is reported offline), and every channel's subscription
        count is sent again at the next count flush."""
        self.recovering = False
        message = Recovered(self.epoch)
        out: Out = [(w, message) for w in self.workers if w not in self.syncing]
        for (app_id, socket_id), info in self.sockets.items():
            if info.watchlist and info.user_id is not None and info.worker not in self.syncing:
                out.append((info.worker, self._watch_view(app_id, socket_id, info)))
        for key in self.channels:
            self._count_changed(key)
        return out

    def _quiet(self, worker: bytes) -> bool:
        """No member events for this worker's connections now (see Recovery)."""
        return self.recovering or worker in self.syncing

    def seen(self, identity: bytes, now: float) -> bool:
        """Note a sign of life; ``False`` if the worker is unknown (it must resync)."""
        worker = self.workers.get(identity)
        if worker is None:
            return False
        worker.last_seen = now
        return True

    def expired(self, now: float, timeout: float) -> list[bytes]:
        return [w.identity for w in self.workers.values() if now - w.last_seen > timeout]

    def purge_named(self, prefix: str) -> Out:
        """Purge the worker(s) whose name starts with ``host:pid:slot:`` (supervisor)."""
        out: Out = []
        for identity in [w.identity for w in self.workers.values()
                         if w.name.startswith(prefix + ":")]:
            out += self.purge(identity)
        return out

    def purge(self, identity: bytes) -> Out:
        """Remove a worker and every connection it held, with the implied events."""
        worker = self.workers.get(identity)
        if worker is None:
            return []
        out: Out = []
        # A scan of every connection: a purge is rare (a worker died, resynced or said
        # goodbye), and an index per worker would cost memory for every connection.
        for app_id, socket_id in [key for key, info in self.sockets.items()
                                  if info.worker == identity]:
            out += self._close_socket(app_id, socket_id)
        del self.workers[identity]
        self.syncing.discard(identity)
        return out

    # --- connections --------------------------------------------------------------

    def conn_open(self, identity: bytes, msg: ConnOpen) -> Out:
        worker = self.workers.get(identity)
        if worker is None:
            return [(identity, Reply(msg.rid, {"ok": False, "error": "unknown worker"}))] \
                if msg.rid else []
        if (msg.app, msg.socket_id) not in self.sockets:
            if msg.max_connections and \
                    self.connections.get(msg.app, 0) >= msg.max_connections:
                return [(identity, Reply(msg.rid, {"ok": False}))] if msg.rid else []
            self._register(identity, msg.app, msg.socket_id)
        return [(identity, Reply(msg.rid, {"ok": True}))] if msg.rid else []

    def conn_close(self, identity: bytes, msg: ConnClose) -> Out:
        info = self.sockets.get((msg.app, msg.socket_id))
        if info is None or info.worker != identity:
            return []  # not this worker's connection (socket ids are per worker)
        return self._close_socket(msg.app, msg.socket_id)

    def _close_socket(self, app_id: str, socket_id: str) -> Out:
        info = self.sockets.pop((app_id, socket_id), None)
        if info is None:
            return []
        out: Out = []
        # O(channels) once; _leave does not touch info.channels, and info is no longer
        # reachable from self.sockets, so nothing else changes it meanwhile.
        for channel, user_id in info.joined():
            out += self._leave(app_id, channel, socket_id, info.worker, user_id)
        info.channels = None
        if info.user_id is not None:
            out += self._sign_out(app_id, socket_id, info)
        self.connections[app_id] -= 1
        return out

    # --- subscriptions ------------------------------------------------------------

    def _register(self, identity: bytes, app_id: str, socket_id: str) -> SocketInfo | None:
        """The connection's record, created on its first message: a worker announces a
        connection with :class:`ConnOpen` only when its app has a quota; otherwise its
        first subscribe or sign-in does (one message less per connection)."""
        key = (app_id, socket_id)
        info = self.sockets.get(key)
        if info is None:
            if identity not in self.workers:
                return None
            info = self.sockets[(self.app_ids.get(app_id, app_id), socket_id)] = \
                SocketInfo(identity)
            self.connections[app_id] += 1
        elif info.worker != identity:
            return None
        return info

    def subscribe(self, identity: bytes, msg: Subscribe) -> Out:
        info = self._register(identity, msg.app, msg.socket_id)
        if info is None:
            # Another worker's socket id, or its worker was purged: refuse.
            return [(identity, Reply(msg.rid, {"ok": False, "type": "ServerError",
                                               "error": "connection unknown", "status": 500}))] \
                if msg.rid else []
        if info.has(msg.channel):
            return [(identity, Reply(msg.rid, self._subscribe_answer(msg)))] if msg.rid else []
        key = (msg.app, msg.channel)
        out: Out = []
        user_id: str | None = None
        if msg.member is not None:
            user_id = msg.member[0]  # a non-empty string: checked by envelope.decode
            state = self.channels.get(key)
            members = (state.members if state is not None else None) or {}
            if user_id not in members and len(members) >= msg.max_members > 0:
                return [(identity, Reply(msg.rid, {
                    "ok": False, "type": "LimitReached",
                    "error": "The maximum members per presence channel limit was reached",
                    "status": 4100}))] if msg.rid else []
        # A worker that already has subscribers here holds the roster its clients were
        # told, kept current by every member event since (workers/rosters.py): it can
        # answer this join from that, and the broker sends no roster (O(members) per
        # join, the bulk of a presence channel's traffic). Not while member events are
        # held back (recovery, a worker syncing): a told roster may be behind then.
        roster_known = user_id is not None and not self.recovering and not self.syncing \
            and key in self.channels and self.channels[key].on_worker(identity) > 0
        state = self._join(identity, key, info, user_id)
        if msg.member is not None and user_id is not None:
            if state.members is None:
                state.members = {}
            connections = state.members.get(user_id)
            if connections is None:
                state.members[user_id] = {msg.socket_id: msg.member[1]}
                if not self._quiet(identity):
                    frame = frames.member_added(msg.channel, user_id, msg.member[1])
                    out += self._route(msg.app, msg.channel, msg.socket_id, frame)
                    self._webhook(msg.app, {"name": "member_added", "channel": msg.channel,
                                            "user_id": user_id})
            else:
                connections[msg.socket_id] = msg.member[1]
        if msg.rid:
            out.append((identity, Reply(msg.rid, self._subscribe_answer(msg, roster_known))))
        return out

    def _subscribe_answer(self, msg: Subscribe, roster_known: bool = False) -> dict[str, Any]:
        body: dict[str, Any] = {"ok": True}
        key = (msg.app, msg.channel)
        if roster_known:
            body["roster_known"] = True
        elif msg.member is not None:
            body["presence"] = self._roster(self.channels[key])
        if kind_of(msg.channel).cache:
            entry = self.cache.get(key)
            if entry is not None and entry.expires <= self.now:
                entry = None  # expired, not yet swept
            body["cache"] = entry.payload.decode() if entry is not None else None
            if entry is None and key not in self.cache_missed:
                self.cache_missed.add(key)
                self._webhook(msg.app, {"name": "cache_miss", "channel": msg.channel})
        return body

    @staticmethod
    def _roster(state: ChannelState) -> dict[str, Any]:
        members = state.members or {}
        ids = list(members)
        hash_ = {uid: next(iter(conns.values())) for uid, conns in members.items()}
        return {"ids": ids, "hash": hash_, "count": len(ids)}

    def _join(self, identity: bytes, key: tuple[str, str], info: SocketInfo,
              user_id: str | None = None) -> ChannelState:
        """Add the connection to a channel it is not in yet (the callers check)."""
        state = self.channels.get(key)
        if state is None:
            state = self.channels[(self.app_ids.get(key[0], key[0]), key[1])] = ChannelState()
        info.add(key[1], user_id)
        state.enter(identity)
        if state.count == 1 and not key[1].startswith("#") and not self._quiet(identity):
            self._webhook(key[0], {"name": "channel_occupied", "channel": key[1]})
        self._count_changed(key)
        return state

    def unsubscribe(self, identity: bytes, msg: Unsubscribe) -> Out:
        info = self.sockets.get((msg.app, msg.socket_id))
        if info is None or info.worker != identity or not info.has(msg.channel):
            return []
        user_id = info.remove(msg.channel)
        return self._leave(msg.app, msg.channel, msg.socket_id, info.worker, user_id)

    def _leave(self, app_id: str, channel: str, socket_id: str, worker: bytes,
               user_id: str | None) -> Out:
        """Take a connection out of a channel's state; the caller has already taken the
        channel out of the connection's ``channels``."""
        key = (app_id, channel)
        state = self.channels.get(key)
        if state is None:
            return []
        out: Out = []
        state.exit(worker)
        members = state.members
        connections = members.get(user_id) if user_id is not None and members else None
        if connections is not None and members is not None and user_id is not None:
            connections.pop(socket_id, None)
            if not connections:
                del members[user_id]
                if not self._quiet(worker):
                    out += self._route(app_id, channel, socket_id,
                                       frames.member_removed(channel, user_id))
                    self._webhook(app_id, {"name": "member_removed", "channel": channel,
                                           "user_id": user_id})
        if state.count <= 0:
            del self.channels[key]
            self.count_dirty.discard(key)
            self.cache_missed.discard(key)
            if not channel.startswith("#") and not self._quiet(worker):
                self._webhook(app_id, {"name": "channel_vacated", "channel": channel})
        else:
            self._count_changed(key)
        return out

    # --- users --------------------------------------------------------------------

    def sign_in(self, identity: bytes, msg: SignIn) -> Out:
        info = self._register(identity, msg.app, msg.socket_id)
        if info is None or info.user_id is not None:
            return []
        info.user_id = msg.user_id
        info.watchlist = tuple(msg.watchlist)
        channel = user_channel(msg.user_id)
        if not info.has(channel):  # (a SUB may have named it already)
            self._join(identity, (msg.app, channel), info)
        out: Out = []
        signed_in = self.online.setdefault((msg.app, msg.user_id), set())
        signed_in.add(msg.socket_id)
        quiet = self._quiet(identity)  # a replay: views are re-sent once recovered
        if len(signed_in) == 1 and not quiet:
            out += self._watch_notify(msg.app, msg.user_id, online=True)
        if info.watchlist:
            for watched in info.watchlist:
                self.watchers[(msg.app, watched)].add(msg.socket_id)
            if not quiet:
                out.append((identity, self._watch_view(msg.app, msg.socket_id, info)))
        return out

    def _watch_view(self, app_id: str, socket_id: str, info: SocketInfo) -> DeliverTo:
        """A watcher's whole view: which of its watched users are online, which not."""
        online = [u for u in info.watchlist if (app_id, u) in self.online]
        offline = [u for u in info.watchlist if (app_id, u) not in self.online]
        return DeliverTo([socket_id], frames.watchlist_events(online, offline))

    def _sign_out(self, app_id: str, socket_id: str, info: SocketInfo) -> Out:
        assert info.user_id is not None
        out: Out = []
        for watched in info.watchlist:
            watchers = self.watchers.get((app_id, watched))
            if watchers is not None:
                watchers.discard(socket_id)
                if not watchers:
                    del self.watchers[(app_id, watched)]
        signed_in = self.online.get((app_id, info.user_id))
        if signed_in is not None:
            signed_in.discard(socket_id)
            if not signed_in:
                del self.online[(app_id, info.user_id)]
                if not self._quiet(info.worker):
                    out += self._watch_notify(app_id, info.user_id, online=False)
        return out

    def _watch_notify(self, app_id: str, user_id: str, online: bool) -> Out:
        watchers = self.watchers.get((app_id, user_id))
        if not watchers:
            return []
        frame = frames.watchlist_events([user_id], []) if online else \
            frames.watchlist_events([], [user_id])
        return self._to_sockets(app_id, watchers, frame)

    def _to_sockets(self, app_id: str, socket_ids: Iterable[str], frame: bytes) -> Out:
        by_worker: dict[bytes, list[str]] = defaultdict(list)
        for socket_id in socket_ids:
            info = self.sockets.get((app_id, socket_id))
            if info is not None:
                by_worker[info.worker].append(socket_id)
        return [(worker, DeliverTo(sids, frame)) for worker, sids in by_worker.items()]

    def terminate_user(self, identity: bytes, msg: TerminateUser) -> Out:
        if msg.rid and self.recovering:
            return [(identity, Reply(msg.rid, _RECOVERING))]
        signed_in = self.online.get((msg.app, msg.user_id), set())
        by_worker: dict[bytes, list[str]] = defaultdict(list)
        for socket_id in signed_in:
            info = self.sockets.get((msg.app, socket_id))
            if info is not None:
                by_worker[info.worker].append(socket_id)
        message = "Connection terminated by the app through the HTTP API"
        out: Out = [(w, Terminate(sids, 4200, message)) for w, sids in by_worker.items()]
        if msg.rid:
            out.append((identity, Reply(msg.rid, _ROUTED)))
        return out

    # --- traffic ------------------------------------------------------------------

    def publish(self, identity: bytes, msg: Publish, now: float) -> Out:
        """Route a publish; answer an HTTP API one (``rid``) after its deliveries, or
        refuse it unrouted while recovering (half the routes may be missing)."""
        if msg.rid and self.recovering:
            return [(identity, Reply(msg.rid, _RECOVERING))]
        if msg.local_first and "client_event" in self.hook_events.get(msg.app, ()):
            self._client_event_webhook(msg)
        if msg.cache_ttl > 0:
            key = (msg.app, msg.channel)
            self.cache_missed.discard(key)
            expires = now + msg.cache_ttl
            self.cache[key] = CacheEntry(msg.payload, expires)
            expiry = self.cache_expiry
            heapq.heappush(expiry, (expires, key))
            if len(expiry) > 2 * len(self.cache) + 64:
                # Mostly superseded items (a channel published to again and again):
                # rebuild from the live entries, O(n) once per n writes.
                expiry[:] = [(e.expires, k) for k, e in self.cache.items()]
                heapq.heapify(expiry)
        out = self._route(msg.app, msg.channel, msg.exclude, msg.payload,
                          origin=identity if msg.local_first else None)
        if msg.rid:
            out.append((identity, Reply(msg.rid, _ROUTED)))
        return out

    def _route(self, app_id: str, channel: str, exclude: str, payload: bytes,
               origin: bytes | None = None) -> Out:
        state = self.channels.get((app_id, channel))
        if state is None:
            return []
        message = Deliver(app_id, channel, exclude, payload)
        skip = None
        if exclude:
            # Do not wake a worker whose only subscriber is the excluded connection.
            info = self.sockets.get((app_id, exclude))
            if info is not None and state.on_worker(info.worker) == 1 \
                    and info.has(channel):
                skip = info.worker
        return [(worker, message) for worker in state.worker_ids()
                if worker != skip and worker != origin]

    # --- subscription counts ------------------------------------------------------

    def _count_changed(self, key: tuple[str, str]) -> None:
        app = self.apps.get(key[0])
        if app is not None and app.enable_subscription_count:
            kind = kind_of(key[1])
            if not kind.presence and not kind.user:
                self.count_dirty.add(key)

    def flush_counts(self, now: float) -> Out:
        """Send coalesced ``pusher_internal:subscription_count`` events;
        none while the state is being rebuilt (the counts would be partial)."""
        if self.recovering or self.syncing:
            return []
        out: Out = []
        for key in list(self.count_dirty):
            state = self.channels.get(key)
            if state is None:
                self.count_dirty.discard(key)
                continue
            if state.count > SUBSCRIPTION_COUNT_BUSY and \
                    now - state.last_count_sent < SUBSCRIPTION_COUNT_BUSY_INTERVAL:
                continue
            self.count_dirty.discard(key)
            state.last_count_sent = now
            out += self._route(key[0], key[1], "", frames.subscription_count(key[1], state.count))
            self._webhook(key[0], {"name": "subscription_count", "channel": key[1],
                                   "subscription_count": state.count})
        return out

    def expire_cache(self, now: float) -> None:
        """Drop entries past their TTL. Runs every 0.1 s: it costs O(log n) per entry
        that expires, not a scan of every cached channel."""
        expiry, cache = self.cache_expiry, self.cache
        while expiry and expiry[0][0] <= now:
            _, key = heapq.heappop(expiry)
            entry = cache.get(key)
            if entry is not None and entry.expires <= now:
                del cache[key]

    # --- webhooks -----------------------------------------------------------------

    def _webhook(self, app_id: str, event: dict[str, Any]) -> None:
        """Queue ``event`` for the webhook sender if an endpoint of the app wants it
        (each endpoint's channel filters are applied by the sender)."""
        wanted = self.hook_events.get(app_id)
        if wanted and event["name"] in wanted:
            self.webhooks.append((app_id, self.wall_ms, event))

    def _client_event_webhook(self, msg: Publish) -> None:
        """The ``client_event`` webhook of a client event: its frame (built by the
        worker, so well-formed) holds the event, data and, on presence channels, the
        sender's user id; ``exclude`` is the sender's socket id."""
        try:
            frame = orjson.loads(msg.payload)
            data = frame.get("data")
            event: dict[str, Any] = {
                "name": "client_event", "channel": msg.channel, "event": frame["event"],
                "data": data if isinstance(data, str) else orjson.dumps(data).decode(),
                "socket_id": msg.exclude}
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
            return  # not a frame a worker builds; the publish itself still goes out
        user_id = frame.get("user_id")
        if isinstance(user_id, str):
            event["user_id"] = user_id
        self._webhook(msg.app, event)

    # --- queries (HTTP API) -------------------------------------------------------

    def query(self, identity: bytes, msg: Query, now: float) -> Out:
        try:
            body = self._answer(msg, now)
        except (KeyError, TypeError, ValueError) as exc:
            body = {"error": f"bad query: {exc}"}
        return [(identity, Reply(msg.rid, body))]

    def _counts(self, app_id: str, channel: str) -> dict[str, int]:
        state = self.channels.get((app_id, channel))
        if state is None:
            return {"subscription_count": 0, "user_count": 0}
        return {"subscription_count": state.count, "user_count": len(state.members or ())}

    def _answer(self, msg: Query, now: float) -> dict[str, Any]:
        app_id, args = msg.app, msg.args
        if msg.kind == "channels":
            prefix = str(args.get("prefix", ""))
            return {"channels": {
                channel: self._counts(app_id, channel)
                for (a, channel) in self.channels
                if a == app_id and channel.startswith(prefix) and not channel.startswith("#")
            }}
        if msg.kind == "channel":
            channel = str(args["channel"])
            counts = self._counts(app_id, channel)
            entry = self.cache.get((app_id, channel))
            cache = None
            if entry is not None and entry.expires > now:
                # The payload is whatever the publishing worker sent; not an object
                # reads as no event rather than failing the query.
                frame = orjson.loads(entry.payload)
                if isinstance(frame, dict):
                    cache = {"event": frame.get("event"), "data": frame.get("data"),
                             "ttl": max(0.0, entry.expires - now)}
            return {"occupied": counts["subscription_count"] > 0, **counts, "cache": cache}
        if msg.kind == "roster":
            state = self.channels.get((app_id, str(args["channel"])))
            members = (state.members if state is not None else None) or {}
            return {"members": {uid: next(iter(conns.values()))
                                for uid, conns in members.items()}}
        if msg.kind == "users":
            state = self.channels.get((app_id, str(args["channel"])))
            return {"users": list(state.members or ()) if state is not None else []}
        if msg.kind == "counts":
            return {"channels": {str(c): self._counts(app_id, str(c)) for c in args["channels"]}}
        if msg.kind == "user":
            user_id = str(args["user_id"])
            return {"online": (app_id, user_id) in self.online,
                    "connections": len(self.online.get((app_id, user_id), ()))}
        raise ValueError(f"unknown query kind {msg.kind!r}")
