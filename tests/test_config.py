"""Configuration: defaults, file + env + flag precedence, and one clear error per problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from vask.config import (
    ConfigError,
    load_settings,
    settings_from_dict,
    settings_to_dict,
    warnings_for,
)


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "vask.toml"
    path.write_text(text)
    return str(path)


def test_defaults_give_one_working_app() -> None:
    settings = load_settings(env={})
    assert settings.port == 6001
    assert settings.activity_timeout == 120
    assert settings.default_app
    (app,) = settings.apps
    assert (app.id, app.key, app.secret) == ("1", "app-key", "app-secret")
    assert app.enabled and app.enable_client_messages


def test_default_app_credentials_from_env() -> None:
    settings = load_settings(env={"VASK_APP_ID": "42", "VASK_APP_KEY": "k",
                                  "VASK_APP_SECRET": "s"})
    (app,) = settings.apps
    assert (app.id, app.key, app.secret) == ("42", "k", "s")


def test_precedence_file_then_env_then_flags(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nport = 7000\nworkers = 3\nhost = '10.0.0.1'\n")
    settings = load_settings(path, env={"VASK_PORT": "7001", "VASK_WORKERS": "4"},
                             overrides={"port": 7002, "host": None})
    assert settings.port == 7002  # flag beats env beats file
    assert settings.workers == 4  # env beats file
    assert settings.host == "10.0.0.1"  # file beats default; flag not given


def test_apps_from_file(tmp_path: Path) -> None:
    path = write(tmp_path, """
[[apps]]
id = "7"
key = "k7"
secret = "s7"
max_connections = 10
enable_client_messages = false
max_event_payload_kb = 100
webhooks = [{url = "http://127.0.0.1:9/hook", event_types = ["channel_occupied"]}]
""")
    settings = load_settings(path, env={})
    (app,) = settings.apps
    assert app.max_connections == 10
    assert app.max_event_payload_bytes == 100 * 1024
    assert app.webhooks[0].event_types == ("channel_occupied",)
    assert not settings.default_app


@pytest.mark.parametrize(
    "text, key",
    [
        ("[server]\nport = 70000\n", "server.port"),
        ("[server]\nport = 'abc'\n", "server.port"),
        ("[server]\nnope = 1\n", "server.nope"),
        ("[server]\nlog_level = 'loud'\n", "server.log_level"),
        ("[server]\nbroker = 'udp://x'\n", "server.broker"),
        ("[[apps]]\nid='1'\nkey='k'\n", "apps[0].secret"),
        ("[[apps]]\nid='1'\nkey='k'\nsecret='s'\nmax_connections=-1\n", "apps[0].max_connections"),
        ("[[apps]]\nid='1'\nkey='k'\nsecret='s'\nenabled='maybe'\n", "apps[0].enabled"),
        ("[[apps]]\nid='1'\nkey='k'\nsecret='s'\ncolour='red'\n", "apps[0].colour"),
        ("[[apps]]\nid='1'\nkey='k'\nsecret='s'\n[[apps]]\nid='2'\nkey='k'\nsecret='t'\n",
         "apps[1].key"),
        ("[[apps]]\nid='1'\nkey='k'\nsecret='s'\nwebhooks=[{url='ftp://x'}]\n",
         "apps[0].webhooks[0].url"),
        ("[[apps]]\nid='1'\nkey='k'\nsecret='s'\nwebhooks=[{url='http://x', event_types=['x']}]\n",
         "apps[0].webhooks[0].event_types"),
        ("not toml =", "not valid TOML"),
    ],
)
def test_invalid_config_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, text), env={})
    assert key in str(info.value)


def test_invalid_env_value_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="VASK_WORKERS"):
        load_settings(env={"VASK_WORKERS": "many"})


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings("/nonexistent/vask.toml", env={})


def test_non_numeric_app_id_is_warned_about(tmp_path: Path) -> None:
    path = write(tmp_path, "[[apps]]\nid='my-app'\nkey='k'\nsecret='s'\n")
    assert any("pusher-http-python" in w for w in warnings_for(load_settings(path, env={})))


def test_round_trip_through_plain_data(tmp_path: Path) -> None:
    path = write(tmp_path, "[[apps]]\nid='1'\nkey='k'\nsecret='s'\n"
                           "webhooks=[{url='http://127.0.0.1:1/h', headers={X='1'}}]\n")
    settings = load_settings(path, env={})
    assert settings_from_dict(settings_to_dict(settings)) == settings


def test_connection_subscription_limits_default_and_from_file(tmp_path: Path) -> None:
    (default,) = load_settings(env={}).apps
    assert default.max_channels_per_connection == 200
    assert default.max_subscriptions_per_second == 10
    path = write(tmp_path, "[[apps]]\nid='1'\nkey='k'\nsecret='s'\n"
                           "max_channels_per_connection = 0\n"
                           "max_subscriptions_per_second = 25\n")
    settings = load_settings(path, env={})
    (app,) = settings.apps
    assert (app.max_channels_per_connection, app.max_subscriptions_per_second) == (0, 25)
    assert settings_from_dict(settings_to_dict(settings)) == settings


@pytest.mark.parametrize("key", ["max_channels_per_connection", "max_subscriptions_per_second"])
@pytest.mark.parametrize(("value", "problem"), [
    ("-1", "must be 0 (unlimited) or more"), ("1.5", "expected int"), ("true", "expected int"),
    ("'ten'", "expected int"),
])
def test_connection_subscription_limits_are_validated(tmp_path: Path, key: str, value: str,
                                                      problem: str) -> None:
    path = write(tmp_path, f"[[apps]]\nid='1'\nkey='k'\nsecret='s'\n{key} = {value}\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    assert str(info.value).startswith(f"apps[0].{key}: ")
    assert problem in str(info.value)
