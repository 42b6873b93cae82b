"""The ``vask`` command line."""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Any

import click

from vask import __version__
from vask.config import ConfigError, Settings, load_settings, wants_webhooks, warnings_for
from vask.logs import setup_logging
from vask.process import set_process_name

log = logging.getLogger("vask")


def _load(config: str | None, overrides: dict[str, Any]) -> Settings:
    try:
        return load_settings(config, overrides=overrides)
    except ConfigError as exc:
        click.echo(f"vask: configuration error: {exc}", err=True)
        sys.exit(2)


#: shared by `vask run` and `vask broker`
_LOG_FORMAT = click.option(
    "--log-format", envvar="VASK_LOG_FORMAT", default=None, type=click.Choice(["text", "json"]),
    help="text (default) or json: one JSON object per line. [env: VASK_LOG_FORMAT]")


class _Commands(click.Group):
    """``vask``'s commands, with ``vask bench`` loaded only when asked for: the server's
    processes are forked from this one, and each would otherwise carry the benchmark
    harness (and what it imports) in its memory."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), "bench"])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name == "bench":
            from vask.bench.broker import broker_bench
            from vask.bench.cli import bench

            if "broker" not in bench.commands:
                bench.add_command(broker_bench)
            return bench
        return super().get_command(ctx, cmd_name)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="vask")
def main() -> None:
    """Vask: a self-hosted realtime server speaking the Pusher Channels protocol.

    Start it with `vask run`; point pusher-js, Laravel Echo or any Pusher server SDK at
    it by changing host, port and credentials.
    """


@main.command()
@click.option("--host", envvar="VASK_HOST", default=None,
              help="Address to listen on (default 0.0.0.0). [env: VASK_HOST]")
@click.option("--port", envvar="VASK_PORT", type=int, default=None,
              help="TCP port for WebSockets and the HTTP API (default 6001). [env: VASK_PORT]")
@click.option("--workers", envvar="VASK_WORKERS", type=int, default=None,
              help="Worker processes, one socket shard each (default: CPU count). "
                   "[env: VASK_WORKERS]")
@click.option("--config", "config", envvar="VASK_CONFIG", type=click.Path(dir_okay=False),
              default=None, help="TOML config file with [server] and [[apps]] (see "
                                 "docs/configuration.md). [env: VASK_CONFIG]")
@click.option("--broker", envvar="VASK_BROKER", default=None,
              help="Join an external broker at this ZeroMQ endpoint (tcp://HOST:PORT) "
                   "instead of starting one; a comma-separated list names standby "
                   "brokers in order of preference. Off this host it needs the CURVE "
                   "keys below (see `vask keys`). [env: VASK_BROKER]")
@click.option("--log-level", envvar="VASK_LOG_LEVEL", default=None,
              type=click.Choice(["debug", "info", "warning", "error"]),
              help="Log verbosity (default info). [env: VASK_LOG_LEVEL]")
@click.option("--pid-file", envvar="VASK_PID_FILE", type=click.Path(dir_okay=False),
              default=None, help="Write the supervisor's pid here, for `vask reload` and "
                                 "`vask restart`. [env: VASK_PID_FILE]")
@click.option("--metrics-port", envvar="VASK_METRICS_PORT", type=int, default=None,
              help="Port of the broker's Prometheus /metrics listener (default 9601, on "
                   "metrics_host, 127.0.0.1 by default); 0 turns it off. "
                   "[env: VASK_METRICS_PORT]")
@click.option("--tls-cert", envvar="VASK_TLS_CERT", type=click.Path(dir_okay=False),
              default=None, help="PEM certificate chain: serve wss:// and https:// on the "
                                 "port (needs --tls-key). [env: VASK_TLS_CERT]")
@click.option("--tls-key", envvar="VASK_TLS_KEY", type=click.Path(dir_okay=False),
              default=None, help="PEM private key of --tls-cert. [env: VASK_TLS_KEY]")
@_LOG_FORMAT
@click.option("--broker-public-key", envvar="VASK_BROKER_PUBLIC_KEY", default=None,
              type=click.Path(dir_okay=False),
              help="The broker's public key file (broker.key from `vask keys`). "
                   "[env: VASK_BROKER_PUBLIC_KEY]")
@click.option("--curve-secret-key", envvar="VASK_CURVE_SECRET_KEY", default=None,
              type=click.Path(dir_okay=False),
              help="This host's worker secret key file (NAME.key_secret from `vask keys`). "
                   "[env: VASK_CURVE_SECRET_KEY]")
@click.option("--insecure-broker", is_flag=True, default=None,
              help="Allow a plain TCP broker link off this host (no encryption, no "
                   "authentication). [env: VASK_INSECURE_BROKER]")
def run(host: str | None, port: int | None, workers: int | None, config: str | None,
        broker: str | None, log_level: str | None, pid_file: str | None,
        metrics_port: int | None, tls_cert: str | None, tls_key: str | None,
        log_format: str | None, broker_public_key: str | None = None,
        curve_secret_key: str | None = None, insecure_broker: bool | None = None) -> None:
    """Start the supervisor, the broker and the worker processes.

    SIGHUP reloads the configuration, SIGUSR2 restarts the workers one by one, SIGTERM
    stops gracefully (docs/operations.md).
    """
    overrides = {"host": host, "port": port, "workers": workers, "broker": broker,
                 "log_level": log_level, "pid_file": pid_file, "metrics_port": metrics_port,
                 "tls_cert": tls_cert, "tls_key": tls_key, "log_format": log_format,
                 "broker_public_key": broker_public_key,
                 "curve_secret_key": curve_secret_key,
                 "insecure_broker": insecure_broker or None}
    settings = _load(config, overrides)
    link_warnings = _check_link(settings, "worker", settings.broker)
    setup_logging(settings.log_level, "supervisor", settings.log_format)
    for warning in warnings_for(settings) + link_warnings:
        log.warning("%s", warning)
    from vask.supervisor import Supervisor

    supervisor = Supervisor(settings, overrides)
    try:
        supervisor.start()
    except OSError as exc:
        supervisor.stop()
        click.echo(f"vask: cannot listen on {settings.host}:{settings.port}: {exc.strerror}",
                   err=True)
        sys.exit(1)
    _banner(settings, supervisor.port)
    sys.exit(supervisor.run())


def _banner(settings: Settings, port: int) -> None:
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    click.echo(f"Vask {__version__}: {settings.workers} worker(s) on {settings.host}:{port} "
               f"(supervisor pid {os.getpid()})", err=True)
    for app in settings.apps:
        # Only the built-in default app's secret is shown: configured secrets stay secret.
        secret = app.secret if settings.default_app else "(from config)"
        tag = " (default app)" if settings.default_app else ""
        click.echo(f"  app id={app.id} key={app.key} secret={secret}{tag}", err=True)
        tls = "s" if settings.tls_cert else ""
        click.echo(f"    WebSocket: ws{tls}://{host}:{port}/app/{app.key}?protocol=7", err=True)
        click.echo(f"    HTTP API:  http{tls}://{host}:{port}/apps/{app.id}/events", err=True)


def _check_link(settings: Settings, role: str, endpoints: str) -> list[str]:
    """The CURVE key files, and the rule that a TCP link off the host is encrypted
    (vask/curve.py); a problem is one line and exit 2, like any configuration error."""
    from vask import curve

    try:
        curve.check_keys(settings)
        return curve.check_link(settings, role, curve.endpoints(endpoints))
    except ConfigError as exc:
        click.echo(f"vask: configuration error: {exc}", err=True)
        sys.exit(2)


@main.command("broker")
@click.option("--bind", "endpoint", envvar="VASK_BROKER", required=True,
              help="ZeroMQ endpoint to bind, e.g. tcp://10.0.0.5:7001 (with "
                   "--curve-secret-key and --authorized-keys-dir), or ipc://PATH. "
                   "[env: VASK_BROKER]")
@click.option("--config", "config", envvar="VASK_CONFIG", type=click.Path(dir_okay=False),
              default=None, help="The same TOML config the workers use. [env: VASK_CONFIG]")
@click.option("--log-level", envvar="VASK_LOG_LEVEL", default=None,
              type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--metrics-port", envvar="VASK_METRICS_PORT", type=int, default=None,
              help="Port of the cluster's Prometheus /metrics listener (default 9601); "
                   "0 turns it off. [env: VASK_METRICS_PORT]")
@_LOG_FORMAT
@click.option("--curve-secret-key", envvar="VASK_CURVE_SECRET_KEY", default=None,
              type=click.Path(dir_okay=False),
              help="The broker's secret key file (broker.key_secret from `vask keys`). "
                   "[env: VASK_CURVE_SECRET_KEY]")
@click.option("--authorized-keys-dir", envvar="VASK_AUTHORIZED_KEYS_DIR", default=None,
              type=click.Path(file_okay=False),
              help="Folder of the worker public keys this broker admits. "
                   "[env: VASK_AUTHORIZED_KEYS_DIR]")
@click.option("--insecure-broker", is_flag=True, default=None,
              help="Allow binding a non-loopback TCP address without CURVE keys. "
                   "[env: VASK_INSECURE_BROKER]")
def broker_command(endpoint: str, config: str | None, log_level: str | None,
                   metrics_port: int | None, log_format: str | None,
                   curve_secret_key: str | None = None, authorized_keys_dir: str | None = None,
                   insecure_broker: bool | None = None) -> None:
    """Run a broker alone, for workers on several hosts (`vask run --broker ...`)."""
    settings = _load(config, {"broker": endpoint, "log_level": log_level,
                              "metrics_port": metrics_port, "log_format": log_format,
                              "curve_secret_key": curve_secret_key,
                              "authorized_keys_dir": authorized_keys_dir,
                              "insecure_broker": insecure_broker or None})
    if "," in endpoint:
        click.echo("vask: configuration error: --bind: one endpoint per broker (standbys "
                   "are separate `vask broker` processes)", err=True)
        sys.exit(2)
    link_warnings = _check_link(settings, "broker", endpoint)
    setup_logging(settings.log_level, "broker", settings.log_format)
    for warning in link_warnings:
        log.warning("%s", warning)
    set_process_name("vask-broker")
    from vask.broker.server import serve
    from vask.supervisor import SenderKeeper, webhook_store

    if not wants_webhooks(settings):
        serve(settings, endpoint)
        return
    # The broker's webhook sender runs beside it, on this host, with its own queue.
    keeper = SenderKeeper(settings, webhook_store(settings, f"webhooks-broker-{endpoint}"))
    try:
        serve(settings, endpoint, webhook_endpoint=keeper.endpoint, every_beat=keeper.check)
    finally:
        keeper.stop()


def _signal_supervisor(pid_file: str, signum: signal.Signals, what: str) -> None:
    try:
        with open(pid_file) as f:
            pid = int(f.read().strip())
    except (OSError, ValueError) as exc:
        click.echo(f"vask: cannot read a pid from {pid_file}: {exc}", err=True)
        sys.exit(1)
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        click.echo(f"vask: no process {pid} (from {pid_file}): is vask running?", err=True)
        sys.exit(1)
    except PermissionError:
        click.echo(f"vask: not allowed to signal process {pid} (from {pid_file})", err=True)
        sys.exit(1)
    click.echo(f"vask: sent {signum.name} to the supervisor (pid {pid}): {what}; "
               "its log says how it went", err=True)


_PID_FILE = click.option(
    "--pid-file", envvar="VASK_PID_FILE", required=True, type=click.Path(dir_okay=False),
    help="The pid file `vask run --pid-file` (or [server] pid_file) writes. "
         "[env: VASK_PID_FILE]")


@main.command("reload")
@_PID_FILE
def reload_command(pid_file: str) -> None:
    """Reload the configuration of a running `vask run` (sends it SIGHUP)."""
    _signal_supervisor(pid_file, signal.SIGHUP, "configuration reload")


@main.command("restart")
@_PID_FILE
def restart_command(pid_file: str) -> None:
    """Replace the workers of a running `vask run` one by one (sends it SIGUSR2)."""
    _signal_supervisor(pid_file, signal.SIGUSR2, "rolling restart")


@main.group("config")
def config_group() -> None:
    """Inspect a configuration without starting anything."""


@config_group.command("check")
@click.argument("file", required=False, type=click.Path(dir_okay=False))
@click.option("--format", "fmt", type=click.Choice(["toml", "json"]), default="toml",
              show_default=True, help="How to print the effective configuration.")
def config_check(file: str | None, fmt: str) -> None:
    """Validate FILE (and the VASK_* environment) and print the effective configuration,
    every secret masked. Exit 0 when valid; one error line and exit 2 otherwise."""
    from vask.config_dump import dump_json, dump_toml, masked

    settings = _load(file, {})
    data = masked(settings)
    click.echo(dump_json(data) if fmt == "json" else dump_toml(data), nl=False)
    for warning in warnings_for(settings):
        click.echo(f"vask: warning: {warning}", err=True)


@main.command("keys")
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("--worker", "workers", multiple=True, default=("worker",), show_default=True,
              help="Name of a worker key pair to create (repeat for one pair per host).")
def keys_command(folder: str, workers: tuple[str, ...]) -> None:
    """Create CURVE key pairs for a broker link across hosts.

    Writes FOLDER/broker.key (public: copy it to every host) and broker.key_secret
    (only on the broker hosts, active and standby), one NAME.key / NAME.key_secret per
    --worker, and FOLDER/authorized/ with the workers' public keys (the brokers'
    authorized_keys_dir). The folder is 0700 and secret files 0600; existing files are
    kept, so running it again with a new --worker only adds that pair.
    """
    from pathlib import Path

    from vask import curve

    for name in workers:
        if not name or not all(c.isalnum() or c in "-_." for c in name) or name == "broker":
            click.echo(f"vask: --worker {name!r}: use letters, digits, '-', '_', '.' "
                       "(and not 'broker')", err=True)
            sys.exit(2)
    written = curve.generate(Path(folder), list(workers))
    for path in written:
        click.echo(str(path))
    if not written:
        click.echo("vask: every key pair already exists; nothing written", err=True)



if __name__ == "__main__":
    main()
