"""Prometheus metrics with vLLM's names under the `raylm:` prefix.

Gauges and engine counters are read from the engines when scraped (a collector), so they
are current even when idle; per-request latencies are histograms fed as requests progress.
"""
from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# Bucket edges as in vLLM's metrics.
_TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
_ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0]
_E2E_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]

FINISHED_REASONS = ("stop", "length", "abort")


class _EngineCollector:
    """Reads `stats_fn()` -> [per-group stats dict] at scrape time."""

    def __init__(self, model_name: str, stats_fn: Callable[[], list[dict]]):
        self.model_name = model_name
        self.stats_fn = stats_fn

    def collect(self):
        stats = self.stats_fn()
        labels = ["model_name", "engine"]
        gauges = {
            "num_requests_running": "Number of requests in model execution batches.",
            "num_requests_waiting": "Number of requests waiting to be processed.",
            "kv_cache_usage_perc": "KV-cache usage. 1 means 100 percent usage.",
        }
        counters = {
            "prefix_cache_queries": ("prefix_cache_queries",
                                     "Prefix cache queries, in terms of number of queried tokens."),
            "prefix_cache_hits": ("prefix_cache_hit_tokens",
                                  "Prefix cache hits, in terms of number of cached tokens."),
            "num_preemptions": ("num_preemptions", "Cumulative number of preemptions."),
            "prompt_tokens": ("prompt_tokens", "Number of prefill tokens processed."),
            "generation_tokens": ("generation_tokens", "Number of generation tokens processed."),
        }
        for name, doc in gauges.items():
            fam = GaugeMetricFamily(f"raylm:{name}", doc, labels=labels)
            for i, st in enumerate(stats):
                fam.add_metric([self.model_name, str(i)], float(st[name]))
            yield fam
        for name, (key, doc) in counters.items():
            fam = CounterMetricFamily(f"raylm:{name}", doc, labels=labels)
            for i, st in enumerate(stats):
                fam.add_metric([self.model_name, str(i)], float(st[key]))
            yield fam


class EngineMetrics:
    """Every metric of one served model, in its own registry."""

    def __init__(self, model_name: str, stats_fn: Callable[[], list[dict]]):
        self.model_name = model_name
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(model_name, stats_fn))
        lbl = ["model_name"]
        self.ttft = Histogram("raylm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                              lbl, buckets=_TTFT_BUCKETS, registry=self.registry)
        self.itl = Histogram("raylm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                             lbl, buckets=_ITL_BUCKETS, registry=self.registry)
        self.e2e = Histogram("raylm:e2e_request_latency_seconds",
                             "Histogram of end to end request latency in seconds.",
                             lbl, buckets=_E2E_BUCKETS, registry=self.registry)
        self.success = Counter("raylm:request_success", "Count of finished requests by finish reason.",
                               lbl + ["finished_reason"], registry=self.registry)
        for reason in FINISHED_REASONS:  # expose zeros so dashboards see every series
            self.success.labels(model_name, reason)

    def observe_first_token(self, seconds: float) -> None:
        self.ttft.labels(self.model_name).observe(seconds)

    def observe_inter_token(self, seconds: float) -> None:
        self.itl.labels(self.model_name).observe(seconds)

    def observe_finished(self, finished_reason: str, e2e_seconds: float) -> None:
        self.success.labels(self.model_name, finished_reason).inc()
        self.e2e.labels(self.model_name).observe(e2e_seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
