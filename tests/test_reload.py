"""vask/reload.py: what a reload keeps, the lines it logs, and where connections go."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from vask.config import App, ConfigError, Settings, Webhook, load_settings
from vask.reload import (
    APP_DISABLED,
    APP_GONE,
    RESTART_ONLY,
    app_changes,
    app_verdict,
    merge,
    read_settings_file,
    reload_settings,
    write_settings_file,
)

ONE = App(id="1", key="k1", secret="s1")
TWO = App(id="2", key="k2", secret="s2")


def test_restart_only_keys_keep_their_running_value_and_say_so() -> None:
    old = Settings(port=6001, workers=2, activity_timeout=120, apps=(ONE,))
    fresh = Settings(port=7000, workers=4, activity_timeout=60, apps=(ONE,))
    new, lines = merge(old, fresh)
    assert (new.port, new.workers, new.activity_timeout) == (6001, 2, 60)
    assert "server.port needs a restart to change (keeping 6001, the configuration " \
           "says 7000)" in lines
    assert any(line.startswith("server.workers needs a restart") for line in lines)
    assert "server.activity_timeout changed: 120 -> 60" in lines
    assert len(lines) == 3


def test_every_restart_only_name_is_a_setting() -> None:
    names = {f.name for f in dataclasses.fields(Settings)}
    assert set(RESTART_ONLY) <= names


def test_app_changes_one_line_each_and_no_secret_shown() -> None:
    old = (ONE, TWO, App(id="3", key="k3", secret="s3"))
    new = (
        dataclasses.replace(ONE, secret="new-secret", max_connections=5),
        dataclasses.replace(TWO, enabled=False, key="k2b"),
        App(id="4", key="k4", secret="s4"),
    )
    lines = app_changes(old, new)
    assert lines == [
        "app 4 added",
        "app 3 removed",
        "app 1 secret changed",
        "app 1 settings changed: max_connections",
        "app 2 disabled",
        "app 2 key changed (k2 -> k2b)",
    ]
    assert not any("new-secret" in line for line in lines)


def test_an_unchanged_configuration_gives_no_lines() -> None:
    old = Settings(apps=(ONE, TWO))
    assert merge(old, Settings(apps=(ONE, TWO))) == (old, [])


def test_app_verdict_follows_the_app_by_id() -> None:
    assert app_verdict(ONE, {"2": TWO}) == APP_GONE
    assert app_verdict(ONE, {"1": dataclasses.replace(ONE, key="other")}) == APP_GONE
    assert app_verdict(ONE, {"1": dataclasses.replace(ONE, enabled=False)}) == APP_DISABLED
    rekeyed = dataclasses.replace(ONE, secret="fresh")
    assert app_verdict(ONE, {"1": rekeyed}) is rekeyed
    assert APP_GONE[0] == 4001 and APP_DISABLED[0] == 4003


def test_settings_file_round_trip(tmp_path: Path) -> None:
    path = str(tmp_path / "settings.json")
    assert read_settings_file(path) is None
    settings = Settings(apps=(dataclasses.replace(
        ONE, cors_origins=("https://a",),
        webhooks=(Webhook("https://h", headers={"X-A": "b"}),)),), drain_window=3.5)
    write_settings_file(path, settings)
    assert read_settings_file(path) == settings


def test_reload_uses_the_same_file_and_flags(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("VASK_")]:
        monkeypatch.delenv(name)
    path = tmp_path / "vask.toml"
    path.write_text('[server]\nport = 7001\n[[apps]]\nid = "1"\nkey = "k1"\nsecret = "s1"\n')
    flags = {"port": 7002, "host": None}
    old = load_settings(str(path), overrides=flags)
    path.write_text('[server]\nport = 7003\nactivity_timeout = 30\n'
                    '[[apps]]\nid = "1"\nkey = "k1"\nsecret = "s1"\n'
                    '[[apps]]\nid = "2"\nkey = "k2"\nsecret = "s2"\n')
    new, lines = reload_settings(old, flags)
    assert new.port == 7002  # the flag still wins; the file's change is not even seen
    assert new.activity_timeout == 30
    assert [a.id for a in new.apps] == ["1", "2"]
    assert lines == ["server.activity_timeout changed: 120 -> 30", "app 2 added"]
    path.write_text("[server\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        reload_settings(new, flags)


def test_new_server_keys_are_validated() -> None:
    with pytest.raises(ConfigError, match="drain_window"):
        load_settings(None, env={"VASK_DRAIN_WINDOW": "-1"})
    with pytest.raises(ConfigError, match="stop_ready_delay"):
        load_settings(None, env={"VASK_STOP_READY_DELAY": "5000"})
    settings = load_settings(None, env={"VASK_PID_FILE": "/run/vask.pid"})
    assert (settings.drain_window, settings.stop_ready_delay, settings.pid_file) == \
        (10.0, 2.0, "/run/vask.pid")
