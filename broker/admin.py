"""The admin listener: /metrics, the dashboard and its API, served by the broker.

With ``admin_token`` set, this replaces prometheus_client's plain /metrics server on
``metrics_host:metrics_port`` (docs/dashboard.md). One aiohttp application, in a thread
of the broker process with its own asyncio loop, serves:

* ``/metrics`` (and ``/``): the same exposition as before, without authentication;
* ``/dashboard/``: the page and its assets, shipped in the package (no data in them);
* ``/admin/api/...``: JSON, each request with ``Authorization: Bearer <admin_token>``;
* ``/admin/ws``: the live feed (overview samples once a second, debug console records),
  authenticated by the first message the page sends.

Why a thread of the broker: the broker holds everything the dashboard shows, so a
thread needs no second copy of the state and no protocol to keep one in step. The
broker's loop never waits for it. The two sides meet in a few plain structures:

* the thread puts requests (a channel list, a roster) on :attr:`AdminServer.requests`;
  the broker loop answers them between two turns (:meth:`AdminServer.broker_turn`) and
  hands the answer back with ``call_soon_threadsafe``, which never blocks;
* the thread says which apps' consoles are open by swapping :attr:`console_apps` (one
  reference assignment); the broker relays that to the workers (``CONSOLE``);
* the broker loop pushes samples and console records to the thread the same way.

What the thread does costs the broker only the GIL while it runs: the feed is a few
small JSON documents a second per viewer, and nothing at all when nobody looks.

The event creator posts to the cluster's own HTTP API (the public port, on loopback),
signed with the app's secret: the same path, checks and limits as any publisher.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import hmac
import logging
import queue
import socket
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import orjson
from aiohttp import ClientSession, ClientTimeout, WSMsgType, web

from vask.config import App, Settings
from vask.envelope import Console
from vask.metrics import PROCESS_CPU, PROCESS_RSS, WORKER_DEPTH, process_usage
from vask.signing import body_md5, http_string_to_sign, sign

if TYPE_CHECKING:
    from vask.broker.metrics import MetricsServer
    from vask.broker.server import Broker

log = logging.getLogger("vask.broker.admin")

#: overview samples kept (one a second: five minutes)
HISTORY = 300
SAMPLE_INTERVAL = 1.0
#: channels per page of the channels view at most, and members per roster
PAGE_LIMIT = 500
ROSTER_LIMIT = 500
#: console records buffered in the broker between two hand-overs, and per viewer
CONSOLE_BUFFER = 2_000
VIEWER_QUEUE = 64
#: seconds a new WebSocket has to authenticate
AUTH_WAIT = 5.0
#: seconds an API request waits for the broker loop
BROKER_WAIT = 5.0
#: how often, while consoles are open, the broker repeats CONSOLE to the workers
CONSOLE_REPEAT = 1.0
#: console records go to the admin thread at most this often (in one hand-over), so a
#: busy broker makes a few larger feed messages rather than one per loop turn
HANDOVER_INTERVAL = 0.1
#: counters (cluster sums) the overview carries per app
APP_COUNTERS = (
    "vask_ws_messages_received", "vask_ws_messages_sent", "vask_http_calls_received",
    "vask_client_events", "vask_deliveries", "vask_new_connections",
    "vask_new_disconnections",
)
ASSETS = ("index.html", "dashboard.js", "dashboard.css")
_CONTENT_TYPES = {"html": "text/html; charset=utf-8", "js": "text/javascript; charset=utf-8",
                  "css": "text/css; charset=utf-8"}
#: the page loads only its own assets and talks only to this listener
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; connect-src 'self'; img-src 'self' data:; "
                               "frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

Request = tuple[str, dict[str, Any], Callable[[Any], None]]


def local_api_host(settings: Settings) -> str:
    """Where the admin thread reaches the public HTTP API: loopback when the server
    listens on every address."""
    host = settings.host
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def signed_event_request(app: App, body: bytes, now: int) -> str:
    """The path and signed query of ``POST /apps/{id}/events`` carrying ``body``."""
    path = f"/apps/{app.id}/events"
    params = [("auth_key", app.key), ("auth_timestamp", str(now)), ("auth_version", "1.0"),
              ("body_md5", body_md5(body))]
    signature = sign(app.secret, http_string_to_sign("POST", path, params))
    query = "&".join(f"{k}={quote(v, safe='')}" for k, v in params)
    return f"{path}?{query}&auth_signature={signature}"


# --- what the broker loop computes --------------------------------------------------------


def overview_sample(broker: Broker, totals: dict[str, Any]) -> dict[str, Any]:
    """One overview point: per app figures (counters are cumulative: the page turns
    consecutive points into rates), per worker and broker figures, webhooks."""
    state = broker.state
    counters, gauges = totals["counters"], totals["gauges"]
    apps: dict[str, dict[str, int]] = {}
    for app_id in state.apps:
        figures = {name: int(counters.get(name, {}).get(app_id, 0)) for name in APP_COUNTERS}
        figures["connections"] = int(gauges.get("vask_connected", {}).get(app_id, 0))
        figures["channels"] = int(gauges.get("vask_channels", {}).get(app_id, 0))
        figures["members"] = int(gauges.get("vask_presence_members", {}).get(app_id, 0))
        figures["subscriptions"] = int(gauges.get("vask_subscriptions", {}).get(app_id, 0))
        apps[app_id] = figures
    workers = []
    for identity, info in sorted(state.workers.items(), key=lambda item: item[1].name):
        snap = broker.totals.live.get(identity, {})
        wg, wc = snap.get("gauges", {}), snap.get("counters", {})
        parts = info.name.split(":")
        slot = parts[2] if len(parts) > 2 else "?"
        workers.append({
            "name": info.name, "slot": slot, "pid": parts[1] if len(parts) > 1 else "",
            "connections": sum(int(v) for v in wg.get("vask_connected", {}).values()),
            "cpu_ms": int(wc.get(PROCESS_CPU, {}).get("", 0)),
            "rss": int(wg.get(PROCESS_RSS, {}).get("", 0)),
            "queue_depth": int(wg.get(WORKER_DEPTH, {}).get("", 0)),
            "restarts": broker.restarts_by_slot.get(slot, 0),
        })
    cpu_ms, rss = process_usage()
    webhooks = broker.webhook_stats
    return {
        "time_ms": time.time_ns() // 1_000_000,
        "apps": apps,
        "workers": workers,
        "broker": {"cpu_ms": cpu_ms, "rss": rss, "queue_depth": broker.buffered,
                   "restarts": broker.worker_restarts, "dropped": broker.dropped_bad,
                   "handler_errors": broker.handler_errors},
        "webhooks": {"sent": int(webhooks.get("sent", 0)),
                     "failed": int(webhooks.get("failed", 0)),
                     "queued": int(webhooks.get("queued", 0)),
                     "given_up": int(webhooks.get("given_up", 0))} if webhooks else None,
    }


def channel_page(broker: Broker, app_id: str, prefix: str, limit: int) -> dict[str, Any]:
    """Occupied channels of an app starting with ``prefix``, in name order, at most
    ``limit`` (with the number that matched). One pass over the channels; the page is
    picked with a bounded heap, so a million matches cost no million-entry list."""
    matched = 0

    def matching() -> Iterator[tuple[str, int, int]]:
        nonlocal matched
        for (a, channel), info in broker.state.channels.items():
            if a == app_id and channel.startswith(prefix) and not channel.startswith("#"):
                matched += 1
                yield channel, info.count, len(info.members) if info.members is not None else -1

    rows = heapq.nsmallest(limit, matching())  # keeps a heap of ``limit`` entries only
    return {"matched": matched, "channels": [
        {"name": name, "subscriptions": count, **({"users": users} if users >= 0 else {})}
        for name, count, users in rows]}


def channel_detail(broker: Broker, app_id: str, channel: str) -> dict[str, Any]:
    """One channel: subscriptions per worker, and the presence roster (bounded)."""
    state = broker.state
    info = state.channels.get((app_id, channel))
    if info is None:
        return {"name": channel, "occupied": False, "subscriptions": 0}
    names = {identity: w.name for identity, w in state.workers.items()}
    out: dict[str, Any] = {
        "name": channel, "occupied": True, "subscriptions": info.count,
        "per_worker": {names.get(w, "?"): n for w, n in info.per_worker.items()}}
    if info.members is not None:
        members: list[dict[str, Any]] = []
        for user_id, connections in info.members.items():
            if len(members) >= ROSTER_LIMIT:
                break
            members.append({"id": user_id, "info": next(iter(connections.values())),
                            "connections": len(connections)})
        out["users"] = len(info.members)
        out["members"] = members
    return out


# --- the server ---------------------------------------------------------------------------


class Viewer:
    """One dashboard page's WebSocket."""

    __slots__ = ("app", "console", "queue", "ws")

    def __init__(self, ws: web.WebSocketResponse) -> None:
        self.ws = ws
        self.app = ""
        self.console = False
        self.queue: asyncio.Queue[bytes] = asyncio.Queue(VIEWER_QUEUE)


