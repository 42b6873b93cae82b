"""End-to-end: clients nobody here wrote (pusher-js 8 and the Node server SDK ``pusher`` 5,
pinned in tests/e2e/package-lock.json) against a real ``vask run``.

Each scenario is one Node script in this folder. It prints a single JSON line::

    {"scenario": ..., "ok": bool, "step": ..., "failures": [...], "observed": {...}}

and exits non-zero when one of its own checks failed. The tests below assert on the
``observed`` facts directly (so a failure names the protocol fact that was wrong) and then
on ``ok``/the exit status (which covers the finer checks the script made itself).

Setup, as CI does it::

    npm ci --prefix tests/e2e
    pytest tests/e2e

Without node or the npm packages these tests are skipped, except in CI (the ``CI``
environment variable set, as ``.ci/run`` does), where they fail.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.servers import APP_ID, APP_KEY, APP_SECRET, Server, free_port, in_ci, run_vask

HERE = Path(__file__).resolve().parent
NODE = shutil.which("node")
MODULES = HERE / "node_modules"



def _missing() -> str | None:
    """Why the e2e layer cannot run here, or None."""
    if NODE is None:
        return "node is not installed (needed for pusher-js e2e)"
    if not ((MODULES / "pusher-js").is_dir() and (MODULES / "pusher").is_dir()):
        return "tests/e2e/node_modules missing: run `npm ci --prefix tests/e2e`"
    return None


MISSING = _missing()

# Only a missing toolchain is a reason to skip, and only outside CI: CI installs both
# (.ci/run), so there a missing one is a broken setup and every e2e test fails.
pytestmark = [
    pytest.mark.skipif(MISSING is not None and not in_ci(), reason=str(MISSING)),
    pytest.mark.timeout(60),
]


@pytest.fixture(autouse=True)
def _toolchain() -> None:
    if MISSING is not None:  # only reached in CI (elsewhere the tests are skipped)
        pytest.fail(f"CI must run the e2e layer, but: {MISSING}", pytrace=False)

# A script's own hard limit; the subprocess timeout sits a little above it so the script
# normally reports its stuck step itself before we have to kill it.
SCRIPT_BUDGET_MS = 15_000
SUBPROCESS_TIMEOUT = SCRIPT_BUDGET_MS / 1000 + 5


def scenario(server: Server, script: str) -> dict[str, Any]:
    """Run one Node scenario against ``server`` and return its parsed result line."""
    args = [
        NODE or "node",
        str(HERE / script),
        "--port",
        str(server.port),
        "--key",
        APP_KEY,
        "--secret",
        APP_SECRET,
        "--app-id",
        APP_ID,
        "--timeout-ms",
        str(SCRIPT_BUDGET_MS),
        "--workers",
        str(server.workers),
    ]
    try:
        done = subprocess.run(
            args, cwd=HERE, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(
            f"{script} did not exit within {SUBPROCESS_TIMEOUT}s\n"
            f"stdout: {exc.stdout!r}\nstderr: {exc.stderr!r}\n"
            f"--- vask log (tail) ---\n{server.log()[-4000:]}"
        )
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    try:
        result: dict[str, Any] = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        pytest.fail(
            f"{script} printed no result line (exit {done.returncode})\n"
            f"stdout: {done.stdout}\nstderr: {done.stderr}\n"
            f"--- vask log (tail) ---\n{server.log()[-4000:]}"
        )
    result["returncode"] = done.returncode
    result["stderr"] = done.stderr
    return result


def explain(result: dict[str, Any]) -> str:
    """Everything a failing run knows: failed checks, error, observed facts, frames."""
    return json.dumps(
        {
            k: result.get(k)
            for k in ("scenario", "step", "error", "failures", "observed", "clients", "stderr")
        },
        indent=1,
        ensure_ascii=False,
    )[:20_000]


def assert_on_every_worker(result: dict[str, Any], server: Server) -> None:
    """The scenario's clients (``socket_ids``) sit on all of the server's workers."""
    ids = result["observed"].get("socket_ids") or []
    assert len({i.split(".")[0] for i in ids}) == server.workers, explain(result)


def assert_clean(result: dict[str, Any]) -> None:
    """The script's own checks all held and it exited 0 by itself."""
    assert result["ok"] and result["returncode"] == 0, explain(result)


