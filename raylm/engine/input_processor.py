"""Checking and tokenizing one request at the edge, before it reaches a core.

Text must be encodable as UTF-8: a lone surrogate ("\\ud800", which JSON can carry) is
refused naming the field, never passed to the tokenizer. Long texts are tokenized on a
small thread pool (`off_loop`), so the event loop keeps answering meanwhile.
"""
from __future__ import annotations

import asyncio
import dataclasses
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional, TypeVar, Union

from raylm.engine.sampling_params import SamplingParams

PromptType = Union[str, dict, list]
T = TypeVar("T")

# Texts up to this many characters are tokenized inline (a thread hop costs more).
INLINE_TOKENIZE_CHARS = 4096
_TOKENIZE_THREADS = 4
_pool: Optional[ThreadPoolExecutor] = None


async def off_loop(fn: Callable[[], T], size: int) -> T:
    """fn() (tokenizing or rendering `size` characters) on the tokenizer thread pool when
    size passes INLINE_TOKENIZE_CHARS, else inline. Fast tokenizers release the GIL while
    they encode, so the event loop runs on meanwhile."""
    global _pool
    if size <= INLINE_TOKENIZE_CHARS:
        return fn()
    if _pool is None:
        _pool = ThreadPoolExecutor(_TOKENIZE_THREADS, thread_name_prefix="raylm-tokenize")
    return await asyncio.get_running_loop().run_in_executor(_pool, fn)


def text_size(value: Any) -> int:
    """Characters in the strings of `value` (nested lists and dicts): the work of tokenizing it."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(text_size(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(text_size(v) for v in value)
    return 0


def unencodable_text(value: Any, path: str) -> Optional[str]:
    """Why `value` (a string, or nested lists and dicts of them, keys included) is not
    valid UTF-8 text, naming the path of the first bad string ("messages[0].content"),
    or None when it all is."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            return (f"{path} is not valid UTF-8 text: it holds the lone surrogate "
                    f"{value[exc.start]!r} at character {exc.start}")
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            why = unencodable_text(key, f"{path} key") or unencodable_text(item, f"{path}.{key}")
            if why:
                return why
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            if why := unencodable_text(item, f"{path}[{i}]"):
                return why
    return None


def check_params_text(params: SamplingParams) -> None:
    """Stop strings, bad_words and structured-output specs are valid UTF-8 (ValueError
    naming the field otherwise)."""
    so = params.structured_outputs
    for name, value in (("stop", params.stop), ("bad_words", params.bad_words),
                        ("structured_outputs", dataclasses.asdict(so) if so is not None else None)):
        if why := unencodable_text(value, name):
            raise ValueError(why)


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
        text = prompt.get("prompt") if isinstance(prompt, dict) else prompt
        if isinstance(text, str) and (why := unencodable_text(text, "prompt")):
            raise ValueError(why)
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
        check_params_text(params)
        text, ids = self._tokenize(prompt)
        if not ids:
            raise ValueError("prompt is empty (0 tokens); it needs at least 1 token")
        if len(ids) > self.max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens; max_model_len is {self.max_model_len}")
        bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(params, name)
            if k is not None and k > self.max_logprobs:
                raise ValueError(f"{name} {k} exceeds max_logprobs {self.max_logprobs}")
        for t in params.stop_token_ids or []:
            if t >= self.vocab_size:
                raise ValueError(f"stop_token_ids entry {t} is outside the vocabulary [0, {self.vocab_size})")
        self._check_token_options(params)
        return text, ids

    async def validate_async(self, prompt: PromptType,
                             params: SamplingParams) -> tuple[Optional[str], list[int]]:
        """`validate`, on the tokenizer threads when the prompt is a long text (see off_loop)."""
        given_ids = isinstance(prompt, dict) and "prompt_token_ids" in prompt
        text = prompt.get("prompt") if isinstance(prompt, dict) else prompt
        size = len(text) if isinstance(text, str) and not given_ids else 0
        return await off_loop(lambda: self.validate(prompt, params), size)

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


def bad_words_token_ids(tokenizer, words: list[str]) -> list[list[int]]:
    """Each bad word's tokenization, alone and after a space when that spells it with
    other tokens of the same count (vLLM's semantics: banned at the start of the text and
    mid-text)."""
    if tokenizer is None:
        raise ValueError("bad_words needs a tokenizer, and skip_tokenizer_init is set")
    out = []
    for word in words:
        plain = tokenizer.encode(word.lstrip(), add_special_tokens=False)
        spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
        if plain:
            out.append(plain)
        if plain and spaced and spaced[0] != plain[0] and len(spaced) == len(plain):
            out.append(spaced)
    return out
