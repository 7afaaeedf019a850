"""The request ledger and router: which worker group serves each request.

It sees every group: each engine core publishes a snapshot (stats, and the prefix-cache
block hashes it cached or evicted since the last one), which `update` applies. Per
request it handles two messages and no tokens: `assign` (route, or refuse when the
waiting queue is full) and `release` (the request ended). A request goes to the group
caching the longest part of its prefix (or with requests in flight sharing it), unless
that group is clearly busier; otherwise to the least-loaded group.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

# Prefer the group caching a request's prefix unless its load exceeds the least-loaded
# group's by more than this (load = sequences in flight / max_num_seqs + KV usage).
AFFINITY_LOAD_SLACK = 0.5
# Seconds a refused client is told to wait (Retry-After).
RETRY_AFTER_S = 1


class Overloaded(Exception):
    """The waiting queue is full: answer 429 with Retry-After."""

    def __init__(self, message: str, retry_after: int = RETRY_AFTER_S):
        super().__init__(message)
        self.retry_after = retry_after


class NoGroupAvailable(Exception):
    """Every worker group has failed: answer 503."""


@dataclass(eq=False)
class GroupView:
    """What the router knows of one worker group."""

    max_num_seqs: int
    alive: bool = True
    error: Optional[str] = None
    seq: int = -1  # the last prefix-cache event applied
    cached: set = field(default_factory=set)  # block hashes its pool caches
    inflight_hashes: Counter = field(default_factory=Counter)  # of requests routed, unfinished
    inflight_seqs: int = 0  # sequences routed here and not released
    stats: dict = field(default_factory=dict)
    metrics: Optional[dict] = None
    requests_routed: int = 0

    @property
    def kv_usage(self) -> float:
        return float(self.stats.get("kv_cache_usage_perc", 0.0))

    @property
    def load(self) -> float:
        return self.inflight_seqs / self.max_num_seqs + self.kv_usage

    @property
    def queued(self) -> int:
        """Sequences routed here beyond what one step can run."""
        return max(0, self.inflight_seqs - self.max_num_seqs)

    def prefix_hit(self, hashes: list[int]) -> int:
        """Leading blocks of a prefix cached here or shared with a request in flight."""
        cached = inflight = 0
        for h in hashes:
            if h not in self.cached:
                break
            cached += 1
        for h in hashes:
            if self.inflight_hashes[h] <= 0:
                break
            inflight += 1
        return max(cached, inflight)


@dataclass
class _Entry:
    group: int
    hashes: list[int]
    num_seqs: int
    start: float


class Router:
    """The ledger of requests in flight and the routing policy (see module doc)."""

    def __init__(self, num_groups: int, max_num_seqs: int, max_queued_requests: int):
        if max_queued_requests < 0:
            raise ValueError(f"max_queued_requests must be >= 0, got {max_queued_requests}")
        self.groups = [GroupView(max_num_seqs) for _ in range(num_groups)]
        self.max_queued_requests = max_queued_requests
        self.ledger: dict[str, _Entry] = {}
        self.calls = Counter()  # messages received, by kind: for tests and stats
        self.num_rejected = 0

    # ---- per request ---------------------------------------------------------------
    def assign(self, request_id: str, hashes: list[int], num_seqs: int = 1) -> int:
        """Choose the group for a new request (n = num_seqs completions) and record it.
        Raises Overloaded past the queue bound, NoGroupAvailable with no live group,
        ValueError for an id already in flight."""
        self.calls["assign"] += 1
        if request_id in self.ledger:
            raise ValueError(f"request_id {request_id!r} is already in use")
        alive = [i for i, g in enumerate(self.groups) if g.alive]
        if not alive:
            errors = "; ".join(f"group {i}: {g.error}" for i, g in enumerate(self.groups))
            raise NoGroupAvailable(f"every worker group has failed ({errors})")
        queued = sum(self.groups[i].queued for i in alive)
        if queued + num_seqs > self.max_queued_requests + sum(
                max(0, self.groups[i].max_num_seqs - self.groups[i].inflight_seqs) for i in alive):
            self.num_rejected += 1
            raise Overloaded(f"the server is at capacity: {queued} requests are waiting "
                             f"(max_queued_requests is {self.max_queued_requests}); retry later")
        gi = self._route(alive, hashes)
        g = self.groups[gi]
        g.inflight_seqs += num_seqs
        g.inflight_hashes.update(hashes)
        g.requests_routed += 1
        self.ledger[request_id] = _Entry(gi, hashes, num_seqs, time.monotonic())
        return gi

    def _route(self, alive: list[int], hashes: list[int]) -> int:
        least = min(alive, key=lambda i: (self.groups[i].load, self.groups[i].requests_routed))
        best, best_hit = least, 0
        if hashes:
            floor = self.groups[least].load
            for i in alive:
                hit = self.groups[i].prefix_hit(hashes)
                if hit > best_hit and self.groups[i].load - floor <= AFFINITY_LOAD_SLACK:
                    best, best_hit = i, hit
        return best

    def release(self, request_ids: list[str]) -> None:
        """These requests ended (finished, aborted or failed): forget them."""
        self.calls["release"] += 1
        for rid in request_ids:
            entry = self.ledger.pop(rid, None)
            if entry is None:
                continue
            g = self.groups[entry.group]
            g.inflight_seqs -= entry.num_seqs
            g.inflight_hashes.subtract(entry.hashes)
            g.inflight_hashes += Counter()  # drop zero counts

    def group_of(self, request_id: str) -> Optional[int]:
        entry = self.ledger.get(request_id)
        return None if entry is None else entry.group

    # ---- per group -----------------------------------------------------------------
    def update(self, gi: int, snapshot: dict) -> None:
        """Apply a core's snapshot (`CoreLoop.snapshot(since=groups[gi].seq)`)."""
        g = self.groups[gi]
        g.stats, g.metrics = snapshot["stats"], snapshot.get("metrics")
        if "hashes" in snapshot:
            g.cached = set(snapshot["hashes"])
        else:
            for op, h in snapshot["events"]:
                if op:
                    g.cached.add(h)
                else:
                    g.cached.discard(h)
        g.seq = snapshot["seq"]
        if not snapshot.get("alive", True):
            self.mark_dead(gi, snapshot.get("error") or "the engine core stopped")

    def mark_dead(self, gi: int, error: str) -> None:
        g = self.groups[gi]
        g.alive, g.error = False, error
        g.cached = set()

    def stats(self) -> dict:
        """Every group's latest stats summed (KV usage over all blocks), with the
        router's own counts and each group's stats under "groups"."""
        groups = [dict(g.stats, alive=g.alive, requests_routed=g.requests_routed,
                       inflight_seqs=g.inflight_seqs) for g in self.groups]
        total: dict = {}
        for st in groups:
            for k, v in st.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    total[k] = total.get(k, 0) + v
        blocks = total.get("num_blocks", 0)
        total["kv_cache_usage_perc"] = total.get("blocks_in_use", 0) / blocks if blocks else 0.0
        total.update(requests_in_flight=len(self.ledger), requests_rejected=self.num_rejected,
                     calls=dict(self.calls), groups=groups)
        return total
