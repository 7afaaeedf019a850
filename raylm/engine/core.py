"""The engine core: one worker group's continuous-batching loop, in token ids.

`EngineCore.step()` schedules one iteration, runs it on the executor and returns, per
request that progressed, the token ids it gained, their log-probabilities and, when it
ended, why (EOS, a stop token, its length). It knows no text: tokenizing, detokenizing,
stop strings and response shaping happen at the edge (`raylm.engine.output_processor`),
which sends an abort back when a stop string ends a request. The offline `LLM` drives a
core in-process; the cluster runs one per worker group in its own process
(`raylm.engine.core_loop`, `raylm.cluster.core_actor`).

Each user request with `n` completions arrives as n core requests that share a
`prefix_group` (the user request id), so only one of them prefills and the others find
the prompt in the prefix cache.
"""
from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass
from typing import Any, Optional

from raylm.engine.config import CPU_KV_CACHE_CAP_BYTES, EngineArgs, resolve_device, resolve_dtype
from raylm.engine.core_messages import EngineCoreOutput, EngineCoreRequest, needs_output_history
from raylm.engine.core_stats import UserRequests, new_step_timing, step_timing_summary
from raylm.engine.grammar_requests import GrammarRequests
from raylm.engine.metrics import CoreMetrics
from raylm.engine.model_config import ModelConfig
from raylm.engine.input_processor import bad_words_token_ids
from raylm.engine.planner import StepPlanner, worker_sampling
from raylm.engine.sampling_params import SamplingParams
from raylm.engine.spec_decode.core_steps import SpecSteps
from raylm.engine.spec_decode.draft import num_lookahead_tokens, worker_spec_decode
from raylm.engine.spec_decode.speculator import Speculator, num_accepted_of
from raylm.engine.structured_outputs import parse_structured_outputs_config, validate_structured_outputs
from raylm.scheduler.block_manager import BlockManager
from raylm.scheduler.request import Request, RequestStatus
from raylm.scheduler.scheduler import Scheduler, SchedulerConfig
from raylm.workers.messages import NewRequest, StepResult

logger = logging.getLogger("raylm")


@dataclass(eq=False)
class _CoreRequest:
    request: Request
    params: SamplingParams
    index: int
    subscriber: Optional[str]
    output_offset: int = 0  # output tokens generated before a re-dispatch (in the prompt)
    out: Optional[EngineCoreOutput] = None  # this step's output, while it is built
    grammar: Any = None  # structured outputs: its xgrammar GrammarMatcher, once compiled
    bad_words_token_ids: Optional[list[list[int]]] = None


