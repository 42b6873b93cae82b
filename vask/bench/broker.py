"""``vask bench broker``: the broker alone, driven by fake workers that speak the envelope.

No WebSocket, no HTTP: a real broker process (the same code ``vask broker`` runs) and
N DEALER sockets in this process, each saying hello like a worker and then sending
requests in large batches, so what is measured is the broker's work per message, not
the clients'. Each phase reports messages answered per second:

* ``subscribes``: plain-channel subscribes (requests, each answered by the broker);
* ``presence joins``: presence-channel subscribes with a member (roster answered,
  member_added routed to the other fake workers);
* ``publishes``: acknowledged publishes (like HTTP API triggers) to a channel with
  subscribers on every fake worker, so each is routed as one delivery per worker;
* ``round trip CPU``: subscribes sent in batches of 1, 8 and 64, one batch at a time,
  each answered before the next leaves (a worker's link under light churn): the
  broker's CPU time (all its threads, from ``/proc``) per round trip and per subscribe.
  What a round trip costs whatever it carries is the thread wake-ups at both ends, and
  it is why a worker lets churn wait for more of its kind on a busy link
  (``churn_linger``);
* ``hop latency``: one acknowledged publish at a time, from a fake worker's send to the
  delivery arriving at another fake worker (median and 99th percentile), which is the
  time a broker hop adds to an event. Run it with ``--endpoint ipc`` and ``tcp`` (and
  ``--curve``) to compare.

The fake workers run in one Python thread, so at high rates they can be the limit: the
report says how long the senders were busy, and the figures are a lower bound of what
the broker can do.
"""

from __future__ import annotations

import multiprocessing
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
import zmq
import zmq.auth

from vask import envelope
from vask.bench.procstat import cpu_seconds
from vask.config import App, Settings
from vask.envelope import (
    ENVELOPE_VERSION,
    ConnOpen,
    Deliver,
    Heartbeat,
    Hello,
    Publish,
    Recovered,
    Reply,
    Subscribe,
    Synced,
    Welcome,
)

BATCH = 512  # envelope messages per ZeroMQ message from a fake worker
#: batch size -> round trips timed for the broker's CPU per round trip
ROUND_TRIPS = {1: 1000, 8: 500, 64: 100}
APP = "1"


class FakeWorker:
    """One DEALER saying hello as a worker; counts what comes back."""

    def __init__(self, context: zmq.Context[Any], endpoint: str, index: int,
                 curve: tuple[bytes, bytes, bytes] | None) -> None:
        self.name = f"bench:{os.getpid()}:{index}:{time.time_ns() // 1000}"
        self.prefix = 100_000_000 + index
        self.sock = context.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, self.name.encode())
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        if curve is not None:
            self.sock.curve_publickey, self.sock.curve_secretkey, \
                self.sock.curve_serverkey = curve
        self.sock.connect(endpoint)
        self.seq = 0
        self.replies = 0
        self.deliveries = 0
        self.recovered = False
        self.welcomed = False
        self.last_delivery = 0.0

    def send(self, messages: Sequence[envelope.Verb]) -> None:
        for start in range(0, len(messages), BATCH):
            chunk = [envelope.encode(m) for m in messages[start:start + BATCH]]
            self.seq += 1
            self.sock.send_multipart([self.seq.to_bytes(8, "big"),
                                      *envelope.encode_batch(chunk)])

    def drain(self) -> None:
        while True:
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            for message in envelope.decode_many(frames[1:]):
                kind = type(message)
                if kind is Reply:
                    self.replies += 1
                elif kind is Deliver:
                    self.deliveries += 1
                    self.last_delivery = time.perf_counter()
                elif kind is Welcome:
                    self.welcomed = True
                elif kind is Recovered:
                    self.recovered = True


def _broker_main(settings: Settings, endpoint: str) -> None:
    from vask.broker.server import serve
    from vask.logs import setup_logging

    setup_logging("warning", "broker")
    # ends with the bench even when the bench is killed (a timed-out test sends SIGKILL,
    # which a daemon child would otherwise outlive)
    serve(settings, endpoint, parent_pid=os.getppid())


def _wait_bound(endpoint: str, deadline: float) -> None:
    """Wait until the broker listens on ``endpoint``. The fake workers connect only then:
    a connection attempted before the bind can be torn down and made again by ZeroMQ
    right after the broker has read the first message on it, and what the broker sends
    on the torn-down one is lost ("Host unreachable"). A real worker sees the gap in
    the numbering and resyncs; the fake ones would wait for it forever."""
    import socket

    while time.monotonic() < deadline:
        with socket.socket(socket.AF_UNIX if endpoint.startswith("ipc://")
                           else socket.AF_INET) as probe:
            try:
                if endpoint.startswith("ipc://"):
                    probe.connect(endpoint.removeprefix("ipc://"))
                else:
                    host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
                    probe.connect((host, int(port)))
                return
            except OSError:
                time.sleep(0.02)
    raise click.ClickException(f"the broker did not listen on {endpoint} in time")


