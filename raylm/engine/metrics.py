"""Prometheus metrics with vLLM's names under the `raylm:` prefix.

Each engine core counts its own requests in plain numbers (`CoreMetrics`: histogram bucket
counts and finish reasons, cheap enough for every token of every step); whoever serves
`/metrics` gathers every core's snapshot and stats and renders them together
(`render_metrics`): gauges and engine counters per core (label `engine`), latency
histograms and request counts summed over the cores.
"""
from __future__ import annotations

from bisect import bisect_left
from typing import Optional, Sequence

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

# Bucket edges as in vLLM's metrics.
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               7.5, 10.0, 20.0, 40.0, 80.0]
E2E_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
               60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]

FINISHED_REASONS = ("stop", "length", "abort")

_HISTOGRAMS = {
    "ttft": ("raylm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
             TTFT_BUCKETS),
    "itl": ("raylm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
            ITL_BUCKETS),
    "e2e": ("raylm:e2e_request_latency_seconds", "Histogram of end to end request latency in seconds.",
            E2E_BUCKETS),
}
_GAUGES = {
    "num_requests_running": "Number of requests in model execution batches.",
    "num_requests_waiting": "Number of requests waiting to be processed.",
    "kv_cache_usage_perc": "KV-cache usage. 1 means 100 percent usage.",
}
_COUNTERS = {  # metric name -> (stats key, help)
    "prefix_cache_queries": ("prefix_cache_queries",
                             "Prefix cache queries, in terms of number of queried tokens."),
    "prefix_cache_hits": ("prefix_cache_hit_tokens",
                          "Prefix cache hits, in terms of number of cached tokens."),
    "num_preemptions": ("num_preemptions", "Cumulative number of preemptions."),
    "prompt_tokens": ("prompt_tokens", "Number of prefill tokens processed."),
    "generation_tokens": ("generation_tokens", "Number of generation tokens processed."),
}
# Speculative decoding (vLLM's names), rendered for cores that speculate.
_SPEC_COUNTERS = {
    "spec_decode_num_drafts": "Number of spec decoding drafts.",
    "spec_decode_num_draft_tokens": "Number of draft tokens.",
    "spec_decode_num_accepted_tokens": "Number of accepted tokens.",
}
_SPEC_PER_POS = "spec_decode_num_accepted_tokens_per_pos"


class _Histogram:
    """Bucket counts (not cumulative; the last is +Inf) and the sum of observations."""

    __slots__ = ("edges", "counts", "sum")

    def __init__(self, edges: list[float]):
        self.edges = edges
        self.counts = [0] * (len(edges) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.edges, value)] += 1  # le semantics: value <= edge
        self.sum += value


class CoreMetrics:
    """One engine core's request metrics as plain numbers; `snapshot()` is msgpack-able."""

    def __init__(self):
        self.histograms = {k: _Histogram(edges) for k, (_, _, edges) in _HISTOGRAMS.items()}
        self.success = {reason: 0 for reason in FINISHED_REASONS}

    def observe_first_token(self, seconds: float) -> None:
        self.histograms["ttft"].observe(seconds)

    def observe_inter_token(self, seconds: float) -> None:
        self.histograms["itl"].observe(seconds)

    def observe_finished(self, finished_reason: str, e2e_seconds: float) -> None:
        self.success[finished_reason] = self.success.get(finished_reason, 0) + 1
        self.histograms["e2e"].observe(e2e_seconds)

    def snapshot(self) -> dict:
        return {"histograms": {k: (list(h.counts), h.sum) for k, h in self.histograms.items()},
                "success": dict(self.success)}


class _Collector:
    def __init__(self, families):
        self.families = families

    def collect(self):
        return iter(self.families)


GROUP_STATES = ("dead", "serving", "starting", "restarting")  # raylm:group_state's values


