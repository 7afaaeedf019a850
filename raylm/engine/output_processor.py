"""What the engine does with a step's results: record the sampled tokens on their
requests, finish those that hit EOS, a stop token or their length, then detokenize,
apply stop strings and build the RequestOutputs (vLLM's output processor).

A mixin of `LLMEngine`, whose state it reads: scheduler, completions (scheduler request id
-> CompletionState), groups (request id -> RequestGroup), counters, tokenizer,
eos_token_ids, max_model_len and the step planner."""
from __future__ import annotations

import time
from typing import Optional

from raylm.engine.detokenizer import check_stop_strings, decode_single_token
from raylm.engine.outputs import Logprob, RequestOutput
from raylm.engine.request_state import CompletionState, RequestGroup
from raylm.scheduler.request import RequestStatus
from raylm.workers.messages import TokenLogprobs


class OutputProcessor:
    """record_step / emit_step and the stop checks; see the module docstring."""

    def _finish(self, comp: CompletionState, status: RequestStatus, stop_reason=None) -> None:
        rid = comp.request.request_id
        self.scheduler.finish_request(rid, status)
        comp.finish_reason = status.value
        comp.stop_reason = stop_reason
        self.completions.pop(rid, None)
        self.planner.finished(rid)

    def _decode_one(self, token_id: int) -> Optional[str]:
        return None if self.tokenizer is None else decode_single_token(self.tokenizer, token_id)

    def _logprob_dict(self, lp: TokenLogprobs) -> dict[int, Logprob]:
        d = {tid: Logprob(v, i + 1, self._decode_one(tid))
             for i, (tid, v) in enumerate(zip(lp.top_ids, lp.top_logprobs))}
        if lp.token_id not in d:
            d[lp.token_id] = Logprob(lp.logprob, lp.rank, self._decode_one(lp.token_id))
        return d

    def _check_stop_tokens(self, comp: CompletionState, token: int) -> None:
        p = comp.params
        n_out = comp.request.num_output_tokens
        if n_out >= p.min_tokens:
            if not p.ignore_eos and token in self.eos_token_ids:
                return self._finish(comp, RequestStatus.FINISHED_STOPPED)
            if p.stop_token_ids and token in p.stop_token_ids:
                return self._finish(comp, RequestStatus.FINISHED_STOPPED, token)
        req = comp.request
        if n_out >= p.max_tokens or req.num_tokens - req.num_pending >= self.max_model_len:
            if not p.stop:
                return self._finish(comp, RequestStatus.FINISHED_LENGTH)
            comp.length_capped = True  # a stop string in this last token still wins

    def _check_stop_strings(self, comp: CompletionState, new_chars: int) -> None:
        p = comp.params
        if p.stop and comp.request.num_output_tokens >= p.min_tokens:
            hit = check_stop_strings(comp.text, new_chars, p.stop, p.include_stop_str_in_output)
            if hit is not None:
                stop_str, keep = hit
                comp.text = comp.text[:keep]
                return self._finish(comp, RequestStatus.FINISHED_STOPPED, stop_str)
        if comp.length_capped:
            self._finish(comp, RequestStatus.FINISHED_LENGTH)

    def record_step(self, sched_out, result, launched: bool = False) -> list:
        """Apply a step's sampled tokens to the requests and finish those that hit EOS, a
        stop token or their length (checks that need no text). Returns what emit_step needs.
        `launched`: asynchronous scheduling already marked the step computed and gave each
        sampling request a placeholder, which the token now replaces."""
        if not sched_out:
            return []
        if not launched:
            self.scheduler.update_after_step(sched_out)
        now = time.monotonic()
        pending = []
        for rid, lps in result.prompt_logprobs.items():
            comp = self.completions.get(rid)
            if comp is not None:
                pending.append((comp, None, lps))
        for rid, token in result.sampled.items():
            comp = self.completions.get(rid)
            if comp is None:
                continue  # finished or aborted after this step was sent
            group = self.groups[self._group_id(comp)]
            group.first_token_time = group.first_token_time or now
            if launched:
                comp.request.resolve_placeholder(token)
            else:
                comp.request.append_output_token(token)
            self.counters["generation_tokens"] += 1
            pending.append((comp, token, result.logprobs.get(rid)))
            self._check_stop_tokens(comp, token)
        return pending

    def emit_step(self, pending: list) -> list[RequestOutput]:
        """Detokenize a recorded step, apply stop strings, and build the outputs."""
        touched: dict[str, RequestGroup] = {}
        for comp, token, lp in pending:
            group = self.groups.get(self._group_id(comp))
            if group is None:
                continue  # aborted in between
            if token is None:
                group.prompt_logprobs.extend(self._logprob_dict(x) for x in lp)
                continue
            if comp.logprobs is not None and lp is not None:
                comp.logprobs.append(self._logprob_dict(lp))
                comp.cumulative_logprob += lp.logprob
            delta = comp.detok.add_token(token)
            comp.text += delta
            if comp.finish_reason is None:
                self._check_stop_strings(comp, len(delta))
            touched[group.request_id] = group
        outputs = []
        for group in touched.values():
            if self.final_outputs_only and not group.finished:
                continue
            outputs.append(group.to_output())
            if group.finished:
                del self.groups[group.request_id]
                self.counters["requests_finished"] += 1
        return outputs

    def _group_id(self, comp: CompletionState) -> str:
        return comp.request.prefix_group or comp.request.request_id
