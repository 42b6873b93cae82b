"""Configuration reload: what a running cluster may change, and what changed.

The supervisor re-reads the configuration on SIGHUP exactly as at start (the same file,
the same environment, the same command-line flags on top) and validates all of it. A
file that does not validate changes nothing. Otherwise :func:`merge` keeps the settings
that only a restart can change (the listening address, the process layout, sizes baked
into sockets at start) and describes every change in one line each. The supervisor
then hands the result to its children through a file (:func:`write_settings_file`,
:func:`read_settings_file`) and a SIGHUP; each swaps its settings in place.

Connections follow their app by id: :func:`app_verdict` says whether a connection made
under an app may stay (and under which :class:`App` from now on) or must be closed with
the code a connect would have been refused with.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson

from vask.config import App, Settings, load_settings, settings_from_dict, settings_to_dict

#: ``[server]`` keys that need a restart: sockets bound and processes forked with them,
#: the broker's frame size limit and the heartbeat pairing set at start, and the webhook
#: queue's place and size
RESTART_ONLY = (
    "host",
    "port",
    "workers",
    "broker",
    "data_dir",
    "pid_file",
    "max_message_bytes",
    "max_http_body_bytes",
    "heartbeat_interval",
    "heartbeat_timeout",
    "webhook_concurrency",
    "webhook_max_queued",
    "metrics_port",
    "metrics_host",
    "proxy_protocol",
)
#: fields of :class:`Settings` that are not ``[server]`` keys
_NOT_SERVER = ("apps", "default_app", "config_file")

#: close codes (and messages) for a connection whose app is gone; the same as a connect
#: to such an app gets (workers/admission.py)
APP_GONE = (4001, "Application does not exist")
APP_DISABLED = (4003, "Application disabled")


def reload_settings(old: Settings,
                    overrides: Mapping[str, Any] | None = None) -> tuple[Settings, list[str]]:
    """Load and validate the configuration again, then :func:`merge` it into ``old``.
    Raises :class:`~vask.config.ConfigError` when it does not validate."""
    fresh = load_settings(old.config_file or None, overrides=overrides)
    return merge(old, fresh)


def merge(old: Settings, fresh: Settings) -> tuple[Settings, list[str]]:
    """The settings to run with from now on, and one line per change (secrets never
    shown): ``fresh``, except that :data:`RESTART_ONLY` keys keep their ``old`` value."""
    lines: list[str] = []
    kept: dict[str, Any] = {}
    for name in RESTART_ONLY:
        before, after = getattr(old, name), getattr(fresh, name)
        if before != after:
            kept[name] = before
            lines.append(f"server.{name} needs a restart to change "
                         f"(keeping {before!r}, the configuration says {after!r})")
    if bool(old.tls_cert) != bool(fresh.tls_cert):
        # Each worker's listener was created with or without TLS; new paths (or the same
        # paths with a renewed certificate) are re-read on a reload, but switching TLS
        # on or off needs new listeners.
        kept["tls_cert"], kept["tls_key"] = old.tls_cert, old.tls_key
        lines.append("server.tls_cert: turning TLS on or off needs a restart "
                     f"(keeping {'TLS' if old.tls_cert else 'plain TCP'})")
    new = dataclasses.replace(fresh, **kept)
    for field in dataclasses.fields(Settings):
        name = field.name
        if name in RESTART_ONLY or name in _NOT_SERVER:
            continue
        before, after = getattr(old, name), getattr(new, name)
        if before != after:
            lines.append(f"server.{name} changed: {before!r} -> {after!r}")
    lines += app_changes(old.apps, new.apps)
    return new, lines


def app_changes(old: tuple[App, ...], new: tuple[App, ...]) -> list[str]:
    """One line per app added, removed, switched, re-keyed or otherwise changed."""
    before = {app.id: app for app in old}
    after = {app.id: app for app in new}
    lines = [f"app {app_id} added" for app_id in after if app_id not in before]
    lines += [f"app {app_id} removed" for app_id in before if app_id not in after]
    for app_id, was in before.items():
        now = after.get(app_id)
        if now is None or now == was:
            continue
        if was.enabled != now.enabled:
            lines.append(f"app {app_id} {'enabled' if now.enabled else 'disabled'}")
        if was.key != now.key:
            lines.append(f"app {app_id} key changed ({was.key} -> {now.key})")
        if was.secret != now.secret:
            lines.append(f"app {app_id} secret changed")
        others = [f.name for f in dataclasses.fields(App)
                  if f.name not in ("id", "key", "secret", "enabled")
                  and getattr(was, f.name) != getattr(now, f.name)]
        if others:
            lines.append(f"app {app_id} settings changed: {', '.join(others)}")
    return lines


def app_verdict(app: App, current: Mapping[str, App]) -> App | tuple[int, str]:
    """For a connection made under ``app``: the app it belongs to now (``current`` maps
    ids to apps), or the close code and message when it may not stay. A changed key
    counts as the app being gone: the client connected with a key that no longer
    exists."""
    now = current.get(app.id)
    if now is None or now.key != app.key:
        return APP_GONE
    if not now.enabled:
        return APP_DISABLED
    return now


def write_settings_file(path: str, settings: Settings) -> None:
    """Write ``settings`` for the children atomically (a child never reads half)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    Path(tmp).write_bytes(orjson.dumps(settings_to_dict(settings)))
    os.replace(tmp, path)


def read_settings_file(path: str) -> Settings | None:
    """The settings the supervisor last wrote, or ``None`` when it wrote none."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return None
    return settings_from_dict(orjson.loads(data))
