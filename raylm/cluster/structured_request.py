"""From a request's constraint fields to the engine's `StructuredOutputsParams`: OpenAI's
`response_format`, vLLM's `structured_outputs` and its legacy `guided_*` aliases, and the
JSON schemas that enforce `tool_choice: "required"` or a named function.

At most one source may be set (else a 400 naming both); a spec that does not compile
is a 400 naming the request field (`response_format.json_schema.schema`, `guided_regex`,
`structured_outputs.grammar`, ...) with the grammar compiler's message.
"""
from __future__ import annotations

import re
from typing import Any, Optional

from raylm.cluster.protocol import ApiError
from raylm.engine.sampling_params import STRUCTURED_OUTPUT_KINDS, StructuredOutputsParams
from raylm.engine.structured_outputs import DEFAULT_CONFIG, GrammarConfig, validate_structured_outputs

# vLLM's legacy request fields, each the same as one structured_outputs key.
ALIASES = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
           "guided_grammar": "grammar"}
_SO_KEYS = (*STRUCTURED_OUTPUT_KINDS, "disable_any_whitespace", "whitespace_pattern")


def _from_response_format(rf: dict) -> Optional[tuple[dict, dict]]:
    """(spec, {kind: request field}) of a response_format; None for {"type": "text"}."""
    kind = rf.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"json_object": True}, {"json_object": "response_format"}
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict) or "schema" not in js:
            raise ApiError(400, "response_format.json_schema must be an object with a 'schema' (a JSON "
                           f"schema), got {js!r}", "response_format.json_schema.schema")
        schema = js["schema"]
        if not isinstance(schema, dict):
            raise ApiError(400, f"response_format.json_schema.schema must be a JSON schema object, "
                           f"got {type(schema).__name__}", "response_format.json_schema.schema")
        return {"json": schema}, {"json": "response_format.json_schema.schema"}
    raise ApiError(400, f"response_format.type must be one of 'text', 'json_object', 'json_schema', "
                   f"got {kind!r}", "response_format.type")


def _from_structured_outputs(so: dict) -> tuple[dict, dict]:
    unknown = sorted(set(so) - set(_SO_KEYS))
    if unknown:
        raise ApiError(400, f"structured_outputs has unknown keys {unknown}; known keys are {list(_SO_KEYS)}",
                       f"structured_outputs.{unknown[0]}")
    spec = {k: v for k, v in so.items() if v is not None}
    return spec, {k: f"structured_outputs.{k}" for k in _SO_KEYS}


def requested_spec(body) -> Optional[tuple[dict, dict, str]]:
    """(spec dict, {spec key: request field}, source field) of the one constraint the
    request sets, or None."""
    sources: list[tuple[dict, dict, str]] = []
    rf = getattr(body, "response_format", None)
    if rf is not None and (got := _from_response_format(rf)) is not None:
        sources.append((*got, "response_format"))
    if getattr(body, "structured_outputs", None) is not None:
        sources.append((*_from_structured_outputs(body.structured_outputs), "structured_outputs"))
    for alias, kind in ALIASES.items():
        if getattr(body, alias, None) is not None:
            sources.append(({kind: getattr(body, alias)}, {kind: alias}, alias))
    if len(sources) > 1:
        a, b = sources[0][2], sources[1][2]
        raise ApiError(400, f"{a} and {b} cannot both be set: a request takes one output constraint", b)
    return sources[0] if sources else None


def build_structured_outputs(spec: dict, names: dict, source: str,
                             config: GrammarConfig = DEFAULT_CONFIG) -> StructuredOutputsParams:
    """The engine's params for a spec, compiled once here under the cores' grammar
    `config` so a bad one is a 400 naming the request field (the engine names its own
    `structured_outputs.<kind>`)."""
    try:
        so = StructuredOutputsParams(**spec)
        validate_structured_outputs(so, config)
    except ValueError as exc:
        message = str(exc)
        m = re.match(r"structured_outputs\.(\w+)", message)
        field = names.get(m.group(1), source) if m else source
        if m:
            message = field + message[m.end():]
        raise ApiError(400, message, field) from None
    return so


def structured_outputs_of(body, config: GrammarConfig = DEFAULT_CONFIG) -> Optional[StructuredOutputsParams]:
    """The request's output constraint, checked under the grammar `config`, or None."""
    got = requested_spec(body)
    return None if got is None else build_structured_outputs(*got, config)


# ---- tools ---------------------------------------------------------------------------
def named_tool_schema(parameters: Optional[dict]) -> dict:
    """The arguments of a named function: its parameters schema (any object without one)."""
    return parameters if parameters else {"type": "object"}


def required_tools_schema(tools: list[tuple[str, Optional[dict]]], parallel: bool) -> dict[str, Any]:
    """A JSON array of {"name", "arguments"} calls, each one of the tools with arguments
    valid for its parameters; one call unless parallel_tool_calls."""
    items = [{"type": "object", "properties": {"name": {"type": "string", "enum": [name]},
                                               "arguments": named_tool_schema(params)},
              "required": ["name", "arguments"], "additionalProperties": False}
             for name, params in tools]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": items}}
    if not parallel:
        schema["maxItems"] = 1
    return schema
