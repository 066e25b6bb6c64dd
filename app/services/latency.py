"""Per-variant latency over the last minutes, from the server's own request histograms (as Prometheus would
compute histogram_quantile over a rate window), for the dashboard and `GET /models/{name}/latency`; for
generation models also time to first token, decode tokens/s and tokens generated, from the token metrics."""

from __future__ import annotations

import threading
import time
from collections import deque

from app.metrics import LATENCY_BUCKETS, TOKEN_BUCKETS, GenerationTotals, Metrics

SNAPSHOT_SECONDS = 10.0
KEEP_SECONDS = 30 * 60.0

Buckets = dict[tuple[str, str], list[float]]
Generations = dict[tuple[str, str], GenerationTotals]
Summary = dict[str, dict[str, float | int | None]]


class LatencyWindow:
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._lock = threading.Lock()
        # Counts are zero when the process starts: that is the first snapshot.
        self._snapshots: deque[tuple[float, Buckets, Generations]] = deque([(time.monotonic(), {}, {})])

    def snapshot(self) -> None:
        now, current = time.monotonic(), self._metrics.request_buckets()
        generations = self._metrics.generation_totals()
        with self._lock:
            self._snapshots.append((now, current, generations))
            while len(self._snapshots) > 1 and now - self._snapshots[1][0] > KEEP_SECONDS:
                self._snapshots.popleft()

    def summary(self, model: str, seconds: float) -> Summary:
        """{variant: {"requests", "p50_ms", "p99_ms"}} over about the last `seconds` (less right after a start);
        variants that generated tokens also get "ttft_p50_ms", "ttft_p99_ms", "decode_tokens_per_second" (one
        request's rate: 1 / its mean time per output token, averaged over requests) and "generated_tokens"."""
        now, current = time.monotonic(), self._metrics.request_buckets()
        generations = self._metrics.generation_totals()
        with self._lock:
            _, base, base_generations = self._snapshots[0]
            for taken, buckets, totals in self._snapshots:
                if now - taken < seconds:
                    break
                base, base_generations = buckets, totals
        result: Summary = {}
        for (name, variant), counts in current.items():
            if name != model:
                continue
            delta = _delta(counts, base.get((name, variant)))
            result[variant] = {"requests": int(delta[-1]), "p50_ms": _quantile(0.5, delta),
                               "p99_ms": _quantile(0.99, delta)}
        for (name, variant), generated in generations.items():
            if name == model:
                result.setdefault(variant, {"requests": 0, "p50_ms": None, "p99_ms": None}).update(
                    _generation_summary(generated, base_generations.get((name, variant))))
        return result


def _generation_summary(now: GenerationTotals, before: GenerationTotals | None) -> dict[str, float | int | None]:
    before = before or GenerationTotals(ttft=[0.0] * len(now.ttft))
    ttft = _delta(now.ttft, before.ttft)
    tpot_sum, tpot_count = now.tpot_sum - before.tpot_sum, now.tpot_count - before.tpot_count
    return {"ttft_p50_ms": _quantile(0.5, ttft, TOKEN_BUCKETS), "ttft_p99_ms": _quantile(0.99, ttft, TOKEN_BUCKETS),
            "decode_tokens_per_second": round(tpot_count / tpot_sum, 2) if tpot_sum > 0 and tpot_count > 0 else None,
            "generated_tokens": int(max(now.tokens - before.tokens, 0.0))}


def _delta(counts: list[float], earlier: list[float] | None) -> list[float]:
    return [max(c - e, 0.0) for c, e in zip(counts, earlier or [0.0] * len(counts), strict=True)]


def _quantile(q: float, cumulative: list[float], bounds: tuple[float, ...] = LATENCY_BUCKETS) -> float | None:
    """Prometheus' histogram_quantile: linear within the bucket that holds the rank, in milliseconds."""
    total = cumulative[-1]
    if total <= 0:
        return None
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in zip(bounds, cumulative, strict=False):
        if count >= rank:
            width = count - lower_count
            fraction = (rank - lower_count) / width if width else 1.0
            return round((lower_bound + (bound - lower_bound) * fraction) * 1e3, 3)
        lower_bound, lower_count = bound, count
    return round(bounds[-1] * 1e3, 3)  # beyond the last bound: Prometheus reports the bound too
