"""An engine core's busy loop, in a thread of its own.

The loop owns the core: requests and aborts reach it through an inbox (any thread may
post), and after every step it hands the outputs, grouped by subscriber, to `deliver`
(one call per step, one batch per subscriber). It never waits on whoever feeds it: while
there is work it steps back to back; with none it sleeps until a request arrives.
If a step raises (a worker died), every request fails with the error and the loop stops;
`error` holds it.
"""
from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from typing import Callable, Optional

from raylm.engine.core import EngineCore, EngineCoreOutput, EngineCoreRequest

logger = logging.getLogger("raylm")

# Waiting requests that fit nowhere this instant: look again this often.
IDLE_POLL_S = 0.005
# Stats and prefix-cache changes are published at most this often.
PUBLISH_S = 0.02
# Prefix-cache changes kept for readers; one further behind gets the whole set.
EVENT_LOG_LEN = 1 << 16

Deliver = Callable[[dict[Optional[str], list[EngineCoreOutput]]], None]


class CoreLoop:
    """Runs `core.step()` in a daemon thread (see module doc)."""

    def __init__(self, core: EngineCore, deliver: Deliver, name: str = "raylm-core"):
        self.core = core
        self._deliver = deliver
        self._inbox: collections.deque = collections.deque()
        self._wake = threading.Event()
        self._stop = False
        self.error: Optional[BaseException] = None
        self.steps = 0
        self.busy_s = 0.0  # wall time spent in steps that had work
        # Wall time between one step's end and the next one's start while work was queued
        # (publishing, delivering outputs, draining the inbox, waiting for the GIL).
        self.between_s = 0.0
        self._last_end: Optional[float] = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        # What readers in other threads see (`snapshot`), published by the loop thread.
        self._lock = threading.Lock()
        self._seq = 0
        self._events: collections.deque = collections.deque(maxlen=EVENT_LOG_LEN)  # (seq, op, hash)
        self._cached: set[int] = set()
        self._published = 0.0
        self._stats: dict = {}
        core.block_manager.hash_events = []
        self._publish()

    def start(self) -> "CoreLoop":
        self._thread.start()
        return self

    # ---- the inbox (any thread) ----------------------------------------------------
    def add(self, requests: list[EngineCoreRequest]) -> None:
        self._post(("add", requests))

    def abort(self, request_ids: list[str], reason: str = "abort") -> None:
        self._post(("abort", request_ids, reason))

    def call(self, fn: Callable[[EngineCore], object]) -> None:
        """Run fn(core) on the loop's thread between steps."""
        self._post(("call", fn))

    def _post(self, item) -> None:
        if self.error is not None:
            raise RuntimeError(f"the engine core failed: {self.error!r}")
        self._inbox.append(item)
        self._wake.set()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop = True
        self._wake.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    # ---- what other threads may read -----------------------------------------------
    def _publish(self) -> None:
        core = self.core
        events, core.block_manager.hash_events = core.block_manager.hash_events, []
        stats = dict(core.stats(), steps=self.steps, busy_s=self.busy_s, between_s=self.between_s,
                     timing=core.timing_summary())
        metrics = core.metrics.snapshot()
        with self._lock:
            for op, h in events:
                self._seq += 1
                self._events.append((self._seq, op, h))
                if op:
                    self._cached.add(h)
                else:
                    self._cached.discard(h)
            self._stats, self._metrics = stats, metrics
        self._published = time.monotonic()

    def snapshot(self, since: int = -1) -> dict:
        """The core's stats, its request metrics, and the prefix-cache block hashes
        cached (op 1) or evicted (op 0) after event `since`: {"seq", "events"} or, for a
        reader further behind than the log (or since=-1), {"seq", "hashes"} (all)."""
        with self._lock:
            out = {"stats": self._stats, "metrics": self._metrics, "seq": self._seq,
                   "alive": self.alive, "error": None if self.error is None else repr(self.error)}
            first = self._events[0][0] if self._events else self._seq + 1
            if since < 0 or since + 1 < first:
                out["hashes"] = list(self._cached)
            else:
                # The log holds consecutive numbers: the last seq - since entries are the new
                # ones, read from the right end (a deque reads from an offset by walking to it).
                new = list(itertools.islice(reversed(self._events), max(0, self._seq - since)))
                out["events"] = [(op, h) for _, op, h in reversed(new)]
        return out

    # ---- the loop ------------------------------------------------------------------
    def _drain(self) -> None:
        failed: dict = {}
        while self._inbox:
            item = self._inbox.popleft()
            if item[0] == "add":
                try:
                    self.core.add_requests(item[1])
                except ValueError as exc:  # refused before queuing: tell its subscriber
                    for r in item[1]:
                        failed.setdefault(r.subscriber, []).append(
                            EngineCoreOutput(r.request_id, error=f"ValueError: {exc}"))
            elif item[0] == "abort":
                self.core.abort(item[1], item[2])
                self._published = 0.0  # publish soon: blocks were freed
            else:
                item[1](self.core)
        if failed:
            self._deliver(failed)

    def _run(self) -> None:
        core = self.core
        try:
            while not self._stop:
                self._drain()
                if not core.has_unfinished_requests():
                    self._last_end = None
                    self._publish()
                    self._wake.wait()
                    self._wake.clear()
                    continue
                t0 = time.perf_counter()
                if self._last_end is not None:
                    self.between_s += t0 - self._last_end
                scheduled = core.scheduler.num_steps
                outputs = core.step()
                self.steps += 1
                self._last_end = time.perf_counter()
                self.busy_s += self._last_end - t0
                # Published before delivery when a request ended, so whoever sees it end
                # sees stats and metrics that count it.
                if (time.monotonic() - self._published >= PUBLISH_S
                        or any(o.finish_reason is not None for o in outputs)):
                    self._publish()
                if outputs:
                    self._deliver(self._group(outputs))
                elif core.scheduler.num_steps == scheduled and not core.step_in_flight:
                    # Nothing fit this instant (waiting for blocks): do not spin hot.
                    self._last_end = None
                    self._wake.wait(IDLE_POLL_S)
                    self._wake.clear()
        except BaseException as exc:  # a worker died: fail every request, stop
            logger.exception("engine core failed")
            self.error = exc
            self._publish_error()
            message = f"the worker group failed: {type(exc).__name__}: {exc}"
            batches: dict = {}
            for rid, sub in core.subscribers.items():
                batches.setdefault(sub, []).append(EngineCoreOutput(rid, error=message))
            if batches:
                self._deliver(batches)

    def _publish_error(self) -> None:
        with self._lock:
            self._stats = dict(self._stats, alive=False)

    @staticmethod
    def _group(outputs: list[EngineCoreOutput]) -> dict[Optional[str], list[EngineCoreOutput]]:
        batches: dict[Optional[str], list[EngineCoreOutput]] = {}
        for out in outputs:
            batches.setdefault(out.subscriber, []).append(out)
        return batches
