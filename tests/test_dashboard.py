"""The dashboard's parts without sockets: the workers' debug recorder (off unless asked,
bounded and sampled when on, off again by itself), the broker's side of the admin
listener (console switch relayed to workers, records bounded, channel pages) and the
admin token rules."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

import orjson
import pytest

from vask import envelope
from vask.broker import admin as admin_module
from vask.broker.admin import AdminServer, channel_page, signed_event_request
from vask.broker.metrics import MetricsServer
from vask.broker.server import Broker
from vask.broker.state import ChannelState, WorkerInfo
from vask.config import App, ConfigError, Settings, load_settings
from vask.envelope import Console, Debug, Publish, Subscribe, Unsubscribe, Verb
from vask.metrics import WorkerMetrics
from vask.session import Ask, Bind, Send, Tell
from vask.signing import body_md5, http_string_to_sign, sign
from vask.workers import console as console_module
from vask.workers.console import PER_WINDOW, ConsoleRecorder

# --- the workers' recorder -----------------------------------------------------------------


def conn(socket_id: str = "1.1", app_id: str = "1") -> Any:
    return SimpleNamespace(app_id=app_id, socket_id=socket_id)


async def _recorder() -> tuple[ConsoleRecorder, WorkerMetrics, list[Verb]]:
    sent: list[Verb] = []
    metrics = WorkerMetrics(["1", "2"])
    return ConsoleRecorder(metrics, 3, sent.append, heartbeat_interval=0.05), metrics, sent


def test_nothing_is_hung_on_the_hot_path_until_the_broker_asks() -> None:
    async def main() -> None:
        recorder, metrics, sent = await _recorder()
        assert all(stats.console is None for stats in metrics.apps.values())
        assert metrics.unknown.console is None
        recorder.watch(["1", "not-an-app"])
        assert metrics.apps["1"].console is recorder
        assert metrics.apps["2"].console is None and metrics.unknown.console is None
        assert recorder.apps == {"1"}
        recorder.watch([])
        assert all(stats.console is None for stats in metrics.apps.values())
        await asyncio.sleep(0.3)
        assert sent == []

    asyncio.run(main())


def test_records_of_what_clients_do_leave_in_one_debug_message() -> None:
    async def main() -> None:
        recorder, _, sent = await _recorder()
        recorder.watch(["1"])
        c = conn()
        recorder.connection("connect", c)
        payload = b'{"event":"client-move","channel":"private-game","data":"{\\"x\\":1}"}'
        recorder.actions(c, [
            Ask(Subscribe(0, "1", "presence-room", "1.1", ["u7", {"n": 1}], 0)),
            Tell(Unsubscribe("1", "news", "1.1")),
            Tell(Publish("1", "private-game", "1.1", 0.0, payload, local_first=True)),
            Send(b'{"event":"pusher:subscription_error","channel":"private-x","data":'
                 b'{"type":"AuthError","error":"bad signature","status":401}}'),
            Send(b'{"event":"pusher_internal:subscription_succeeded","channel":"n","data":"{}"}'),
            Bind("news", True),
        ])
        recorder.error(c, 4009, "Connection not authorized")
        recorder.api_publishes([Publish("1", "news", "", 0.0,
                                        b'{"event":"hello","channel":"news","data":"' +
                                        b"x" * 1000 + b'"}')])
        recorder.connection("disconnect", c)
        assert sent == []  # gathered for one window
        await asyncio.sleep(console_module.WINDOW + 0.2)
        assert len(sent) == 1 and isinstance(sent[0], Debug)
        records = sent[0].records
        assert [r["type"] for r in records] == [
            "connect", "subscribe", "unsubscribe", "client_event", "error", "error",
            "api_message", "disconnect"]
        assert all(r["worker"] == 3 and r["app"] == "1" and r["time_ms"] > 0 for r in records)
        assert records[1]["user_id"] == "u7" and records[1]["channel"] == "presence-room"
        assert records[3]["event"] == "client-move" and records[3]["socket_id"] == "1.1"
        assert records[4]["code"] == 401 and "bad signature" in records[4]["message"]
        assert records[4]["channel"] == "private-x"
        assert records[5]["code"] == 4009
        assert len(records[6]["data"]) <= console_module.DATA_CHARS + 1  # cut, with a mark
        # what travels is a valid envelope message
        assert envelope.decode(envelope.encode(sent[0])) == sent[0]

    asyncio.run(main())


def test_a_flood_is_sampled_one_window_at_a_time() -> None:
    async def main() -> None:
        recorder, _, sent = await _recorder()
        recorder.watch(["1"])
        for i in range(PER_WINDOW + 150):
            recorder.connection("connect", conn(f"1.{i}"))
        await asyncio.sleep(console_module.WINDOW + 0.2)
        assert len(sent) == 1
        records = sent[0].records  # type: ignore[attr-defined]
        assert len(records) == PER_WINDOW + 1
        assert records[-1] == {"type": "sampled", "app": "1", "left_out": 150, "worker": 3,
                               "time_ms": records[-1]["time_ms"]}
        assert len(records) <= envelope.MAX_DEBUG_RECORDS
        # the next window starts afresh
        recorder.connection("connect", conn("1.999"))
        await asyncio.sleep(console_module.WINDOW + 0.2)
        assert len(sent) == 2 and len(sent[1].records) == 1  # type: ignore[attr-defined]

    asyncio.run(main())


def test_recording_stops_by_itself_when_the_broker_falls_silent() -> None:
    async def main() -> None:
        recorder, metrics, _ = await _recorder()
        recorder.watch(["1"])
        # told again within the window: stays on
        for _ in range(4):
            await asyncio.sleep(0.06)
            recorder.watch(["1"])
        assert metrics.apps["1"].console is recorder
        deadline = time.monotonic() + 10
        while metrics.apps["1"].console is not None:
            assert time.monotonic() < deadline, "the recorder never switched itself off"
            await asyncio.sleep(0.02)
        assert recorder.apps == frozenset() and recorder.expire_handle is None

    asyncio.run(main())


# --- the broker's side -------------------------------------------------------------------


class FakeLoop:
    """Stands in for the admin thread's loop: collects what the broker hands over."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, Any]] = []

    def call_soon_threadsafe(self, callback: Any, value: Any) -> None:
        self.calls.append((callback, value))


