"""Metric definitions and the per-worker registry (``docs/metrics.md``).

The cluster exposes one Prometheus endpoint, served by the broker
(:mod:`vask.broker.metrics`). Workers do not serve anything: each keeps its figures as
plain integers here and sends a snapshot of them to the broker with its heartbeat (the
``STATS`` envelope verb). The broker sums the snapshots of every worker, adds its own
figures and answers scrapes.

Why plain integers and not ``prometheus_client`` objects on the workers: counting sits
on the hot path (every frame read or written), and a ``prometheus_client`` counter takes
a lock and a label lookup per increment. Here an increment is one attribute addition on
an object the connection already holds (:class:`AppStats`, one per app, reached through
``conn.stats``), with no lock (a worker is one thread) and no allocation.

A snapshot holds cumulative values since the worker started, never deltas: a lost or
late snapshot costs nothing, the next one carries everything. Its layout (all names are
the exported family names without ``_total``)::

    {"counters":   {metric: {label value: int}},
     "gauges":     {metric: {label value: int}},
     "histograms": {metric: [count per bucket..., count above the last bound, sum in us]}}

The label of each metric (``app_id``, ``reason``, ``direction`` or none, written as the
label value ``""``) is fixed by :data:`SPECS`; the broker exports only names it knows, so
a newer worker may send more without confusing an older broker.
"""

from __future__ import annotations

import os
from bisect import bisect_left
from collections import Counter
from dataclasses import dataclass
from typing import Any

#: counter values by label value, per metric
Labelled = dict[str, dict[str, int]]


@dataclass(frozen=True, slots=True)
class Spec:
    """One exported metric family."""

    name: str  #: family name; counters are exposed with ``_total`` appended
    kind: str  #: "counter", "gauge" or "histogram"
    label: str  #: the label name, or "" for none
    help: str


#: Histogram bounds, in seconds (the same for both histograms, so their panels compare).
LATENCY_BOUNDS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

SPECS: tuple[Spec, ...] = (
    # --- connections and traffic, per app (the soketi-compatible set) ---
    Spec("vask_connected", "gauge", "app_id", "WebSocket connections open now"),
    Spec("vask_new_connections", "counter", "app_id", "WebSocket connections established"),
    Spec("vask_new_disconnections", "counter", "app_id",
         "Established WebSocket connections that ended"),
    Spec("vask_socket_received_bytes", "counter", "app_id",
         "Bytes read from WebSocket connections"),
    Spec("vask_socket_transmitted_bytes", "counter", "app_id",
         "Bytes written to WebSocket connections"),
    Spec("vask_ws_messages_received", "counter", "app_id",
         "WebSocket text messages received from clients"),
    Spec("vask_ws_messages_sent", "counter", "app_id",
         "WebSocket frames sent to clients (events and protocol messages)"),
    Spec("vask_http_received_bytes", "counter", "app_id", "Bytes of HTTP API requests"),
    Spec("vask_http_transmitted_bytes", "counter", "app_id", "Bytes of HTTP API responses"),
    Spec("vask_http_calls_received", "counter", "app_id", "HTTP API requests"),
    Spec("vask_deliveries", "counter", "app_id",
         "Event frames written to subscribers (channel events, user events)"),
    Spec("vask_client_events", "counter", "app_id", "Client events accepted for broadcast"),
    # --- refusals and protection ---
    Spec("vask_rejections", "counter", "reason",
         "Requests, connections, messages refused by a limit or a rate limit"),
    Spec("vask_slow_consumers_cut", "counter", "",
         "Connections cut because their outbound buffer passed write_buffer_limit"),
    # --- broker link, worker side ---
    Spec("vask_worker_resyncs", "counter", "",
         "Times a worker replayed its state to the broker (broker restart, lost message)"),
    Spec("vask_link_gaps", "counter", "direction",
         "Gaps seen in the message numbering between workers and the broker"),
    Spec("vask_link_drops", "counter", "",
         "Batches a worker dropped because its queue to the broker was full"),
    Spec("vask_sibling_events", "counter", "direction",
         "Client events sent straight to, or received from, the other workers of the "
         "host (one per sibling), without the broker"),
    Spec("vask_sibling_drops", "counter", "",
         "Client events not delivered to a sibling worker because its queue was full"),
    Spec("vask_broker_round_trip_seconds", "histogram", "",
         "Worker request to broker answer (subscribes, API publishes and queries)"),
    Spec("vask_publish_write_seconds", "histogram", "",
         "HTTP API publish received to its frames written to the receiving worker's "
         "own subscribers"),
    # --- broker state and health ---
    Spec("vask_channels", "gauge", "app_id", "Occupied channels"),
    Spec("vask_presence_members", "gauge", "app_id",
         "Presence channel members (distinct users, summed over channels)"),
    Spec("vask_subscriptions", "gauge", "app_id", "Channel subscriptions of all connections"),
    Spec("vask_workers", "gauge", "", "Workers known to the broker"),
    Spec("vask_broker_queue_depth", "gauge", "",
         "Messages read by the broker and waiting to be handled"),
    Spec("vask_broker_dropped_messages", "counter", "",
         "Messages the broker dropped because they failed the envelope checks"),
    Spec("vask_broker_handler_errors", "counter", "",
         "Messages whose handling failed in the broker (a bug; logged)"),
    Spec("vask_worker_restarts", "counter", "",
         "Worker processes that died and were restarted by the supervisor"),
    # --- webhooks (from the broker's webhook sender) ---
    Spec("vask_webhooks_sent", "counter", "", "Webhook requests delivered (2xx)"),
    Spec("vask_webhook_events_sent", "counter", "", "Webhook events delivered"),
    Spec("vask_webhooks_failed", "counter", "", "Webhook requests that failed (to be retried)"),
    Spec("vask_webhooks_retried", "counter", "", "Webhook requests sent again after a failure"),
    Spec("vask_webhooks_given_up", "counter", "",
         "Webhook requests given up after the retry window"),
    Spec("vask_webhooks_dropped", "counter", "",
         "Webhook events dropped because the queue was full"),
    Spec("vask_webhooks_cancelled", "counter", "",
         "Webhook events cancelled before sending (a leave followed by a rejoin)"),
    Spec("vask_webhooks_queued", "gauge", "", "Webhook events waiting to be sent"),
)
SPEC_BY_NAME: dict[str, Spec] = {spec.name: spec for spec in SPECS}

