"""Logging setup shared by every Vask process: one line per record, role and pid.

Two formats (``[server] log_format``): ``text`` for people reading a terminal or the
journal, and ``json`` for log collectors: one JSON object per line, with the same facts
as fields, so nothing has to parse the text.
"""

from __future__ import annotations

import logging
import os
import sys
import time

import orjson


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601 with milliseconds), level, role,
    pid, logger, message, and the traceback text as ``exception`` when there is one."""

    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        out = {
            "time": f"{stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "role": self.role,
            "pid": record.process,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exception"] = record.exc_text
        # orjson escapes newlines inside strings, so a record stays one line
        return orjson.dumps(out).decode()


def setup_logging(level: str, role: str, fmt: str = "text") -> None:
    """Configure the root logger for this process (``role`` is supervisor/broker/worker-N,
    ``fmt`` is text or json)."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(role))
    else:
        handler.setFormatter(logging.Formatter(
            f"%(asctime)s {role}[{os.getpid()}] %(levelname)s %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("websockets").setLevel(logging.WARNING)
