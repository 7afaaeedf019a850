"""The offline API, as in vLLM: `LLM(model=...).generate(prompts, sampling_params)`."""
from __future__ import annotations

import time
from typing import Optional, Sequence, Union

from raylm.engine.config import EngineArgs
from raylm.engine.llm_engine import LLMEngine, PromptType
from raylm.engine.outputs import RequestOutput
from raylm.engine.sampling_params import SamplingParams


class LLM:
    """Generates text for batches of prompts with continuous batching.

    `model` is a local HF directory, a .gguf file, a hub id (when the hub is reachable)
    or None for the embedded default (SmolLM2-135M-Instruct). Every other keyword is
    an engine argument with vLLM's name (see `EngineArgs`)."""

    def __init__(self, model: Optional[str] = None, **kwargs):
        unknown = set(kwargs) - set(EngineArgs.field_names())
        if unknown:
            raise TypeError(f"unknown engine argument(s) {sorted(unknown)}; "
                            f"known: {EngineArgs.field_names()}")
        self.llm_engine: Optional[LLMEngine] = LLMEngine(EngineArgs(model=model, **kwargs))

    @property
    def engine(self) -> LLMEngine:
        if self.llm_engine is None:
            raise RuntimeError("this LLM has been shut down")
        return self.llm_engine

    def get_tokenizer(self):
        return self.engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """What `generate` and `chat` use without sampling_params (as vLLM): the model's
        generation_config.json defaults (`generation_config="auto"`, the default), else
        SamplingParams()."""
        return SamplingParams(**self.engine.model.default_sampling)

    def generate(self, prompts: Union[PromptType, Sequence[PromptType]],
                 sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
                 use_tqdm: bool = True, priority: Optional[Sequence[int]] = None) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in input order. A prompt is
        a string, a list of token ids, or {"prompt_token_ids": [...]}. Every request is
        validated before any runs."""
        if isinstance(prompts, (str, dict)) or (
                isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        params = ([sampling_params] * len(prompts) if isinstance(sampling_params, SamplingParams)
                  else list(sampling_params))
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} sampling_params for {len(prompts)} prompts")
        if priority is not None and len(priority) != len(prompts):
            raise ValueError(f"got {len(priority)} priorities for {len(prompts)} prompts")
        engine = self.engine
        checked = [engine.validate(p, sp) for p, sp in zip(prompts, params)]
        ids = []
        for i, (p, sp, v) in enumerate(zip(prompts, params, checked)):
            rid = engine.next_request_id()
            engine.add_request(rid, p, sp, priority=priority[i] if priority else 0, validated=v)
            ids.append(rid)
        return self._run(ids, use_tqdm)

    def chat(self, messages, sampling_params: Optional[SamplingParams] = None,
             use_tqdm: bool = True, chat_template: Optional[str] = None,
             add_generation_prompt: bool = True) -> list[RequestOutput]:
        """Generate replies to one conversation (a list of {"role", "content"} dicts) or a
        list of conversations, formatted with the tokenizer's chat template."""
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        tok = self.engine.tokenizer
        prompts = []
        for conv in convs:
            ids = tok.apply_chat_template(conv, chat_template=chat_template, tokenize=True,
                                          add_generation_prompt=add_generation_prompt)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            prompts.append({"prompt_token_ids": list(ids),
                            "prompt": tok.decode(ids, skip_special_tokens=False)})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        engine = self.engine
        pending = set(request_ids)
        done: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(request_ids), desc="Processed prompts", dynamic_ncols=True)
        start = time.perf_counter()
        p0, g0 = engine.counters["prompt_tokens"], engine.counters["generation_tokens"]
        engine.final_outputs_only = True  # offline: no per-step snapshots to build
        try:
            while pending:
                for out in engine.step():
                    if out.finished and out.request_id in pending:
                        pending.discard(out.request_id)
                        done[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
                if bar is not None:
                    elapsed = max(time.perf_counter() - start, 1e-9)
                    bar.set_postfix_str(
                        f"est. speed input: {(engine.counters['prompt_tokens'] - p0) / elapsed:.1f} toks/s, "
                        f"output: {(engine.counters['generation_tokens'] - g0) / elapsed:.1f} toks/s",
                        refresh=False)
        except BaseException:
            engine.abort_request(list(pending))
            raise
        finally:
            engine.final_outputs_only = False
            if bar is not None:
                bar.close()
        return [done[r] for r in request_ids]

    def stats(self) -> dict:
        """Counters: prefix-cache hit tokens, preemptions, mixed prefill+decode steps,
        blocks in use, requests and tokens; with speculative decoding also drafts, draft
        and accepted tokens (per position too), `spec_decode_acceptance_rate` (accepted /
        draft tokens) and `spec_decode_mean_acceptance_length` (tokens per verified row)."""
        from raylm.engine.spec_decode.speculator import acceptance_summary

        stats = self.engine.stats()
        return {**stats, **acceptance_summary(stats)}

    def shutdown(self) -> None:
        """Free the KV pool and the model; the LLM cannot be used afterwards."""
        if self.llm_engine is not None:
            self.llm_engine.shutdown()
            self.llm_engine = None

    def __del__(self):
        try:
            self.shutdown()
        except Exception:
            pass
