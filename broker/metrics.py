"""The cluster's /metrics endpoint, served by the broker (``docs/metrics.md``).

Why the broker: it already hears from every worker once a heartbeat, it holds the
cluster state (channels, presence members, subscriptions) the figures are about, and it
runs both under ``vask run`` and alone (``vask broker``), so one scrape of one process
covers the whole cluster either way. The supervisor would have to ask the broker
anyway.

Three parts:

* :class:`ClusterTotals` keeps the latest snapshot of every worker (the ``STATS`` verb,
  cumulative figures) and sums them. A worker that is gone (it died, stopped, or was
  purged for silence) leaves its counters and histograms behind in a retired sum, so a
  ``*_total`` never goes down when a worker restarts; its gauges go with it. A purged
  worker that comes back (a stall, not a death) takes its figures back out of the
  retired sum, so nothing is counted twice.
* :func:`cluster_snapshot` adds the broker's own figures. It walks every channel, so the
  broker loop runs it only when a scrape asked (:class:`MetricsServer`): no scrapes, no
  cost.
* :class:`MetricsServer` answers scrapes from a thread (``prometheus_client``'s HTTP
  server) with a collector that never touches the broker's state: it asks the loop for
  a fresh snapshot, waits a bounded time for it, and reads the snapshot the loop swapped
  in (a plain reference assignment). A slow or stuck scraper therefore holds only its
  own thread, never the broker loop.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from vask.metrics import LATENCY_BOUNDS, SPECS

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from vask.broker.server import Broker

log = logging.getLogger("vask.broker")

Snapshot = dict[str, Any]
#: purged workers remembered individually (to take them back if they return); older
#: ones stay in the retired sum for good
RECENT_RETIRED = 256
#: how long a scrape waits for the broker loop's fresh snapshot before it answers with
#: the previous one
FRESH_WAIT = 2.0
#: webhook sender counters (``Broker.webhook_stats`` keys) -> metric families
WEBHOOK_COUNTERS = (
    ("sent", "vask_webhooks_sent"),
    ("events_sent", "vask_webhook_events_sent"),
    ("failed", "vask_webhooks_failed"),
    ("retried", "vask_webhooks_retried"),
    ("given_up", "vask_webhooks_given_up"),
    ("dropped", "vask_webhooks_dropped"),
    ("cancelled", "vask_webhooks_cancelled"),
)


def _empty() -> Snapshot:
    return {"counters": {}, "gauges": {}, "histograms": {}}


def _add(into: Snapshot, snap: Snapshot, sign: int, gauges: bool) -> None:
    """``into += sign * snap`` (gauges only with ``gauges``)."""
    sections = ("counters", "gauges") if gauges else ("counters",)
    for section in sections:
        target = into[section]
        for name, values in snap.get(section, {}).items():
            per_label = target.setdefault(name, {})
            for label, value in values.items():
                per_label[label] = per_label.get(label, 0) + sign * value
    hists = into["histograms"]
    for name, counts in snap.get("histograms", {}).items():
        have = hists.get(name)
        if have is None or len(have) != len(counts):
            if sign < 0:
                continue
            # a new name, or other buckets (another release): the newest layout wins
            hists[name] = have = [0] * len(counts)
        for i, value in enumerate(counts):
            have[i] += sign * value


class ClusterTotals:
    """The workers' snapshots, summed so that counters never go backwards."""

    def __init__(self) -> None:
        #: worker identity -> its latest snapshot
        self.live: dict[bytes, Snapshot] = {}
        #: counters and histograms of workers that are gone
        self.retired: Snapshot = _empty()
        self.recent: OrderedDict[bytes, Snapshot] = OrderedDict()

    def update(self, identity: bytes, snapshot: Snapshot) -> None:
        came_back = self.recent.pop(identity, None)
        if came_back is not None:
            _add(self.retired, came_back, -1, gauges=False)
        self.live[identity] = snapshot

    def reconcile(self, known: Iterable[bytes]) -> None:
        """Retire the snapshots of workers no longer in ``known``."""
        known = set(known)
        for identity in [i for i in self.live if i not in known]:
            snapshot = self.live.pop(identity)
            _add(self.retired, snapshot, 1, gauges=False)
            self.recent[identity] = snapshot
            if len(self.recent) > RECENT_RETIRED:
                self.recent.popitem(last=False)

    def total(self) -> Snapshot:
        """Counters and histograms of every worker ever seen, gauges of the live ones."""
        out = _empty()
        _add(out, self.retired, 1, gauges=False)
        for snapshot in self.live.values():
            _add(out, snapshot, 1, gauges=True)
        return out


