"""The cluster's /metrics endpoint, served by the broker (``docs/metrics.md``).

Why the broker: it already hears from every worker once a heartbeat, it holds the
cluster state (channels, presence members, subscriptions) the figures are about, and it
runs both under ``vask run`` and alone (``vask broker``), so one scrape of one process
covers the whole cluster either way. The supervisor would have to ask the broker
anyway.

What it serves is summed in :mod:`vask.broker.totals`, which does not import
``prometheus_client``: the broker loads this module only when it serves /metrics.

Its :class:`MetricsServer` answers scrapes from a thread (``prometheus_client``'s HTTP
server) with a collector that never touches the broker's state: it asks the loop for a
fresh snapshot, waits a bounded time for it, and reads the snapshot the loop swapped in
(a plain reference assignment). A slow or stuck scraper therefore holds only its own
thread, never the broker loop.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from vask.broker.totals import Snapshot, empty_snapshot
from vask.metrics import LATENCY_BOUNDS, SPECS

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

log = logging.getLogger("vask.broker")

#: how long a scrape waits for the broker loop's fresh snapshot before it answers with
#: the previous one
FRESH_WAIT = 2.0


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
        self.latest: Snapshot = empty_snapshot()
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
