"""The edge of the engine: token ids from the core in, user-facing outputs out.

`OutputProcessor` turns a user request into core requests (one per completion) and the
core's per-step token-id deltas (`EngineCoreOutput`) into cumulative `RequestOutput`s:
it detokenizes incrementally, applies stop strings (a match ends the completion here and
names the core request to abort), and builds log-probability dicts. It runs wherever the
tokenizer is: in-process for the offline `LLM`, in each ingress replica in the cluster.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional, Union

from raylm.engine.core import EngineCoreOutput, EngineCoreRequest
from raylm.engine.detokenizer import IncrementalDetokenizer, check_stop_strings, decode_single_token
from raylm.engine.outputs import CompletionOutput, Logprob, RequestOutput
from raylm.engine.sampling_params import SamplingParams
from raylm.workers.messages import TokenLogprobs


class NoDetokenizer:
    """Stands in for the detokenizer under skip_tokenizer_init: no text."""

    def add_token(self, token_id: int) -> str:
        return ""


@dataclass(eq=False)
class CompletionState:
    """Edge state of one completion (one core request)."""

    core_id: str
    index: int
    params: SamplingParams
    detok: Union[IncrementalDetokenizer, NoDetokenizer]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: Optional[list] = None
    cumulative_logprob: float = 0.0
    finish_reason: Optional[str] = None
    stop_reason: Union[int, str, None] = None
    num_cached_tokens: int = 0

    def to_output(self) -> CompletionOutput:
        return CompletionOutput(
            index=self.index, text=self.text, token_ids=list(self.token_ids),
            cumulative_logprob=self.cumulative_logprob if self.logprobs is not None else None,
            logprobs=list(self.logprobs) if self.logprobs is not None else None,
            finish_reason=self.finish_reason, stop_reason=self.stop_reason)


@dataclass(eq=False)
class RequestState:
    """One user request: a prompt and its n completions."""

    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    params: SamplingParams
    completions: list[CompletionState] = field(default_factory=list)
    prompt_logprobs: Optional[list] = None
    arrival_time: float = 0.0
    first_token_time: Optional[float] = None

    @property
    def finished(self) -> bool:
        for c in self.completions:  # (per request and token at the ingress: no generator)
            if c.finish_reason is None:
                return False
        return True

    def to_output(self) -> RequestOutput:
        cached = min(c.num_cached_tokens for c in self.completions)
        return RequestOutput(
            request_id=self.request_id, prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            prompt_logprobs=list(self.prompt_logprobs) if self.prompt_logprobs is not None else None,
            outputs=[c.to_output() for c in self.completions], finished=self.finished,
            num_cached_tokens=cached,
            metrics={"arrival_time": self.arrival_time, "first_token_time": self.first_token_time})


class GroupFailure(RuntimeError):
    """The worker group serving a request failed (its state here is kept: the cluster's
    frontend re-dispatches it to another group)."""


def error_from(message: str) -> Exception:
    """A core's error message as an exception: the core refusing a request's input
    ("ValueError: ...") is the client's error, anything else its group's failure."""
    if message.startswith("ValueError: "):
        return ValueError(message[len("ValueError: "):])
    return GroupFailure(message)


def core_request_ids(request_id: str, n: int) -> list[str]:
    """The core request ids of a user request's n completions."""
    return [request_id] if n == 1 else [f"{i}_{request_id}" for i in range(n)]


