"""A webhook receiver for tests: an HTTP server on 127.0.0.1 in a thread.

Every POST is checked with pusher-http-python's own ``validate_webhook`` (signature,
key, ``time_ms`` age) before it counts; the raw requests are kept too, so the Node SDK
can check them afterwards (tests/e2e/webhook_check.mjs). The test sets how it answers:
``ok`` (200), ``fail`` (500), ``slow`` (answers after ``slow_seconds``, past the
sender's timeout), or takes it down (:meth:`down`: the port refuses connections) and
back up (:meth:`up`, same port).
"""

from __future__ import annotations

import contextlib
import http.server
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pusher

from tests.servers import APP_ID, APP_KEY, APP_SECRET, free_port


@dataclass
class Delivery:
    """One accepted POST."""

    at: float  # time.monotonic() when it arrived
    headers: dict[str, str]
    body: bytes
    events: list[dict[str, Any]]


class Receiver:
    def __init__(self, key: str = APP_KEY, secret: str = APP_SECRET) -> None:
        self.port = free_port()
        self.sdk = pusher.Pusher(app_id=APP_ID, key=key, secret=secret)
        self.key = key
        self.mode = "ok"
        self.slow_seconds = 8.0
        self.deliveries: list[Delivery] = []
        #: every request, whatever was answered: (mode, monotonic time)
        self.attempts: list[tuple[str, float]] = []
        #: requests that failed the SDK's check (must stay empty)
        self.invalid: list[tuple[dict[str, str], bytes]] = []
        self.lock = threading.Lock()
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/pusher/webhooks"

    # --- running --------------------------------------------------------------------

    def up(self) -> None:
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                receiver._handle(self, dict(self.headers.items()), body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, daemon=True)
        self._thread.start()

    def down(self) -> None:
        """Stop listening: connections to the port are refused until :meth:`up`."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def _handle(self, handler: http.server.BaseHTTPRequestHandler, headers: dict[str, str],
                body: bytes) -> None:
        mode = self.mode
        with self.lock:
            self.attempts.append((mode, time.monotonic()))
        if mode == "slow":
            time.sleep(self.slow_seconds)
            mode = "fail"
        if mode == "fail":
            self._answer(handler, 500, b"receiver failing on purpose")
            return
        lowered = {k.lower(): v for k, v in headers.items()}
        checked = self.sdk.validate_webhook(
            key=lowered.get("x-pusher-key", ""),
            signature=lowered.get("x-pusher-signature", ""), body=body.decode())
        with self.lock:
            if checked is None or lowered.get("content-type") != "application/json":
                self.invalid.append((headers, body))
            else:
                self.deliveries.append(Delivery(time.monotonic(), headers, body,
                                                list(checked["events"])))
        self._answer(handler, 200, b"{}")

    @staticmethod
    def _answer(handler: http.server.BaseHTTPRequestHandler, status: int, body: bytes) -> None:
        with contextlib.suppress(OSError):
            handler.send_response(status)
            handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            handler.wfile.write(body)

    # --- looking at what came -------------------------------------------------------

    def events(self, match: Callable[[dict[str, Any]], bool] = lambda e: True
               ) -> list[dict[str, Any]]:
        with self.lock:
            return [e for d in self.deliveries for e in d.events if match(e)]

    def timed_events(self) -> list[tuple[float, dict[str, Any]]]:
        with self.lock:
            return [(d.at, e) for d in self.deliveries for e in d.events]

    def wait(self, match: Callable[[dict[str, Any]], bool], count: int = 1,
             timeout: float = 20.0) -> list[dict[str, Any]]:
        """Wait until at least ``count`` received events match; return them."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.events(match)
            if len(found) >= count:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(found)} of {count} webhook events after "
                                     f"{timeout}s; received: {self.events()}")
            time.sleep(0.05)

    def raw(self) -> list[dict[str, Any]]:
        """The accepted requests as plain data (for the Node SDK's check)."""
        with self.lock:
            return [{"headers": d.headers, "body": d.body.decode()} for d in self.deliveries]

    def dump(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.raw(), f)


@contextlib.contextmanager
def receiving(**kwargs: Any) -> Iterator[Receiver]:
    receiver = Receiver(**kwargs)
    receiver.up()
    try:
        yield receiver
    finally:
        receiver.mode = "ok"
        receiver.down()