def render_metrics(model_name: str, stats: Sequence[dict], snapshots: Sequence[dict],
                   groups: Optional[Sequence[dict]] = None, redispatched: int = 0) -> bytes:
    """Prometheus exposition text of every core: `stats[i]` and `snapshots[i]` are core
    i's `EngineCore.stats()` and `CoreMetrics.snapshot()`; `groups` the router's view of
    each group ({"state", "restarts"}), `redispatched` the requests moved off failed ones."""
    families = []
    if groups is not None:
        state = GaugeMetricFamily("raylm:group_state", "Worker group state: " + ", ".join(
            f"{i} {name}" for i, name in enumerate(GROUP_STATES)) + ".", labels=["model_name", "group"])
        restarts = CounterMetricFamily("raylm:group_restarts", "Restarts of each worker group.",
                                       labels=["model_name", "group"])
        for i, g in enumerate(groups):
            state.add_metric([model_name, str(i)], float(GROUP_STATES.index(g["state"])))
            restarts.add_metric([model_name, str(i)], float(g["restarts"]))
        moved = CounterMetricFamily("raylm:requests_redispatched",
                                    "Requests moved to another worker group after theirs failed.",
                                    labels=["model_name"])
        moved.add_metric([model_name], float(redispatched))
        families += [state, restarts, moved]
    labels = ["model_name", "engine"]
    for name, doc in _GAUGES.items():
        fam = GaugeMetricFamily(f"raylm:{name}", doc, labels=labels)
        for i, st in enumerate(stats):
            fam.add_metric([model_name, str(i)], float(st.get(name, 0.0)))
        families.append(fam)
    for name, (key, doc) in _COUNTERS.items():
        fam = CounterMetricFamily(f"raylm:{name}", doc, labels=labels)
        for i, st in enumerate(stats):
            fam.add_metric([model_name, str(i)], float(st.get(key, 0)))
        families.append(fam)
    families += _spec_families(model_name, stats)
    for key, (name, doc, edges) in _HISTOGRAMS.items():
        counts, total = [0] * (len(edges) + 1), 0.0
        for snap in snapshots:
            c, s = snap["histograms"][key]
            counts = [a + b for a, b in zip(counts, c)]
            total += s
        cumulative, buckets = 0, []
        for edge, c in zip([*map(str, edges), "+Inf"], counts):
            cumulative += c
            buckets.append((edge, cumulative))
        fam = HistogramMetricFamily(name, doc, labels=["model_name"])
        fam.add_metric([model_name], buckets, total)
        families.append(fam)
    success = CounterMetricFamily("raylm:request_success", "Count of finished requests by finish reason.",
                                  labels=["model_name", "finished_reason"])
    reasons = dict.fromkeys(FINISHED_REASONS, 0)
    for snap in snapshots:
        for reason, n in snap["success"].items():
            reasons[reason] = reasons.get(reason, 0) + n
    for reason, n in reasons.items():
        success.add_metric([model_name, reason], float(n))
    families.append(success)
    registry = CollectorRegistry()
    registry.register(_Collector(families))
    return generate_latest(registry)


def _spec_families(model_name: str, stats: Sequence[dict]) -> list:
    """The speculative-decoding counters of the cores that speculate (none otherwise)."""
    cores = [(i, st) for i, st in enumerate(stats) if _SPEC_PER_POS in st]
    if not cores:
        return []
    labels = ["model_name", "engine"]
    families = []
    for name, doc in _SPEC_COUNTERS.items():
        fam = CounterMetricFamily(f"raylm:{name}", doc, labels=labels)
        for i, st in cores:
            fam.add_metric([model_name, str(i)], float(st.get(name, 0)))
        families.append(fam)
    fam = CounterMetricFamily(f"raylm:{_SPEC_PER_POS}", "Accepted tokens per draft position.",
                              labels=labels + ["position"])
    for i, st in cores:
        for pos, n in enumerate(st[_SPEC_PER_POS]):
            fam.add_metric([model_name, str(i), str(pos)], float(n))
    families.append(fam)
    return families
