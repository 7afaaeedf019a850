"""How to sample one request: vLLM's `SamplingParams`, with the same names and defaults.

Construction validates every field and normalises a few convenient spellings
(`top_k=-1` -> 0, `stop="x"` -> `["x"]`, `None` lists -> `[]`), so the rest of the
engine only ever sees one canonical form. `to_dict()` is what crosses process
boundaries: plain ints, floats, bools, strings, lists and str-keyed dicts (msgpack
refuses int map keys, so `logit_bias` travels with its token ids as strings).
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any, Optional, Union

# vLLM treats temperatures this small as greedy: dividing logits by them overflows.
_GREEDY_TEMPERATURE = 1e-5


def _is_int(value: Any) -> bool:
    # bool is an int subclass, but n=True or logprobs=False is a caller mistake.
    return isinstance(value, Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


# The constraint kinds of StructuredOutputsParams, in vLLM's spelling; exactly one is set.
STRUCTURED_OUTPUT_KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


@dataclass
class StructuredOutputsParams:
    """A constraint on the output text (vLLM's `StructuredOutputsParams`): exactly one of
    `json` (a JSON schema, dict or JSON string), `regex`, `choice` (list of strings),
    `grammar` (EBNF/GBNF), `json_object` (any JSON object) or `structural_tag` (JSON str).

    Checked for shape here; whether the schema/regex/grammar compiles is checked by
    `raylm.engine.structured_outputs.validate_structured_outputs`.
    """

    json: Union[str, dict, None] = None
    regex: Optional[str] = None
    choice: Optional[list[str]] = None
    grammar: Optional[str] = None
    json_object: Optional[bool] = None
    structural_tag: Optional[str] = None
    disable_any_whitespace: bool = False
    whitespace_pattern: Optional[str] = None

    def __post_init__(self) -> None:
        self._check_types()
        chosen = [k for k in STRUCTURED_OUTPUT_KINDS if self._is_set(k)]
        if len(chosen) != 1:
            raise ValueError(f"structured_outputs must set exactly one of {list(STRUCTURED_OUTPUT_KINDS)}, "
                             f"got {chosen or 'none'}")

    def _is_set(self, kind: str) -> bool:
        value = getattr(self, kind)
        return value is not None and value is not False

    def _check_types(self) -> None:
        if self.json is not None and not isinstance(self.json, (str, dict)):
            raise ValueError(f"structured_outputs.json must be a JSON schema (dict or JSON str), "
                             f"got {type(self.json).__name__}")
        for name in ("regex", "grammar", "structural_tag", "whitespace_pattern"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured_outputs.{name} must be a non-empty str, got {value!r}")
        if self.choice is not None:
            if not isinstance(self.choice, (list, tuple)) or not self.choice:
                raise ValueError(f"structured_outputs.choice must be a non-empty list of str, got {self.choice!r}")
            if not all(isinstance(c, str) and c for c in self.choice):
                raise ValueError(f"structured_outputs.choice entries must be non-empty str, got {self.choice!r}")
            self.choice = list(self.choice)
        for name in ("json_object", "disable_any_whitespace"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise ValueError(f"structured_outputs.{name} must be a bool, got {value!r}")

    @property
    def kind(self) -> str:
        """Which constraint is set: one of STRUCTURED_OUTPUT_KINDS."""
        return next(k for k in STRUCTURED_OUTPUT_KINDS if self._is_set(k))

    def to_dict(self) -> dict[str, Any]:
        """The fields that differ from their defaults (msgpack/JSON-friendly)."""
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self)
                if getattr(self, f.name) != f.default}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StructuredOutputsParams":
        """Build (and validate) from a dict; unknown keys raise ValueError."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown structured_outputs fields {unknown}; known fields are {sorted(known)}")
        return cls(**d)


