"""Structured outputs, tokenizer-free half: turning a `StructuredOutputsParams` into a
grammar of one of two backends, checking it (`validate_structured_outputs`, which the HTTP
edge calls to answer 400 before admitting a request) and the `structured_outputs_config`
engine argument. Compiling against a vocabulary and matching tokens is
`raylm.engine.grammar`.

Backends, in vLLM's names: "xgrammar" (the default, a required dependency) and "guidance"
(llguidance, the extra `raylm[guidance]`). "auto" (the default setting) takes xgrammar, and
llguidance, where it is installed, for a spec xgrammar cannot compile or does not support
(`whitespace_pattern`), as vLLM's "auto" does.

JSON grammars bound whitespace: none at all with `disable_any_whitespace`, otherwise at
most `JSON_MAX_WHITESPACE` blanks in a row, so a model cannot loop on spaces."""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
from typing import NamedTuple, Optional, Union

from raylm.engine.sampling_params import SamplingParams, StructuredOutputsParams

JSON_MAX_WHITESPACE = 4
SUPPORTED_BACKENDS = ("auto", "xgrammar", "guidance")
# vLLM's reasoning parsers raylm knows; both mark reasoning with <think> ... </think>.
REASONING_PARSERS = ("deepseek_r1", "qwen3")


def check_reasoning_parser(name: Optional[str], field: str = "reasoning_parser") -> Optional[str]:
    """`name` when it is None or a parser raylm knows; else ValueError naming `field`."""
    if name is not None and name not in REASONING_PARSERS:
        raise ValueError(f"{field} {name!r} is not supported; supported parsers are {list(REASONING_PARSERS)}")
    return name
# llguidance's JSON whitespace, bounded as xgrammar's max_whitespace_cnt bounds it.
GUIDANCE_JSON_WHITESPACE = r"[\x20\x0A\x0D\x09]{0,%d}" % JSON_MAX_WHITESPACE


class Grammar(NamedTuple):
    """A spec's grammar: `backend` "xgrammar" (`value` an xgrammar `Grammar`) or
    "guidance" (`value` llguidance's grammar text)."""
    backend: str
    value: object


@dataclasses.dataclass(frozen=True)
class GrammarConfig:
    """The `structured_outputs_config` engine argument, parsed (vLLM's keys):
    `backend` "auto", "xgrammar" or "guidance"; `disable_any_whitespace`: every JSON
    output compact, whatever the request says; `disable_additional_properties`: the
    guidance backend closes objects whose schema leaves `additionalProperties` out, as
    xgrammar does (llguidance otherwise follows JSON Schema and admits extra keys);
    `reasoning_parser` (set by `--reasoning-parser`): a grammar starts after the output's
    reasoning, at its `</think>`, unless the prompt closed the reasoning."""
    backend: str = "auto"
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    reasoning_parser: Optional[str] = None


DEFAULT_CONFIG = GrammarConfig()


def guidance_available() -> bool:
    return importlib.util.find_spec("llguidance") is not None