def _rss_kib(pid: int | None) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


#: seconds between the fake workers' heartbeats while the bench waits
HEARTBEAT_EVERY = 0.5
_last_beat = 0.0


def _wait(workers: list[FakeWorker], done: Any, timeout: float, what: str) -> float:
    poller = zmq.Poller()
    for w in workers:
        poller.register(w.sock, zmq.POLLIN)
    began = time.perf_counter()
    deadline = began + timeout
    global _last_beat
    while not done():
        now = time.perf_counter()
        if now > deadline:
            raise click.ClickException(f"timed out: {what}")
        if now - _last_beat > HEARTBEAT_EVERY:
            # Like real workers: a fake worker that only listens (the receiver of the
            # latency phase) would otherwise be purged for silence on a slow machine.
            _last_beat = now
            for w in workers:
                w.send([Heartbeat(1)])
        poller.poll(50)
        for w in workers:
            w.drain()
    return time.perf_counter() - began


def run(workers: int, count: int, endpoint_kind: str, use_curve: bool,
        samples: int) -> dict[str, Any]:
    app = App(id=APP, key="bench-key", secret="bench-secret",
              max_presence_members_per_channel=1_000_000,
              max_channels_per_connection=0)
    runtime = Path(tempfile.mkdtemp(prefix="vask-bench-broker-"))
    curve_keys: tuple[bytes, bytes, bytes] | None = None
    extra: dict[str, Any] = {}
    if use_curve:
        from vask import curve

        curve.generate(runtime / "keys", ["bench"])
        extra = {"curve_secret_key": str(runtime / "keys" / "broker.key_secret"),
                 "authorized_keys_dir": str(runtime / "keys" / "authorized")}
        pub, sec = zmq.auth.load_certificate(runtime / "keys" / "bench.key_secret")
        server, _ = zmq.auth.load_certificate(runtime / "keys" / "broker.key")
        assert sec is not None
        curve_keys = (pub, sec, server)
    # metrics_port=0: a bench broker must not take (or fight over) a real server's
    # /metrics port
    settings = Settings(apps=(app,), workers=workers, heartbeat_interval=1.0,
                        heartbeat_timeout=30.0, metrics_port=0, **extra)
    if endpoint_kind == "ipc":
        endpoint = f"ipc://{runtime}/broker.sock"
    else:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        endpoint = f"tcp://127.0.0.1:{port}"
    process = multiprocessing.get_context("fork").Process(
        target=_broker_main, args=(settings, endpoint), daemon=True)
    process.start()
    _wait_bound(endpoint, time.monotonic() + 20)
    context: zmq.Context[Any] = zmq.Context()
    fakes = [FakeWorker(context, endpoint, i, curve_keys) for i in range(workers)]
    out: dict[str, Any] = {"workers": workers, "messages": count, "endpoint": endpoint_kind
                           + (" + CURVE" if use_curve else "")}
    try:
        for w in fakes:
            w.send([Hello(ENVELOPE_VERSION, w.name, 1, w.prefix, os.getpid())])
        _wait(fakes, lambda: all(w.welcomed for w in fakes), 20, "welcome")
        for w in fakes:
            w.send([Synced(1)])
        _wait(fakes, lambda: all(w.recovered for w in fakes), 20, "recovery")

        # one connection per (worker, k); count messages spread over the workers
        per = count // workers
        rss_before = _rss_kib(process.pid)
        opens = [[ConnOpen(0, APP, f"{w.prefix}.{k}", 0) for k in range(per)] for w in fakes]
        for w, batch in zip(fakes, opens, strict=True):
            w.send(batch)

        def phase(name: str, build: Any, expect: Any) -> None:
            base = [w.replies for w in fakes]
            base_d = [w.deliveries for w in fakes]
            started = time.perf_counter()
            for i, w in enumerate(fakes):
                w.send(build(i, w))
            sent = time.perf_counter() - started
            total = _wait(fakes, lambda: expect(base, base_d), 120, name) + sent
            out[name] = {"per_second": round(per * workers / total),
                         "seconds": round(total, 3), "send_seconds": round(sent, 3)}

        phase("subscribes", lambda i, w: [
            Subscribe(k + 1, APP, f"ch-{i}-{k}", f"{w.prefix}.{k}", None, 0)
            for k in range(per)],
            lambda b, _: sum(w.replies for w in fakes) - sum(b) >= per * workers)
        phase("presence_joins", lambda i, w: [
            Subscribe(k + 1, APP, f"presence-room-{k % 100}", f"{w.prefix}.{k}",
                      [f"user-{i}-{k}", {"n": k}], 1_000_000) for k in range(per)],
            lambda b, _: sum(w.replies for w in fakes) - sum(b) >= per * workers)
        # the broker's memory for per*workers connections, each in one plain channel
        # and one presence channel (as member), over what it held empty
        out["broker_kib_per_connection"] = round(
            (_rss_kib(process.pid) - rss_before) / (per * workers), 3)
        # a channel with a subscriber on every fake worker, confirmed before anything is
        # published to it: the broker routes a publish to the workers subscribed when it
        # handles it, and it may handle one worker's publishes before another worker's
        # subscribe (it takes its peers in turn)
        base_hot = [w.replies for w in fakes]
        for w in fakes:
            w.send([Subscribe(1, APP, "hot", f"{w.prefix}.0", None, 0)])
        _wait(fakes, lambda: all(w.replies > b for w, b in zip(fakes, base_hot, strict=True)),
              20, "the hot channel's subscribes")
        payload = b'{"event":"tick","channel":"hot","data":"{}"}'
        phase("publishes", lambda i, w: [
            Publish(APP, "hot", "", 0.0, payload, False, k + 1) for k in range(per)],
            lambda b, d: sum(w.replies for w in fakes) - sum(b) >= per * workers
            and sum(w.deliveries for w in fakes) - sum(d) >= per * workers * workers)
        out["publishes"]["deliveries_per_second"] = out["publishes"]["per_second"] * workers

        # the broker's CPU per round trip: one batch at a time, each answered first
        rtt = fakes[0]
        broker_pid = process.pid
        assert broker_pid is not None  # started above
        trips: dict[str, Any] = {}
        for size, count_trips in ROUND_TRIPS.items():
            size = min(size, per)
            before = cpu_seconds(broker_pid)
            for t in range(count_trips):
                base = rtt.replies
                rtt.send([Subscribe(1, APP, f"rt-{size}-{t}-{j}", f"{rtt.prefix}.{j}", None, 0)
                          for j in range(size)])
                _wait(fakes, lambda b=base, n=size: rtt.replies >= b + n, 10, "a round trip")
            used = cpu_seconds(broker_pid) - before
            trips[str(size)] = {
                "round_trips": count_trips,
                "broker_cpu_us_per_round_trip": round(used * 1e6 / count_trips),
                "broker_cpu_us_per_subscribe": round(used * 1e6 / (count_trips * size), 1)}
        out["round_trip_cpu"] = trips

        # hop latency: worker 0 publishes, worker 1 (or 0) receives the delivery
        sender, receiver = fakes[0], fakes[-1]
        latencies = []
        for k in range(samples):
            before = receiver.deliveries
            began = time.perf_counter()
            sender.send([Publish(APP, "hot", "", 0.0, payload, False, 10_000_000 + k)])
            _wait(fakes, lambda b=before: receiver.deliveries > b, 10, "a delivery")
            latencies.append((receiver.last_delivery - began) * 1e6)
        latencies.sort()
        out["hop_latency_us"] = {
            "median": round(statistics.median(latencies)),
            "p99": round(latencies[int(0.99 * (len(latencies) - 1))]),
            "samples": samples}
    finally:
        for w in fakes:
            w.sock.close(0)
        context.destroy(linger=0)
        if process.pid:
            os.kill(process.pid, 15)
        process.join(5)
        if process.is_alive():
            process.kill()
        import shutil

        shutil.rmtree(runtime, ignore_errors=True)
    return out


@click.command("broker")
@click.option("--workers", "-w", type=int, default=8, show_default=True,
              help="Fake workers (DEALER sockets) talking to the broker.")
@click.option("--messages", "-n", type=int, default=40_000, show_default=True,
              help="Messages per phase, spread over the workers.")
@click.option("--endpoint", type=click.Choice(["ipc", "tcp"]), default="ipc",
              show_default=True, help="ipc:// socket, or TCP on 127.0.0.1.")
@click.option("--curve", is_flag=True, help="CURVE on the TCP link (implies --endpoint tcp).")
@click.option("--samples", type=int, default=2000, show_default=True,
              help="One-at-a-time publishes timed for the hop latency.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def broker_bench(workers: int, messages: int, endpoint: str, curve: bool, samples: int,
                 as_json: bool) -> None:
    """Measure the broker alone with fake workers (no WebSocket, no HTTP)."""
    import json

    if workers < 2:
        raise click.BadParameter("at least 2", param_hint="--workers")
    result = run(workers, messages, "tcp" if curve else endpoint, curve, samples)
    click.echo(json.dumps(result, indent=None if as_json else 2))