class OutputProcessor:
    """Edge-side state of every open user request (see module doc)."""

    def __init__(self, tokenizer, max_model_len: int):
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.requests: dict[str, RequestState] = {}
        self._by_core: dict[str, tuple[RequestState, CompletionState]] = {}
        # Offline generate() needs only finished requests; skip building the others.
        self.final_outputs_only = False

    def has(self, request_id: str) -> bool:
        return request_id in self.requests

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def add_request(self, request_id: str, prompt: Optional[str], prompt_token_ids: list[int],
                    params: SamplingParams, arrival_time: Optional[float] = None, priority: int = 0,
                    subscriber: Optional[str] = None) -> list[EngineCoreRequest]:
        """Open a user request; return its core requests (n of them, seeds set to
        seed + i, max_tokens resolved to the rest of the context when None)."""
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        arrival = arrival_time if arrival_time is not None else time.monotonic()
        state = RequestState(request_id, prompt, list(prompt_token_ids), params, arrival_time=arrival)
        if params.prompt_logprobs is not None:
            state.prompt_logprobs = [None]
        max_tokens = params.max_tokens if params.max_tokens is not None else self.max_model_len - len(prompt_token_ids)
        core_reqs = []
        for i, core_id in enumerate(core_request_ids(request_id, params.n)):
            child = params.clone()
            child.n = 1
            child.max_tokens = max(1, max_tokens)
            if params.seed is not None:
                child.seed = params.seed + i
            detok = (NoDetokenizer() if self.tokenizer is None else
                     IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params.skip_special_tokens,
                                            params.spaces_between_special_tokens))
            comp = CompletionState(core_id, i, child, detok,
                                   logprobs=[] if params.logprobs is not None else None)
            state.completions.append(comp)
            self._by_core[core_id] = (state, comp)
            core_reqs.append(EngineCoreRequest(core_id, list(prompt_token_ids), child, i,
                                               request_id if params.n > 1 else None, arrival, priority,
                                               subscriber))
        self.requests[request_id] = state
        return core_reqs

    def abort(self, request_id: str) -> tuple[Optional[RequestOutput], list[str]]:
        """End a user request now: (its final output with finish_reason "abort" on each
        unfinished completion, the core ids still running). Unknown ids give (None, [])."""
        state = self.requests.pop(request_id, None)
        if state is None:
            return None, []
        running = []
        for comp in state.completions:
            self._by_core.pop(comp.core_id, None)
            if comp.finish_reason is None:
                comp.finish_reason = "abort"
                running.append(comp.core_id)
        return state.to_output(), running

    def redispatch(self, request_id: str, attempt: int) -> list[EngineCoreRequest]:
        """Core requests that continue a user request's unfinished completions elsewhere,
        by recompute: each prompt is the original prompt plus the tokens generated so far
        (output_offset of them), max_tokens what is left; text, logprobs and usage go on
        from where they were. The old core ids are forgotten (late outputs are dropped)."""
        state = self.requests.get(request_id)
        if state is None:
            return []
        reqs = []
        redo_prompt_logprobs = (state.prompt_logprobs is not None
                                and len(state.prompt_logprobs) < len(state.prompt_token_ids))
        if redo_prompt_logprobs:
            state.prompt_logprobs = [None]
        for comp in state.completions:
            self._by_core.pop(comp.core_id, None)
            if comp.finish_reason is not None:
                continue
            done = len(comp.token_ids)
            params = comp.params.clone()
            params.max_tokens = comp.params.max_tokens - done
            if params.max_tokens < 1:  # its last token was in flight: it has all it needs
                comp.finish_reason = "length"
                continue
            if not (redo_prompt_logprobs and comp.index == 0):
                params.prompt_logprobs = None
            comp.core_id = f"{comp.core_id.split('@')[0]}@{attempt}"
            self._by_core[comp.core_id] = (state, comp)
            reqs.append(EngineCoreRequest(comp.core_id, state.prompt_token_ids + comp.token_ids, params,
                                          comp.index, None, time.monotonic(), 0, None, output_offset=done))
        return reqs

    def fail(self, request_id: str) -> list[str]:
        """Forget a user request that failed; return its core ids."""
        state = self.requests.pop(request_id, None)
        if state is None:
            return []
        for comp in state.completions:
            self._by_core.pop(comp.core_id, None)
        return [c.core_id for c in state.completions]

    def process(self, outputs: list[EngineCoreOutput]
                ) -> tuple[list[tuple[str, Union[RequestOutput, Exception]]], list[str]]:
        """Apply one step's core outputs. Returns ((user request id, its new cumulative
        output, or the exception it failed with) for each request that progressed, core
        ids to abort because a stop string ended them here)."""
        touched: dict[str, RequestState] = {}
        failed: dict[str, Exception] = {}
        stops: list[str] = []
        now = time.monotonic()
        for out in outputs:
            entry = self._by_core.get(out.request_id)
            if entry is None:
                continue  # finished here already (stop string) or aborted
            state, comp = entry
            if out.error is not None:
                failed[state.request_id] = error_from(out.error)
                continue
            if out.prompt_logprobs and state.prompt_logprobs is not None \
                    and len(state.prompt_logprobs) >= len(state.prompt_token_ids):
                out.prompt_logprobs = None  # re-dispatched: positions past the prompt
            if out.prompt_logprobs:
                state.prompt_logprobs.extend(self._logprob_dict(x) for x in out.prompt_logprobs)
                del state.prompt_logprobs[len(state.prompt_token_ids):]  # a re-dispatch's extra positions
            comp.num_cached_tokens = out.num_cached_tokens
            if out.new_token_ids:
                state.first_token_time = state.first_token_time or now
            for j, token in enumerate(out.new_token_ids):
                comp.token_ids.append(token)
                if comp.logprobs is not None and out.new_logprobs is not None:
                    lp = out.new_logprobs[j]
                    comp.logprobs.append(self._logprob_dict(lp))
                    comp.cumulative_logprob += lp.logprob
                delta = comp.detok.add_token(token)
                comp.text += delta
                if self._check_stop_strings(comp, len(delta)):
                    if out.finish_reason is None:
                        stops.append(comp.core_id)
                    break
            if comp.finish_reason is None and out.finish_reason is not None:
                comp.finish_reason, comp.stop_reason = out.finish_reason, out.stop_reason
            touched[state.request_id] = state
        results: list = []
        for rid, exc in failed.items():
            if not isinstance(exc, GroupFailure):  # bad input: it ends here
                self.fail(rid)
            touched.pop(rid, None)
            results.append((rid, exc))
        for state in touched.values():
            if state.finished:
                for comp in state.completions:
                    self._by_core.pop(comp.core_id, None)
                del self.requests[state.request_id]
            elif self.final_outputs_only:
                continue
            results.append((state.request_id, state.to_output()))
        return results, stops

    def _check_stop_strings(self, comp: CompletionState, new_chars: int) -> bool:
        p = comp.params
        if not p.stop or len(comp.token_ids) < p.min_tokens:
            return False
        hit = check_stop_strings(comp.text, new_chars, p.stop, p.include_stop_str_in_output)
        if hit is None:
            return False
        stop_str, keep = hit
        comp.text = comp.text[:keep]
        comp.finish_reason, comp.stop_reason = "stop", stop_str
        return True

    def _decode_one(self, token_id: int) -> Optional[str]:
        return None if self.tokenizer is None else decode_single_token(self.tokenizer, token_id)

    def _logprob_dict(self, lp: TokenLogprobs) -> dict[int, Logprob]:
        d = {tid: Logprob(v, i + 1, self._decode_one(tid))
             for i, (tid, v) in enumerate(zip(lp.top_ids, lp.top_logprobs))}
        if lp.token_id not in d:
            d[lp.token_id] = Logprob(lp.logprob, lp.rank, self._decode_one(lp.token_id))
        return d
