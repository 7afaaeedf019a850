"""How to sample one request: vLLM's `SamplingParams`, with the same names and defaults.

Construction validates every field and normalises a few convenient spellings
(`top_k=-1` -> 0, `stop="x"` -> `["x"]`, `None` lists -> `[]`), so the rest of the
engine only ever sees one canonical form. `to_dict()` is what crosses process
boundaries: plain ints, floats, bools, strings and lists.
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

    def __post_init__(self) -> None:
        self._check_ints()
        self._check_floats()
        self._check_bools()
        self._normalise_stops()
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
        return {f.name: copy.copy(getattr(self, f.name)) for f in dataclasses.fields(self)}

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


# Canonical default values, for __repr__ (built once the class exists).
_DEFAULTS = SamplingParams().to_dict()