def parse_structured_outputs_config(config: Union[str, dict, None]) -> GrammarConfig:
    """The `structured_outputs_config` engine argument (vLLM's spelling, a dict or its
    JSON) as a `GrammarConfig`. "guidance" without llguidance installed is refused here,
    naming the package; so is a key raylm does not know, or a value of the wrong type."""
    if config is None:
        config = {}
    if isinstance(config, str):
        try:
            config = json.loads(config)
        except json.JSONDecodeError as e:
            raise ValueError(f"structured_outputs_config must be a JSON object, got {config!r}: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"structured_outputs_config must be a dict (JSON object), got {config!r}")
    known = [f.name for f in dataclasses.fields(GrammarConfig)]
    unknown = sorted(set(config) - set(known))
    if unknown:
        raise ValueError(f"structured_outputs_config has unknown keys {unknown}; known keys are {known}")
    for name in ("disable_any_whitespace", "disable_additional_properties"):
        if not isinstance(config.get(name, False), bool):
            raise ValueError(f"structured_outputs_config {name} must be true or false, got {config[name]!r}")
    check_reasoning_parser(config.get("reasoning_parser"), "structured_outputs_config reasoning_parser")
    backend = config.get("backend", "auto")
    if backend not in SUPPORTED_BACKENDS:
        raise ValueError(f"structured_outputs_config backend {backend!r} is not supported; "
                         f"supported backends are {list(SUPPORTED_BACKENDS)}")
    if backend == "guidance" and not guidance_available():
        raise ValueError("structured_outputs_config backend 'guidance' needs the llguidance package, "
                         "which is not installed: pip install 'raylm[guidance]'")
    return GrammarConfig(**config)


def grammar_config(args) -> GrammarConfig:
    """An `EngineArgs`' `structured_outputs_config`, parsed."""
    return parse_structured_outputs_config(args.structured_outputs_config)


def spec_key(so: StructuredOutputsParams) -> tuple:
    """A hashable key that identifies the grammar a spec compiles to."""
    kind = so.kind
    value = getattr(so, kind)
    if kind == "json" and isinstance(value, dict):
        value = json.dumps(value)  # key order kept: it is the properties' output order
    elif kind == "choice":
        value = tuple(value)
    return kind, value, so.disable_any_whitespace, so.whitespace_pattern


def validate_structured_outputs(params: Union[SamplingParams, StructuredOutputsParams, None],
                                config: GrammarConfig = DEFAULT_CONFIG) -> None:
    """Raise ValueError naming the field (`structured_outputs.json`, `.regex`, ...) and
    the compiler's message when the spec does not compile under `config`; a no-op
    without a spec. Cached by spec, so repeated schemas cost a dict lookup."""
    so = params.structured_outputs if isinstance(params, SamplingParams) else params
    if so is not None:
        build_grammar(so, config)


def build_grammar(so: StructuredOutputsParams, config: GrammarConfig = DEFAULT_CONFIG,
                  special_tokens: frozenset = frozenset()) -> Grammar:
    """The spec's `Grammar` under `config` (its backend "auto" resolved as the module
    doc says; cached by spec; raises ValueError as above). `special_tokens`: the
    tokenizer's, where it is known (llguidance matches a structural tag's `<...>`
    trigger as one token when it is one)."""
    key = spec_key(so)
    if config.disable_any_whitespace:
        key = key[:2] + (True,) + key[3:]
    return _grammar_of_key(key, config, special_tokens)


@functools.lru_cache(maxsize=1024)
def _grammar_of_key(key: tuple, config: GrammarConfig, special_tokens: frozenset = frozenset()) -> Grammar:
    closed = config.disable_additional_properties
    if config.backend == "guidance":
        return Grammar("guidance", _guidance_grammar(key, special_tokens, closed))
    try:
        return Grammar("xgrammar", _xgrammar_grammar(key))
    except ValueError as e:
        if config.backend == "xgrammar" or not guidance_available():
            raise
        first = e
    try:
        return Grammar("guidance", _guidance_grammar(key, special_tokens, closed))
    except ValueError:
        if key[3] is not None:  # whitespace_pattern, which only llguidance takes: its message
            raise
        raise first from None  # xgrammar's message: neither compiles it


def _xgrammar_grammar(key: tuple):
    import xgrammar as xgr

    kind, value, no_whitespace, whitespace_pattern = key
    if whitespace_pattern is not None:
        raise ValueError(f"structured_outputs.whitespace_pattern {whitespace_pattern!r} is not supported "
                         f"by the xgrammar backend; use disable_any_whitespace instead, or the guidance "
                         f"backend (pip install 'raylm[guidance]')")
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


def _guidance_grammar(key: tuple, special_tokens: frozenset, closed: bool) -> str:
    """llguidance's grammar text for a spec key, checked by its validator (without a
    vocabulary: the matcher's construction checks the rest). `closed`: JSON objects
    without `additionalProperties` admit no other keys."""
    import llguidance
    from llguidance import LLMatcher

    kind, value, no_whitespace, whitespace_pattern = key
    try:
        if kind in ("json", "json_object"):
            schema = value if kind == "json" else '{"type": "object"}'
            if isinstance(schema, str):
                schema = json.loads(schema)
            if closed:
                schema = _closed(schema)
            options = ({"whitespace_flexible": False} if no_whitespace else
                       {"whitespace_pattern": whitespace_pattern or GUIDANCE_JSON_WHITESPACE})
            grammar = LLMatcher.grammar_from_json_schema(schema, defaults=options)
        elif whitespace_pattern is not None:
            raise ValueError("whitespace_pattern applies to JSON schemas only")
        elif kind == "regex":
            grammar = LLMatcher.grammar_from_regex(value)
        elif kind == "choice":
            grammar = llguidance.grammar_from("choice", list(value))
        elif kind == "grammar":
            grammar = llguidance.grammar_from("grammar", value)  # GBNF/EBNF or Lark
        else:
            grammar = _guidance_structural_tag(value, special_tokens)
        error, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    except (ValueError, KeyError, TypeError, AssertionError) as e:
        msg = f"missing key {e}" if isinstance(e, KeyError) else (str(e) or type(e).__name__)
        raise ValueError(f"structured_outputs.{kind} is invalid: {msg.strip().splitlines()[0]}") from None
    if error:
        raise ValueError(f"structured_outputs.{kind} is invalid: {_guidance_message(messages[0])}")
    return grammar


_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMAS = ("items", "additionalProperties", "not", "if", "then", "else", "contains", "propertyNames",
            "additionalItems", "unevaluatedProperties")


def _closed(schema):
    """A copy of a JSON schema in which every object schema that does not say
    `additionalProperties` says false (values such as `enum`, `const` and `default`
    are left as they are)."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for k in _SCHEMA_MAPS:
        if isinstance(out.get(k), dict):
            out[k] = {name: _closed(s) for name, s in out[k].items()}
    for k in _SCHEMA_LISTS:
        if isinstance(out.get(k), list):
            out[k] = [_closed(s) for s in out[k]]
    for k in _SCHEMAS:
        if k in out:
            out[k] = [_closed(s) for s in out[k]] if isinstance(out[k], list) else _closed(out[k])
    kind = out.get("type")
    if (kind == "object" or (isinstance(kind, list) and "object" in kind) or "properties" in out) \
            and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def _guidance_structural_tag(text: str, special_tokens: frozenset) -> str:
    """vLLM's legacy structural tag {"structures": [{begin, schema, end}], "triggers"}
    as llguidance `StructTag`s (each structure under the trigger its begin starts with);
    `<...>` triggers are matched as special tokens when all of them are among
    `special_tokens`, else as text. xgrammar's {"type": "structural_tag", "format": ...}
    has no llguidance form."""
    from llguidance import StructTag

    tag = json.loads(text)
    if not (isinstance(tag, dict) and "structures" in tag):
        raise ValueError("the guidance backend takes the {\"structures\": [...], \"triggers\": [...]} form only")
    triggers = list(tag.get("triggers", []))
    tags = []
    for s in tag["structures"]:
        trigger = next((t for t in triggers if s["begin"].startswith(t)), None)
        if trigger is None:
            raise ValueError(f"structure begin {s['begin']!r} starts with none of the triggers {triggers}")
        tags.append(StructTag(trigger=trigger, begin=s["begin"], grammar=s["schema"], end=s["end"]))
    bracketed = {t.trigger for t in tags if t.trigger.startswith("<") and t.trigger.endswith(">")}
    return StructTag.to_grammar(tags, assume_special=bool(bracketed) and bracketed <= special_tokens)


def _guidance_message(message: str) -> str:
    """llguidance's first line, without its 'at line(col):' position prefix, and with
    the 'error: ...' line of a regex error that the first line only announces."""
    lines = [line.strip() for line in message.strip().splitlines()]
    if not lines:
        return "does not compile"
    line = lines[0]
    if line.startswith("at ") and "): " in line:
        line = line.split("): ", 1)[1]
    detail = next((x[len("error:"):].strip() for x in lines[1:] if x.startswith("error:")), None)
    return f"{line} {detail}" if line.endswith(":") and detail else line


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

