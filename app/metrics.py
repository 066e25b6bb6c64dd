"""Every Prometheus metric of the service, defined once, with cached label children for the hot path."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
JOB_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)

# Finished jobs by state, and durations of succeeded jobs by recipe: read from the database at scrape time.
JobStats = Callable[[], tuple[dict[str, int], dict[str, list[float]]]]


class JobsCollector(Collector):
    """Jobs run in other processes (a child, a Celery worker on another host); the database is the one place
    that knows them all, so every replica reports the same totals (aggregate with max, not sum)."""

    def __init__(self, stats: JobStats) -> None:
        self._stats = stats

    def collect(self) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
        try:
            counts, durations = self._stats()
        except Exception:
            return  # a scrape while the database is down shows the other metrics, not an error
        total = CounterMetricFamily("slimserve_compression_jobs", "Compression jobs by state.", labels=["state"])
        for state, count in sorted(counts.items()):
            total.add_metric([state], count)
        yield total
        histogram = HistogramMetricFamily(
            "slimserve_compression_job_duration_seconds", "Duration of succeeded compression jobs.",
            labels=["recipe"],
        )
        for recipe, values in sorted(durations.items()):
            buckets = [(str(bound), sum(1 for v in values if v <= bound)) for bound in JOB_BUCKETS]
            buckets.append(("+Inf", len(values)))
            histogram.add_metric([recipe], buckets, sum_value=sum(values))
        yield histogram


class Metrics:
    """The service's metrics on one registry, so that each app built in a test has its own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.request_duration = Histogram(
            "slimserve_request_duration_seconds", "Time in the server per prediction request.",
            ["model", "variant", "protocol"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.inference_duration = Histogram(
            "slimserve_inference_duration_seconds", "Model compute time per prediction.",
            ["model", "variant"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.queue_duration = Histogram(
            "slimserve_queue_duration_seconds", "Time a prediction waited before compute.",
            ["model", "variant"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.requests = Counter(
            "slimserve_requests", "Prediction requests by outcome.",
            ["model", "variant", "protocol", "code"], registry=r,
        )
        self.batch_size = Histogram(
            "slimserve_batch_size", "Rows in each onnxruntime call.",
            ["model", "variant"], buckets=BATCH_BUCKETS, registry=r,
        )
        self.model_size = Gauge(
            "slimserve_model_size_bytes", "Size of each served model variant.",
            ["model", "variant"], registry=r, multiprocess_mode="max",
        )
        self.loaded_models = Gauge(
            "slimserve_loaded_models", "onnxruntime sessions open in this process.", registry=r,
            multiprocess_mode="livesum",
        )
        self.loaded_bytes = Gauge(
            "slimserve_loaded_bytes", "Model bytes behind the open sessions of this process.", registry=r,
            multiprocess_mode="livesum",
        )
        self.shadow_agreement = Gauge(
            "slimserve_shadow_agreement_ratio",
            "Top-1 agreement (classifiers) or mean cosine of a shadow variant with the answering variant.",
            ["model", "variant"], registry=r, multiprocess_mode="mostrecent",
        )
        self.time_to_first_token = Histogram(
            "slimserve_time_to_first_token_seconds",
            "From a generation request's arrival to its first generated token (the prompt's prefill included).",
            ["model", "variant"], buckets=TOKEN_BUCKETS, registry=r,
        )
        self.time_per_output_token = Histogram(
            "slimserve_time_per_output_token_seconds", "Mean time per generated token after the first, per request.",
            ["model", "variant"], buckets=TOKEN_BUCKETS, registry=r,
        )
        self.generated_tokens = Counter(
            "slimserve_generated_tokens", "Tokens generated.", ["model", "variant"], registry=r,
        )
        self.prompt_tokens = Counter(
            "slimserve_prompt_tokens", "Prompt tokens of generation requests.", ["model", "variant"], registry=r,
        )
        self.active_generations = Gauge(
            "slimserve_active_generations", "Generations running now.", ["model"], registry=r,
            multiprocess_mode="livesum",
        )
        self._ok_children: dict[tuple[str, str, str], tuple[Any, ...]] = {}
        self._jobs: JobsCollector | None = None
        self._batch_children: dict[tuple[str, str], Any] = {}

    def observe_success(
        self, *, model: str, variant: str, protocol: str, total_s: float, queue_s: float, infer_s: float,
    ) -> None:
        key = (model, variant, protocol)
        children = self._ok_children.get(key)
        if children is None:
            # labels() costs a dict lookup and a lock per call; the hot path reuses the children.
            children = (
                self.request_duration.labels(model, variant, protocol),
                self.inference_duration.labels(model, variant),
                self.queue_duration.labels(model, variant),
                self.requests.labels(model, variant, protocol, "200"),
            )
            self._ok_children[key] = children
        req, inf, queue, count = children
        req.observe(total_s)
        inf.observe(infer_s)
        queue.observe(queue_s)
        count.inc()

    def observe_batch(self, model: str, variant: str, rows: int) -> None:
        """Rows of one onnxruntime call (several requests when dynamic batching stacked them)."""
        child = self._batch_children.get((model, variant))
        if child is None:
            child = self._batch_children[(model, variant)] = self.batch_size.labels(model, variant)
        child.observe(rows)

    def observe_generation(self, *, model: str, variant: str, prompt_tokens: int, completion_tokens: int,
                           first_token_s: float | None, decode_s: float) -> None:
        self.prompt_tokens.labels(model, variant).inc(prompt_tokens)
        self.generated_tokens.labels(model, variant).inc(completion_tokens)
        if first_token_s is not None:
            self.time_to_first_token.labels(model, variant).observe(first_token_s)
        if completion_tokens > 1:
            self.time_per_output_token.labels(model, variant).observe(decode_s / (completion_tokens - 1))

    def observe_failure(self, *, model: str, variant: str, protocol: str, code: int, total_s: float) -> None:
        self.request_duration.labels(model, variant, protocol).observe(total_s)
        self.requests.labels(model, variant, protocol, str(code)).inc()

    def forget_model(self, model: str) -> None:
        self._ok_children = {k: v for k, v in self._ok_children.items() if k[0] != model}
        self._batch_children = {k: v for k, v in self._batch_children.items() if k[0] != model}
        for metric in (self.request_duration, self.inference_duration, self.queue_duration,
                       self.requests, self.batch_size, self.model_size, self.shadow_agreement,
                       self.time_to_first_token, self.time_per_output_token, self.generated_tokens,
                       self.prompt_tokens, self.active_generations):
            for labels in list(_label_sets(metric)):
                if labels and labels[0] == model:
                    metric.remove(*labels)

    def watch_jobs(self, stats: JobStats) -> None:
        self._jobs = JobsCollector(stats)
        self.registry.register(self._jobs)

    def request_buckets(self) -> dict[tuple[str, str], list[float]]:
        """Cumulative request-latency bucket counts per (model, variant), all protocols and processes summed;
        the last entry is +Inf (the request count)."""
        return self._histogram_buckets(self.request_duration, "slimserve_request_duration_seconds", LATENCY_BUCKETS)

    def generation_totals(self) -> dict[tuple[str, str], GenerationTotals]:
        """Per (model, variant), all processes summed: time-to-first-token bucket counts (cumulative, +Inf last),
        the sum and count of per-request time per output token, and the tokens generated."""
        ttft = self._histogram_buckets(self.time_to_first_token, "slimserve_time_to_first_token_seconds",
                                       TOKEN_BUCKETS)
        totals = {key: GenerationTotals(ttft=counts) for key, counts in ttft.items()}
        for family in self._families(self.time_per_output_token, self.generated_tokens):
            for sample in family.samples:
                key = (sample.labels.get("model", ""), sample.labels.get("variant", ""))
                entry = totals.setdefault(key, GenerationTotals(ttft=[0.0] * (len(TOKEN_BUCKETS) + 1)))
                if sample.name == "slimserve_time_per_output_token_seconds_sum":
                    entry.tpot_sum += sample.value
                elif sample.name == "slimserve_time_per_output_token_seconds_count":
                    entry.tpot_count += sample.value
                elif sample.name == "slimserve_generated_tokens_total":
                    entry.tokens += sample.value
        return totals

    def _families(self, *metrics: Any) -> list[Any]:
        # Only these metrics: collecting the whole registry would also run the jobs collector's query.
        if _multiprocess():
            names = {m._name for m in metrics}  # prometheus_client keeps the family name there
            return [f for f in _process_files_registry().collect() if f.name in names]
        return [family for metric in metrics for family in metric.collect()]

    def _histogram_buckets(self, histogram: Any, name: str, bounds: tuple[float, ...]
                           ) -> dict[tuple[str, str], list[float]]:
        totals: dict[tuple[str, str], list[float]] = {}
        for family in self._families(histogram):
            if family.name != name:
                continue
            for sample in family.samples:
                if not sample.name.endswith("_bucket"):
                    continue
                key = (sample.labels["model"], sample.labels["variant"])
                bound = sample.labels["le"]
                index = len(bounds) if bound == "+Inf" else bounds.index(float(bound))
                totals.setdefault(key, [0.0] * (len(bounds) + 1))[index] += sample.value
        return totals

    def render(self) -> tuple[bytes, str]:
        if _multiprocess():
            registry = _process_files_registry()
            if self._jobs is not None:
                registry.register(self._jobs)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


@dataclass
class GenerationTotals:
    ttft: list[float]
    tpot_sum: float = 0.0
    tpot_count: float = 0.0
    tokens: float = 0.0


def _multiprocess() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


def _process_files_registry() -> CollectorRegistry:
    """Several server processes: each writes its own files, and reading them sums them."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return registry


def _label_sets(metric: Any) -> list[tuple[str, ...]]:
    with metric._lock:  # prometheus_client has no public way to list a metric's children
        return list(metric._metrics.keys())
