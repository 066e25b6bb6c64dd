"""Per-variant latency over the last minutes, from the server's own request histograms (as Prometheus would
compute histogram_quantile over a rate window), for the dashboard and `GET /models/{name}/latency`."""

from __future__ import annotations

import threading
import time
from collections import deque

from app.metrics import LATENCY_BUCKETS, Metrics

SNAPSHOT_SECONDS = 10.0
KEEP_SECONDS = 30 * 60.0

Buckets = dict[tuple[str, str], list[float]]


class LatencyWindow:
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._lock = threading.Lock()
        # Counts are zero when the process starts: that is the first snapshot.
        self._snapshots: deque[tuple[float, Buckets]] = deque([(time.monotonic(), {})])

    def snapshot(self) -> None:
        now, current = time.monotonic(), self._metrics.request_buckets()
        with self._lock:
            self._snapshots.append((now, current))
            while len(self._snapshots) > 1 and now - self._snapshots[1][0] > KEEP_SECONDS:
                self._snapshots.popleft()

    def summary(self, model: str, seconds: float) -> dict[str, dict[str, float | int | None]]:
        """{variant: {"requests", "p50_ms", "p99_ms"}} over about the last `seconds` (less right after a start)."""
        now, current = time.monotonic(), self._metrics.request_buckets()
        with self._lock:
            base = self._snapshots[0][1]
            for taken, buckets in self._snapshots:
                if now - taken < seconds:
                    break
                base = buckets
        result: dict[str, dict[str, float | int | None]] = {}
        for (name, variant), counts in current.items():
            if name != model:
                continue
            earlier = base.get((name, variant), [0.0] * len(counts))
            delta = [max(c - e, 0.0) for c, e in zip(counts, earlier, strict=True)]
            result[variant] = {"requests": int(delta[-1]), "p50_ms": _quantile(0.5, delta),
                               "p99_ms": _quantile(0.99, delta)}
        return result


def _quantile(q: float, cumulative: list[float]) -> float | None:
    """Prometheus' histogram_quantile: linear within the bucket that holds the rank, in milliseconds."""
    total = cumulative[-1]
    if total <= 0:
        return None
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in zip(LATENCY_BUCKETS, cumulative, strict=False):
        if count >= rank:
            width = count - lower_count
            fraction = (rank - lower_count) / width if width else 1.0
            return round((lower_bound + (bound - lower_bound) * fraction) * 1e3, 3)
        lower_bound, lower_count = bound, count
    return round(LATENCY_BUCKETS[-1] * 1e3, 3)  # beyond the last bound: Prometheus reports the bound too
