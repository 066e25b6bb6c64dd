"""Latency over the last minutes from the request histograms: Prometheus' histogram_quantile, per variant."""

from __future__ import annotations

import time

import pytest

from app.metrics import Metrics
from app.services.latency import LatencyWindow


def _observe(metrics: Metrics, variant: str, seconds: float, times: int) -> None:
    for _ in range(times):
        metrics.observe_failure(model="m", variant=variant, protocol="v2", code=200, total_s=seconds)


def test_quantiles_interpolate_within_buckets_per_variant() -> None:
    metrics = Metrics()
    window = LatencyWindow(metrics)
    _observe(metrics, "original", 0.0007, 90)  # bucket (0.5 ms, 1 ms]
    _observe(metrics, "original", 0.02, 10)  # bucket (10 ms, 25 ms]
    _observe(metrics, "int8", 0.0002, 4)
    _observe(metrics.__class__(), "other-registry", 1.0, 5)  # another app's registry is not ours
    summary = window.summary("m", 300)
    assert summary["original"]["requests"] == 100
    # rank 50 of 90 in (0.5, 1] ms: 0.5 + 0.5 * 50/90
    assert summary["original"]["p50_ms"] == pytest.approx(0.5 + 0.5 * 50 / 90, abs=1e-3)
    # rank 99: 9 of the 10 in (10, 25] ms
    assert summary["original"]["p99_ms"] == pytest.approx(10 + 15 * 9 / 10, abs=1e-3)
    assert summary["int8"]["requests"] == 4 and set(summary) == {"original", "int8"}
    assert window.summary("nobody", 300) == {}


def test_only_requests_inside_the_window_count(monkeypatch: pytest.MonkeyPatch) -> None:
    metrics = Metrics()
    window = LatencyWindow(metrics)
    clock = [time.monotonic()]
    monkeypatch.setattr("app.services.latency.time.monotonic", lambda: clock[0])
    _observe(metrics, "original", 0.02, 50)
    window.snapshot()
    clock[0] += 400  # the 50 slow requests are now older than a 5-minute window
    _observe(metrics, "original", 0.0007, 10)
    summary = window.summary("m", 300)["original"]
    assert summary["requests"] == 10 and summary["p99_ms"] is not None and summary["p99_ms"] < 1.0
    assert window.summary("m", 600)["original"]["requests"] == 60


def test_generation_variants_get_time_to_first_token_and_decode_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    metrics = Metrics()
    window = LatencyWindow(metrics)
    clock = [time.monotonic()]
    monkeypatch.setattr("app.services.latency.time.monotonic", lambda: clock[0])
    metrics.observe_generation(model="m", variant="original", prompt_tokens=9, completion_tokens=11,
                               first_token_s=3.0, decode_s=10.0)  # 1 token/s, outside the window below
    window.snapshot()
    clock[0] += 400
    for first, decode in ((0.04, 0.2), (0.06, 0.5)):  # 10 tokens after the first: 50 and 20 tokens/s
        metrics.observe_generation(model="m", variant="int4", prompt_tokens=5, completion_tokens=11,
                                   first_token_s=first, decode_s=decode)
        metrics.observe_success(model="m", variant="int4", protocol="openai", total_s=first + decode, queue_s=0,
                                infer_s=first + decode)
    summary = window.summary("m", 300)
    int4 = summary["int4"]
    assert int4["requests"] == 2 and int4["generated_tokens"] == 22
    # mean time per output token (0.02 + 0.05) / 2 = 35 ms: 28.57 tokens/s
    assert int4["decode_tokens_per_second"] == pytest.approx(2 / 0.07, abs=0.01)
    assert int4["ttft_p50_ms"] is not None and 25 < int4["ttft_p50_ms"] <= 50  # rank 1 of 2: bucket (25, 50] ms
    assert summary["original"]["generated_tokens"] == 0 and summary["original"]["decode_tokens_per_second"] is None
    assert window.summary("m", 600)["original"]["generated_tokens"] == 11
