"""The webhooks scenario's server side: the Vask config it writes, the placeholders in
``--server-cmd``, and the churn's frames and pacing (with fake connections)."""

from __future__ import annotations

import asyncio
import shlex
from pathlib import Path
from typing import Any, cast

import orjson

from vask.bench.cli import KEY_METRICS
from vask.bench.webhooks import (
    churn_channels,
    churn_frames,
    stamp_of,
    substitute_webhook_placeholders,
    webhook_config_toml,
)
from vask.config import load_settings, wants_webhooks


def test_config_is_a_valid_vask_config_with_the_app_and_one_endpoint(tmp_path: Path) -> None:
    secret = 'se"cr\\et \u00e9'  # quotes, a backslash and non-ASCII survive the quoting
    path = tmp_path / "vask.toml"
    path.write_text(webhook_config_toml("app-id", "app-key", secret,
                                        "http://127.0.0.1:17001/webhooks", 0.0,
                                        str(tmp_path / "data dir")))
    settings = load_settings(str(path), env={})
    assert wants_webhooks(settings)
    assert settings.data_dir == str(tmp_path / "data dir")
    (app,) = settings.apps
    assert (app.id, app.key, app.secret) == ("app-id", "app-key", secret)
    assert app.enable_client_messages
    assert app.webhook_leave_delay == 0.0
    (hook,) = app.webhooks
    assert hook.url == "http://127.0.0.1:17001/webhooks"
    assert hook.event_types == ("channel_occupied", "channel_vacated")


def test_config_takes_the_leave_delay(tmp_path: Path) -> None:
    path = tmp_path / "vask.toml"
    path.write_text(webhook_config_toml("1", "k", "s", "http://127.0.0.1:1/", 2.5, "d"))
    assert load_settings(str(path), env={}).apps[0].webhook_leave_delay == 2.5


def test_placeholders_are_replaced_and_the_path_quoted() -> None:
    cmd = ("X='[{\"url\":\"{webhook_url}\"}]' PORT={port} run --config {webhook_config} "
           "--hook {webhook_url}")
    out = substitute_webhook_placeholders(cmd, "http://127.0.0.1:17002/webhooks",
                                          "/tmp/a b/vask.toml")
    assert "{webhook" not in out
    assert out.count("http://127.0.0.1:17002/webhooks") == 2
    assert "{port}" in out  # left for the server's own port substitution
    words = shlex.split(out)
    assert words[words.index("--config") + 1] == "/tmp/a b/vask.toml"
    assert substitute_webhook_placeholders("vask run --port {port}", "u", "p") == \
        "vask run --port {port}"


def test_churn_frames_are_subscribe_then_unsubscribe_of_one_channel() -> None:
    sub, unsub = churn_frames("wh-1-2-3")
    assert orjson.loads(sub) == {"event": "pusher:subscribe",
                                 "data": {"channel": "wh-1-2-3", "auth": ""}}
    assert orjson.loads(unsub) == {"event": "pusher:unsubscribe",
                                   "data": {"channel": "wh-1-2-3"}}


class FakeConn:
    def __init__(self, index: int) -> None:
        self.index = index
        self.sent: list[dict[str, Any]] = []

    def send_text(self, payload: bytes) -> None:
        self.sent.append(orjson.loads(payload))


def test_churn_sends_rate_times_duration_fresh_stamped_channels_round_robin() -> None:
    conns = [FakeConn(i) for i in (10, 11, 12)]
    res = asyncio.run(churn_channels(cast(Any, conns), 400.0, 0.1, 0.0, lambda: False))
    assert res["channels"] == 40
    names = []
    for c in conns:
        assert len(c.sent) in (26, 28)  # 40 channels over 3 connections, 2 frames each
        for sub, unsub in zip(c.sent[::2], c.sent[1::2], strict=True):
            assert sub["event"] == "pusher:subscribe"
            assert unsub["event"] == "pusher:unsubscribe"
            ch = sub["data"]["channel"]
            assert unsub["data"]["channel"] == ch
            assert ch.split("-")[2] == str(c.index)
            stamp = stamp_of(ch)
            assert stamp is not None and res["t_begin"] <= stamp <= res["t_end"]
            names.append(ch)
    assert len(set(names)) == 40


def test_open_ended_churn_runs_until_stopped() -> None:
    async def main() -> dict[str, Any]:
        stop = False
        task = asyncio.ensure_future(
            churn_channels(cast(Any, [FakeConn(0)]), 1000.0, 0, 0.0, lambda: stop))
        await asyncio.sleep(0.2)
        assert not task.done()
        stop = True
        return await asyncio.wait_for(task, 5)

    assert asyncio.run(main())["channels"] > 0


def test_compare_knows_the_webhooks_scenario() -> None:
    paths = [p for p, _ in KEY_METRICS["webhooks"]]
    assert "webhook_events_per_s" in paths and "fanout_churn_ratio" in paths
