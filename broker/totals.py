"""The cluster's figures, summed in the broker: what /metrics and the dashboard show.

* :class:`ClusterTotals` keeps the latest snapshot of every worker (the ``STATS`` verb,
  cumulative figures) and sums them. A worker that is gone (it died, stopped, or was
  purged for silence) leaves its counters and histograms behind in a retired sum, so a
  ``*_total`` never goes down when a worker restarts; its gauges go with it. A purged
  worker that comes back (a stall, not a death) takes its figures back out of the
  retired sum, so nothing is counted twice.
* :func:`cluster_snapshot` adds the broker's own figures. It walks every channel, so the
  broker loop runs it only when a scrape (or the dashboard) asked: no scrapes, no cost.

Apart from :mod:`vask.broker.metrics`, which serves them: that module imports
``prometheus_client`` (with ``http.server``, ``wsgiref`` and ``email``, about 9 MiB of a
process's memory), and a broker without a /metrics listener never loads it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vask.broker.server import Broker

Snapshot = dict[str, Any]
#: purged workers remembered individually (to take them back if they return); older
#: ones stay in the retired sum for good
RECENT_RETIRED = 256
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


def empty_snapshot() -> Snapshot:
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
        self.retired: Snapshot = empty_snapshot()
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
        out = empty_snapshot()
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
