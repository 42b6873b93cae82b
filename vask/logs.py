"""Logging setup shared by every Vask process: one line per record, role and pid."""

from __future__ import annotations

import logging
import os
import sys


def setup_logging(level: str, role: str) -> None:
    """Configure the root logger for this process (``role`` is supervisor/broker/worker-N)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        f"%(asctime)s {role}[{os.getpid()}] %(levelname)s %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("websockets").setLevel(logging.WARNING)
