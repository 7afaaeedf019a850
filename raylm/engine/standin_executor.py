"""A stand-in for the model: an executor that spends a real step's device time asleep
and samples a fixed token, so the whole serving path (HTTP, router, cores, streaming)
can be measured on a machine without a GPU (`benchmarks/host_scaling.py`).

Select it with `distributed_executor_backend="raylm.engine.standin_executor:StandInExecutor"`.
A step takes `RAYLM_STANDIN_STEP_MS` (default 20) plus `RAYLM_STANDIN_TOKEN_US`
(default 0) per scheduled token, as a GPU step would, and releases the GIL meanwhile
(time.sleep): launch() starts the clock and collect() sleeps out the rest, as the
device runs a launched step while the host plans the next one.
"""
from __future__ import annotations

import os
import time

from raylm.workers.messages import StepPlan, StepResult

# The token every step samples (any id below the vocabulary size; benchmarks ignore EOS).
STANDIN_TOKEN = 7


class _Launched:
    __slots__ = ("plan", "done_at")

    def __init__(self, plan: StepPlan, done_at: float):
        self.plan, self.done_at = plan, done_at


class StandInExecutor:
    supports_async = True

    def __init__(self, args, model_dir: str, hf_config, dtype, device: str, max_model_len: int):
        self.step_s = float(os.environ.get("RAYLM_STANDIN_STEP_MS", "20")) / 1e3
        self.token_s = float(os.environ.get("RAYLM_STANDIN_TOKEN_US", "0")) / 1e6
        self.token = STANDIN_TOKEN % int(hf_config.vocab_size)
        self._busy_until = 0.0  # one step at a time, as on one device

    def kv_bytes_per_block(self) -> int:
        return 1024

    def available_kv_memory(self, gpu_memory_utilization: float, max_num_batched_tokens: int) -> int:
        return 1 << 30

    def allocate_kv_cache(self, num_blocks: int) -> None:
        pass

    def launch(self, plan: StepPlan) -> _Launched:
        tokens = sum(len(s.token_ids) for s in plan.seqs)
        start = max(time.perf_counter(), self._busy_until)
        self._busy_until = start + (self.step_s + self.token_s * tokens if plan.seqs else 0.0)
        return _Launched(plan, self._busy_until)

    def collect(self, launched: _Launched) -> StepResult:
        wait = launched.done_at - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        return StepResult(sampled={s.request_id: self.token for s in launched.plan.seqs if s.sample})

    def execute(self, plan: StepPlan) -> StepResult:
        return self.collect(self.launch(plan))

    def profile_all_reduce(self, num_tokens: int, iters: int = 10) -> float:
        return 0.0

    def shutdown(self) -> None:
        pass
