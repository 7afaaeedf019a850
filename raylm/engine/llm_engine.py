"""The in-process engine: the edge (tokenize, detokenize, stop strings) around one
`EngineCore` (scheduling, the model, stop tokens), stepped by its caller. The offline
`LLM` drives it; the cluster runs the same core in its own process per worker group
(`raylm.engine.core_loop`) with the edge in the ingress replicas.
"""
from __future__ import annotations

import time
from typing import Any, Optional, Union

from raylm.engine.config import EngineArgs
from raylm.engine.core import EngineCore
from raylm.engine.input_processor import InputProcessor, PromptType
from raylm.engine.model_config import ModelConfig
from raylm.engine.output_processor import OutputProcessor
from raylm.engine.outputs import RequestOutput
from raylm.engine.sampling_params import SamplingParams

__all__ = ["LLMEngine", "PromptType"]


class LLMEngine:
    """Owns the tokenizer, the edge's output processor and one engine core."""

    def __init__(self, args: EngineArgs):
        self.args = args
        self.model = ModelConfig.from_args(args)
        self.tokenizer = self.model.load_tokenizer()
        self.core = EngineCore(args, self.model)
        self.inputs = InputProcessor(self.tokenizer, self.model.max_model_len, self.model.vocab_size,
                                     args.max_logprobs)
        self.outputs = OutputProcessor(self.tokenizer, self.model.max_model_len)
        self._counter = 0

    # The core's parts, for tests, benchmarks and stats.
    def __getattr__(self, name: str) -> Any:
        if name in ("scheduler", "block_manager", "executor", "async_scheduling", "counters",
                    "timing", "timing_summary", "reset_timing", "startup_timing", "num_blocks",
                    "max_model_len", "model_dir", "hf_config", "vocab_size", "eos_token_ids",
                    "device", "dtype", "max_num_batched_tokens", "metrics", "stats"):
            return getattr(self.__dict__["core"], name)
        raise AttributeError(name)

    @property
    def final_outputs_only(self) -> bool:
        return self.outputs.final_outputs_only

    @final_outputs_only.setter
    def final_outputs_only(self, value: bool) -> None:
        self.outputs.final_outputs_only = value

    def validate(self, prompt: PromptType, params: SamplingParams) -> tuple[Optional[str], list[int]]:
        """Tokenize and check one request; raise ValueError naming what is wrong."""
        return self.inputs.validate(prompt, params)

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams,
                    priority: int = 0, arrival_time: Optional[float] = None,
                    validated: Optional[tuple] = None) -> None:
        """Queue a request; raises ValueError (queuing nothing) on bad input."""
        if self.outputs.has(request_id):
            raise ValueError(f"request_id {request_id!r} is already in use")
        text, ids = validated or self.validate(prompt, params)
        arrival = arrival_time if arrival_time is not None else time.monotonic()
        reqs = self.outputs.add_request(request_id, text, ids, params, arrival, priority)
        try:
            self.core.add_requests(reqs)
        except BaseException:
            self.outputs.fail(request_id)
            raise

    def abort_request(self, request_id: Union[str, list[str]]) -> list[RequestOutput]:
        """Stop requests at once and free their KV blocks; unknown ids are ignored.
        Returns the final outputs (finish_reason "abort") of the requests it stopped."""
        outputs = []
        for rid in [request_id] if isinstance(request_id, str) else request_id:
            out, running = self.outputs.abort(rid)
            if out is not None:
                self.core.abort(running)
                outputs.append(out)
        return outputs

    def has_unfinished_requests(self) -> bool:
        return self.outputs.has_unfinished()

    def next_request_id(self) -> str:
        self._counter += 1
        return str(self._counter - 1)

    def step(self) -> list[RequestOutput]:
        """Run one iteration; return the outputs of requests that progressed (finished ones
        last appear with `finished=True`). With asynchronous scheduling these are the
        outputs of the previous iteration, whose tokens arrive while this one runs."""
        results, stops = self.outputs.process(self.core.step())
        if stops:
            self.core.abort(stops, reason="stop")
        outputs = []
        for _, item in results:
            if isinstance(item, BaseException):
                raise item
            outputs.append(item)
        return outputs

    def shutdown(self) -> None:
        core = self.__dict__.get("core")
        if core is not None:
            core.shutdown()