def cluster_snapshot(broker: Broker) -> Snapshot:
    """Everything /metrics shows: the workers' sums plus the broker's own figures."""
    state = broker.state
    totals = broker.totals
    totals.reconcile(state.workers)
    out = totals.total()
    channels: dict[str, int] = {app_id: 0 for app_id in state.apps}
    members = dict(channels)
    subscriptions = dict(channels)
    for (app_id, _), channel in state.channels.items():
        if app_id not in channels:
            continue  # only configured apps get a label
        channels[app_id] += 1
        subscriptions[app_id] += channel.count
        if channel.members is not None:
            members[app_id] += len(channel.members)
    gauges = out["gauges"]
    gauges["vask_channels"] = channels
    gauges["vask_presence_members"] = members
    gauges["vask_subscriptions"] = subscriptions
    gauges["vask_workers"] = {"": len(state.workers)}
    gauges["vask_broker_queue_depth"] = {"": broker.buffered}
    counters = out["counters"]
    gaps = counters.setdefault("vask_link_gaps", {})
    gaps["to_broker"] = gaps.get("to_broker", 0) + broker.link_gaps
    counters["vask_broker_dropped_messages"] = {"": broker.dropped_bad}
    counters["vask_broker_handler_errors"] = {"": broker.handler_errors}
    counters["vask_worker_restarts"] = {"": broker.worker_restarts}
    webhooks: dict[str, int] = getattr(broker, "webhook_stats", None) or {}
    if webhooks:
        for key, name in WEBHOOK_COUNTERS:
            counters[name] = {"": int(webhooks.get(key, 0))}
        gauges["vask_webhooks_queued"] = {"": int(webhooks.get("queued", 0))}
    return out


def families(snapshot: Snapshot) -> Iterator[Metric]:
    """The Prometheus metric families for a cluster snapshot (known names only)."""
    for spec in SPECS:
        labels = [spec.label] if spec.label else []
        if spec.kind == "histogram":
            counts = snapshot["histograms"].get(spec.name)
            if counts is None or len(counts) != len(LATENCY_BOUNDS) + 2:
                continue
            buckets: list[tuple[str, float]] = []
            running = 0
            for bound, count in zip(LATENCY_BOUNDS, counts, strict=False):
                running += count
                buckets.append((repr(bound), running))
            running += counts[len(LATENCY_BOUNDS)]
            buckets.append(("+Inf", running))
            family: Metric = HistogramMetricFamily(spec.name, spec.help)
            family.add_metric([], buckets, counts[-1] / 1_000_000)  # type: ignore[attr-defined]
            yield family
            continue
        section = "counters" if spec.kind == "counter" else "gauges"
        values = snapshot[section].get(spec.name)
        if values is None:
            continue
        if spec.kind == "counter":
            family = CounterMetricFamily(spec.name, spec.help, labels=labels)
        else:
            family = GaugeMetricFamily(spec.name, spec.help, labels=labels)
        for label, value in sorted(values.items()):
            family.add_metric([label] if labels else [], value)
        yield family


class _Collector(Collector):
    def __init__(self, server: MetricsServer) -> None:
        self.server = server

    def collect(self) -> Iterable[Metric]:
        return families(self.server.fresh())


class MetricsServer:
    """The /metrics listener (a thread) and its hand-over with the broker loop."""

    def __init__(self) -> None:
        #: set by a scrape, cleared by the loop once it published a snapshot
        self.wanted = threading.Event()
        self._ready = threading.Event()
        self.latest: Snapshot = _empty()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))
        self.httpd: WSGIServer | None = None
        self.thread: threading.Thread | None = None

    def start(self, host: str, port: int) -> bool:
        """Listen; False (logged) if the port cannot be had: the broker runs on."""
        from prometheus_client import start_http_server

        try:
            self.httpd, self.thread = start_http_server(port, host, self.registry)
        except OSError as exc:
            log.error("metrics: cannot listen on %s:%d (%s); /metrics is off",
                      host, port, exc.strerror)
            return False
        log.info("metrics on http://%s:%d/metrics", host, port)
        return True

    def stop(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None

    # --- called by the broker loop -----------------------------------------------

    def publish(self, snapshot: Snapshot) -> None:
        self.latest = snapshot  # one reference swap: the scraper reads it whole
        self.wanted.clear()
        self._ready.set()

    # --- called by scrapes (their threads) -----------------------------------------

    def fresh(self) -> Snapshot:
        """A snapshot the loop made after this call began, or the last one after
        :data:`FRESH_WAIT` (a busy or stalled broker still gets scraped)."""
        self._ready.clear()
        self.wanted.set()
        self._ready.wait(FRESH_WAIT)
        return self.latest
