"""Checking and tokenizing one request at the edge, before it reaches a core."""
from __future__ import annotations

from typing import Optional, Union

from raylm.engine.sampling_params import SamplingParams

PromptType = Union[str, dict, list]


class InputProcessor:
    """`validate(prompt, params)` -> (prompt text or None, prompt token ids)."""

    def __init__(self, tokenizer, max_model_len: int, vocab_size: int, max_logprobs: int):
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.max_logprobs = max_logprobs

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
            if k is not None and k > self.max_logprobs:
                raise ValueError(f"{name} {k} exceeds max_logprobs {self.max_logprobs}")
        for t in params.stop_token_ids or []:
            if t >= self.vocab_size:
                raise ValueError(f"stop_token_ids entry {t} is outside the vocabulary [0, {self.vocab_size})")
        self._check_token_options(params)
        return text, ids

    def _check_token_options(self, params: SamplingParams) -> None:
        """Token ids of logit_bias and allowed_token_ids inside the vocabulary; bad_words
        and structured outputs need a tokenizer (the core tokenizes and compiles)."""
        for t in params.logit_bias or {}:
            if t >= self.vocab_size:
                raise ValueError(f"logit_bias key {t} is out of the vocabulary (size {self.vocab_size})")
        for t in params.allowed_token_ids or []:
            if t >= self.vocab_size:
                raise ValueError(f"allowed_token_ids entry {t} is out of the vocabulary (size {self.vocab_size})")
        if self.tokenizer is None:
            for name in ("bad_words", "structured_outputs"):
                if getattr(params, name):
                    raise ValueError(f"{name} needs a tokenizer, and skip_tokenizer_init is set")