class EngineCore:
    """Scheduler, block manager and executor of one worker group (see module doc)."""

    def __init__(self, args: EngineArgs, model: Optional[ModelConfig] = None):
        from raylm.engine.executor import make_executor

        t_init = time.perf_counter()
        self.args = args
        self.model = model or ModelConfig.from_args(args)
        t_config = time.perf_counter()
        self.model_dir, self.hf_config = self.model.model_dir, self.model.hf_config
        self.vocab_size, self.max_model_len = self.model.vocab_size, self.model.max_model_len
        self.eos_token_ids = self.model.eos_token_ids
        self.device = resolve_device(args.device)
        self.dtype = resolve_dtype(args.dtype, self.hf_config, self.device)
        self.max_num_batched_tokens = args.max_num_batched_tokens or max(8192, args.max_num_seqs)
        t0 = time.perf_counter()
        spec = args.parsed_speculative_config()
        spec_decode = worker_spec_decode(spec, self.hf_config, self.max_model_len, args.tensor_parallel_size)
        self.executor = make_executor(args, self.model_dir, self.hf_config, self.dtype, self.device,
                                      self.max_model_len,
                                      **({"spec_decode": spec_decode} if spec_decode else {}))
        try:
            t1 = time.perf_counter()
            self.num_blocks = self._size_kv_cache()
            t2 = time.perf_counter()
            self.executor.allocate_kv_cache(self.num_blocks)
        except BaseException:
            self.shutdown()
            raise
        supports_async = getattr(self.executor, "supports_async", False)
        if args.async_scheduling and not supports_async:
            raise ValueError(f"async_scheduling=True is not supported by {type(self.executor).__name__}")
        self.async_scheduling = (supports_async and self.device.startswith("cuda")
                                 if args.async_scheduling is None else bool(args.async_scheduling))
        self._inflight = None  # asynchronous scheduling: (scheduler output, launched step)
        # ... and the step after it, when its forward pass is launched but its sampling
        # waits for the grammar bitmasks that the in-flight step's tokens decide.
        self._deferred = None
        self.pipeline_grammar_steps = True  # see _finish_deferred (benchmarks turn it off to compare)
        # A list to trace the pipelined grammar steps' host phases into (_finish_deferred;
        # benchmarks set it): one dict of phase -> ms per call.
        self.step_trace: Optional[list] = None
        self._trace_returned: Optional[float] = None
        t3 = time.perf_counter()
        self.startup_timing = {"load_s": t1 - t0, "profile_s": t2 - t1,
                               "kv_cache_and_graphs_s": t3 - t2}
        logger.info("raylm start-up: load %.1f s, memory profile %.1f s, KV cache and graphs %.1f s",
                    *self.startup_timing.values())
        # ... and where the last of them went, when the model runs in this process.
        runner = getattr(self.executor, "runner", None)
        self.startup_timing.update(getattr(runner, "startup_phases", None) or {})
        self.block_manager = BlockManager(self.num_blocks, args.block_size, args.enable_prefix_caching)
        self.scheduler = Scheduler(SchedulerConfig(
            max_num_seqs=args.max_num_seqs, max_num_batched_tokens=self.max_num_batched_tokens,
            max_model_len=self.max_model_len,
            long_prefill_token_threshold=args.long_prefill_token_threshold,
            num_lookahead_tokens=num_lookahead_tokens(spec)), self.block_manager)
        self.requests: dict[str, _CoreRequest] = {}
        # Live requests whose sampling reads the tokens so far (penalties, min_tokens, bad
        # words): while there are none, no step waits for the one in flight on their account.
        self._history_ids: set[str] = set()
        self.planner = StepPlanner(self._new_request)
        self.structured_outputs_config = parse_structured_outputs_config(
            getattr(args, "structured_outputs_config", None))
        self._tokenizer = None
        # Structured outputs: compiles, matchers and bitmasks (see grammar_requests).
        self.grammar_requests = GrammarRequests(self.requests, self._load_tokenizer, self.vocab_size,
                                                self.eos_token_ids, self.structured_outputs_config)
        # Bitmask buffers for a full batch from the first grammar step: each growth pins new
        # host memory mid-run (the benchmark's first structured steps paid ~4 of them).
        self.grammar_requests.reserve_rows = args.max_num_seqs
        if getattr(self.executor, "supports_deferred_sampling", False):  # the model runs in this process
            self.grammar_requests.use_tensors(pin_memory=self.device.startswith("cuda"))
        # Speculative decoding: proposals before each step (see spec_decode.speculator).
        self.speculator = Speculator(spec) if spec is not None else None
        self.spec_steps = SpecSteps(self.speculator, self.requests) if spec is not None else None
        self.metrics = CoreMetrics()
        self.counters = {"prompt_tokens": 0, "generation_tokens": 0, "requests_finished": 0}
        self.user_requests = UserRequests(self.metrics, self.counters)  # latency metrics
        self.users = self.user_requests.users
        self.reset_timing()
        # What start-up built (the model, graphs, tables) lives as long as the engine: move
        # it out of the collector's generations, so that the full collections that the step
        # loop's garbage triggers do not walk it again each time (vLLM does the same).
        # shutdown() gives it back to the collector.
        t_gc = time.perf_counter()
        gc.collect()
        gc.freeze()
        # ... and the rest of building it: before the model loads (its config, the device and
        # dtype: importing torch and starting CUDA when nothing has yet) and after the graphs.
        now = time.perf_counter()
        self.startup_timing.update({"before_load_s": t0 - t_init, "model_config_s": t_config - t_init,
                                    "after_graphs_s": now - t3, "gc_freeze_s": now - t_gc})
        # ... the model config's parts (imports, HF config, model class, EOS ids and tokenizer).
        self.startup_timing.update({f"model_config.{k}": v for k, v in self.model.timing.items()})
        logger.info("raylm engine core: model=%s dtype=%s device=%s kv_blocks=%d (block_size=%d, "
                    "%d tokens, max concurrency %.1f at max_model_len=%d)", self.model_dir,
                    self.dtype, self.device, self.num_blocks, args.block_size,
                    self.num_blocks * args.block_size,
                    self.num_blocks / self.block_manager.blocks_needed(self.max_model_len),
                    self.max_model_len)

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
    def add_requests(self, reqs: list[EngineCoreRequest]) -> None:
        """Queue core requests (the n completions of one user request come together).
        Raises ValueError, queuing none of them, on an id in use or a prompt too long."""
        # A finished request's id stays in use while a step that holds it is on the device
        # (asynchronous scheduling): that step's token must not reach a new request.
        in_flight = {s.request_id for step in (self._inflight, self._deferred) if step is not None
                     for s in step[0].seqs}
        for r in reqs:
            if r.request_id in self.requests or r.request_id in in_flight:
                raise ValueError(f"request_id {r.request_id!r} is already in use")
            if len(r.prompt_token_ids) > self.max_model_len:
                raise ValueError(f"prompt has {len(r.prompt_token_ids)} tokens; "
                                 f"max_model_len is {self.max_model_len}")
            validate_structured_outputs(r.params, self.structured_outputs_config)  # cached by spec
        bad_words = {r.request_id: bad_words_token_ids(self._load_tokenizer(), r.params.bad_words)
                     for r in reqs if r.params.bad_words}
        now = time.monotonic()
        for r in reqs:
            p = r.params
            max_tokens = p.max_tokens if p.max_tokens is not None else self.max_model_len - len(r.prompt_token_ids)
            req = Request(r.request_id, r.prompt_token_ids, priority=r.priority,
                          arrival_time=r.arrival_time or now,
                          use_prefix_cache=p.prompt_logprobs is None or r.index > 0,
                          prefix_group=r.prefix_group, max_output_tokens=max(1, max_tokens))
            self.requests[r.request_id] = _CoreRequest(req, p, r.index, r.subscriber, r.output_offset,
                                                       bad_words_token_ids=bad_words.get(r.request_id))
            if needs_output_history(p) or r.request_id in bad_words:
                self._history_ids.add(r.request_id)
            if p.structured_outputs is not None:  # scheduled once its grammar is compiled
                self.grammar_requests.submit(r.request_id, p.structured_outputs)
            else:
                self.scheduler.add_request(req)
            self.user_requests.add(r.group_id, now, len(r.prompt_token_ids))

    def _load_tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = self.model.load_tokenizer()
        return self._tokenizer

    @property
    def _grammars(self):
        """The GrammarManager, once a grammar request arrived (benchmarks read it)."""
        return self.grammar_requests.manager

    def _admit_compiled(self) -> list[EngineCoreOutput]:
        """Move requests whose grammar finished compiling into the scheduler; a failed
        compile fails its request. With nothing else to run, wait briefly for a compile."""
        failed = []
        block = self._scheduler_idle() and not self.step_in_flight
        t0 = time.perf_counter()
        for state, error in self.grammar_requests.admit(block):
            if error is None:
                self.scheduler.add_request(state.request)
                continue
            failed.append(EngineCoreOutput(state.request.request_id, error=error, subscriber=state.subscriber))
            self._finish(state, RequestStatus.FINISHED_ABORTED)
        self.timing["schedule_s"] += time.perf_counter() - t0
        return failed

    @property
    def _num_compiling(self) -> int:
        return self.grammar_requests.num_compiling

    def _scheduler_idle(self) -> bool:
        return not (self.scheduler.num_running or self.scheduler.num_waiting)

    def abort(self, request_ids, reason: str = "abort") -> list[str]:
        """Stop core requests at once and free their KV blocks; unknown ids are ignored.
        `reason` is what the metrics count ("stop" when the edge matched a stop string).
        Returns the ids it stopped."""
        status = RequestStatus.FINISHED_STOPPED if reason == "stop" else RequestStatus.FINISHED_ABORTED
        done = []
        for rid in [request_ids] if isinstance(request_ids, str) else request_ids:
            state = self.requests.get(rid)
            if state is not None:
                self._finish(state, status)
                done.append(rid)
        return done

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests) or self.step_in_flight or self.planner.has_finished

    @property
    def step_in_flight(self) -> bool:
        return self._inflight is not None or self._deferred is not None

    @property
    def subscribers(self) -> dict[str, Optional[str]]:
        return {rid: s.subscriber for rid, s in self.requests.items()}

    def _new_request(self, request_id: str) -> NewRequest:
        state = self.requests[request_id]
        extra = {"output_offset": state.output_offset} if state.output_offset else {}
        if state.bad_words_token_ids:
            extra["bad_words_token_ids"] = state.bad_words_token_ids
        return NewRequest(request_id, state.request.prompt_token_ids,
                          worker_sampling(state.params, self.eos_token_ids, state.index, **extra))

    def _finish(self, state: _CoreRequest, status: RequestStatus, stop_reason=None) -> None:
        rid = state.request.request_id
        self.scheduler.finish_request(rid, status)
        self.grammar_requests.release(state, self.requests.pop(rid, None) is not None)
        self._history_ids.discard(rid)
        self.planner.finished(rid)
        if self.speculator is not None:
            self.speculator.remove(rid)
        if state.out is not None:
            state.out.finish_reason = status.value
            state.out.stop_reason = stop_reason
        self.user_requests.finished(state.request.prefix_group or rid, status.value)

    # ---- one step ------------------------------------------------------------------
    def step(self) -> list[EngineCoreOutput]:
        """Run one iteration; return the outputs of the requests that progressed. With
        asynchronous scheduling these are the previous iteration's, whose tokens arrive
        while this one runs. A speculative step (proposals while no more than the limit of
        requests run) records the step in flight first and runs synchronously."""
        spec = self.speculator
        # Admit compiled grammar requests first: whether this step speculates counts them.
        # A prompt prefilled in a step that does not gets no drafted proposals for its first
        # decode, and a seeded request's tokens would depend on when its compile finished.
        outputs = self._admit_compiled() if self._num_compiling else []
        speculating = spec is not None and spec.active(self.scheduler.num_running, self.scheduler.num_waiting)
        if self.async_scheduling and not speculating and not (spec is not None and spec.every_step_sync):
            return outputs + self._step_async()
        if self._deferred is not None:  # its sampling waits for the step in flight's tokens
            outputs += self._finish_deferred(time.perf_counter(), pipeline=False)
        if self._inflight is not None:  # proposals follow the last token: record it first
            outputs += self._complete_inflight(time.perf_counter())
        return outputs + self._step_sync(speculating)

    def _step_sync(self, speculating: bool = False) -> list[EngineCoreOutput]:
        """Schedule, run and record one step; with speculation, propose first. A step
        with proposals runs synchronously: how many tokens each row emits decides the
        next step's inputs."""
        t0 = time.perf_counter()
        proposed = self.spec_steps.propose(self.scheduler.running) if speculating else []
        sched_out = self.scheduler.schedule()
        for req in proposed:  # rows the budget left out keep none for a later step
            req.spec_token_ids = []
        if not sched_out and not sched_out.preempted_ids and not self.planner.has_finished:
            return []
        plan = self.planner.plan(sched_out)
        if self.grammar_requests.num_live and sched_out:
            tg = time.perf_counter()
            self.grammar_requests.attach_bitmask(plan, sched_out)
            self.timing["grammar_s"] += time.perf_counter() - tg
        if speculating and self.speculator.on_workers:  # drafted on the workers after this step
            plan.spec_wanted = self.spec_steps.wanted(sched_out, self.scheduler.requests)
        t1 = time.perf_counter()
        result = self.executor.execute(plan)
        t2 = time.perf_counter()
        outputs = self._record(sched_out, result)
        tm = self.timing
        tm["steps"] += 1
        tm["schedule_s"] += t1 - t0
        tm["execute_s"] += t2 - t1
        tm["process_s"] += time.perf_counter() - t2
        return outputs

    def _step_async(self) -> list[EngineCoreOutput]:
        """Schedule step N+1 (with placeholders for step N's tokens), launch it, then
        collect and record step N while the device runs N+1. With grammar rows, N+1's
        sampling waits for N's tokens (see _finish_deferred)."""
        t0 = time.perf_counter()
        if self._deferred is not None:
            return self._finish_deferred(t0)
        outputs: list[EngineCoreOutput] = []
        sched_out = self.scheduler.schedule()
        t1 = time.perf_counter()
        if not sched_out and not sched_out.preempted_ids and not self.planner.has_finished:
            if self._inflight is not None:
                outputs = self._complete_inflight(t1)
            return outputs
        # Grammar rows need step N's tokens only to sample: launch N+1's forward pass first
        # and queue its sampling once N is recorded (its matchers advanced), while the
        # device runs the forward pass.
        defer = (self._inflight is not None and self.grammar_requests.num_live
                 and getattr(self.executor, "supports_deferred_sampling", False)
                 and not self._needs_current_outputs(sched_out, grammar=False)
                 and self._needs_current_outputs(sched_out))
        if self._inflight is not None and not defer and self._needs_current_outputs(sched_out):
            outputs += self._complete_inflight(t1)  # penalties need step N's tokens first
            # Requests that step N ended (a stop token, EOS) leave this step's rows.
            sched_out.seqs = [s for s in sched_out.seqs if s.request_id in self.requests]
            t1 = time.perf_counter()
        plan = self.planner.plan(sched_out)
        if self.grammar_requests.num_live and sched_out and not defer:
            tg = time.perf_counter()
            self.grammar_requests.attach_bitmask(plan, sched_out)  # its matchers saw step N's tokens (above)
            self.timing["grammar_s"] += time.perf_counter() - tg
        launched = self.executor.launch(plan, defer_sampling=True) if defer else self.executor.launch(plan)
        self._mark_launched(sched_out)
        t2 = time.perf_counter()
        tm = self.timing
        tm["schedule_s"] += t1 - t0
        tm["execute_s"] += t2 - t1
        if defer:
            self._deferred = (sched_out, launched)
            return outputs + self._finish_deferred(t2)
        if self._inflight is not None:
            outputs += self._complete_inflight(t2)
        self._inflight = (sched_out, launched)
        return outputs

    def _can_pipeline(self) -> bool:
        """Whether the next step can be launched before the deferred one's sampling is
        queued: grammar rows, an executor that defers sampling, and no request whose
        sampling reads its outputs so far (penalties, min_tokens, bad_words)."""
        return (self.pipeline_grammar_steps and bool(self.grammar_requests.num_live) and not self._history_ids
                and self.speculator is None and getattr(self.executor, "supports_deferred_sampling", False))

    def _finish_deferred(self, t0: float, pipeline: bool = True) -> list[EngineCoreOutput]:
        """Steps N (self._inflight: its sampling queued) and N+1 (self._deferred: its
        forward pass on the device, its sampling waiting for bitmasks that N's tokens
        decide). Collect N; its grammar rows' tokens go to their matchers and N+1's
        bitmasks fill on the grammar threads while this thread records N and, with
        `pipeline`, schedules and plans N+2; then queue N+1's sampling and launch N+2's
        forward pass right behind it (its own sampling deferred in turn), so the device
        never waits for the host's planning between steps."""
        sched1, launched1 = self._deferred
        self._deferred = None
        tm = self.timing
        outputs: list[EngineCoreOutput] = []
        rows = self.grammar_requests.rows(sched1)
        # step_trace: each phase's host time (ms), in the order they run.
        trace = None if self.step_trace is None else {"rows": len(sched1.seqs), "grammar_rows": len(rows)}
        if trace is not None and self._trace_returned is not None:  # the engine's work between calls
            trace["between_ms"] = 1e3 * (t0 - self._trace_returned)
        last = [t0]

        def mark(phase: str, t: float) -> None:
            if trace is not None:
                trace[phase + "_ms"] = 1e3 * (t - last[0])
                last[0] = t
        step = None
        try:
            if self._inflight is not None:
                sched0, launched0 = self._inflight
                self._inflight = None
                result = self.executor.collect(launched0)
                t1 = time.perf_counter()
                tm["execute_s"] += t1 - t0
                tm["wait_s"] += t1 - t0  # blocked on the device
                mark("collect", t1)
                g0 = tm["grammar_s"]
                step = self.grammar_requests.start_step({} if result.spec_sampled else result.sampled, rows)
                outputs = self._record(sched0, result, launched=True, grammar_step=step)
                tm["steps"] += 1
                t0 = time.perf_counter()
                tm["process_s"] += t0 - t1
                mark("record", t0)
                if trace is not None:  # of which waiting for the matchers' accepts
                    trace["record_accept_wait_ms"] = 1e3 * (tm["grammar_s"] - g0)
            elif rows:
                step = self.grammar_requests.start_step({}, rows)
            nxt = None
            if pipeline and self._can_pipeline():
                sched2 = self.scheduler.schedule()
                if sched2 or sched2.preempted_ids or self.planner.has_finished:
                    nxt = (sched2, self.planner.plan(sched2))
                t1 = time.perf_counter()
                tm["schedule_s"] += t1 - t0
                t0 = t1
                mark("plan", t1)

            inside = [0.0]  # seconds queue_sampling took

            def queue_sampling() -> None:
                """Wait for N+1's bitmasks and queue its sampling."""
                t1 = time.perf_counter()
                mark("launch_prepare", t1)  # the host's part of N+2's launch before this (if any)
                mask = step.bitmask() if rows else None
                if step is not None:
                    step.close()
                t2 = time.perf_counter()
                tm["grammar_s"] += t2 - t1
                mark("bitmask_wait", t2)
                ids, mask = self.grammar_requests.constrained(rows, mask) if rows else ([], None)
                self.executor.finish_sampling(launched1, ids, mask)
                self._inflight = (sched1, launched1)
                t3 = time.perf_counter()
                tm["deferred_sampling_s"] += t3 - t2
                mark("finish_sampling", t3)
                inside[0] = t3 - t1

            if nxt is not None and getattr(self.executor, "supports_before_inputs", False):
                # N+2's inputs are built on the host while N+1's bitmasks fill; then N+1's
                # sampling is queued, and N+2's inputs and forward pass right behind it.
                t1 = time.perf_counter()
                self._deferred = (nxt[0], self.executor.launch(nxt[1], defer_sampling=True,
                                                               before_inputs=queue_sampling))
                self._mark_launched(nxt[0])
                t2 = time.perf_counter()
                tm["execute_s"] += (t2 - t1) - inside[0]
                mark("launch", t2)
                nxt = None
            else:
                queue_sampling()
        finally:
            if step is not None:  # its threads joined (an abandoned or fill-less step's too)
                step.close()
        if nxt is not None:
            t0 = time.perf_counter()
            self._deferred = (nxt[0], self.executor.launch(nxt[1], defer_sampling=True))
            self._mark_launched(nxt[0])
            t1 = time.perf_counter()
            tm["execute_s"] += t1 - t0
            mark("launch", t1)
        if trace is not None:
            self.step_trace.append(trace)
            self._trace_returned = time.perf_counter()
        return outputs

    def _needs_current_outputs(self, sched_out, grammar: bool = True) -> bool:
        """True when a request of this step samples from the tokens so far (penalties,
        min_tokens, bad_words, a grammar's bitmask unless grammar=False): the step in
        flight must be recorded before this one samples."""
        grammar = grammar and bool(self.grammar_requests.num_live)
        if not self._history_ids and not grammar:
            return False
        for s in sched_out.seqs:
            if s.request_id in self._history_ids:
                return True
            if grammar and s.sample:
                state = self.requests.get(s.request_id)
                if state is not None and state.grammar is not None:
                    return True
        return False

    def _mark_launched(self, sched_out) -> None:
        """The step is on the device: count its tokens computed and give each request it
        samples a placeholder for its token."""
        if not sched_out:
            return
        self.scheduler.update_after_step(sched_out)
        for s in sched_out.seqs:
            state = self.requests.get(s.request_id)
            if s.sample and state is not None:
                state.request.append_placeholder()

    def _complete_inflight(self, t0: float) -> list[EngineCoreOutput]:
        sched_out, launched = self._inflight
        self._inflight = None
        result = self.executor.collect(launched)
        t1 = time.perf_counter()
        outputs = self._record(sched_out, result, launched=True)
        tm = self.timing
        tm["steps"] += 1
        tm["execute_s"] += t1 - t0
        tm["wait_s"] += t1 - t0  # blocked on the device: the step launched before was running
        tm["process_s"] += time.perf_counter() - t1
        return outputs

    def _output(self, state: _CoreRequest, outputs: list) -> EngineCoreOutput:
        if state.out is None:
            req = state.request
            state.out = EngineCoreOutput(req.request_id, num_cached_tokens=max(0, req.num_cached_tokens),
                                         subscriber=state.subscriber)
            outputs.append((state, state.out))
        return state.out

    def _record(self, sched_out, result: StepResult, launched: bool = False,
                grammar_step=None) -> list[EngineCoreOutput]:
        """Apply a step's sampled tokens and finish the requests that hit EOS, a stop
        token or their length. `launched`: asynchronous scheduling already marked the
        step computed and gave each sampling request a placeholder. `grammar_step`: the
        grammar rows' tokens already went to their matchers (GrammarRequests.start_step)."""
        if not sched_out:
            return []
        num_accepted = num_accepted_of(sched_out, result.spec_sampled) if result.spec_sampled else None
        if not launched:
            self.scheduler.update_after_step(sched_out, num_accepted)
        now = time.monotonic()
        built: list[tuple[_CoreRequest, EngineCoreOutput]] = []
        for rid, lps in result.prompt_logprobs.items():
            state = self.requests.get(rid)
            if state is not None:
                out = self._output(state, built)
                out.prompt_logprobs = (out.prompt_logprobs or []) + list(lps)
        # The grammar rows' tokens go to their matchers together, on the manager's threads.
        grammar_batch = [] if self.grammar_requests.num_live else None
        for rid, token in result.sampled.items():
            state = self.requests.get(rid)
            if state is None:
                continue  # finished or aborted after this step was sent
            req = state.request
            if launched:
                req.resolve_placeholder(token)
            else:
                req.append_output_token(token)
            out = self._output(state, built)
            lp = result.logprobs.get(rid)
            if lp is not None and state.params.logprobs is not None:
                out.new_logprobs = (out.new_logprobs or []) + [lp]
            self._emit(state, out, token, now, grammar_batch)
        if grammar_batch:
            states = [st for st, _ in grammar_batch]
            tokens = [t for _, t in grammar_batch]
            tg = time.perf_counter()
            stops = (grammar_step.stops(states, tokens) if grammar_step is not None
                     else self.grammar_requests.advance_many(states, tokens))
            self.timing["grammar_s"] += time.perf_counter() - tg
            for state, stop in zip(states, stops):
                if stop and state.request.request_id in self.requests:
                    self._finish(state, RequestStatus.FINISHED_STOPPED)
        if num_accepted:
            self._record_spec(sched_out, result, num_accepted, built, now)
        if self.speculator is not None:
            self.speculator.after_step(sched_out, result, self.requests)
        outs = []
        for state, out in built:
            state.out = None
            outs.append(out)
        return outs

    def _record_spec(self, sched_out, result: StepResult, num_accepted: dict, built: list,
                     now: float) -> None:
        """Append each verified row's emitted tokens (its accepted proposals and the one
        after them), checking EOS, stop tokens and the length after each: a request that
        ends drops the tokens after its end."""
        for state, tokens, lps in self.spec_steps.emitted(sched_out, result, num_accepted):
            out = self._output(state, built)
            for j, token in enumerate(tokens):
                state.request.append_output_token(token)
                if lps is not None:
                    out.new_logprobs = (out.new_logprobs or []) + [lps[j]]
                self._emit(state, out, token, now)
                if state.request.request_id not in self.requests:
                    break

    def _emit(self, state: _CoreRequest, out: EngineCoreOutput, token: int, now: float,
              grammar_batch: Optional[list] = None) -> None:
        """A token the request gained (already appended to it): into its output, the
        metrics, the stop checks and its grammar's matcher (emitted tokens only; into
        `grammar_batch`, when given, for the caller to advance with the step's others)."""
        rid = state.request.request_id
        self.counters["generation_tokens"] += 1
        out.new_token_ids.append(token)
        self.user_requests.observe_token(state.request.prefix_group or rid, now)
        self._check_stop(state, token)
        if state.grammar is not None and rid in self.requests:
            if grammar_batch is not None:
                grammar_batch.append((state, token))
            elif self.grammar_requests.advance(state, token):
                self._finish(state, RequestStatus.FINISHED_STOPPED)

    def _check_stop(self, state: _CoreRequest, token: int) -> None:
        p, req = state.params, state.request
        n_out = req.num_output_tokens
        if n_out + state.output_offset >= p.min_tokens:
            if not p.ignore_eos and token in self.eos_token_ids:
                return self._finish(state, RequestStatus.FINISHED_STOPPED)
            if p.stop_token_ids and token in p.stop_token_ids:
                return self._finish(state, RequestStatus.FINISHED_STOPPED, token)
        if n_out >= req.max_output_tokens or req.num_tokens - req.num_pending >= self.max_model_len:
            self._finish(state, RequestStatus.FINISHED_LENGTH)

    # ---- introspection -------------------------------------------------------------
    def reset_timing(self) -> None:
        self.timing = new_step_timing()

    def timing_summary(self) -> dict:
        """Per-step wall time of the step loop (see core_stats.step_timing_summary)."""
        return step_timing_summary(self.timing)

    def stats(self) -> dict[str, Any]:
        bm, sch = self.block_manager, self.scheduler
        return {
            "num_requests_running": sch.num_running,
            "num_requests_waiting": sch.num_waiting + self._num_compiling,
            "num_blocks": bm.num_blocks,
            "blocks_in_use": bm.num_used_blocks,
            "kv_cache_usage_perc": bm.usage,
            "prefix_cache_queries": bm.prefix_query_tokens,
            "prefix_cache_hit_tokens": bm.prefix_hit_tokens,
            "num_preemptions": sch.num_preemptions,
            "num_mixed_steps": sch.num_mixed_steps,
            "num_steps": sch.num_steps,
            "max_num_seqs": self.args.max_num_seqs,
            **self.counters,
            **(self.speculator.stats() if self.speculator is not None else {}),
        }

    def shutdown(self) -> None:
        gc.unfreeze()  # the engine's objects (and any in reference cycles) can be freed again
        if getattr(self, "grammar_requests", None) is not None:
            self.grammar_requests.shutdown()
        if getattr(self, "executor", None) is not None:
            self.executor.shutdown()
            self.executor = None