#: refusals counted outside any worker object (the pure session rules and the HTTP API
#: rate limit), per reason. Per process: each worker sends its own in its snapshot.
rejections: Counter[str] = Counter()


class AppStats:
    """One app's traffic on one worker. Connections of the app hold a reference to it
    (``conn.stats``), so counting is an attribute increment, never a lookup."""

    __slots__ = ("client_events", "connected", "console", "deliveries", "http_bytes_in",
                 "http_bytes_out", "http_calls", "new_connections", "new_disconnections",
                 "ws_bytes_in", "ws_bytes_out", "ws_messages_in", "ws_messages_out")

    def __init__(self) -> None:
        self.connected = 0
        self.new_connections = 0
        self.new_disconnections = 0
        self.ws_bytes_in = 0
        self.ws_bytes_out = 0
        self.ws_messages_in = 0
        self.ws_messages_out = 0
        self.http_bytes_in = 0
        self.http_bytes_out = 0
        self.http_calls = 0
        self.deliveries = 0
        self.client_events = 0
        #: the worker's debug console recorder while someone watches this app's
        #: console, else None: the only thing the hot path tests (docs/dashboard.md)
        self.console: Any = None


#: AppStats attribute -> counter family
_APP_COUNTERS = (
    ("new_connections", "vask_new_connections"),
    ("new_disconnections", "vask_new_disconnections"),
    ("ws_bytes_in", "vask_socket_received_bytes"),
    ("ws_bytes_out", "vask_socket_transmitted_bytes"),
    ("ws_messages_in", "vask_ws_messages_received"),
    ("ws_messages_out", "vask_ws_messages_sent"),
    ("http_bytes_in", "vask_http_received_bytes"),
    ("http_bytes_out", "vask_http_transmitted_bytes"),
    ("http_calls", "vask_http_calls_received"),
    ("deliveries", "vask_deliveries"),
    ("client_events", "vask_client_events"),
)


