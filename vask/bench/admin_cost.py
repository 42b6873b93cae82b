"""What the dashboard's broker-side work costs on a large state (docs/dashboard.md).

``python -m vask.bench.admin_cost --channels 100000`` fills a broker's state with that
many channels of one app (every tenth a presence channel with one member) and times, best
of ``--repeat``, what the broker loop runs for the dashboard: one overview sample, a
channel page without a prefix, and one with a narrow prefix. No sockets are used.
"""

from __future__ import annotations

import argparse
import time
import uuid
from collections.abc import Callable

from vask.broker.admin import channel_page, overview_sample
from vask.broker.server import Broker
from vask.broker.state import ChannelState
from vask.broker.totals import cluster_snapshot
from vask.config import App, Settings


def best_ms(work: Callable[[], object], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        began = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - began)
    return best * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    settings = Settings(apps=(App(id="1", key="k", secret="s"),))
    broker = Broker(settings, f"inproc://admin-cost-{uuid.uuid4().hex}")
    try:
        for i in range(args.channels):
            broker.state.channels[("1", f"chan-{i}")] = ChannelState(
                [b"w", 1], 1, {"u": {"1.1": {}}} if i % 10 == 0 else None)
        narrow = f"chan-{args.channels // 10 - 1}"
        print(f"{args.channels} channels, best of {args.repeat}:")
        sample = best_ms(lambda: overview_sample(broker, cluster_snapshot(broker)), args.repeat)
        print(f"  overview sample:             {sample:.1f} ms")
        print(f"  channel page, no prefix:     "
              f"{best_ms(lambda: channel_page(broker, '1', '', 200), args.repeat):.1f} ms")
        print(f"  channel page, prefix {narrow}: "
              f"{best_ms(lambda: channel_page(broker, '1', narrow, 200), args.repeat):.1f} ms")
    finally:
        broker.router.close(linger=0)


if __name__ == "__main__":
    main()