def test_connects_with_socket_id() -> None:
    with run_vask(workers=2) as server:
        result = scenario(server, "connect.mjs")
        seen = result["observed"]
        assert seen.get("state") == "connected", explain(result)
        assert re.fullmatch(r"\d+\.\d+", seen.get("socket_id") or ""), explain(result)
        assert_clean(result)


def test_public_channel_receives_sdk_trigger() -> None:
    with run_vask(workers=2) as server:
        result = scenario(server, "public.mjs")
        seen = result["observed"]
        assert seen.get("subscribed") is True, explain(result)
        assert seen.get("trigger_status") == 200 and seen.get("trigger_body") == {}, explain(result)
        assert seen.get("received") == {
            "headline": "Grüße ✓",
            "n": 42,
            "nested": {"list": [1, "two", None]},
        }, explain(result)
        assert_clean(result)


def test_private_channel_auth_and_bad_signature() -> None:
    with run_vask(workers=2) as server:
        result = scenario(server, "private.mjs")
        seen = result["observed"]
        assert seen.get("good_subscribed") is True, explain(result)
        assert seen.get("good_received") == {"v": 1}, explain(result)
        error = seen.get("bad_error")
        # pusher-js turns the server's pusher:subscription_error into this object.
        assert isinstance(error, dict) and error.get("status") == 401, explain(result)
        frame = seen.get("bad_error_frame") or {}
        assert frame.get("event") == "pusher:subscription_error", explain(result)
        assert str(frame.get("channel")).startswith("private-orders-"), explain(result)
        assert seen.get("bad_received") is None, explain(result)
        assert seen.get("bad_state") == "connected", explain(result)
        assert_clean(result)


def test_presence_members_across_workers() -> None:
    # Three workers and six clients placed two per worker (spread() in lib.mjs), and
    # every pair's member_added / member_removed is checked by the script.
    with run_vask(workers=3) as server:
        result = scenario(server, "presence.mjs")
        seen = result["observed"]
        assert_on_every_worker(result, server)
        added = {row["client"]: row["added"] for row in seen.get("member_added_per_client", [])}
        users = [f"user-{i}" for i in range(6)]
        assert added == {f"C{i}": users[i + 1 :] for i in range(6)}, explain(result)
        assert seen.get("counts_after_join") == [6] * 6, explain(result)
        assert seen.get("second_tab_roster_count") == 6, explain(result)
        assert seen.get("removed_at_C0") == list(reversed(users[1:])), explain(result)
        assert seen.get("final_count_at_C0") == 1, explain(result)
        assert_clean(result)


def test_client_events_private_and_presence() -> None:
    with run_vask(workers=3) as server:
        result = scenario(server, "client_events.mjs")
        seen = result["observed"]
        assert_on_every_worker(result, server)
        message = {"typing": True, "text": "hello from A", "user_id": "forged"}
        for kind, sender_id in (("private", None), ("presence", "uid-A")):
            deliveries = seen.get(f"{kind}_deliveries") or {}
            assert deliveries.get("A") == [], f"{kind}: sender got its own event\n{explain(result)}"
            for receiver in ("B1", "B2", "B3"):
                assert deliveries.get(receiver) == [{"data": message, "user_id": sender_id}], (
                    f"{kind}: {receiver}\n{explain(result)}"
                )
        assert_clean(result)


def test_signin_send_to_user_and_terminate() -> None:
    with run_vask(workers=3) as server:
        result = scenario(server, "signin.mjs")
        seen = result["observed"]
        assert_on_every_worker(result, server)
        assert seen.get("send_status") == 200, explain(result)
        order = {"order_id": 1001, "items": ["tea", "scones"]}
        assert seen.get("orders") == {"ada-1": [order], "ada-2": [order], "bob": []}, explain(
            result
        )
        assert seen.get("terminate_status") == 200, explain(result)
        # Each of ada's connections left `connected` and was closed with Vask's 4200.
        for states in seen.get("ada_states_after_terminate") or [[], []]:
            assert any(s != "connected" for s in states), explain(result)
        assert seen.get("ada_close_codes") == [[4200], [4200]], explain(result)
        assert seen.get("bob_states") == ["connected"], explain(result)
        assert_clean(result)


def test_http_api_through_node_sdk() -> None:
    with run_vask(workers=3) as server:
        result = scenario(server, "http_api.mjs")
        seen = result["observed"]
        assert_on_every_worker(result, server)
        assert seen.get("listener_events") == {
            "L0": ["for-all"],
            "L1": ["not-for-l0", "for-all"],
            "L2": ["not-for-l0", "for-all"],
        }, explain(result)
        assert seen.get("trigger_batch") == {"status": 200, "body": {}}, explain(result)
        channels = seen.get("get_channels", {}).get("body", {}).get("channels", {})
        assert len(channels) == 2 and all(v == {} for v in channels.values()), explain(result)
        room = next((name for name in channels if name.startswith("presence-")), None)
        assert room is not None, explain(result)
        assert seen.get("get_channels_presence") == {
            "status": 200,
            "body": {"channels": {room: {"user_count": 3}}},
        }, explain(result)
        presence = seen.get("get_presence_channel", {})
        assert presence.get("status") == 200, explain(result)
        assert presence.get("body", {}).get("occupied") is True, explain(result)
        assert presence.get("body", {}).get("user_count") == 3, explain(result)
        users = seen.get("get_presence_users", {}).get("body", {}).get("users")
        assert sorted(users or [], key=lambda u: u["id"]) == [
            {"id": "u1"},
            {"id": "u2"},
            {"id": "u3"},
        ], explain(result)
        after = seen.get("get_presence_users_after_leave", {}).get("body", {}).get("users")
        assert sorted(u["id"] for u in after or []) == ["u1", "u3"], explain(result)
        assert_clean(result)


def test_cache_channel_replay_and_miss() -> None:
    with run_vask(workers=3) as server:
        result = scenario(server, "cache.mjs")
        seen = result["observed"]
        assert_on_every_worker(result, server)
        # Exactly: the confirmation, then the last cached event (not the earlier one).
        primed = seen.get("primed_sequences") or {}
        assert len(primed) == 3, explain(result)
        for seq in primed.values():
            assert [e["event"] for e in seq] == ["pusher:subscription_succeeded", "score"], explain(
                result
            )
            assert seq[1]["data"] == {"home": 3, "away": 1}, explain(result)
        empty = seen.get("empty_sequences") or {}
        assert len(empty) == 3 and all(
            seq == ["pusher:subscription_succeeded", "pusher:cache_miss"] for seq in empty.values()
        ), explain(result)
        assert_clean(result)


def test_webhooks_checked_by_the_node_sdk(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every kind of webhook but subscription_count, caused by pusher-js clients on three
    workers, received by a Node server that checks each request with the Node SDK's
    ``webhook(...).isValid()``: each event exactly once, with Pusher's fields."""
    port = free_port()
    monkeypatch.setenv("E2E_WEBHOOK_PORT", str(port))
    monkeypatch.setenv("E2E_LEAVE_DELAY_MS", "1000")
    config = (
        f'[[apps]]\nid = "{APP_ID}"\nkey = "{APP_KEY}"\nsecret = "{APP_SECRET}"\n'
        "enable_client_messages = true\nwebhook_leave_delay = 1.0\n"
        f'[[apps.webhooks]]\nurl = "http://127.0.0.1:{port}/hooks"\n'
    )
    with run_vask(workers=3, config=config) as server:
        result = scenario(server, "webhooks.mjs")
        seen = result["observed"]
        assert_on_every_worker(result, server)
        assert seen.get("invalid") == 0, explain(result)
        names = seen.get("channels") or {}
        sockets = seen.get("sockets") or {}
        events = seen.get("events") or []

        def of(name: str, channel: str) -> list[dict[str, Any]]:
            return [e for e in events if e["name"] == name and e["channel"] == names[channel]]

        for channel in ("pub", "room", "priv", "cache"):
            assert len(of("channel_occupied", channel)) == 1, explain(result)
        # u1 joined with two tabs on two workers: one member_added; u2 once
        assert sorted(e["user_id"] for e in of("member_added", "room")) == ["u1", "u2"], \
            explain(result)
        assert of("member_removed", "room") == [
            {"name": "member_removed", "channel": names["room"], "user_id": "u2"}], \
            explain(result)
        assert seen.get("removed_after_ms", 0) >= 900, explain(result)  # the leave delay
        assert len(of("cache_miss", "cache")) == 1, explain(result)
        assert of("client_event", "priv") == [{
            "name": "client_event", "channel": names["priv"], "event": "client-ping",
            "data": '{"n":1}', "socket_id": sockets["A"]}], explain(result)
        assert of("client_event", "room") == [{
            "name": "client_event", "channel": names["room"], "event": "client-wave",
            "data": "hi", "socket_id": sockets["C"], "user_id": "u2"}], explain(result)
        # C's departure vacated its pub/priv/cache seats but A is still in each
        assert not [e for e in events if e["name"] == "channel_vacated"], explain(result)
        assert_clean(result)


def test_tls_wss_and_https_with_both_sdks(tmp_path: Path) -> None:
    """Vask with its own TLS: pusher-js over wss:// (forceTLS) receives one event triggered
    by the Node SDK over https:// and one by pusher-http-python over https://, all
    trusting the test's CA (``NODE_EXTRA_CA_CERTS``, and the Python SDK's ``verify``).
    A Node https client without that CA is refused by its own verification."""
    import os
    import time

    import pusher
    from pusher.requests import RequestsBackend

    from tests.tls_certs import make_ca, make_server_cert

    ca = make_ca(tmp_path)
    leaf = make_server_cert(tmp_path, ca)
    with run_vask(workers=2, tls_ca=str(ca.path),
                  extra_args=("--tls-cert", str(leaf.cert_path),
                              "--tls-key", str(leaf.key_path))) as server:
        args = [NODE or "node", str(HERE / "tls.mjs"), "--port", str(server.port),
                "--key", APP_KEY, "--secret", APP_SECRET, "--app-id", APP_ID,
                "--timeout-ms", str(SCRIPT_BUDGET_MS), "--workers", "2", "--tls"]
        env = {**os.environ, "NODE_EXTRA_CA_CERTS": str(ca.path)}
        node = subprocess.Popen(args, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=env)
        try:
            assert node.stdout is not None
            first = json.loads(node.stdout.readline() or "{}")  # the script's own budget
            channel = first.get("waiting")
            if channel:

                class Backend(RequestsBackend):  # type: ignore[misc]
                    def __init__(self, client: object, **options: object) -> None:
                        super().__init__(client, **options)
                        self.options["verify"] = str(ca.path)

                python_sdk = pusher.Pusher(app_id=APP_ID, key=APP_KEY, secret=APP_SECRET,
                                           host="127.0.0.1", port=server.port, ssl=True,
                                           timeout=10, backend=Backend)
                python_sdk.trigger(channel, "from-python", {"via": "python-sdk"})
            out, err = node.communicate(timeout=SUBPROCESS_TIMEOUT)
        finally:
            if node.poll() is None:
                node.kill()
                node.wait(5)
        lines = [line for line in (json.dumps(first), *out.splitlines()) if line.strip()]
        result: dict[str, Any] = json.loads(lines[-1])
        result["returncode"] = node.returncode
        result["stderr"] = err
        assert channel, explain(result)
        seen = result["observed"]
        assert seen.get("encrypted") is True, explain(result)
        assert seen.get("trigger_status") == 200, explain(result)
        assert seen.get("node_event") == {"via": "node-sdk", "n": 7}, explain(result)
        assert seen.get("python_event") == {"via": "python-sdk"}, explain(result)
        assert_clean(result)

        # Node without the test CA: its TLS verification refuses the server.
        probe = ("require('https').get('https://127.0.0.1:" + str(server.port) + "/up', "
                 "r => console.log('status ' + r.statusCode))"
                 ".on('error', e => console.log('error ' + e.code))")
        began = time.monotonic()
        refused = subprocess.run([NODE or "node", "-e", probe], capture_output=True, text=True,
                                 timeout=SUBPROCESS_TIMEOUT, check=False,
                                 env={k: v for k, v in os.environ.items()
                                      if k != "NODE_EXTRA_CA_CERTS"})
        assert refused.stdout.startswith("error "), (refused.stdout, refused.stderr,
                                                     time.monotonic() - began)
        assert "CERT" in refused.stdout or "SIGNATURE" in refused.stdout, refused.stdout
