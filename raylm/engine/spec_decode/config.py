"""`speculative_config` (vLLM's engine argument, a dict or a JSON string) parsed into a
`SpeculativeConfig`. Keys we cannot honour are refused, never ignored."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Optional, Union

SPECULATIVE_METHODS = ("ngram", "draft_model", "eagle3")
# vLLM's legacy way to ask for n-gram speculation: model="[ngram]" without a method.
_NGRAM_MODEL_NAMES = ("ngram", "[ngram]")
# vLLM's defaults when neither bound is given.
DEFAULT_PROMPT_LOOKUP = 5
# With adaptive_num_speculative_tokens and no disable_by_batch_size: no proposals above
# this many running requests (a guess until measured on the GPU).
ADAPTIVE_DISABLE_BY_BATCH_SIZE = 64


@dataclass
class SpeculativeConfig:
    """What to propose and how much. `num_speculative_tokens` (k) proposals per request
    per step; n-gram lookup matches the last n tokens for n from `prompt_lookup_max`
    down to `prompt_lookup_min`; `model` is the draft or EAGLE-3 head checkpoint;
    `adaptive_num_speculative_tokens` (our addition, off by default as vLLM has no such
    flag) lets the engine lower k for requests whose proposals keep being rejected (k
    stays the upper bound) and, unless `disable_by_batch_size` says otherwise, stop
    proposing above ADAPTIVE_DISABLE_BY_BATCH_SIZE running requests;
    `disable_by_batch_size` (vLLM's name): no proposals while more than this many
    requests run (verification then costs more than it saves)."""

    method: str
    num_speculative_tokens: int
    model: Optional[str] = None
    prompt_lookup_min: Optional[int] = None
    prompt_lookup_max: Optional[int] = None
    draft_tensor_parallel_size: Optional[int] = None
    adaptive_num_speculative_tokens: bool = False
    disable_by_batch_size: Optional[int] = None

    @property
    def max_batch_size(self) -> Optional[int]:
        """The most running requests at which the engine still proposes (None: any)."""
        if self.disable_by_batch_size is None and self.adaptive_num_speculative_tokens:
            return ADAPTIVE_DISABLE_BY_BATCH_SIZE
        return self.disable_by_batch_size

    @property
    def uses_draft_probs(self) -> bool:
        """True when proposals come with draft probabilities (rejection sampling);
        n-gram proposals are one-hot."""
        return self.method != "ngram"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_KEYS = tuple(f.name for f in dataclasses.fields(SpeculativeConfig))


def _fail(key: str, value, limit: str) -> None:
    raise ValueError(f"speculative_config[{key!r}] must be {limit}, got {value!r}")


def _positive_int(key: str, value, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        _fail(key, value, "an integer >= 1")


def _as_dict(spec: Union[dict, str]) -> dict:
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError as e:
            raise ValueError(f"speculative_config is not valid JSON ({e}): {spec!r}") from None
    if not isinstance(spec, dict):
        raise ValueError(f"speculative_config must be a dict or a JSON object string, "
                         f"got {type(spec).__name__}")
    unknown = sorted(set(spec) - set(_KEYS))
    if unknown:
        raise ValueError(f"speculative_config has unsupported keys {unknown}; "
                         f"supported keys are {list(_KEYS)}")
    return dict(spec)


def _resolve_method(d: dict) -> str:
    method, model = d.get("method"), d.get("model")
    if method is None:
        if model in _NGRAM_MODEL_NAMES:
            d["model"] = None
            return "ngram"
        if model is None:
            raise ValueError("speculative_config needs 'method' (one of "
                             f"{list(SPECULATIVE_METHODS)}) or a draft 'model'")
        return "draft_model"  # vLLM's choice for a bare model path
    if method == "[ngram]":
        return "ngram"
    if method not in SPECULATIVE_METHODS:
        _fail("method", method, f"one of {list(SPECULATIVE_METHODS)}")
    return method


def _check_ngram(d: dict) -> None:
    for key in ("model", "draft_tensor_parallel_size"):
        if d.get(key) is not None:
            _fail(key, d[key], "unset for method 'ngram' (it has no draft model)")
    lo, hi = d.get("prompt_lookup_min"), d.get("prompt_lookup_max")
    _positive_int("prompt_lookup_min", lo)
    _positive_int("prompt_lookup_max", hi)
    if lo is None and hi is None:
        lo = hi = DEFAULT_PROMPT_LOOKUP
    lo, hi = (hi if lo is None else lo), (lo if hi is None else hi)
    if lo > hi:
        raise ValueError(f"speculative_config['prompt_lookup_min'] ({lo}) must be <= "
                         f"prompt_lookup_max ({hi})")
    d["prompt_lookup_min"], d["prompt_lookup_max"] = lo, hi


def _check_model(d: dict, method: str, tensor_parallel_size: Optional[int]) -> None:
    model = d.get("model")
    if not isinstance(model, str) or not model:
        _fail("model", model, f"a checkpoint path or name for method {method!r}")
    for key in ("prompt_lookup_min", "prompt_lookup_max"):
        if d.get(key) is not None:
            _fail(key, d[key], f"unset for method {method!r} (only 'ngram' looks up the prompt)")
    tp = d.get("draft_tensor_parallel_size")
    _positive_int("draft_tensor_parallel_size", tp)
    if tp is not None and tensor_parallel_size is not None and tp not in (1, tensor_parallel_size):
        _fail("draft_tensor_parallel_size", tp,
              f"1 or the target's tensor_parallel_size ({tensor_parallel_size})")


def parse_speculative_config(spec: Union[dict, str, SpeculativeConfig, None],
                             tensor_parallel_size: Optional[int] = None
                             ) -> Optional[SpeculativeConfig]:
    """The validated config of a `speculative_config` argument (None stays None). Every
    error names the key, the value and the limit."""
    if spec is None or isinstance(spec, SpeculativeConfig):
        return spec
    d = _as_dict(spec)
    method = _resolve_method(d)
    d["method"] = method
    if "num_speculative_tokens" not in d:
        raise ValueError("speculative_config needs 'num_speculative_tokens' (an integer >= 1)")
    _positive_int("num_speculative_tokens", d["num_speculative_tokens"], allow_none=False)
    if not isinstance(d.get("adaptive_num_speculative_tokens", False), bool):
        _fail("adaptive_num_speculative_tokens", d["adaptive_num_speculative_tokens"], "a bool")
    _positive_int("disable_by_batch_size", d.get("disable_by_batch_size"))
    if method == "ngram":
        _check_ngram(d)
    else:
        _check_model(d, method, tensor_parallel_size)
    return SpeculativeConfig(**d)