@dataclass(repr=False)
class SamplingParams:
    """Sampling settings for one request; valid by construction (bad values raise
    `ValueError` naming the argument, the value and the limit).

    Fields may be reassigned afterwards (the engine fills in `max_tokens` and
    per-completion seeds on clones); reassignment is not re-validated.
    """

    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1 on input) disables top-k
    min_p: float = 0.0
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None
    stop_token_ids: Optional[list[int]] = None
    ignore_eos: bool = False
    max_tokens: Optional[int] = 16  # None: up to max_model_len, resolved by the engine
    min_tokens: int = 0
    logprobs: Optional[int] = None
    prompt_logprobs: Optional[int] = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    structured_outputs: Optional[StructuredOutputsParams] = None
    logit_bias: Optional[dict[int, float]] = None  # token id -> bias in [-100, 100]
    allowed_token_ids: Optional[list[int]] = None
    bad_words: Optional[list[str]] = None

    def __post_init__(self) -> None:
        self._check_ints()
        self._check_floats()
        self._check_bools()
        self._normalise_stops()
        self._check_logits_processors()
        if self.top_k == -1:
            self.top_k = 0

    # ---- validation --------------------------------------------------------------
    def _check_ints(self) -> None:
        # name -> (lowest allowed value or None when checked below, whether None is allowed)
        rules = {"n": (1, False), "top_k": (None, False), "max_tokens": (1, True),
                 "min_tokens": (0, False), "logprobs": (0, True), "prompt_logprobs": (0, True),
                 "seed": (None, True)}
        for name, (low, optional) in rules.items():
            value = getattr(self, name)
            if value is None and optional:
                continue
            if not _is_int(value):
                raise ValueError(f"{name} must be an int{' or None' if optional else ''}, "
                                 f"got {value!r} ({type(value).__name__})")
            if low is not None and value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
            setattr(self, name, int(value))  # numpy ints -> plain ints for msgpack/JSON
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1, 0 (disabled) or >= 1, got {self.top_k}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens must be <= max_tokens ({self.max_tokens}), "
                             f"got {self.min_tokens}")
        # torch generators take seeds in [-2**63, 2**64); outside that seeding would fail
        # later, on a worker, far from the caller.
        if self.seed is not None and not -(2 ** 63) <= self.seed < 2 ** 64:
            raise ValueError(f"seed must be in [-2**63, 2**64), got {self.seed}")

    def _check_floats(self) -> None:
        # name -> (test, description of the allowed range)
        rules = {
            "temperature": (lambda v: v >= 0, ">= 0"),
            "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
            "min_p": (lambda v: 0 <= v <= 1, "in [0, 1]"),
            "repetition_penalty": (lambda v: v > 0, "> 0"),
            "presence_penalty": (lambda v: -2 <= v <= 2, "in [-2, 2]"),
            "frequency_penalty": (lambda v: -2 <= v <= 2, "in [-2, 2]"),
        }
        for name, (ok, limit) in rules.items():
            value = getattr(self, name)
            if not _is_number(value):
                raise ValueError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
            if not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value}")
            if not ok(value):
                raise ValueError(f"{name} must be {limit}, got {value}")
            setattr(self, name, float(value))

    def _check_bools(self) -> None:
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens",
                     "spaces_between_special_tokens"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be a bool, got {value!r} ({type(value).__name__})")

    def _normalise_stops(self) -> None:
        stop = self.stop
        if stop is None:
            stop = []
        elif isinstance(stop, str):
            stop = [stop]
        elif isinstance(stop, (list, tuple)):
            stop = list(stop)  # a copy: later edits to the caller's list must not leak in
        else:
            raise ValueError(f"stop must be a str, a list of str or None, got {type(stop).__name__}")
        for s in stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty str, got {s!r} in stop={stop!r}")
        self.stop = stop

        ids = self.stop_token_ids
        if ids is None:
            ids = []
        elif isinstance(ids, (list, tuple)):
            ids = list(ids)
        else:
            raise ValueError(f"stop_token_ids must be a list of int or None, got {type(ids).__name__}")
        for t in ids:
            if not _is_int(t) or t < 0:
                raise ValueError(f"stop_token_ids entries must be ints >= 0, got {t!r} "
                                 f"in stop_token_ids={ids!r}")
        self.stop_token_ids = [int(t) for t in ids]

    def _check_logits_processors(self) -> None:
        so = self.structured_outputs
        if isinstance(so, dict):
            self.structured_outputs = StructuredOutputsParams.from_dict(so)
        elif so is not None and not isinstance(so, StructuredOutputsParams):
            raise ValueError(f"structured_outputs must be a StructuredOutputsParams, a dict or None, "
                             f"got {type(so).__name__}")
        self.logit_bias = _check_logit_bias(self.logit_bias)
        ids = self.allowed_token_ids
        if ids is not None:
            if not isinstance(ids, (list, tuple)) or not ids:
                raise ValueError(f"allowed_token_ids must be a non-empty list of int or None, got {ids!r}")
            for t in ids:
                if not _is_int(t) or t < 0:
                    raise ValueError(f"allowed_token_ids entries must be ints >= 0, got {t!r}")
            self.allowed_token_ids = [int(t) for t in ids]
        words = self.bad_words
        if words is not None:
            if not isinstance(words, (list, tuple)):
                raise ValueError(f"bad_words must be a list of str or None, got {type(words).__name__}")
            for w in words:
                if not isinstance(w, str) or not w.strip():
                    raise ValueError(f"bad_words entries must be non-blank str, got {w!r}")
            self.bad_words = list(words)

    # ---- convenience -------------------------------------------------------------
    @property
    def is_greedy(self) -> bool:
        """True when sampling reduces to argmax (temperature below 1e-5, as in vLLM)."""
        return self.temperature < _GREEDY_TEMPERATURE

    def clone(self) -> "SamplingParams":
        """An independent deep copy (lists are not shared)."""
        return copy.deepcopy(self)

    def to_dict(self) -> dict[str, Any]:
        """Every field as plain JSON/msgpack-friendly values; `from_dict` inverts it."""
        d = {f.name: copy.copy(getattr(self, f.name)) for f in dataclasses.fields(self)}
        if self.structured_outputs is not None:
            d["structured_outputs"] = self.structured_outputs.to_dict()
        if self.logit_bias is not None:
            d["logit_bias"] = {str(k): v for k, v in self.logit_bias.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SamplingParams":
        """Build (and validate) from a dict such as `to_dict()` returns; missing keys take
        their defaults, unknown keys raise ValueError."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown SamplingParams fields {unknown}; known fields are {sorted(known)}")
        return cls(**d)

    def __repr__(self) -> str:
        # Only what differs from the defaults: a full dump of 19 fields buries the
        # one or two that matter when reading logs.
        default = _DEFAULTS
        parts = [f"{k}={v!r}" for k, v in self.to_dict().items() if v != default[k]]
        return f"SamplingParams({', '.join(parts)})"


def _check_logit_bias(bias: Any) -> Optional[dict[int, float]]:
    """logit_bias as {int token id: float in [-100, 100]}; JSON's str keys ("123") accepted."""
    if bias is None:
        return None
    if not isinstance(bias, dict):
        raise ValueError(f"logit_bias must be a dict of token id -> bias or None, got {type(bias).__name__}")
    out = {}
    for key, value in bias.items():
        token = key
        if isinstance(key, str) and key.strip().lstrip("-").isascii() and key.strip().lstrip("-").isdigit():
            token = int(key)
        if not _is_int(token) or token < 0:
            raise ValueError(f"logit_bias keys must be token ids (ints >= 0), got {key!r}")
        if not _is_number(value) or not math.isfinite(value) or not -100 <= value <= 100:
            raise ValueError(f"logit_bias[{key!r}] must be a number in [-100, 100], got {value!r}")
        out[int(token)] = float(value)
    return out


# Canonical default values, for __repr__ (built once the class exists).
_DEFAULTS = SamplingParams().to_dict()
