"""The dashboard in a real headless Chromium (Selenium), against a real `vask run`.

What a person would do: sign in (a wrong token first), watch a pusher-js client's
connection appear in the debug console within 2 s, see an HTTP API publish there, send
an event with the event creator and see the pusher-js client receive it, filter the
console, look a presence channel up in the channels view. The pusher-js client runs in
a second tab of the same browser, on a page this test serves (pusher-js from
tests/e2e/node_modules). Each view is saved as a screenshot in docs/dashboard/.

Needs Debian's ``chromium`` and ``chromium-driver`` (the browser cannot come from PyPI
here; ``.ci/run`` installs them), ``selenium`` (the test extras) and the e2e npm
packages. Without them the tests skip with the reason, except in CI, where they fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pusher
import pytest

from tests.pusher_client import PusherClient, close_all
from tests.servers import APP_ID, APP_KEY, APP_SECRET, Server, free_port, in_ci, run_vask

ROOT = Path(__file__).resolve().parents[2]
PUSHER_JS = ROOT / "tests" / "e2e" / "node_modules" / "pusher-js" / "dist" / "web" / \
    "pusher.min.js"
SHOTS = ROOT / "docs" / "dashboard"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
TOKEN = "browser-test-admin-token-42"
#: seconds for things that depend on a busy machine (not the 2 s the issue asks for)
SLOW = 30.0


def _missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    if CHROMIUM is None or DRIVER is None:
        return ("Debian's chromium and chromium-driver are not installed "
                "(apt-get install -y chromium chromium-driver; .ci/run does it)")
    if not PUSHER_JS.is_file():
        return "pusher-js missing: run `npm ci --prefix tests/e2e`"
    return None


MISSING = _missing()
pytestmark = [
    pytest.mark.skipif(MISSING is not None and not in_ci(), reason=str(MISSING)),
    pytest.mark.timeout(240),
]

CLIENT_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>pusher-js client</title>
<script src="pusher.min.js"></script></head>
<body><h1>pusher-js client</h1><p>socket id: <span id="socket-id"></span></p>
<pre id="received"></pre>
<script>
const pusher = new Pusher("%(key)s", {cluster: "local", wsHost: "127.0.0.1", wsPort: %(port)d,
  forceTLS: false, enabledTransports: ["ws"], disableStats: true});
pusher.connection.bind("connected", () => {
  document.getElementById("socket-id").textContent = pusher.connection.socket_id;
});
pusher.subscribe("news").bind_global((event, data) => {
  if (event.startsWith("pusher")) return;
  document.getElementById("received").textContent += event + " " + JSON.stringify(data) + "\\n";
});
</script></body></html>
"""


@contextlib.contextmanager
def client_site(vask_port: int) -> Iterator[int]:
    """A tiny HTTP server for the pusher-js page (loopback, a free port)."""
    page = (CLIENT_PAGE % {"key": APP_KEY, "port": vask_port}).encode()
    script = PUSHER_JS.read_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body, kind = (script, "text/javascript") if self.path.endswith(".js") \
                else (page, "text/html")
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    port = free_port()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield port
    finally:
        httpd.shutdown()
        httpd.server_close()


@contextlib.contextmanager
def chromium() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    assert CHROMIUM is not None and DRIVER is not None
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,900", "--no-first-run", "--disable-extensions",
                "--disable-background-networking", "--disable-background-timer-throttling",
                "--disable-renderer-backgrounding", "--disable-backgrounding-occluded-windows"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def until(check: Callable[[], Any], what: str, within: float = SLOW) -> Any:
    """Poll ``check`` until it returns something true; fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        try:
            value = check()
        except Exception as exc:  # a stale element while the page re-renders
            value, last = None, exc
        else:
            last = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {within}s (last error: {last})")
        time.sleep(0.05)


def console_rows(driver: Any) -> list[list[str]]:
    """The console's rows as text, read in one round trip to the browser (one WebDriver
    call per cell took seconds once the console held the traffic's rows, which the
    2-second check below would have counted against the dashboard)."""
    rows: list[list[str]] = driver.execute_script(
        "return Array.from(document.querySelectorAll('#console-log tbody tr'))"
        ".map(row => Array.from(row.querySelectorAll('td')).map(td => td.innerText));")
    return rows


def shoot(driver: Any, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(SHOTS / f"{name}.png"))


def traffic(server: Server, seconds: float) -> None:
    """Some HTTP API publishes, so the overview's rates and charts have something."""
    api = pusher.Pusher(app_id=APP_ID, key=APP_KEY, secret=APP_SECRET, host="127.0.0.1",
                        port=server.port, ssl=False, timeout=10)
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        api.trigger("news", "tick", {"n": n})
        n += 1
        time.sleep(0.1)