def _admin(broker: Broker) -> tuple[AdminServer, FakeLoop]:
    admin = AdminServer(broker.settings, MetricsServer())
    loop = FakeLoop()
    admin.loop = loop  # type: ignore[assignment]
    broker.admin = admin
    for name in (b"w1", b"w2"):
        broker.state.workers[name] = WorkerInfo(name, f"host:1:{name[-1:].decode()}:1", 1, 1,
                                                time.monotonic())
    return admin, loop


def _sent(broker: Broker) -> dict[bytes, list[Verb]]:
    out = {w: [envelope.decode(frames) for frames in box] for w, box in broker.outboxes.items()}
    broker.outboxes = {}
    return out


def test_the_console_switch_reaches_every_worker_while_it_is_on(broker: Broker) -> None:
    admin, _ = _admin(broker)
    now = time.monotonic()
    admin.broker_turn(broker, now)
    assert _sent(broker) == {}  # nobody watches: nothing is sent
    admin.console_apps = frozenset({"1"})
    admin.broker_turn(broker, now)
    assert _sent(broker) == {b"w1": [Console(["1"])], b"w2": [Console(["1"])]}
    admin.broker_turn(broker, now + 0.1)
    assert _sent(broker) == {}  # not every turn
    admin.broker_turn(broker, now + admin_module.CONSOLE_REPEAT + 0.01)
    assert _sent(broker) == {b"w1": [Console(["1"])], b"w2": [Console(["1"])]}
    admin.console_apps = frozenset()
    admin.broker_turn(broker, now + 5)
    assert _sent(broker) == {b"w1": [Console([])], b"w2": [Console([])]}
    admin.broker_turn(broker, now + 10)
    assert _sent(broker) == {}


def test_worker_records_are_bounded_and_handed_over(broker: Broker) -> None:
    admin, loop = _admin(broker)
    admin.next_sample = float("inf")
    record = {"type": "connect", "app": "1", "socket_id": "1.1"}
    broker.handle([b"w1", *envelope.encode(Debug([record] * 3))], time.monotonic())
    assert admin.records == [record] * 3
    admin.take_records([record] * admin_module.CONSOLE_BUFFER)
    assert len(admin.records) == admin_module.CONSOLE_BUFFER
    assert admin.records_left_out == 3
    admin.broker_turn(broker, time.monotonic())
    assert admin.records == [] and len(loop.calls) == 1
    handed = loop.calls[0][1]
    assert len(handed) == admin_module.CONSOLE_BUFFER + 1
    assert handed[-1]["type"] == "sampled" and handed[-1]["left_out"] == 3


