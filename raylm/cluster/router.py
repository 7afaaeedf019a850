"""The request ledger and router: which worker group serves each request.

It sees every group: each engine core publishes a snapshot (stats, and the prefix-cache
block hashes it cached or evicted since the last one), which `update` applies. Per
request it handles two messages and no tokens: `assign` (route, or refuse when the
waiting queue is full) and `release` (the request ended). A request goes to the group
caching the longest part of its prefix (or with requests in flight sharing it), unless
that group is clearly busier; otherwise to the least-loaded group. A group with a free
running slot always comes before one where the request would wait: the load's KV term
comes from snapshots that lag, and a stale one must not send requests to wait in one
group's queue while another has room (with requests of equal length that costs a whole
round of them).

Each group is `starting`, `serving`, `restarting` (its core died and a new one is being
started) or `dead` (not restarted, or between restarts). A serving group that holds work
and whose step counter has not moved for `step_timeout` seconds is hung: `watch` marks it
dead like a crashed one. Requests of a dead group are re-dispatched by the frontends
(`assign(..., redispatch=True)`), which counts them.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

# Prefer the group caching a request's prefix unless its load exceeds the least-loaded
# group's by more than this (load = sequences in flight / max_num_seqs + KV usage).
AFFINITY_LOAD_SLACK = 0.5
# KV usage from which a group counts as full even with free sequence slots (a new
# request's prompt would wait there for blocks).
KV_FULL = 0.95
# Seconds a refused client is told to wait (Retry-After).
RETRY_AFTER_S = 1


class Overloaded(Exception):
    """The waiting queue is full: answer 429 with Retry-After."""

    def __init__(self, message: str, retry_after: int = RETRY_AFTER_S):
        super().__init__(message)
        self.retry_after = retry_after


class NoGroupAvailable(Exception):
    """Every worker group has failed: answer 503."""


# Seconds between a group's death and its restart attempts: doubling up to the last.
RESTART_BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)


@dataclass(eq=False)
class GroupView:
    """What the router knows of one worker group."""

    max_num_seqs: int
    state: str = "serving"
    error: Optional[str] = None
    generation: int = 0  # bumped at each restart: the frontends then fetch the new core
    restarts: int = 0
    failures: int = 0  # deaths since it last served (for the restart back-off)
    last_steps: int = -1
    last_progress: float = field(default_factory=time.monotonic)  # steps advanced, or idle
    last_step_change: float = field(default_factory=time.monotonic)  # its step counter last moved
    last_assigned: float = float("-inf")  # a request was last routed here
    seq: int = -1  # the last prefix-cache event applied
    cached: set = field(default_factory=set)  # block hashes its pool caches
    inflight_hashes: Counter = field(default_factory=Counter)  # of requests routed, unfinished
    inflight_seqs: int = 0  # sequences routed here and not released
    stats: dict = field(default_factory=dict)
    metrics: Optional[dict] = None
    requests_routed: int = 0

    @property
    def alive(self) -> bool:
        return self.state == "serving"

    @property
    def holds_work(self) -> bool:
        """Its core runs or queues requests, or a request was routed here after its step
        counter last moved (one the core may not have taken in yet). Requests routed
        before that count no more: the core has stepped since, so it took them in, and
        any left in the ledger are ones no frontend will release (their ingress replica
        died), which must not make an idle core look hung."""
        return (self.stats.get("num_requests_running", 0) > 0 or self.stats.get("num_requests_waiting", 0) > 0
                or (self.inflight_seqs > 0 and self.last_assigned >= self.last_step_change))

    @property
    def kv_usage(self) -> float:
        return float(self.stats.get("kv_cache_usage_perc", 0.0))

    @property
    def load(self) -> float:
        return self.inflight_seqs / self.max_num_seqs + self.kv_usage

    @property
    def has_room(self) -> bool:
        """Whether a request routed here now would run in the next step, not wait."""
        return self.inflight_seqs < self.max_num_seqs and self.kv_usage < KV_FULL

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

    def __init__(self, num_groups: int, max_num_seqs: int, max_queued_requests: int,
                 step_timeout: float = 60.0):
        if max_queued_requests < 0:
            raise ValueError(f"max_queued_requests must be >= 0, got {max_queued_requests}")
        if step_timeout <= 0:
            raise ValueError(f"step_timeout must be > 0 seconds, got {step_timeout}")
        self.groups = [GroupView(max_num_seqs) for _ in range(num_groups)]
        self.max_queued_requests = max_queued_requests
        self.step_timeout = step_timeout
        self.ledger: dict[str, _Entry] = {}
        self.calls = Counter()  # messages received, by kind: for tests and stats
        self.num_rejected = 0
        self.num_redispatched = 0

    # ---- per request ---------------------------------------------------------------
    def assign(self, request_id: str, hashes: list[int], num_seqs: int = 1,
               redispatch: bool = False, failed_group: Optional[tuple[int, int]] = None) -> int:
        """Choose the group for a request (n = num_seqs completions) and record it.
        `redispatch`: the request's group died and it moves with its tokens so far (it
        replaces its own ledger entry, and the queue bound does not refuse it);
        `failed_group`: (group, generation) the caller saw die (see report_failure).
        Raises Overloaded past the queue bound, NoGroupAvailable with no serving group,
        ValueError for a new id already in flight."""
        self.calls["assign"] += 1
        self.report_failure(failed_group)
        if redispatch:
            self.release([request_id], count=False)
            self.num_redispatched += 1
        elif request_id in self.ledger:
            raise ValueError(f"request_id {request_id!r} is already in use")
        alive = [i for i, g in enumerate(self.groups) if g.alive]
        if not alive:
            states = ", ".join(f"group {i} {g.state}" for i, g in enumerate(self.groups))
            raise NoGroupAvailable(f"no worker group is serving ({states}); retry later")
        queued = sum(self.groups[i].queued for i in alive)
        if not redispatch and queued + num_seqs > self.max_queued_requests + sum(
                max(0, self.groups[i].max_num_seqs - self.groups[i].inflight_seqs) for i in alive):
            self.num_rejected += 1
            raise Overloaded(f"the server is at capacity: {queued} requests are waiting "
                             f"(max_queued_requests is {self.max_queued_requests}); retry later")
        gi = self._route(alive, hashes)
        g = self.groups[gi]
        g.inflight_seqs += num_seqs
        g.inflight_hashes.update(hashes)
        g.requests_routed += 1
        g.last_assigned = time.monotonic()
        self.ledger[request_id] = _Entry(gi, hashes, num_seqs, g.last_assigned)
        return gi

    def _route(self, alive: list[int], hashes: list[int]) -> int:
        groups = self.groups
        least = min(alive, key=lambda i: (not groups[i].has_room, groups[i].load, groups[i].requests_routed))
        best, best_hit = least, 0
        if hashes:
            floor, room = groups[least].load, groups[least].has_room
            for i in alive:
                if room and not groups[i].has_room:
                    continue  # it would wait there while another group has room
                hit = groups[i].prefix_hit(hashes)
                if hit > best_hit and groups[i].load - floor <= AFFINITY_LOAD_SLACK:
                    best, best_hit = i, hit
        return best

    def release(self, request_ids: list[str], count: bool = True) -> None:
        """These requests ended (finished, aborted or failed): forget them."""
        if count:
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
    def update(self, gi: int, snapshot: dict, now: Optional[float] = None) -> None:
        """Apply a core's snapshot (`CoreLoop.snapshot(since=groups[gi].seq)`)."""
        g = self.groups[gi]
        now = time.monotonic() if now is None else now
        g.stats, g.metrics = snapshot["stats"], snapshot.get("metrics")
        steps = g.stats.get("steps", 0)
        if steps != g.last_steps:
            g.last_step_change = now
        if steps != g.last_steps or not g.holds_work:
            g.last_steps, g.last_progress = steps, now
        # Snapshots come pushed and, for /metrics and stats, by call: one may end before
        # the prefix-cache events already applied (g.seq), and its older part is skipped.
        seq = snapshot["seq"]
        if "hashes" in snapshot:
            if seq >= g.seq:
                g.cached = set(snapshot["hashes"])
        else:
            events = snapshot["events"]
            for op, h in events[max(0, g.seq - (seq - len(events))):]:
                if op:
                    g.cached.add(h)
                else:
                    g.cached.discard(h)
        g.seq = max(g.seq, seq)
        orphans = snapshot.get("orphans", ())  # their frontend died: none will release them
        self.release([rid for rid in orphans if self.group_of(rid) == gi], count=False)
        if not snapshot.get("alive", True):
            self.mark_dead(gi, snapshot.get("error") or "the engine core stopped")

    def report_failure(self, failed: Optional[tuple[int, int]]) -> bool:
        """A frontend saw (group, generation)'s core die: mark it dead now, before the
        next snapshot would tell, unless the group has moved on to a newer core since.
        Returns whether it marked it."""
        if failed is None:
            return False
        gi, generation = failed
        g = self.groups[gi]
        if not g.alive or g.generation != generation:
            return False
        self.mark_dead(gi, "its engine core failed (seen by an ingress)")
        return True

    def watch(self, now: Optional[float] = None) -> list[int]:
        """Mark hung groups dead: serving, holding work, no step for step_timeout
        seconds. Returns the groups it marked."""
        now = time.monotonic() if now is None else now
        hung = [i for i, g in enumerate(self.groups)
                if g.alive and g.holds_work and now - g.last_progress > self.step_timeout]
        for i in hung:
            self.mark_dead(i, f"no step for {now - self.groups[i].last_progress:.0f} s "
                              f"(step_timeout is {self.step_timeout:g} s)")
        return hung

    def mark_dead(self, gi: int, error: str) -> None:
        """The group's core is gone (or hung): route nothing to it; its requests are
        re-dispatched by the frontends, which release them here."""
        g = self.groups[gi]
        if g.state == "dead":
            return
        g.state, g.error = "dead", error
        g.failures += 1
        g.cached = set()
        g.seq = -1

    def restarting(self, gi: int) -> float:
        """A restart of the group begins; returns the back-off to wait first."""
        g = self.groups[gi]
        g.state = "restarting"
        return RESTART_BACKOFF_S[min(g.failures, len(RESTART_BACKOFF_S)) - 1] if g.failures else 0.0

    def restarted(self, gi: int) -> None:
        """Its new core is up: it serves again, with a new generation."""
        g = self.groups[gi]
        g.state, g.error = "serving", None
        g.generation += 1
        g.restarts += 1
        g.failures = 0
        g.stats, g.seq, g.last_steps = {}, -1, -1
        g.last_progress = g.last_step_change = time.monotonic()

    def check_all_serving(self) -> None:
        """Raise unless every group serves."""
        failed = [i for i, g in enumerate(self.groups) if not g.alive]
        if failed:
            raise RuntimeError(f"worker group(s) {failed} failed")

    def metrics_view(self) -> dict:
        """What `render_metrics` needs of the router."""
        return {"groups": [{"state": g.state, "restarts": g.restarts} for g in self.groups],
                "redispatched": self.num_redispatched}

    def health(self, now: Optional[float] = None) -> dict:
        """{"status": "ok" or "unavailable", "groups": [{"id", "state", "last_step_age_s"}]}."""
        now = time.monotonic() if now is None else now
        groups = [{"id": i, "state": g.state, "last_step_age_s": round(now - g.last_progress, 3)}
                  for i, g in enumerate(self.groups)]
        return {"status": "ok" if any(g.alive for g in self.groups) else "unavailable", "groups": groups}

    def stats(self) -> dict:
        """Every group's latest stats summed (KV usage over all blocks), with the
        router's own counts and each group's stats under "groups"."""
        groups = [dict(g.stats, alive=g.alive, state=g.state, restarts=g.restarts,
                       requests_routed=g.requests_routed, inflight_seqs=g.inflight_seqs) for g in self.groups]
        total: dict = {}
        for st in groups:
            for k, v in st.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    total[k] = total.get(k, 0) + v
        blocks = total.get("num_blocks", 0)
        total["kv_cache_usage_perc"] = total.get("blocks_in_use", 0) / blocks if blocks else 0.0
        total.update(requests_in_flight=len(self.ledger), requests_rejected=self.num_rejected,
                     requests_redispatched=self.num_redispatched, calls=dict(self.calls), groups=groups)
        return total
