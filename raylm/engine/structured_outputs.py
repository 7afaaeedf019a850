"""Structured outputs, tokenizer-free half: turning a `StructuredOutputsParams` into an
xgrammar `Grammar`, checking it (`validate_structured_outputs`, which the HTTP edge calls
to answer 400 before admitting a request) and the `structured_outputs_config` engine
argument. Compiling against a vocabulary and matching tokens is `raylm.engine.grammar`.

JSON grammars bound whitespace: none at all with `disable_any_whitespace`, otherwise at
most `JSON_MAX_WHITESPACE` blanks in a row, so a model cannot loop on spaces."""
from __future__ import annotations

import functools
import json
from typing import Union

from raylm.engine.sampling_params import SamplingParams, StructuredOutputsParams

JSON_MAX_WHITESPACE = 4
SUPPORTED_BACKENDS = ("xgrammar", "auto")


def parse_structured_outputs_config(config: Union[str, dict, None]) -> dict:
    """The `structured_outputs_config` engine argument (vLLM's spelling, a dict or its
    JSON) with its backend resolved: "auto" and "xgrammar" mean xgrammar."""
    if config is None:
        config = {}
    if isinstance(config, str):
        try:
            config = json.loads(config)
        except json.JSONDecodeError as e:
            raise ValueError(f"structured_outputs_config must be a JSON object, got {config!r}: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"structured_outputs_config must be a dict (JSON object), got {config!r}")
    unknown = sorted(set(config) - {"backend"})
    if unknown:
        raise ValueError(f"structured_outputs_config has unknown keys {unknown}; known keys are ['backend']")
    backend = config.get("backend", "auto")
    if backend not in SUPPORTED_BACKENDS:
        raise ValueError(f"structured_outputs_config backend {backend!r} is not supported; "
                         f"supported backends are {list(SUPPORTED_BACKENDS)}")
    return {"backend": "xgrammar"}


def spec_key(so: StructuredOutputsParams) -> tuple:
    """A hashable key that identifies the grammar a spec compiles to."""
    kind = so.kind
    value = getattr(so, kind)
    if kind == "json" and isinstance(value, dict):
        value = json.dumps(value)  # key order kept: it is the properties' output order
    elif kind == "choice":
        value = tuple(value)
    return kind, value, so.disable_any_whitespace, so.whitespace_pattern


def validate_structured_outputs(params: Union[SamplingParams, StructuredOutputsParams, None]) -> None:
    """Raise ValueError naming the field (`structured_outputs.json`, `.regex`, ...) and
    the compiler's message when the spec does not compile; a no-op without a spec.
    Cached by spec, so repeated schemas cost a dict lookup."""
    so = params.structured_outputs if isinstance(params, SamplingParams) else params
    if so is not None:
        build_grammar(so)


def build_grammar(so: StructuredOutputsParams):
    """The xgrammar `Grammar` of a spec (cached by spec; raises ValueError as above)."""
    return _grammar_of_key(spec_key(so))


@functools.lru_cache(maxsize=1024)
def _grammar_of_key(key: tuple):
    import xgrammar as xgr

    kind, value, no_whitespace, whitespace_pattern = key
    if whitespace_pattern is not None:
        raise ValueError(f"structured_outputs.whitespace_pattern {whitespace_pattern!r} is not supported "
                         f"by the xgrammar backend; use disable_any_whitespace instead")
    try:
        if kind in ("json", "json_object"):
            schema = value if kind == "json" else '{"type": "object"}'
            if isinstance(schema, str):
                json.loads(schema)  # a clear message for text that is not JSON at all
            return xgr.Grammar.from_json_schema(
                schema, any_whitespace=not no_whitespace,
                max_whitespace_cnt=None if no_whitespace else JSON_MAX_WHITESPACE)
        if kind == "regex":
            return xgr.Grammar.from_regex(value)
        if kind == "choice":
            return xgr.Grammar.from_ebnf(choice_ebnf(value))
        if kind == "grammar":
            return xgr.Grammar.from_ebnf(value)
        return _structural_tag_grammar(value)
    # xgrammar's parsers raise RuntimeError with their message; json ValueError; a
    # malformed structural tag KeyError or TypeError.
    except (ValueError, RuntimeError, KeyError, TypeError) as e:
        msg = f"missing key {e}" if isinstance(e, KeyError) else _first_line(e)
        raise ValueError(f"structured_outputs.{kind} is invalid: {msg}") from None


def choice_ebnf(choices: list[str]) -> str:
    """An EBNF grammar whose language is exactly the given strings."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def _structural_tag_grammar(text: str):
    """vLLM's two spellings: the legacy {"structures": [{begin, schema, end}], "triggers"}
    and xgrammar's {"type": "structural_tag", "format": ...}."""
    import xgrammar as xgr

    tag = json.loads(text)
    if isinstance(tag, dict) and "structures" in tag:
        items = [xgr.StructuralTagItem(begin=s["begin"], schema=json.dumps(s["schema"]), end=s["end"])
                 for s in tag["structures"]]
        return xgr.Grammar.from_structural_tag(items, list(tag.get("triggers", [])))
    return xgr.Grammar.from_structural_tag(text)


def _first_line(e: Exception) -> str:
    """xgrammar's messages start with a '[time] file.cc:line:' prefix; keep the text."""
    msg = str(e).strip()
    if msg.startswith("[") and ": " in msg:
        head, _, rest = msg.partition(": ")
        if ".cc:" in head or ".h:" in head:
            msg = rest
    return msg.splitlines()[0] if msg else type(e).__name__

