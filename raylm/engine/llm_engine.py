"""The engine loop: requests in, step plans to the executor, tokens back, text out.

`add_request` validates and tokenizes; `step` schedules one iteration, runs it,
detokenizes, applies stop conditions and returns the outputs that changed.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Optional, Union

from raylm.engine.config import (CPU_KV_CACHE_CAP_BYTES, EngineArgs, resolve_device, resolve_dtype,
                                 resolve_max_model_len)
from raylm.engine.detokenizer import IncrementalDetokenizer
from raylm.engine.outputs import RequestOutput
from raylm.engine.output_processor import OutputProcessor
from raylm.engine.request_state import CompletionState, NoDetokenizer, RequestGroup
from raylm.engine.sampling_params import SamplingParams
from raylm.scheduler.block_manager import BlockManager
from raylm.scheduler.request import Request, RequestStatus
from raylm.scheduler.scheduler import Scheduler, SchedulerConfig
from raylm.engine.planner import StepPlanner, worker_sampling
from raylm.workers.messages import NewRequest, StepPlan

logger = logging.getLogger("raylm")

PromptType = Union[str, dict, list]


class LLMEngine(OutputProcessor):
    """Owns the tokenizer, the scheduler and the executor for one model."""

    def __init__(self, args: EngineArgs):
        from transformers import AutoTokenizer

        from raylm.engine.executor import make_executor
        from raylm.workers.loader import load_config, resolve_model_path

        self.args = args
        self.model_dir = resolve_model_path(args.model)
        self.hf_config = load_config(self.model_dir)
        from raylm.workers.models.llama import get_model_class
        get_model_class(self.hf_config)  # unsupported architectures fail before any loading
        from raylm.workers.quantization import get_quant_config
        get_quant_config(self.hf_config, args.quantization)  # and unsupported quantization configs
        # skip_tokenizer_init (vLLM's name): token ids in, token ids out, no text.
        self.tokenizer = (None if args.skip_tokenizer_init
                          else AutoTokenizer.from_pretrained(args.tokenizer or self.model_dir))
        self.vocab_size = int(self.hf_config.vocab_size)
        self.eos_token_ids = self._eos_token_ids()
        self.device = resolve_device(args.device)
        self.dtype = resolve_dtype(args.dtype, self.hf_config, self.device)
        self.max_model_len = resolve_max_model_len(args, self.hf_config)
        self.max_num_batched_tokens = args.max_num_batched_tokens or max(8192, args.max_num_seqs)
        t0 = time.perf_counter()
        self.executor = make_executor(args, self.model_dir, self.hf_config, self.dtype, self.device,
                                      self.max_model_len)
        t1 = time.perf_counter()
        self.num_blocks = self._size_kv_cache()
        t2 = time.perf_counter()
        self.executor.allocate_kv_cache(self.num_blocks)
        supports_async = getattr(self.executor, "supports_async", False)
        if args.async_scheduling and not supports_async:
            raise ValueError(f"async_scheduling=True is not supported by {type(self.executor).__name__}")
        self.async_scheduling = (supports_async and self.device.startswith("cuda")
                                 if args.async_scheduling is None else bool(args.async_scheduling))
        self._inflight = None  # asynchronous scheduling: (scheduler output, pending step)
        # Where start-up time goes: weights (and worker start), the profiled step, the KV
        # pool plus CUDA graph capture.
        self.startup_timing = {"load_s": t1 - t0, "profile_s": t2 - t1,
                               "kv_cache_and_graphs_s": time.perf_counter() - t2}
        logger.info("raylm start-up: load %.1f s, memory profile %.1f s, KV cache and graphs %.1f s",
                    *self.startup_timing.values())
        self.block_manager = BlockManager(self.num_blocks, args.block_size, args.enable_prefix_caching)
        self.scheduler = Scheduler(SchedulerConfig(
            max_num_seqs=args.max_num_seqs, max_num_batched_tokens=self.max_num_batched_tokens,
            max_model_len=self.max_model_len,
            long_prefill_token_threshold=args.long_prefill_token_threshold), self.block_manager)
        self.groups: dict[str, RequestGroup] = {}
        self.completions: dict[str, CompletionState] = {}  # scheduler request id -> completion
        self.planner = StepPlanner(self._new_request)
        self._counter = 0
        self.reset_timing()
        # Offline generate() needs only finished requests; skip building the others.
        self.final_outputs_only = False
        self.counters = {"prompt_tokens": 0, "generation_tokens": 0, "requests_finished": 0}
        logger.info("raylm engine: model=%s dtype=%s device=%s kv_blocks=%d (block_size=%d, "
                    "%d tokens, max concurrency %.1f at max_model_len=%d)", self.model_dir,
                    self.dtype, self.device, self.num_blocks, args.block_size,
                    self.num_blocks * args.block_size,
                    self.num_blocks / self.block_manager.blocks_needed(self.max_model_len),
                    self.max_model_len)

    # ---- set-up --------------------------------------------------------------------
    def _eos_token_ids(self) -> list[int]:
        ids = set()
        eos = self.tokenizer.eos_token_id if self.tokenizer is not None else self.hf_config.eos_token_id
        ids.update([eos] if isinstance(eos, int) else (eos or []))
        try:
            from transformers import GenerationConfig

            gen = GenerationConfig.from_pretrained(self.model_dir)
            eos = gen.eos_token_id
            ids.update([eos] if isinstance(eos, int) else (eos or []))
        except Exception:  # no generation_config.json
            pass
        return sorted(ids)

    def _size_kv_cache(self) -> int:
        args = self.args
        per_block = self.executor.kv_bytes_per_block()
        need = -(-self.max_model_len // args.block_size)
        if args.kv_cache_memory_bytes is not None:
            budget, source = args.kv_cache_memory_bytes, "kv_cache_memory_bytes"
        elif self.device == "cpu":
            budget = min(args.max_num_seqs * need * per_block, CPU_KV_CACHE_CAP_BYTES)
            source = "the CPU default (max_num_seqs full sequences, capped at 1 GiB)"
        else:
            budget = self.executor.available_kv_memory(args.gpu_memory_utilization,
                                                       self.max_num_batched_tokens)
            source = f"gpu_memory_utilization={args.gpu_memory_utilization}"
        num_blocks = max(0, budget) // per_block
        if num_blocks < need:
            raise ValueError(
                f"KV cache of {max(0, budget)} bytes ({source}) holds {num_blocks} blocks of "
                f"{args.block_size} tokens ({per_block} bytes each); one max_model_len="
                f"{self.max_model_len} sequence needs {need} blocks ({need * per_block} bytes): "
                f"raise the KV cache memory or lower max_model_len")
        return num_blocks

    # ---- requests ------------------------------------------------------------------
    def _tokenize(self, prompt: PromptType) -> tuple[Optional[str], list[int]]:
        if self.tokenizer is None and (isinstance(prompt, str) or (
                isinstance(prompt, dict) and "prompt_token_ids" not in prompt)):
            raise ValueError("skip_tokenizer_init is set: prompts must be token ids")
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                return prompt["prompt"], self.tokenizer.encode(prompt["prompt"])
            raise ValueError(f"prompt dict needs 'prompt' or 'prompt_token_ids', got keys {sorted(prompt)}")
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise ValueError(f"prompt must be a string, a list of token ids or a dict, got {type(prompt).__name__}")

    def validate(self, prompt: PromptType, params: SamplingParams) -> tuple[Optional[str], list[int]]:
        """Tokenize and check one request; raise ValueError naming what is wrong."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
        text, ids = self._tokenize(prompt)
        if not ids:
            raise ValueError("prompt is empty (0 tokens); it needs at least 1 token")
        if len(ids) > self.max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens; max_model_len is {self.max_model_len}")
        bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(params, name)
            if k is not None and k > self.args.max_logprobs:
                raise ValueError(f"{name} {k} exceeds max_logprobs {self.args.max_logprobs}")
        for t in params.stop_token_ids or []:
            if t >= self.vocab_size:
                raise ValueError(f"stop_token_ids entry {t} is outside the vocabulary [0, {self.vocab_size})")
        return text, ids

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams,
                    priority: int = 0, arrival_time: Optional[float] = None,
                    validated: Optional[tuple] = None) -> None:
        """Queue a request; raises ValueError (queuing nothing) on bad input."""
        if request_id in self.groups:
            raise ValueError(f"request_id {request_id!r} is already in use")
        text, ids = validated or self.validate(prompt, params)
        arrival = arrival_time if arrival_time is not None else time.monotonic()
        group = RequestGroup(request_id, text, ids, params, arrival_time=arrival)
        if params.prompt_logprobs is not None:
            group.prompt_logprobs = [None]
        max_tokens = params.max_tokens if params.max_tokens is not None else self.max_model_len - len(ids)
        for i in range(params.n):
            child = params.clone()
            child.max_tokens = max(1, max_tokens)
            if params.seed is not None:
                child.seed = params.seed + i
            rid = request_id if params.n == 1 else f"{i}_{request_id}"
            req = Request(rid, ids, priority=priority, arrival_time=arrival,
                          use_prefix_cache=params.prompt_logprobs is None or i > 0,
                          prefix_group=request_id if params.n > 1 else None,
                          max_output_tokens=child.max_tokens)
            detok = (NoDetokenizer() if self.tokenizer is None else
                     IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens,
                                            params.spaces_between_special_tokens))
            comp = CompletionState(req, i, child, detok, logprobs=[] if params.logprobs is not None else None)
            group.completions.append(comp)
        for comp in group.completions:
            self.scheduler.add_request(comp.request)
            self.completions[comp.request.request_id] = comp
        self.groups[request_id] = group
        self.counters["prompt_tokens"] += len(ids)

    def abort_request(self, request_id: Union[str, list[str]]) -> list[RequestOutput]:
        """Stop requests at once and free their KV blocks; unknown ids are ignored.
        Returns the final outputs (finish_reason "abort") of the requests it stopped."""
        outputs = []
        for rid in [request_id] if isinstance(request_id, str) else request_id:
            group = self.groups.get(rid)
            if group is None:
                continue
            for comp in group.completions:
                if comp.finish_reason is None:
                    self._finish(comp, RequestStatus.FINISHED_ABORTED)
            del self.groups[rid]
            outputs.append(group.to_output())
        return outputs

    def has_unfinished_requests(self) -> bool:
        return bool(self.groups)

    def next_request_id(self) -> str:
        self._counter += 1
        return str(self._counter - 1)

    # ---- one step ------------------------------------------------------------------
    def _plan(self, sched_out) -> StepPlan:
        return self.planner.plan(sched_out)

    def _new_request(self, request_id: str) -> NewRequest:
        comp = self.completions[request_id]
        return NewRequest(request_id, comp.request.prompt_token_ids,
                          worker_sampling(comp.params, self.eos_token_ids, comp.index))

    def step(self) -> list[RequestOutput]:
        """Run one iteration; return the outputs of requests that progressed (finished ones
        last appear with `finished=True`). With asynchronous scheduling these are the
        outputs of the previous iteration, whose tokens arrive while this one runs."""
        if self.async_scheduling:
            return self._step_async()
        t0 = time.perf_counter()
        planned = self.begin_step()
        if planned is None:
            return []
        sched_out, plan = planned
        t1 = time.perf_counter()
        result = self.executor.execute(plan)
        t2 = time.perf_counter()
        outputs = self.emit_step(self.record_step(sched_out, result))
        t3 = time.perf_counter()
        tm = self.timing
        tm["steps"] += 1
        tm["schedule_s"] += t1 - t0
        tm["execute_s"] += t2 - t1
        tm["process_s"] += t3 - t2
        return outputs

    def _step_async(self) -> list[RequestOutput]:
        """Schedule step N+1 (with placeholders for step N's tokens), launch it, then
        collect and process step N while the device runs N+1."""
        t0 = time.perf_counter()
        planned = self.begin_step()
        t1 = time.perf_counter()
        outputs: list[RequestOutput] = []
        if planned is None:
            if self._inflight is not None:
                outputs = self._complete_inflight(t1)
            return outputs
        sched_out, plan = planned
        if self._inflight is not None and self.needs_current_outputs(sched_out):
            outputs += self._complete_inflight(t1)  # penalties need step N's tokens first
            t1 = time.perf_counter()
        pending = self.executor.launch(plan)
        self.mark_launched(sched_out)
        t2 = time.perf_counter()
        tm = self.timing
        tm["schedule_s"] += t1 - t0
        tm["execute_s"] += t2 - t1
        if self._inflight is not None:
            outputs += self._complete_inflight(t2)
        self._inflight = (sched_out, pending)
        return outputs

    def needs_current_outputs(self, sched_out) -> bool:
        """True when a request of this step samples from the tokens so far (penalties,
        min_tokens): the step in flight must be recorded before this one is launched."""
        return bool(sched_out) and any(
            c is not None and c.needs_current_outputs
            for c in (self.completions.get(s.request_id) for s in sched_out.seqs))

    def mark_launched(self, sched_out) -> None:
        """Asynchronous scheduling: the step is on the device; count its tokens computed
        and give each request it samples a placeholder for its token."""
        if not sched_out:
            return
        self.scheduler.update_after_step(sched_out)
        for s in sched_out.seqs:
            comp = self.completions.get(s.request_id)
            if s.sample and comp is not None:
                comp.request.append_placeholder()

    def _complete_inflight(self, t0: float) -> list[RequestOutput]:
        sched_out, pending = self._inflight
        self._inflight = None
        result = self.executor.collect(pending)
        t1 = time.perf_counter()
        outputs = self.emit_step(self.record_step(sched_out, result, launched=True))
        tm = self.timing
        tm["steps"] += 1
        tm["execute_s"] += t1 - t0
        tm["process_s"] += time.perf_counter() - t1
        return outputs

    def reset_timing(self) -> None:
        self.timing = {"steps": 0, "schedule_s": 0.0, "execute_s": 0.0, "process_s": 0.0}

    def timing_summary(self) -> dict:
        """Per-step wall time of the synchronous step loop: scheduling and output processing
        (host) against the executor call (input preparation, the model, sampling)."""
        tm = self.timing
        n = max(1, tm["steps"])
        return {"steps": tm["steps"], "schedule_ms_per_step": 1e3 * tm["schedule_s"] / n,
                "execute_ms_per_step": 1e3 * tm["execute_s"] / n,
                "process_ms_per_step": 1e3 * tm["process_s"] / n}

    # The step in three parts, so an asynchronous driver can send step N+1 to the workers
    # (begin_step) right after recording step N's tokens (record_step) and detokenize
    # step N (emit_step) while the workers compute.
    def begin_step(self) -> Optional[tuple]:
        """Schedule one step: (scheduler output, step plan), or None when there is nothing
        to send. A plan may carry only finished ids (worker state to drop)."""
        sched_out = self.scheduler.schedule()
        if not sched_out and not self.planner.has_finished:
            return None
        return sched_out, self._plan(sched_out)

    # ---- introspection -------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        bm, sch = self.block_manager, self.scheduler
        return {
            "num_requests_running": sch.num_running,
            "num_requests_waiting": sch.num_waiting,
            "num_blocks": bm.num_blocks,
            "blocks_in_use": bm.num_used_blocks,
            "kv_cache_usage_perc": bm.usage,
            "prefix_cache_queries": bm.prefix_query_tokens,
            "prefix_cache_hit_tokens": bm.prefix_hit_tokens,
            "num_preemptions": sch.num_preemptions,
            "num_mixed_steps": sch.num_mixed_steps,
            "num_steps": sch.num_steps,
            **self.counters,
        }

    def shutdown(self) -> None:
        if getattr(self, "executor", None) is not None:
            self.executor.shutdown()
            self.executor = None