class AdminServer:
    """The admin listener (a thread with its own loop) and its hand-over with the broker."""

    def __init__(self, settings: Settings, metrics: MetricsServer) -> None:
        self.settings = settings
        self.metrics = metrics
        self.token = settings.admin_token.encode()
        # --- written by the admin thread, read by the broker loop ---
        self.requests: queue.SimpleQueue[Request] = queue.SimpleQueue()
        #: apps whose debug console is open now (swapped whole, never changed in place)
        self.console_apps: frozenset[str] = frozenset()
        #: a page is connected: take overview samples (each walks every channel, so
        #: none are taken while nobody looks)
        self.watching = False
        # --- broker loop only ---
        self.told_apps: frozenset[str] = frozenset()
        self.next_console = 0.0
        self.next_sample = 0.0
        self.next_handover = 0.0
        self.records: list[dict[str, Any]] = []
        self.records_left_out = 0
        # --- admin thread only ---
        self.history: deque[dict[str, Any]] = deque(maxlen=HISTORY)
        self.viewers: set[Viewer] = set()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self.runner: web.AppRunner | None = None
        self.session: ClientSession | None = None
        self._stopped: asyncio.Event | None = None

    # --- lifecycle (broker's main thread) ------------------------------------------------

    def start(self, host: str, port: int) -> bool:
        """Bind, then serve from a thread; False (logged) if the port cannot be had."""
        try:
            sock = socket.create_server((host, port), family=socket.AF_INET6
                                        if ":" in host else socket.AF_INET)
        except OSError as exc:
            log.error("admin: cannot listen on %s:%d (%s); /metrics and /dashboard are off",
                      host, port, exc.strerror)
            return False
        started = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(sock, started),
                                       name="vask-admin", daemon=True)
        self.thread.start()
        started.wait(10)
        log.info("metrics on http://%s:%d/metrics, dashboard on http://%s:%d/dashboard/",
                 host, port, host, port)
        return True

    def stop(self) -> None:
        loop, stopped = self.loop, self._stopped
        if loop is not None and stopped is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stopped.set)
        if self.thread is not None:
            self.thread.join(5)
            self.thread = None

    def _run(self, sock: socket.socket, started: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        self.loop = loop
        try:
            loop.run_until_complete(self._serve(sock, started))
        finally:
            loop.close()

    async def _serve(self, sock: socket.socket, started: threading.Event) -> None:
        self._stopped = asyncio.Event()
        app = web.Application(client_max_size=64 * 1024)
        app.router.add_get("/", self.metrics_page)
        app.router.add_get("/metrics", self.metrics_page)
        app.router.add_get("/dashboard", self.to_dashboard)
        app.router.add_get("/dashboard/", self.asset)
        app.router.add_get("/dashboard/{name}", self.asset)
        app.router.add_get("/admin/ws", self.feed)
        api = "/admin/api"
        app.router.add_get(f"{api}/apps", self.guarded(self.apps))
        app.router.add_get(f"{api}/overview", self.guarded(self.overview))
        app.router.add_get(f"{api}/apps/{{app}}/channels", self.guarded(self.channels))
        app.router.add_get(f"{api}/apps/{{app}}/channel", self.guarded(self.channel))
        app.router.add_post(f"{api}/apps/{{app}}/events", self.guarded(self.event))
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self.runner.setup()
        await web.SockSite(self.runner, sock).start()
        self.session = ClientSession(timeout=ClientTimeout(total=10))
        started.set()
        await self._stopped.wait()
        for viewer in list(self.viewers):
            await viewer.ws.close()
        await self.session.close()
        await self.runner.cleanup()

    # --- the broker loop's side ----------------------------------------------------------

    def broker_turn(self, broker: Broker, now: float) -> None:
        """Run by the broker loop each turn: answer requests, relay console switches,
        hand over console records and overview samples. Cheap when idle: a few
        attribute tests."""
        requests = self.requests
        while not requests.empty():
            kind, args, reply = requests.get_nowait()
            try:
                if kind == "channels":
                    answer: Any = channel_page(broker, args["app"], args["prefix"],
                                               args["limit"])
                elif kind == "channel":
                    answer = channel_detail(broker, args["app"], args["channel"])
                else:
                    answer = None
            except Exception:  # a bug: answer nothing rather than stop the broker
                log.exception("admin request %s failed", kind)
                answer = None
            self._to_thread(reply, answer)
        apps = self.console_apps
        if apps != self.told_apps or (apps and now >= self.next_console):
            self.told_apps = apps
            self.next_console = now + CONSOLE_REPEAT
            message = Console(sorted(apps))
            broker.send([(w, message) for w in broker.state.workers])
        if apps:
            hooks = broker.webhooks
            if hooks is not None and hooks.outcomes:
                for outcome in hooks.outcomes:
                    if outcome.get("app") in apps:
                        self.records.append({"type": "webhook", **outcome})
                hooks.outcomes.clear()
        if self.records and now >= self.next_handover:
            self.next_handover = now + HANDOVER_INTERVAL
            records, self.records = self.records, []
            if self.records_left_out:
                records.append({"type": "sampled", "left_out": self.records_left_out,
                                "time_ms": time.time_ns() // 1_000_000, "app": ""})
                self.records_left_out = 0
            self._to_thread(self._console, records)
        if self.watching and now >= self.next_sample:
            self.next_sample = now + SAMPLE_INTERVAL
            from vask.broker.totals import cluster_snapshot

            self._to_thread(self._sample, overview_sample(broker, cluster_snapshot(broker)))

    def take_records(self, records: list[dict[str, Any]]) -> None:
        """A worker's DEBUG message (broker loop)."""
        room = CONSOLE_BUFFER - len(self.records)
        if room < len(records):
            self.records_left_out += len(records) - max(room, 0)
            records = records[:max(room, 0)]
        self.records.extend(records)

    def _to_thread(self, callback: Callable[[Any], None], value: Any) -> None:
        loop = self.loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the admin loop is closing
            loop.call_soon_threadsafe(callback, value)

    # --- the admin thread's side ---------------------------------------------------------

    def _sample(self, sample: dict[str, Any]) -> None:
        self.history.append(sample)
        if self.viewers:
            self._broadcast(orjson.dumps({"type": "sample", "sample": sample}), None)

    def _console(self, records: list[dict[str, Any]]) -> None:
        by_app: dict[str, list[dict[str, Any]]] = {}
        for record in records:
            by_app.setdefault(str(record.get("app", "")), []).append(record)
        for viewer in self.viewers:
            if not viewer.console:
                continue
            mine = by_app.get(viewer.app, []) + by_app.get("", [])
            if mine:
                self._offer(viewer, orjson.dumps({"type": "console", "records": mine}))

    def _broadcast(self, payload: bytes, app: str | None) -> None:
        for viewer in self.viewers:
            if app is None or viewer.app == app:
                self._offer(viewer, payload)

    @staticmethod
    def _offer(viewer: Viewer, payload: bytes) -> None:
        """Queue for one viewer; a viewer that does not keep up loses messages (a
        ``lagging`` note tells its page) instead of growing a queue here."""
        try:
            viewer.queue.put_nowait(payload)
        except asyncio.QueueFull:
            with contextlib.suppress(asyncio.QueueEmpty):
                viewer.queue.get_nowait()
            with contextlib.suppress(asyncio.QueueFull):
                viewer.queue.put_nowait(b'{"type":"lagging"}')

    def _update_console_apps(self) -> None:
        self.console_apps = frozenset(v.app for v in self.viewers if v.console and v.app)
        self.watching = bool(self.viewers)

    async def ask_broker(self, kind: str, args: dict[str, Any]) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()

        def reply(answer: Any) -> None:
            if not future.done():
                future.set_result(answer)

        self.requests.put((kind, args, reply))
        return await asyncio.wait_for(future, BROKER_WAIT)

    # --- HTTP handlers -------------------------------------------------------------------

    def authorized(self, given: str) -> bool:
        return bool(given) and hmac.compare_digest(given.encode(), self.token)

    def guarded(self, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def check(request: web.Request) -> web.StreamResponse:
            header = request.headers.get("Authorization", "")
            scheme, _, given = header.partition(" ")
            if scheme.lower() != "bearer" or not self.authorized(given.strip()):
                return web.json_response(
                    {"error": "admin token required (Authorization: Bearer <admin_token>)"},
                    status=401, headers={"WWW-Authenticate": 'Bearer realm="vask"'})
            return await handler(request)
        return check

    async def metrics_page(self, request: web.Request) -> web.Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        # fresh() waits (up to 2 s) for the broker loop: not on this loop's thread
        body = await asyncio.get_running_loop().run_in_executor(
            None, generate_latest, self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def to_dashboard(self, request: web.Request) -> web.Response:
        raise web.HTTPFound("/dashboard/")

    async def asset(self, request: web.Request) -> web.Response:
        name = request.match_info.get("name", "") or "index.html"
        if name not in ASSETS:
            raise web.HTTPNotFound()
        data = resources.files("vask.dashboard").joinpath(name).read_bytes()
        return web.Response(body=data, headers={
            **_PAGE_HEADERS, "Content-Type": _CONTENT_TYPES[name.rsplit(".", 1)[1]]})

    def _app(self, request: web.Request) -> App:
        app_id = request.match_info["app"]
        for app in self.settings.apps:
            if app.id == app_id:
                return app
        raise web.HTTPNotFound(text='{"error":"no such app"}', content_type="application/json")

    async def apps(self, request: web.Request) -> web.Response:
        return web.json_response({"apps": [
            {"id": app.id, "enabled": app.enabled, "client_events": app.enable_client_messages,
             "webhooks": len(app.webhooks)} for app in self.settings.apps]})

    async def overview(self, request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps({"history": list(self.history)}),
                            content_type="application/json")

    async def channels(self, request: web.Request) -> web.Response:
        app = self._app(request)
        prefix = request.query.get("prefix", "")
        try:
            limit = max(1, min(PAGE_LIMIT, int(request.query.get("limit", "100"))))
        except ValueError:
            limit = 100
        try:
            answer = await self.ask_broker("channels", {"app": app.id, "prefix": prefix,
                                                        "limit": limit})
        except TimeoutError:
            answer = None
        if answer is None:
            return web.json_response({"error": "the broker did not answer"}, status=503)
        return web.Response(body=orjson.dumps(answer), content_type="application/json")

    async def channel(self, request: web.Request) -> web.Response:
        app = self._app(request)
        name = request.query.get("name", "")
        if not name:
            return web.json_response({"error": "name is required"}, status=400)
        try:
            answer = await self.ask_broker("channel", {"app": app.id, "channel": name})
        except TimeoutError:
            answer = None
        if answer is None:
            return web.json_response({"error": "the broker did not answer"}, status=503)
        return web.Response(body=orjson.dumps(answer), content_type="application/json")

    async def event(self, request: web.Request) -> web.Response:
        """The event creator: the page's event, published through the HTTP API."""
        app = self._app(request)
        try:
            form = await request.json()
        except ValueError:
            return web.json_response({"error": "expected a JSON body"}, status=400)
        if not isinstance(form, dict):
            return web.json_response({"error": "expected a JSON object"}, status=400)
        channel, name, data = form.get("channel"), form.get("event"), form.get("data", "")
        # the HTTP API checks the names themselves (and answers why it refuses one)
        if not isinstance(channel, str) or not channel or not isinstance(name, str) or \
                not name or not isinstance(data, str):
            return web.json_response(
                {"error": "channel, event (non-empty strings) and data (a string) are "
                          "required"}, status=400)
        body = orjson.dumps({"name": name, "channel": channel, "data": data})
        target = signed_event_request(app, body, int(time.time()))
        host = local_api_host(self.settings)
        url = f"http://{'[' + host + ']' if ':' in host else host}:{self.settings.port}{target}"
        assert self.session is not None
        try:
            async with self.session.post(url, data=body, headers={
                    "Content-Type": "application/json"}) as response:
                answer = await response.read()
                status = response.status
        except (OSError, TimeoutError) as exc:
            return web.json_response({"error": f"the HTTP API did not answer: {exc}"},
                                     status=502)
        return web.json_response({"status": status, "answer": answer.decode(errors="replace")},
                                 status=200 if status == 200 else 502)

    # --- the live feed -------------------------------------------------------------------

    async def feed(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(heartbeat=30, max_msg_size=4096)
        await ws.prepare(request)
        try:
            first = await ws.receive(timeout=AUTH_WAIT)
        except TimeoutError:
            await ws.close(code=4401, message=b"authenticate first")
            return ws
        token = ""
        if first.type == WSMsgType.TEXT:
            with contextlib.suppress(orjson.JSONDecodeError, AttributeError):
                token = str(orjson.loads(first.data).get("token", ""))
        if not self.authorized(token):
            await ws.close(code=4401, message=b"wrong admin token")
            return ws
        viewer = Viewer(ws)
        self.viewers.add(viewer)
        self._update_console_apps()
        await ws.send_str(orjson.dumps({"type": "hello", "history": list(self.history)}).decode())
        writer = asyncio.get_running_loop().create_task(self._write(viewer))
        try:
            async for message in ws:
                if message.type != WSMsgType.TEXT:
                    continue
                try:
                    command = orjson.loads(message.data)
                except orjson.JSONDecodeError:
                    continue
                if isinstance(command, dict) and command.get("type") == "watch":
                    viewer.app = str(command.get("app", ""))
                    viewer.console = bool(command.get("console"))
                    self._update_console_apps()
        finally:
            self.viewers.discard(viewer)
            self._update_console_apps()
            writer.cancel()
        return ws

    @staticmethod
    async def _write(viewer: Viewer) -> None:
        ws = viewer.ws
        while not ws.closed:
            payload = await viewer.queue.get()
            try:
                await ws.send_str(payload.decode())
            except (ConnectionError, RuntimeError):
                return