def test_webhook_outcomes_join_the_console_only_for_watched_apps(broker: Broker) -> None:
    admin, loop = _admin(broker)
    admin.next_sample = float("inf")
    hooks = SimpleNamespace(outcomes=[{"app": "1", "outcome": "sent", "url": "http://x"},
                                      {"app": "2", "outcome": "retry", "url": "http://y"}])
    broker.webhooks = hooks  # type: ignore[assignment]
    admin.broker_turn(broker, time.monotonic())
    assert loop.calls == [] and len(hooks.outcomes) == 2  # kept (bounded) while unwatched
    admin.console_apps = frozenset({"1"})
    admin.broker_turn(broker, time.monotonic())
    assert loop.calls[-1][1] == [{"type": "webhook", "app": "1", "outcome": "sent",
                                  "url": "http://x"}]
    assert hooks.outcomes == []
    broker.webhooks = None


def test_overview_sample_per_app_and_per_worker(broker: Broker) -> None:
    admin, loop = _admin(broker)
    snapshot = {"counters": {"vask_http_calls_received": {"1": 4}, "vask_process_cpu_ms":
                             {"": 250}},
                "gauges": {"vask_connected": {"1": 2}, "vask_process_rss_bytes": {"": 123},
                           "vask_worker_queue_depth": {"": 1}}}
    broker.totals.update(b"w1", snapshot)
    broker.restarts_by_slot["1"] = 2
    broker.state.channels[("1", "presence-a")] = ChannelState(
        [b"w1", 2], 2, {"u1": {"1.1": {}}, "u2": {"1.2": {}}})
    admin.broker_turn(broker, time.monotonic())
    assert loop.calls == []  # no page connected: no sample (each walks every channel)
    admin.watching = True
    admin.broker_turn(broker, time.monotonic())
    sample = loop.calls[-1][1]
    assert sample["apps"]["1"]["connections"] == 2
    assert sample["apps"]["1"]["vask_http_calls_received"] == 4
    assert sample["apps"]["1"]["channels"] == 1 and sample["apps"]["1"]["members"] == 2
    w1 = next(w for w in sample["workers"] if w["name"].endswith(":1:1"))
    assert w1 == {"name": "host:1:1:1", "slot": "1", "pid": "1", "connections": 2,
                  "cpu_ms": 250, "rss": 123, "queue_depth": 1, "restarts": 2}
    assert sample["broker"]["rss"] > 0
    orjson.dumps(sample)  # it travels as JSON


def test_channel_pages_are_bounded_sorted_and_by_prefix(broker: Broker) -> None:
    channels = broker.state.channels
    for name in ("b", "a", "presence-z", "presence-y", "c", "#server-to-user-1"):
        channels[("1", name)] = ChannelState([b"w", 1], 1,
                                             {"u": {}} if name.startswith("presence") else None)
    channels[("2", "a-other-app")] = ChannelState([b"w", 1], 1)
    page = channel_page(broker, "1", "", 2)
    assert page == {"matched": 5, "channels": [{"name": "a", "subscriptions": 1},
                                               {"name": "b", "subscriptions": 1}]}
    page = channel_page(broker, "1", "presence-", 10)
    assert page["matched"] == 2
    assert [c["name"] for c in page["channels"]] == ["presence-y", "presence-z"]
    assert page["channels"][0]["users"] == 1


def test_the_event_creator_signs_like_an_api_client() -> None:
    app = App(id="7", key="the-key", secret="the-secret")
    body = b'{"name":"e","channel":"c","data":"d"}'
    target = signed_event_request(app, body, 1_700_000_000)
    path, _, query = target.partition("?")
    params = dict(pair.split("=", 1) for pair in query.split("&"))
    assert path == "/apps/7/events" and params["body_md5"] == body_md5(body)
    expected = sign("the-secret", http_string_to_sign(
        "POST", path, [(k, v) for k, v in params.items()]))
    assert params["auth_signature"] == expected


# --- configuration -------------------------------------------------------------------------


def test_admin_token_rules() -> None:
    assert load_settings(env={}).admin_token == ""
    token = "a-long-enough-admin-token"
    assert load_settings(env={"VASK_ADMIN_TOKEN": token}).admin_token == token
    with pytest.raises(ConfigError, match="admin_token"):
        load_settings(env={"VASK_ADMIN_TOKEN": "short"})
    with pytest.raises(ConfigError, match="admin_token"):
        load_settings(env={"VASK_ADMIN_TOKEN": "x" * 20, "VASK_APP_SECRET": "x" * 20})
    assert Settings().admin_token == ""