def test_dashboard_in_a_real_browser() -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    admin_port = free_port()
    env = {"VASK_METRICS_PORT": str(admin_port), "VASK_ADMIN_TOKEN": TOKEN}
    with run_vask(workers=2, env=env) as server, client_site(server.port) as site, \
            chromium() as driver:
        dashboard = f"http://127.0.0.1:{admin_port}/dashboard/"
        driver.get(dashboard)
        find = driver.find_element
        # --- sign in: a wrong token is refused, the right one opens the overview
        find(By.ID, "token").send_keys("not-the-admin-token")
        find(By.ID, "login-button").click()
        until(lambda: find(By.ID, "login-error").is_displayed(), "the refusal")
        assert "Wrong admin token" in find(By.ID, "login-error").text
        shoot(driver, "login")
        find(By.ID, "token").clear()
        find(By.ID, "token").send_keys(TOKEN)
        find(By.ID, "login-button").click()
        until(lambda: find(By.ID, "view-overview").is_displayed(), "the overview")
        until(lambda: find(By.ID, "feed-state").text == "live", "the live feed")
        # --- a presence roster and some traffic for the overview
        presence = asyncio.run(join_presence(server))
        try:
            traffic(server, 6.0)
            until(lambda: find(By.ID, "stat-members").text == "2", "members in the overview")
            until(lambda: float(find(By.ID, "stat-api").text.replace(",", "") or 0) > 0,
                  "API calls per second")
            shoot(driver, "overview")
            # --- the debug console: a pusher-js client's connection within 2 s
            find(By.ID, "tab-console").click()
            wait_console_on(driver, server)
            dashboard_tab = driver.current_window_handle
            driver.switch_to.new_window("tab")
            driver.get(f"http://127.0.0.1:{site}/")
            socket_id = until(lambda: find(By.ID, "socket-id").text, "pusher-js connected")
            connected_at = time.monotonic()
            driver.switch_to.window(dashboard_tab)
            until(lambda: any(r[1] == "connect" and r[3] == socket_id
                              for r in console_rows(driver)),
                  "the pusher-js connection in the console", within=2.0)
            assert time.monotonic() - connected_at <= 2.0
            until(lambda: any(r[1] == "subscribe" and r[3] == socket_id and r[4] == "news"
                              for r in console_rows(driver)), "its subscribe")
            # --- an event triggered through the HTTP API shows in the console
            api = pusher.Pusher(app_id=APP_ID, key=APP_KEY, secret=APP_SECRET,
                                host="127.0.0.1", port=server.port, ssl=False, timeout=10)
            api.trigger("news", "triggered-by-test", {"hello": "console"})
            until(lambda: any(r[1] == "api_message" and r[4] == "news"
                              and "triggered-by-test" in r[5] for r in console_rows(driver)),
                  "the triggered event in the console")
            # --- the event creator, received by pusher-js
            find(By.ID, "ec-channel").send_keys("news")
            find(By.ID, "ec-event").send_keys("from-the-dashboard")
            find(By.ID, "ec-data").send_keys('{"n":42}')
            find(By.ID, "ec-send").click()
            until(lambda: "sent" in find(By.ID, "ec-result").text, "the creator's answer")
            until(lambda: any("from-the-dashboard" in r[5] for r in console_rows(driver)),
                  "the creator's event in the console")
            # --- filters: by type, then by channel (each applied as it is changed)
            Select(find(By.ID, "filter-type")).select_by_value("api_message")
            until(lambda: (rows := console_rows(driver)) and all(
                r[1] == "api_message" for r in rows), "only API messages")
            Select(find(By.ID, "filter-type")).select_by_value("")
            find(By.ID, "filter-channel").send_keys("news")
            until(lambda: (rows := console_rows(driver)) and all(
                r[4] == "news" for r in rows) and any(r[1] == "subscribe" for r in rows),
                "only the news channel, of every type")
            find(By.ID, "filter-channel").send_keys("-nothing-like-it")
            until(lambda: not console_rows(driver), "no row for an unknown channel")
            find(By.ID, "filter-channel").clear()
            find(By.ID, "filter-event").send_keys(" ")  # clear() fires no 'input': re-render
            find(By.ID, "filter-event").clear()
            until(lambda: len(console_rows(driver)) >= 5, "the unfiltered console")
            shoot(driver, "console")
            client_tab = next(h for h in driver.window_handles if h != dashboard_tab)
            driver.switch_to.window(client_tab)
            until(lambda: 'from-the-dashboard {"n":42}' in find(By.ID, "received").text,
                  "pusher-js received the creator's event")
            driver.switch_to.window(dashboard_tab)
            # --- the channels view: search by prefix, open a presence roster
            find(By.ID, "tab-channels").click()
            find(By.ID, "channel-prefix").send_keys("presence-")
            find(By.ID, "channel-search").click()
            rows = until(lambda: (found := driver.find_elements(
                By.CSS_SELECTOR, "#channels-table tbody tr")) and [
                    r.get_attribute("data-channel") for r in found] == ["presence-lobby"]
                and found, "only the presence channel")
            row = rows[0]
            assert "1 channel(s)" in find(By.ID, "channel-count").text
            row.click()
            until(lambda: "ada" in find(By.ID, "channel-detail").text, "the roster")
            detail = find(By.ID, "channel-detail").text
            assert "grace" in detail and "2 user(s)" in detail
            shoot(driver, "channels")
        finally:
            asyncio.run(close_all(presence))


async def join_presence(server: Server) -> list[PusherClient]:
    clients = []
    for user, name in (("ada", "Ada Lovelace"), ("grace", "Grace Hopper")):
        client = await PusherClient.connect(server.ws_url)
        frame = await client.subscribe("presence-lobby", json.dumps(
            {"user_id": user, "user_info": {"name": name}}))
        assert frame["event"] == "pusher_internal:subscription_succeeded"
        clients.append(client)
    return clients


def wait_console_on(driver: Any, server: Server) -> None:
    """The console records from a moment after it is opened (the broker relays the
    switch to the workers): probe with throwaway connections until one shows."""

    async def probe() -> str:
        client = await PusherClient.connect(server.ws_url)
        await client.close()
        return client.socket_id

    deadline = time.monotonic() + SLOW
    while True:
        socket_id = asyncio.run(probe())
        try:
            until(lambda sid=socket_id: any(  # type: ignore[misc]
                r[3] == sid for r in console_rows(driver)), "a probe's row", within=2.0)
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise
