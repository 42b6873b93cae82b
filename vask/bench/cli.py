"""``vask bench``: click commands for every scenario plus ``compare``."""

from __future__ import annotations

import asyncio
import json
import math
import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import click

from vask.bench.loadgen import loop_factory, raise_nofile_limit
from vask.bench.report import format_table
from vask.bench.scenarios import (
    Common,
    Target,
    run_client_events,
    run_fanout,
    run_idle,
    run_presence,
)
from vask.bench.stats import median
from vask.config import DEFAULT_APP_ID

F = TypeVar("F", bound=Callable[..., Any])


def target_options(f: F) -> F:
    """Options naming the server under test and the loadgen knobs shared by scenarios."""
    opts = [
        click.option("--host", default="127.0.0.1", show_default=True, help="Server host."),
        click.option("--port", type=int, default=6001, show_default=True,
                     help="Server port (ignored with --server-cmd)."),
        click.option("--app-id", default=DEFAULT_APP_ID, show_default=True,
                     help="App id for the HTTP API (default: vask run's default app; "
                     "bin/soketi-peer uses the same)."),
        click.option("--key", default="app-key", show_default=True),
        click.option("--secret", default="app-secret", show_default=True),
        click.option("--server-cmd", default=None,
                     help="Shell command starting the server; {port} (and {port2}..{port9}) are "
                     "replaced by free ports in 17000-17999. Started in its own process group, "
                     "stopped afterwards."),
        click.option("--server-pid", type=int, default=None,
                     help="Root PID of an already running server, for CPU/memory accounting."),
        click.option("--server-log", default=None, help="Append the managed server's output here."),
        click.option("--startup-timeout", type=float, default=30.0, show_default=True,
                     help="Seconds to wait for a --server-cmd server to listen."),
        click.option("--procs", "--clients-procs", "procs", type=int, default=None,
                     help="Load-generator processes (default: max(2, connections/5000))."),
        click.option("--connect-concurrency", type=int, default=200, show_default=True,
                     help="Connection handshakes in flight per loadgen process."),
        click.option("--connect-timeout", type=float, default=30.0, show_default=True),
        click.option("--drain-timeout", type=float, default=10.0, show_default=True,
                     help="Give up waiting for deliveries after this long without progress."),
        click.option("--tls", is_flag=True,
                     help="Speak TLS (wss://, https://) to the server, without verifying "
                          "its certificate unless --tls-ca is given."),
        click.option("--tls-ca", default="",
                     help="CA file to verify the server's certificate with (implies --tls)."),
        click.option("--json", "as_json", is_flag=True, help="Print the result as JSON."),
        click.option("--quiet", is_flag=True, help="No progress on stderr."),
        click.option("--source-addrs", "sources", type=click.IntRange(1, 254), default=1,
                     show_default=True,
                     help="Spread client connections over loopback source addresses "
                     "127.0.0.1..N (one address has ~28 000 ports towards one server port; "
                     "needs --host 127.0.0.1)."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _split(kw: dict[str, Any]) -> tuple[Target, Common, bool]:
    t = Target(
        host=kw.pop("host"), port=kw.pop("port"), app_id=kw.pop("app_id"), key=kw.pop("key"),
        secret=kw.pop("secret"), server_cmd=kw.pop("server_cmd"),
        server_pid=kw.pop("server_pid"), server_log=kw.pop("server_log"),
        startup_timeout=kw.pop("startup_timeout"),
        tls=kw.pop("tls") or bool(kw["tls_ca"]), tls_ca=kw.pop("tls_ca"),
    )
    c = Common(
        procs=kw.pop("procs"), connect_concurrency=kw.pop("connect_concurrency"),
        connect_timeout=kw.pop("connect_timeout"), drain_timeout=kw.pop("drain_timeout"),
        progress=not kw.pop("quiet"), sources=kw.pop("sources"),
    )
    return t, c, kw.pop("as_json")


def _run(coro_fn: Callable[[], Coroutine[Any, Any, dict[str, Any]]], as_json: bool) -> None:
    """Run a scenario on uvloop, print it, exit non-zero when correctness failed."""
    raise_nofile_limit()

    async def main() -> dict[str, Any]:
        task = asyncio.current_task()
        assert task is not None
        # SIGTERM cancels the scenario so servers and workers are still stopped.
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        return await coro_fn()

    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        result = runner.run(main())
    if as_json:
        click.echo(json.dumps(result, indent=2, default=_json_default))
    else:
        click.echo(format_table(result))
    sys.exit(0 if result["ok"] else 1)


def _json_default(o: Any) -> Any:
    if isinstance(o, float) and math.isnan(o):
        return None
    return str(o)


@click.group()
def bench() -> None:
    """Benchmark any Pusher-protocol server (Vask, soketi, ...).

    Point it at a running server (--host/--port and credentials, --server-pid for
    resource accounting) or let it start one per run with --server-cmd.
    """


@bench.command()
@target_options
@click.option("--subscribers", "-s", type=int, default=2000, show_default=True)
@click.option("--events", "-e", type=int, default=2000, show_default=True)
@click.option("--inflight", "-k", type=int, default=8, show_default=True,
              help="HTTP trigger requests in flight (one keep-alive connection each).")
@click.option("--payload", type=int, default=0, show_default=True,
              help="Extra bytes of padding in each event's data.")
@click.option("--channel", default="bench", show_default=True)
def fanout(**kw: Any) -> None:
    """S subscribers on one channel, E events triggered as fast as the server answers."""
    t, c, as_json = _split(kw)
    _run(lambda: run_fanout(t, c, kw["subscribers"], kw["events"], kw["inflight"],
                            None, kw["payload"], kw["channel"]), as_json)


@bench.command("fanout-rate")
@target_options
@click.option("--subscribers", "-s", type=int, default=1000, show_default=True)
@click.option("--rate", "-r", type=float, default=50.0, show_default=True,
              help="Events per second.")
@click.option("--duration", "-d", type=float, default=10.0, show_default=True, help="Seconds.")
@click.option("--inflight", "-k", type=int, default=8, show_default=True)
@click.option("--payload", type=int, default=0, show_default=True)
@click.option("--channel", default="bench", show_default=True)
def fanout_rate(**kw: Any) -> None:
    """Fanout at a fixed publish rate: latency under steady load."""
    t, c, as_json = _split(kw)
    events = max(1, int(kw["rate"] * kw["duration"]))
    _run(lambda: run_fanout(t, c, kw["subscribers"], events, kw["inflight"], kw["rate"],
                            kw["payload"], kw["channel"], name="fanout-rate"), as_json)


@bench.command()
@target_options
@click.option("--connections", "-c", type=int, default=10000, show_default=True)
@click.option("--channel", default="idle-{i}", show_default=True,
              help="Channel per connection; {i} is the connection index. A private-/"
              "presence- prefix makes the bench sign the subscription.")
@click.option("--idle-seconds", type=float, default=10.0, show_default=True)
def idle(**kw: Any) -> None:
    """C subscribed, idle connections: memory/CPU per connection, connect rate, idle CPU."""
    t, c, as_json = _split(kw)
    _run(lambda: run_idle(t, c, kw["connections"], kw["channel"], kw["idle_seconds"]), as_json)


@bench.command()
@target_options
@click.option("--members", "-m", type=int, default=500, show_default=True)
@click.option("--channel", default="presence-bench", show_default=True)
def presence(**kw: Any) -> None:
    """M members join one presence channel at once, then half leave; events must be exact."""
    t, c, as_json = _split(kw)
    if not kw["channel"].startswith("presence-"):
        raise click.BadParameter("must start with presence-", param_hint="--channel")
    _run(lambda: run_presence(t, c, kw["members"], kw["channel"]), as_json)


@bench.command("client-events")
@target_options
@click.option("--clients", "-n", type=int, default=200, show_default=True)
@click.option("--rate", "-r", type=float, default=1.0, show_default=True,
              help="Client events per second per client (must stay under 10).")
@click.option("--duration", "-d", type=float, default=10.0, show_default=True)
@click.option("--payload", type=int, default=0, show_default=True)
@click.option("--channel", default="private-bench", show_default=True)
def client_events(**kw: Any) -> None:
    """N clients on a private channel sending client events at a fixed rate."""
    t, c, as_json = _split(kw)
    if not 0 < kw["rate"] < 10:
        raise click.BadParameter("must be > 0 and < 10 (the per-connection limit)",
                                 param_hint="--rate")
    if not kw["channel"].startswith(("private-", "presence-")):
        raise click.BadParameter("client events need a private- or presence- channel",
                                 param_hint="--channel")
    _run(lambda: run_client_events(t, c, kw["clients"], kw["rate"], kw["duration"],
                                   kw["payload"], kw["channel"]), as_json)


# metric path, higher_is_better
KEY_METRICS: dict[str, list[tuple[str, bool]]] = {
    "fanout": [
        ("deliveries_per_s", True),
        ("latency_ms.p50", False),
        ("latency_ms.p99", False),
        ("server_cpu_s_per_million", False),
        ("loadgen_cpu_s_per_million", False),
    ],
    "fanout-rate": [
        ("latency_ms.p50", False),
        ("latency_ms.p95", False),
        ("latency_ms.p99", False),
        ("latency_ms.max", False),
        ("server_cpu_s_per_million", False),
    ],
    "idle": [
        ("rss_kib_per_conn", False),
        ("pss_kib_per_conn", False),
        ("connect_subscribe_per_s", True),
        ("server_cpu_ms_per_conn", False),
        ("server_idle_cpu_pct_of_core", False),
    ],
    "presence": [
        ("join_per_s", True),
        ("join_complete_s", False),
        ("leave_complete_s", False),
        ("server_rss_mib_peak", False),
    ],
    "client-events": [
        ("deliveries_per_s", True),
        ("latency_ms.p50", False),
        ("latency_ms.p99", False),
        ("server_cpu_s_per_million", False),
    ],
}


# The webhooks scenario: webhook throughput, latency and cost, and what the churn (with
# its webhooks) costs a concurrent fan-out.
KEY_METRICS["webhooks"] = [
    ("webhook_events_per_s", True),
    ("occupied_latency_ms.p50", False),
    ("occupied_latency_ms.p99", False),
    ("vacated_latency_ms.p50", False),
    ("vacated_latency_ms.p99", False),
    ("server_cpu_s_per_thousand_events", False),
    ("churn_server_cpu_pct_of_core", False),
    ("fanout_quiet_deliveries_per_s", True),
    ("fanout_churn_deliveries_per_s", True),
    ("fanout_churn_ratio", True),
    ("fanout_churn_server_cpu_s_per_million", False),
]


# The reconnect storm: how fast and at what cost every client comes back.
KEY_METRICS["storm"] = [
    ("all_back_s", False),
    ("listen_after_drop_s", False),
    ("reconnect_after_listen_s", False),
    ("server_cpu_s", False),
    ("server_cpu_ms_per_reconnect", False),
    ("failed_reconnects", False),
]


def _get(metrics: dict[str, Any], path: str) -> float:
    v: Any = metrics
    for part in path.split("."):
        if not isinstance(v, dict) or part not in v:
            return math.nan
        v = v[part]
    return float(v) if isinstance(v, (int, float)) and v is not None else math.nan


@bench.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("cmd_a")
@click.argument("cmd_b")
@click.argument("scenario", type=click.Choice(sorted(KEY_METRICS)))
@click.option("--rounds", type=int, default=3, show_default=True, help="A/B rounds (>= 3).")
@click.option("--a-args", default="", help="Extra scenario options for A only, e.g. "
              "'--app-id other' (shell-quoted string).")
@click.option("--b-args", default="", help="Extra scenario options for B only, e.g. '--app-id 1'.")
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON.")
@click.pass_context
def compare(ctx: click.Context, cmd_a: str, cmd_b: str, scenario: str, rounds: int,
            a_args: str, b_args: str, as_json: bool) -> None:
    """Run SCENARIO against CMD_A and CMD_B alternately (A B A B ...) and compare medians.

    Any further options are passed to the scenario, e.g.
    ``vask bench compare 'CMD_A' 'CMD_B' fanout -s 500 -e 500 --rounds 3``.
    Servers whose credentials differ get them through ``--a-args``/``--b-args``.
    Each run is a fresh ``python -m vask.bench SCENARIO --server-cmd CMD --json`` process.
    """
    if rounds < 3:
        raise click.BadParameter("at least 3 rounds", param_hint="--rounds")
    extra = list(ctx.args)
    runs: dict[str, list[dict[str, Any]]] = {"A": [], "B": []}
    failed_runs: list[str] = []
    for rnd in range(1, rounds + 1):
        for label, cmd, own in (("A", cmd_a, a_args), ("B", cmd_b, b_args)):
            click.echo(f"[compare] round {rnd}/{rounds} {label}: {cmd}", err=True)
            argv = [sys.executable, "-m", "vask.bench", scenario, "--server-cmd", cmd,
                    "--json", *extra, *shlex.split(own)]
            proc = subprocess.run(argv, stdout=subprocess.PIPE, env=os.environ.copy(),
                                  check=False)
            try:
                res = json.loads(proc.stdout)
            except json.JSONDecodeError:
                res = {"ok": False, "metrics": {}, "failures": ["no JSON output"]}
            if not res.get("ok"):
                failed_runs.append(f"round {rnd} {label}: {res.get('failures')}")
            runs[label].append(res)
    table: list[dict[str, Any]] = []
    for path, higher in KEY_METRICS[scenario]:
        a = [_get(r.get("metrics", {}), path) for r in runs["A"]]
        b = [_get(r.get("metrics", {}), path) for r in runs["B"]]
        # Ratio oriented so that > 1 means B is better: B/A for throughput, A/B for costs.
        ratios = [
            (y / x if higher else x / y) if x and y and not (math.isnan(x) or math.isnan(y))
            else math.nan
            for x, y in zip(a, b, strict=True)
        ]
        good = [r for r in ratios if not math.isnan(r)]
        table.append({
            "metric": path,
            "better": "higher" if higher else "lower",
            "A_median": median([v for v in a if not math.isnan(v)]),
            "B_median": median([v for v in b if not math.isnan(v)]),
            "ratio": "B/A" if higher else "A/B",
            "ratio_median": median(good),
            "ratio_min": min(good) if good else math.nan,
            "ratio_max": max(good) if good else math.nan,
            "A_rounds": a,
            "B_rounds": b,
        })
    if as_json:
        click.echo(json.dumps({"scenario": scenario, "A": cmd_a, "B": cmd_b, "rounds": rounds,
                               "extra_args": extra, "metrics": table,
                               "failed_runs": failed_runs}, indent=2, default=_json_default))
    else:
        click.echo(f"scenario {scenario}, {rounds} rounds (A B alternating), args {extra}")
        click.echo(f"A = {cmd_a}\nB = {cmd_b}")
        click.echo("ratio > 1 means B is better (B/A for throughput, A/B for costs and latency)")
        head = (f"{'metric':<30} {'A median':>12} {'B median':>12}  "
                f"{'ratio':<5} {'median':>7}  range")
        click.echo(head)
        for row in table:
            click.echo(
                f"{row['metric']:<30} {_num(row['A_median']):>12} {_num(row['B_median']):>12}  "
                f"{row['ratio']:<5} {_num(row['ratio_median']):>7}  "
                f"{_num(row['ratio_min'])}..{_num(row['ratio_max'])}"
            )
        for f in failed_runs:
            click.echo(f"FAILED RUN {f}")
    sys.exit(1 if failed_runs else 0)


def _num(v: float) -> str:
    if math.isnan(v):
        return "n/a"
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}" if abs(v) < 1 else f"{v:.2f}"


@bench.command()
@target_options
@click.option("--connections", "-c", type=click.IntRange(min=1), default=200,
              show_default=True, help="Connections doing the channel churn.")
@click.option("--rate", "-r", type=click.FloatRange(min=0, min_open=True), default=1000.0,
              show_default=True, help="Channels occupied and vacated per second, in total.")
@click.option("--duration", "-d", type=click.FloatRange(min=0, min_open=True), default=10.0,
              show_default=True, help="Seconds of churn in the measured churn phase.")
@click.option("--subscribers", "-s", type=click.IntRange(min=0), default=1000,
              show_default=True, help="Fan-out subscribers (0: no fan-out phases).")
@click.option("--events", "-e", type=click.IntRange(min=0), default=2000, show_default=True,
              help="Events per fan-out phase (0: no fan-out phases).")
@click.option("--inflight", "-k", type=click.IntRange(min=1), default=8, show_default=True,
              help="HTTP trigger requests in flight during fan-out.")
@click.option("--leave-delay", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="webhook_leave_delay written into {webhook_config}; subtracted from the "
              "vacated latency.")
@click.option("--churn-procs", type=click.IntRange(min=1), default=1, show_default=True,
              help="Load-generator processes sending the churn.")
@click.option("--no-check-webhooks", is_flag=True,
              help="Do not require every webhook event (for servers without webhooks).")
@click.option("--receiver-port", type=click.IntRange(min=0, max=65535), default=0,
              help="Fixed port for the webhook receiver (default: a free one in "
              "17000-17999), for a server started outside the bench.")
def webhooks(**kw: Any) -> None:
    """Channel churn with occupied/vacated webhooks, and its cost to a concurrent fan-out.

    The bench runs the webhook receiver itself. In --server-cmd, {webhook_url} is its
    URL and {webhook_config} a Vask config file with the app and that endpoint.
    """
    from vask.bench.webhooks import WebhookParams, run_webhooks

    t, c, as_json = _split(kw)
    p = WebhookParams(
        connections=kw["connections"], rate=kw["rate"], duration=kw["duration"],
        subscribers=kw["subscribers"], events=kw["events"], inflight=kw["inflight"],
        leave_delay=kw["leave_delay"], check_webhooks=not kw["no_check_webhooks"],
        churn_procs=kw["churn_procs"], receiver_port=kw["receiver_port"],
    )
    _run(lambda: run_webhooks(t, c, p), as_json)



@bench.command()
@target_options
@click.option("--connections", "-c", type=click.IntRange(min=1), default=10000,
              show_default=True)
@click.option("--channels", type=click.IntRange(min=1), default=100, show_default=True,
              help="Public channels storm-0..N-1; client i subscribes to storm-(i mod N).")
@click.option("--mode", type=click.Choice(["restart", "signal"]), default="restart",
              show_default=True,
              help="restart: SIGKILL the server tree and start the same command again "
              "(needs --server-cmd); signal: send --signal to the server's root process "
              "and let it drop the clients (Vask: USR2, a rolling restart).")
@click.option("--signal", "sig", default="USR2", show_default=True,
              help="Signal for --mode signal.")
@click.option("--retry-min", type=click.FloatRange(min=0), default=0.05, show_default=True,
              help="First delay after a refused connect (doubles, jittered +-50%).")
@click.option("--retry-max", type=click.FloatRange(min=0), default=0.5, show_default=True,
              help="Largest delay between refused connects.")
@click.option("--storm-timeout", type=click.FloatRange(min=1), default=120.0,
              show_default=True, help="Give up when not all are back after this long.")
def storm(**kw: Any) -> None:
    """Reconnect storm: C subscribed clients dropped at once reconnect and resubscribe."""
    from vask.bench.storm import run_storm

    t, c, as_json = _split(kw)
    _run(lambda: run_storm(t, c, kw["connections"], kw["channels"], kw["mode"], kw["sig"],
                           kw["retry_min"], kw["retry_max"], kw["storm_timeout"]), as_json)


@bench.command("connect-pair")
@click.argument("cmd_a")
@click.argument("cmd_b")
@click.option("--connections", "-c", type=click.IntRange(min=2), default=10000,
              show_default=True, help="Subscribed connections opened to each server.")
@click.option("--blocks", type=click.IntRange(min=2), default=20, show_default=True,
              help="Blocks per server; they alternate A B B A ...")
@click.option("--channel", default="idle-{i}", show_default=True,
              help="Channel per connection; {i} is the connection's index.")
@click.option("--key", default="app-key", show_default=True)
@click.option("--secret", default="app-secret", show_default=True)
@click.option("--procs", type=int, default=None,
              help="Load-generator processes per server (default: max(2, connections/5000)).")
@click.option("--connect-concurrency", type=int, default=200, show_default=True,
              help="Connection handshakes in flight per loadgen process.")
@click.option("--connect-timeout", type=float, default=30.0, show_default=True)
@click.option("--startup-timeout", type=float, default=30.0, show_default=True)
@click.option("--settle", type=click.FloatRange(min=0), default=0.25, show_default=True,
              help="Seconds after a block's last subscribe that are still charged to it.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--quiet", is_flag=True, help="No progress on stderr.")
def connect_pair(cmd_a: str, cmd_b: str, connections: int, blocks: int, channel: str,
                 key: str, secret: str, procs: int | None, connect_concurrency: int,
                 connect_timeout: float, startup_timeout: float, settle: float,
                 as_json: bool, quiet: bool) -> None:
    """Server CPU per connect+subscribe of CMD_A and CMD_B, both running at once and
    loaded in alternating blocks, so that the machine's drift falls on both.

    Prints B's CPU per connection over A's with a 95 % bootstrap interval. Both servers
    take the same key and secret. Exits 1 when a connection failed.
    """
    from vask.bench.paired import format_pair, run_connect_pair

    raise_nofile_limit()
    common = Common(procs=procs, connect_concurrency=connect_concurrency,
                    connect_timeout=connect_timeout, progress=not quiet)
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        result = runner.run(run_connect_pair(cmd_a, cmd_b, common, connections, blocks,
                                             channel, key, secret, startup_timeout,
                                             settle))
    _print_pair(result, as_json, format_pair)


def _print_pair(result: dict[str, Any], as_json: bool,
                formatter: Callable[[dict[str, Any]], str]) -> None:
    if as_json:
        click.echo(json.dumps(result, indent=2, default=_json_default))
    else:
        click.echo(formatter(result))
    sys.exit(0 if result["ok"] else 1)


@bench.command("fanout-pair")
@click.argument("cmd_a")
@click.argument("cmd_b")
@click.option("--subscribers", "-s", type=click.IntRange(min=1), default=1000,
              show_default=True, help="Subscribers on the channel of each server.")
@click.option("--rate", "-r", type=click.FloatRange(min=0.1), default=50.0,
              show_default=True, help="Events per second within a block.")
@click.option("--events", "-e", type=click.IntRange(min=1), default=25, show_default=True,
              help="Events per block.")
@click.option("--blocks", type=click.IntRange(min=2), default=20, show_default=True,
              help="Blocks per server; they alternate A B B A ...")
@click.option("--payload", type=click.IntRange(min=0), default=0, show_default=True,
              help="Extra bytes of padding in each event's data.")
@click.option("--channel", default="bench", show_default=True)
@click.option("--app-id", default=DEFAULT_APP_ID, show_default=True)
@click.option("--key", default="app-key", show_default=True)
@click.option("--secret", default="app-secret", show_default=True)
@click.option("--inflight", "-k", type=click.IntRange(min=1), default=2, show_default=True,
              help="HTTP trigger requests in flight per server.")
@click.option("--procs", type=int, default=None,
              help="Load-generator processes per server (default: max(2, subscribers/5000)).")
@click.option("--startup-timeout", type=float, default=30.0, show_default=True)
@click.option("--drain-timeout", type=float, default=10.0, show_default=True,
              help="Seconds without a delivery after which a block gives up waiting.")
@click.option("--settle", type=click.FloatRange(min=0), default=0.25, show_default=True,
              help="Seconds after a block's last delivery that are still charged to it.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--quiet", is_flag=True, help="No progress on stderr.")
def fanout_pair(cmd_a: str, cmd_b: str, subscribers: int, rate: float, events: int,
                blocks: int, payload: int, channel: str, app_id: str, key: str, secret: str,
                inflight: int, procs: int | None, startup_timeout: float,
                drain_timeout: float, settle: float, as_json: bool, quiet: bool) -> None:
    """Server CPU per million deliveries of CMD_A and CMD_B at a steady event rate, both
    running at once and published to in alternating blocks, so that the machine's drift
    falls on both.

    Prints B's CPU per million deliveries over A's with a 95 % bootstrap interval, and
    each side's delivery latency. Both servers take the same app id, key and secret.
    Exits 1 unless every subscriber received every event.
    """
    from vask.bench.paired import format_pair, run_fanout_pair

    raise_nofile_limit()
    common = Common(procs=procs, drain_timeout=drain_timeout, progress=not quiet)
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        result = runner.run(run_fanout_pair(
            cmd_a, cmd_b, common, subscribers, rate, events, blocks, payload, channel,
            app_id, key, secret, inflight, startup_timeout, settle))
    _print_pair(result, as_json, format_pair)
