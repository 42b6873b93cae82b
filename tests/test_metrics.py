"""Metrics without sockets: the worker registry, the broker's sums across workers and
restarts, and the Prometheus text it produces (parsed back with prometheus_client)."""

from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from vask import envelope
from vask.broker.metrics import MetricsServer, families
from vask.broker.server import Broker
from vask.broker.totals import ClusterTotals, cluster_snapshot
from vask.envelope import ENVELOPE_VERSION, Hello, Stats, Subscribe
from vask.metrics import (
    LATENCY_BOUNDS,
    SPEC_BY_NAME,
    SPECS,
    Histogram,
    WorkerMetrics,
    valid_snapshot,
)

W1, W2, W3 = b"w1", b"w2", b"w3"


def worker_snapshot(connections: int, connected: int, deliveries: int = 0,
                    round_trips: tuple[float, ...] = ()) -> dict[str, Any]:
    metrics = WorkerMetrics(["1"])
    stats = metrics.app("1")
    stats.new_connections = connections
    stats.connected = connected
    stats.deliveries = deliveries
    for seconds in round_trips:
        metrics.round_trips.observe(seconds)
    return metrics.snapshot()


def samples(snapshot: dict[str, Any]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The exposition text of ``snapshot``, parsed back: (sample name, labels) -> value."""
    server = MetricsServer()
    server.fresh = lambda: snapshot  # type: ignore[method-assign]
    text = generate_latest(server.registry).decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(snapshot: dict[str, Any], name: str, **labels: str) -> float:
    return samples(snapshot)[(name, tuple(sorted(labels.items())))]


# --- the worker side --------------------------------------------------------------------


def test_a_histogram_puts_a_bound_in_its_own_bucket_and_sums_in_microseconds() -> None:
    h = Histogram()
    h.observe(LATENCY_BOUNDS[0])  # le= the first bound
    h.observe(0.003)  # between 0.0025 and 0.005
    h.observe(60.0)  # above every bound
    assert h.counts[0] == 1
    assert h.counts[LATENCY_BOUNDS.index(0.005)] == 1
    assert h.counts[-1] == 1
    assert sum(h.counts) == 3
    assert h.sum_us == 500 + 3000 + 60_000_000


def test_a_worker_snapshot_is_valid_and_unknown_apps_are_not_exported() -> None:
    metrics = WorkerMetrics(["1", "2"])
    metrics.app("1").ws_bytes_in += 10
    metrics.app("nope").ws_bytes_in += 99  # the slot of connections not yet admitted
    metrics.events["http_413"] += 2
    metrics.events["reject_connection_quota"] += 1
    metrics.events["slow_consumers_cut"] += 3
    metrics.link["resyncs"] += 1
    snap = metrics.snapshot()
    assert valid_snapshot(snap)
    counters = snap["counters"]
    assert counters["vask_socket_received_bytes"] == {"1": 10, "2": 0}
    assert counters["vask_rejections"]["http_413"] == 2
    assert counters["vask_rejections"]["connection_quota"] == 1
    assert counters["vask_slow_consumers_cut"] == {"": 3}
    assert counters["vask_worker_resyncs"] == {"": 1}


def test_every_spec_is_exported_with_its_label() -> None:
    snap: dict[str, Any] = {"counters": {}, "gauges": {}, "histograms": {}}
    for spec in SPECS:
        label = "x" if spec.label else ""
        if spec.kind == "histogram":
            snap["histograms"][spec.name] = [0] * (len(LATENCY_BOUNDS) + 1) + [0]
        else:
            snap[spec.kind + "s"][spec.name] = {label: 1}
    names = {name for name, _ in samples(snap)}
    for spec in SPECS:
        if spec.kind == "counter":
            assert spec.name + "_total" in names
        elif spec.kind == "gauge":
            assert spec.name in names
        else:
            assert spec.name + "_count" in names


# --- sums across workers and restarts -------------------------------------------------


def test_sums_across_workers() -> None:
    totals = ClusterTotals()
    totals.update(W1, worker_snapshot(5, 3, 7, (0.001,)))
    totals.update(W2, worker_snapshot(4, 2, 1, (0.2, 9.0)))
    snap = totals.total()
    assert value(snap, "vask_connected", app_id="1") == 5
    assert value(snap, "vask_new_connections_total", app_id="1") == 9
    assert value(snap, "vask_deliveries_total", app_id="1") == 8
    assert value(snap, "vask_broker_round_trip_seconds_count") == 3
    assert value(snap, "vask_broker_round_trip_seconds_bucket", le="0.001") == 1
    assert value(snap, "vask_broker_round_trip_seconds_bucket", le="0.25") == 2
    assert value(snap, "vask_broker_round_trip_seconds_bucket", le="+Inf") == 3
    assert abs(value(snap, "vask_broker_round_trip_seconds_sum") - 9.201) < 1e-6


def test_counters_never_go_back_when_a_worker_dies_and_its_successor_starts_at_zero() -> None:
    totals = ClusterTotals()
    totals.update(W1, worker_snapshot(5, 3, round_trips=(0.01,)))
    totals.update(W2, worker_snapshot(4, 2))
    before = totals.total()
    totals.reconcile([W2])  # W1 died
    after_death = totals.total()
    assert value(after_death, "vask_new_connections_total", app_id="1") == 9
    assert value(after_death, "vask_broker_round_trip_seconds_count") == 1
    assert value(after_death, "vask_connected", app_id="1") == 2  # its gauges go with it
    totals.update(W3, worker_snapshot(0, 0))  # the restarted worker, fresh counts
    totals.update(W3, worker_snapshot(1, 1))
    after = totals.total()
    assert value(after, "vask_new_connections_total", app_id="1") == 10
    assert value(after, "vask_connected", app_id="1") == 3
    for (name, labels), figure in samples(before).items():
        if name.endswith(("_total", "_count", "_bucket", "_sum")):
            assert samples(after)[(name, labels)] >= figure, name


def test_a_purged_worker_that_comes_back_is_not_counted_twice() -> None:
    totals = ClusterTotals()
    totals.update(W1, worker_snapshot(5, 3))
    totals.reconcile([])  # purged for silence (a stall, not a death)
    totals.update(W1, worker_snapshot(6, 3))  # its cumulative figures, one more since
    totals.reconcile([W1])
    snap = totals.total()
    assert value(snap, "vask_new_connections_total", app_id="1") == 6
    assert value(snap, "vask_connected", app_id="1") == 3


# --- the broker -----------------------------------------------------------------------


def hello(broker: Broker, identity: bytes, prefix: int) -> None:
    broker.handle([identity, *encode(Hello(ENVELOPE_VERSION, identity.decode(), 1, prefix, 1))],
                  0.0)


def encode(message: Any) -> list[bytes]:
    return envelope.encode(message)


def test_the_broker_adds_its_state_and_keeps_a_dead_workers_counts(broker: Broker) -> None:
    hello(broker, W1, 100)
    hello(broker, W2, 200)
    broker.handle([W1, *encode(Stats(1, worker_snapshot(5, 3)))], 0.0)
    broker.handle([W2, *encode(Stats(1, worker_snapshot(4, 2)))], 0.0)
    broker.handle([W1, *encode(Subscribe(0, "1", "presence-room", "100.1", ["u1", {}], 0))], 0.0)
    broker.handle([W2, *encode(Subscribe(0, "1", "presence-room", "200.1", ["u2", None], 0))],
                  0.0)
    broker.handle([W2, *encode(Subscribe(0, "1", "news", "200.1", None, 0))], 0.0)
    # the sender's last report, and 3 events the broker itself dropped (queue full)
    broker.webhooks = SimpleNamespace(  # type: ignore[assignment]
        stats={"sent": 4, "queued": 2, "dropped": 1}, dropped=3)
    snap = cluster_snapshot(broker)
    assert value(snap, "vask_connected", app_id="1") == 5
    assert value(snap, "vask_channels", app_id="1") == 2
    assert value(snap, "vask_presence_members", app_id="1") == 2
    assert value(snap, "vask_subscriptions", app_id="1") == 3
    assert value(snap, "vask_workers") == 2
    assert value(snap, "vask_webhooks_sent_total") == 4
    assert value(snap, "vask_webhooks_queued") == 2
    assert value(snap, "vask_webhooks_dropped_total") == 4
    # W1 dies: the supervisor says so on the control pipe (a worker's name is
    # host:pid:slot:epoch; the supervisor knows the first three)
    broker.state.workers[W1].name = "h:1:0:1"
    read, write = os.pipe()
    try:
        broker.control_fd = read
        os.write(write, b"h:1:0\n")
        broker.read_control()
    finally:
        os.close(read)
        os.close(write)
    assert value(cluster_snapshot(broker), "vask_worker_restarts_total") == 1
    snap = cluster_snapshot(broker)
    assert value(snap, "vask_new_connections_total", app_id="1") == 9
    assert value(snap, "vask_connected", app_id="1") == 2
    assert value(snap, "vask_workers") == 1
    assert value(snap, "vask_channels", app_id="1") == 2  # W2 still holds both


def test_a_bad_snapshot_is_dropped_and_counted(broker: Broker) -> None:
    hello(broker, W1, 100)
    broker.handle([W1, b"STATS", b'[1,{"counters":{"vask_deliveries":{"1":-5}}}]'], 0.0)
    assert broker.dropped_bad == 1
    assert broker.totals.live == {}


def test_a_scrape_is_answered_by_the_loop_and_without_it_after_the_wait() -> None:
    server = MetricsServer()
    server.publish({"counters": {}, "gauges": {"vask_workers": {"": 7}}, "histograms": {}})
    got: list[dict[str, Any]] = []
    scrape = threading.Thread(target=lambda: got.append(server.fresh()))
    scrape.start()
    assert server.wanted.wait(10)
    server.publish({"counters": {}, "gauges": {"vask_workers": {"": 8}}, "histograms": {}})
    scrape.join(10)
    assert got and got[0]["gauges"]["vask_workers"] == {"": 8}
    assert not server.wanted.is_set()
    families_out = list(families(got[0]))
    assert [f.name for f in families_out] == ["vask_workers"]


def test_the_grafana_dashboard_is_json_and_names_only_exported_metrics() -> None:
    path = Path(__file__).parent.parent / "docs" / "grafana-dashboard.json"
    dashboard = json.loads(path.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    names = {n for e in exprs for n in re.findall(r"vask_[a-z_]+", e)}
    assert len(names) > 20
    for name in names:
        base = re.sub(r"_(total|bucket)$", "", name)
        assert base in SPEC_BY_NAME, name
    documented = (path.parent / "metrics.md").read_text()
    for spec in SPECS:
        assert f"`{spec.name}" in documented, spec.name
