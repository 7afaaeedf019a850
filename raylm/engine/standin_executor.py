"""A stand-in for the model: an executor that spends a real step's device time asleep
and samples a fixed token, so the whole serving path (HTTP, router, cores, streaming)
can be measured on a machine without a GPU (`benchmarks/host_scaling.py`).

Select it with `distributed_executor_backend="raylm.engine.standin_executor:StandInExecutor"`.
A step takes `RAYLM_STANDIN_STEP_MS` (default 20) plus `RAYLM_STANDIN_TOKEN_US`
(default 0) per scheduled token, as a GPU step would, and releases the GIL meanwhile
(time.sleep): launch() starts the clock and collect() sleeps out the rest, as the
device runs a launched step while the host plans the next one.

Rows with a grammar bitmask (structured outputs) sample a token their bitmask allows,
uniformly at random (seeded by `RAYLM_STANDIN_SEED`, default 0), so a structured-outputs
workload runs its grammars for real (`benchmarks/structured.py --standin-step-ms`), on a
thread of its own, as a GPU would draw them beside the host's work. Like
the model runner, it can launch a step before the bitmasks are known (deferred
sampling): the step's sampling then ends no earlier than `RAYLM_STANDIN_SAMPLE_MS`
(default 0.3) after `finish_sampling` hands them over, as a GPU's would.
"""
from __future__ import annotations

import os
import time
from raylm.workers.messages import StepPlan, StepResult

# The token every step samples (any id below the vocabulary size; benchmarks ignore EOS).
STANDIN_TOKEN = 7


class _Launched:
    __slots__ = ("plan", "done_at", "drawn")

    def __init__(self, plan: StepPlan, done_at: float):
        self.plan, self.done_at = plan, done_at
        self.drawn = None  # the grammar rows' tokens: (ids, a future of the tokens)


def allowed_tokens(bitmask, num_rows: int, vocab_size: int, rng) -> list[int]:
    """One token per row of a packed int32 bitmask (bytes or a CPU tensor, rows of
    ceil(V/32) words, bit t of word w allowing token 32w + t), each one its row allows
    below `vocab_size`: a random set bit of a random nonzero word of the row. Not uniform
    over tokens; a stand-in needs only a token the grammar accepts, and cheaply, since a
    GPU would draw it while the host works: one pass over the rows' nonzero words, 0.8 ms
    for 256 rows of a 49k-token bitmask on the 2-core CPU, where the earlier version
    (random probes, then a search of the rows that allow few tokens) took 2.7 ms of the
    host's CPU, holding the GIL from the core's threads for much of it."""
    import numpy as np

    if isinstance(bitmask, (bytes, bytearray)):
        words = np.frombuffer(bitmask, dtype=np.int32).reshape(num_rows, -1)
    else:
        words = bitmask.numpy().reshape(num_rows, -1)
    nw = min(words.shape[1], -(-vocab_size // 32))
    words = np.ascontiguousarray(words[:, :nw]).view(np.uint32)
    tail = vocab_size - 32 * (nw - 1)
    tail_mask = np.uint32((1 << tail) - 1) if tail < 32 else np.uint32(0xFFFFFFFF)
    # Row-major: each row's nonzero words together, in order (through a bool array: 8x faster).
    flat = np.flatnonzero(words != 0)
    r, c = np.divmod(flat, nw)
    if tail < 32:  # tokens past the vocabulary are never drawn: a last word allowing only those is no choice
        last = np.flatnonzero(c == nw - 1)
        empty = last[(words[r[last], nw - 1] & tail_mask) == 0]
        if len(empty):
            r, c = np.delete(r, empty), np.delete(c, empty)
    counts = np.bincount(r, minlength=num_rows)
    if not counts.all():
        raise RuntimeError(f"bitmask row {int(np.argmin(counts))} allows no token below {vocab_size}")
    starts = np.cumsum(counts) - counts
    w = c[starts + (rng.random(num_rows) * counts).astype(np.int64)]
    chosen = words[np.arange(num_rows), w]
    chosen = np.where(w == nw - 1, chosen & tail_mask, chosen)
    bits = (chosen[:, None] >> np.arange(32, dtype=np.uint32)) & 1
    b = (rng.random(bits.shape) * bits).argmax(axis=1)
    return [int(t) for t in 32 * w + b]


class StandInExecutor:
    supports_async = True
    supports_deferred_sampling = True

    def __init__(self, args, model_dir: str, hf_config, dtype, device: str, max_model_len: int):
        import numpy as np

        self.step_s = float(os.environ.get("RAYLM_STANDIN_STEP_MS", "20")) / 1e3
        self.token_s = float(os.environ.get("RAYLM_STANDIN_TOKEN_US", "0")) / 1e6
        self.sample_s = float(os.environ.get("RAYLM_STANDIN_SAMPLE_MS", "0.3")) / 1e3
        self.vocab_size = int(hf_config.vocab_size)
        self.token = STANDIN_TOKEN % self.vocab_size
        self.rng = np.random.default_rng(int(os.environ.get("RAYLM_STANDIN_SEED", "0")))
        self._drawer = None  # a thread that draws grammar rows' tokens, as a GPU would beside the host
        self._busy_until = 0.0  # one step at a time, as on one device

    def kv_bytes_per_block(self) -> int:
        return 1024

    def available_kv_memory(self, gpu_memory_utilization: float, max_num_batched_tokens: int) -> int:
        return 1 << 30

    def allocate_kv_cache(self, num_blocks: int) -> None:
        pass

    supports_before_inputs = True

    def launch(self, plan: StepPlan, defer_sampling: bool = False, before_inputs=None) -> _Launched:
        if before_inputs is not None:  # no host part to a stand-in's launch
            before_inputs()
        tokens = sum(len(s.token_ids) for s in plan.seqs)
        start = max(time.perf_counter(), self._busy_until)
        self._busy_until = start + (self.step_s + self.token_s * tokens if plan.seqs else 0.0)
        launched = _Launched(plan, self._busy_until)
        if not defer_sampling:
            self._draw(launched, plan.bitmask_ids, plan.bitmask)
        return launched

    def finish_sampling(self, launched: _Launched, bitmask_ids: list[str], bitmask) -> None:
        """The deferred step's bitmasks: its sampling ends no earlier than sample_s from now."""
        self._draw(launched, bitmask_ids, bitmask)
        launched.done_at = max(launched.done_at, time.perf_counter() + self.sample_s)
        self._busy_until = max(self._busy_until, launched.done_at)

    def _draw(self, launched: _Launched, ids, bitmask) -> None:
        if not ids:
            return
        if self._drawer is None:
            from concurrent.futures import ThreadPoolExecutor

            self._drawer = ThreadPoolExecutor(1, thread_name_prefix="raylm-standin")
        ids = list(ids)
        launched.drawn = (ids, self._drawer.submit(allowed_tokens, bitmask, len(ids), self.vocab_size, self.rng))

    def collect(self, launched: _Launched) -> StepResult:
        sampled = {s.request_id: self.token for s in launched.plan.seqs if s.sample}
        if launched.drawn is not None:
            ids, fut = launched.drawn
            sampled.update(zip(ids, fut.result()))
        wait = launched.done_at - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        return StepResult(sampled=sampled)

    def execute(self, plan: StepPlan) -> StepResult:
        return self.collect(self.launch(plan))

    def profile_all_reduce(self, num_tokens: int, iters: int = 10) -> float:
        return 0.0

    def shutdown(self) -> None:
        if self._drawer is not None:
            self._drawer.shutdown(wait=False)
