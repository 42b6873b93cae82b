"""The effective configuration as data, TOML or JSON, with every secret masked
(``vask config check``).

What is printed is what ``vask run`` would use after defaults, the file, the environment
and flags are merged, written back in the file's own layout (``[server]``, ``[[apps]]``,
``[[apps.webhooks]]``), so the output is itself a valid configuration file once the
masked values are filled in again. Masked: app secrets, the values of custom webhook
headers (they usually carry tokens) and any password in a webhook URL.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from vask.config import _SERVER_KEYS, App, Settings, Webhook

MASK = "********"


def masked(settings: Settings) -> dict[str, Any]:
    """``{"server": {...}, "apps": [...]}`` with secrets replaced by :data:`MASK`."""
    server = {name: _plain(getattr(settings, name)) for name in _SERVER_KEYS}
    return {"server": server, "apps": [_app(app) for app in settings.apps]}


def _app(app: App) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(App):
        value = getattr(app, f.name)
        if f.name == "secret":
            out["secret"] = MASK
        elif f.name == "webhooks":
            out["webhooks"] = [_webhook(w) for w in value]
        else:
            out[f.name] = _plain(value)
    return out


def _webhook(hook: Webhook) -> dict[str, Any]:
    out: dict[str, Any] = {"url": _mask_url(hook.url),
                           "event_types": list(hook.event_types),
                           "headers": {name: MASK for name in hook.headers}}
    filters = {name: getattr(hook, name)
               for name in ("channel_name_starts_with", "channel_name_ends_with")
               if getattr(hook, name)}
    if filters:
        out["filter"] = filters
    return out


def _mask_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:{MASK}@{host}"))


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def dump_json(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2) + "\n"


def dump_toml(data: dict[str, Any]) -> str:
    """A TOML writer for exactly this shape (tables of scalars, string lists, string
    tables, arrays of tables): small enough not to need a dependency."""
    lines = ["[server]"]
    lines += [f"{name} = {_toml_value(value)}" for name, value in data["server"].items()]
    for app in data["apps"]:
        lines += ["", "[[apps]]"]
        lines += [f"{name} = {_toml_value(value)}" for name, value in app.items()
                  if name != "webhooks"]
        for hook in app["webhooks"]:
            lines += ["", "[[apps.webhooks]]"]
            lines += [f"{name} = {_toml_value(value)}" for name, value in hook.items()]
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}"
                                for k, v in value.items()) + " }"
    raise TypeError(f"no TOML form for {value!r}")
