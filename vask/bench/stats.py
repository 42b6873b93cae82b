"""Pure statistics helpers: percentiles, latency summaries and medians.

Kept free of I/O so they can be unit-tested exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Return the ``q``-th percentile (0..100) of already sorted values.

    Uses the nearest-rank definition (the smallest value such that at least
    ``q`` percent of the samples are <= it), which always returns an observed
    sample; for latency reporting that is more honest than interpolating
    between two samples. An empty sequence yields ``nan``.
    """
    n = len(sorted_values)
    if n == 0:
        return math.nan
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile must be within 0..100, got {q}")
    if q == 0.0:
        return float(sorted_values[0])
    rank = math.ceil(q / 100.0 * n)
    return float(sorted_values[min(max(rank, 1), n) - 1])


def latency_summary_us(samples_us: Iterable[int]) -> dict[str, float]:
    """Summarise latency samples given in microseconds as milliseconds.

    Returns ``count``, ``p50``, ``p95``, ``p99``, ``max`` and ``mean`` (the
    time values in ms). Negative samples (clock skew cannot happen with
    CLOCK_MONOTONIC, but be defensive) are clamped to zero.
    """
    values = sorted(max(0, int(v)) for v in samples_us)
    n = len(values)
    if n == 0:
        nan = math.nan
        return {"count": 0, "p50": nan, "p95": nan, "p99": nan, "max": nan, "mean": nan}
    return {
        "count": n,
        "p50": percentile(values, 50) / 1000.0,
        "p95": percentile(values, 95) / 1000.0,
        "p99": percentile(values, 99) / 1000.0,
        "max": values[-1] / 1000.0,
        "mean": sum(values) / n / 1000.0,
    }


def median(values: Sequence[float]) -> float:
    """Median of ``values`` (mean of the two middle ones for even counts)."""
    s = sorted(values)
    n = len(s)
    if n == 0:
        return math.nan
    mid = n // 2
    if n % 2:
        return float(s[mid])
    return (s[mid - 1] + s[mid]) / 2.0


def safe_div(num: float, den: float) -> float:
    """``num / den``, or ``nan`` when the denominator is zero."""
    return num / den if den else math.nan