class Histogram:
    """Fixed buckets as plain counts: :meth:`observe` is a bisect and two additions."""

    __slots__ = ("bounds", "counts", "sum_us")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BOUNDS) -> None:
        self.bounds = bounds
        #: observations per bucket (not cumulative); the last one is above every bound
        self.counts = [0] * (len(bounds) + 1)
        self.sum_us = 0

    def observe(self, seconds: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bound's bucket (le=)
        self.counts[bisect_left(self.bounds, seconds)] += 1
        if seconds > 0:
            self.sum_us += int(seconds * 1_000_000)

    def snapshot(self) -> list[int]:
        return [*self.counts, self.sum_us]


class WorkerMetrics:
    """Everything one worker counts, and the snapshot it sends to the broker."""

    __slots__ = ("apps", "depth", "events", "link", "publish_write", "round_trips",
                 "siblings", "unknown")

    def __init__(self, app_ids: list[str]) -> None:
        #: per configured app; a connection not yet admitted counts into ``unknown``,
        #: which is not exported (it has no app to name)
        self.apps: dict[str, AppStats] = {app_id: AppStats() for app_id in app_ids}
        self.unknown = AppStats()
        #: named rare events (refusals such as ``http_413``, ``slow_consumers_cut``);
        #: this is ``Worker.counters``
        self.events: Counter[str] = Counter()
        #: the broker link's counts (``BrokerLink.counters``)
        self.link: dict[str, int] = {"link_gaps": 0, "link_drops": 0, "resyncs": 0}
        #: client events to and from sibling workers (``Siblings.counts``)
        self.siblings: dict[str, int] = {"sent": 0, "received": 0, "drops": 0}
        self.round_trips = Histogram()
        self.publish_write = Histogram()
        #: messages waiting in the worker's broker link (requests unanswered plus the
        #: outbox), set by the link before each snapshot; shown by the dashboard
        self.depth = 0

    def app(self, app_id: str) -> AppStats:
        stats = self.apps.get(app_id)
        return stats if stats is not None else self.unknown

    def snapshot(self) -> dict[str, Any]:
        """Cumulative figures since this worker started (see the module docstring)."""
        counters: Labelled = {name: {} for _, name in _APP_COUNTERS}
        connected: dict[str, int] = {}
        for app_id, stats in self.apps.items():
            for attr, name in _APP_COUNTERS:
                counters[name][app_id] = getattr(stats, attr)
            connected[app_id] = stats.connected
        reasons: dict[str, int] = dict(rejections)
        for key, count in self.events.items():
            if key.startswith("http_"):
                reasons[key] = reasons.get(key, 0) + count
            elif key.startswith("reject_"):
                reasons[key[7:]] = reasons.get(key[7:], 0) + count
        counters["vask_rejections"] = reasons
        counters["vask_slow_consumers_cut"] = {"": self.events.get("slow_consumers_cut", 0)}
        counters["vask_worker_resyncs"] = {"": self.link["resyncs"]}
        counters["vask_link_gaps"] = {"to_worker": self.link["link_gaps"]}
        counters["vask_link_drops"] = {"": self.link["link_drops"]}
        siblings = self.siblings
        counters["vask_sibling_events"] = {"sent": siblings["sent"],
                                           "received": siblings["received"]}
        counters["vask_sibling_drops"] = {"": siblings["drops"]}
        cpu_ms, rss = process_usage()
        counters[PROCESS_CPU] = {"": cpu_ms}
        return {
            "counters": counters,
            "gauges": {"vask_connected": connected, PROCESS_RSS: {"": rss},
                       WORKER_DEPTH: {"": self.depth}},
            "histograms": {"vask_broker_round_trip_seconds": self.round_trips.snapshot(),
                           "vask_publish_write_seconds": self.publish_write.snapshot()},
        }


# --- process figures (for the dashboard; not exported to Prometheus) ------------------
#
# Per-process figures make no sense summed over the cluster, so these names are not in
# SPECS: /metrics leaves them out, and the dashboard reads each worker's own snapshot.

PROCESS_CPU = "vask_process_cpu_ms"
PROCESS_RSS = "vask_process_rss_bytes"
WORKER_DEPTH = "vask_worker_queue_depth"
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def process_usage() -> tuple[int, int]:
    """This process's CPU time (user + system, in ms) and resident memory (bytes).

    Read once a heartbeat; the resident size comes from /proc where there is one, else
    the peak resident size is the best there is."""
    times = os.times()
    cpu_ms = int((times.user + times.system) * 1000)
    try:
        with open("/proc/self/statm", "rb") as statm:
            rss = int(statm.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return cpu_ms, rss


# --- validation (used by the envelope) ---------------------------------------------------

#: most entries (label values and buckets together) one snapshot may hold
MAX_SNAPSHOT_ENTRIES = 100_000
_SECTIONS = frozenset(("counters", "gauges", "histograms"))
_LIMIT = 2**63


def valid_snapshot(value: object) -> bool:
    """Whether ``value`` has the snapshot layout, with non-negative integers only and a
    bounded size (the broker sums what it gets, so nothing else may get in)."""
    if type(value) is not dict or not value.keys() <= _SECTIONS:
        return False
    entries = 0
    for section, metrics in value.items():
        if type(metrics) is not dict:
            return False
        for name, values in metrics.items():
            if type(name) is not str or not 0 < len(name) <= 200:
                return False
            if section == "histograms":
                if type(values) is not list or not 2 <= len(values) <= 64:
                    return False
                items: Any = values
            else:
                if type(values) is not dict:
                    return False
                if not all(type(k) is str and len(k) <= 4096 for k in values):
                    return False
                items = values.values()
            if not all(type(v) is int and 0 <= v < _LIMIT for v in items):
                return False
            entries += len(values)
            if entries > MAX_SNAPSHOT_ENTRIES:
                return False
    return True
