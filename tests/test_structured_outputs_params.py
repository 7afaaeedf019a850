"""StructuredOutputsParams and the new SamplingParams fields (logit_bias,
allowed_token_ids, bad_words): validation messages, msgpack round trips, and the
tokenizer-free spec check the HTTP edge calls before admitting a request."""
from __future__ import annotations

import msgpack
import pytest

from raylm import SamplingParams, StructuredOutputsParams
from raylm.engine.structured_outputs import parse_structured_outputs_config, validate_structured_outputs


def test_round_trip_through_msgpack():
    p = SamplingParams(structured_outputs=StructuredOutputsParams(json={"type": "object"},
                                                                  disable_any_whitespace=True),
                       logit_bias={"5": 3, 7: -100}, allowed_token_ids=[1, 2], bad_words=["x y"])
    q = SamplingParams.from_dict(msgpack.unpackb(msgpack.packb(p.to_dict())))
    assert q.logit_bias == {5: 3.0, 7: -100.0}
    assert q.structured_outputs == p.structured_outputs
    assert (q.allowed_token_ids, q.bad_words) == ([1, 2], ["x y"])
    assert SamplingParams.from_dict(SamplingParams().to_dict()).structured_outputs is None
    # A dict is accepted where the dataclass is (what the wire and JSON clients carry).
    assert SamplingParams(structured_outputs={"regex": "a+"}).structured_outputs.regex == "a+"


@pytest.mark.parametrize("kwargs, needle", [
    (dict(), "exactly one of"),
    (dict(regex="a", choice=["b"]), "['regex', 'choice']"),
    (dict(json=3), "structured_outputs.json"),
    (dict(choice=[]), "structured_outputs.choice"),
    (dict(choice=["a", 3]), "structured_outputs.choice"),
    (dict(json_object="yes"), "structured_outputs.json_object"),
    (dict(regex=""), "structured_outputs.regex"),
])
def test_bad_structured_outputs_shapes(kwargs, needle):
    with pytest.raises(ValueError, match=__import__("re").escape(needle)):
        StructuredOutputsParams(**kwargs)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(logit_bias={1: 101}), "logit_bias[1] must be a number in [-100, 100], got 101"),
    (dict(logit_bias={1: float("nan")}), "logit_bias[1]"),
    (dict(logit_bias={"x": 1}), "logit_bias keys must be token ids (ints >= 0), got 'x'"),
    (dict(logit_bias={-1: 1}), "got -1"),
    (dict(logit_bias=[1, 2]), "logit_bias must be a dict"),
    (dict(allowed_token_ids=[]), "allowed_token_ids"),
    (dict(allowed_token_ids=[-3]), "allowed_token_ids entries must be ints >= 0, got -3"),
    (dict(bad_words=[""]), "bad_words"),
    (dict(bad_words="word"), "bad_words must be a list"),
    (dict(structured_outputs=3), "structured_outputs must be"),
])
def test_bad_new_sampling_fields(kwargs, needle):
    import re
    with pytest.raises(ValueError, match=re.escape(needle)):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(json='{"type": "objec"}'), 'structured_outputs.json is invalid: Unsupported type "objec"'),
    (dict(json="{bad"), "structured_outputs.json is invalid: Expecting property name"),
    (dict(regex="(ab"), "structured_outputs.regex is invalid: Regex parsing error"),
    (dict(grammar="root ::= foo"), 'structured_outputs.grammar is invalid: EBNF parser error at line 1, '
                                   'column 10: Rule "foo" is not defined'),
    (dict(structural_tag='{"structures": [{}]}'), "structured_outputs.structural_tag is invalid: missing key"),
    (dict(structural_tag="not json"), "structured_outputs.structural_tag is invalid"),
    # xgrammar lacks whitespace_pattern; llguidance (which "auto" falls back to) takes it for JSON only
    (dict(choice=["a"], whitespace_pattern=" "), "structured_outputs.choice is invalid: whitespace_pattern "
                                                 "applies to JSON schemas only"),
])
def test_validate_names_field_and_compiler_message(kwargs, needle):
    import re
    with pytest.raises(ValueError, match=re.escape(needle)):
        validate_structured_outputs(SamplingParams(structured_outputs=StructuredOutputsParams(**kwargs)))


def test_validate_accepts_good_specs_and_caches():
    good = [dict(json={"type": "object", "properties": {"a": {"type": "integer"}}}),
            dict(json='{"type": "string"}', disable_any_whitespace=True),
            dict(regex=r"\d{3}-[a-z]+"), dict(choice=['say "hi"', "back\\slash"]),
            dict(grammar='root ::= "yes" | "no"'), dict(json_object=True),
            dict(structural_tag='{"structures": [{"begin": "<f>", "schema": {"type": "object"}, '
                                '"end": "</f>"}], "triggers": ["<f>"]}')]
    for kw in good:
        validate_structured_outputs(StructuredOutputsParams(**kw))
    validate_structured_outputs(SamplingParams())  # no spec: nothing to check
    from raylm.engine.structured_outputs import _grammar_of_key
    hits = _grammar_of_key.cache_info().hits
    validate_structured_outputs(StructuredOutputsParams(**good[0]))
    assert _grammar_of_key.cache_info().hits == hits + 1


def test_structured_outputs_config():
    from raylm.engine.structured_outputs import GrammarConfig

    assert parse_structured_outputs_config(None) == GrammarConfig("auto", False, False)
    assert parse_structured_outputs_config('{"backend": "auto"}') == GrammarConfig("auto")
    assert parse_structured_outputs_config({"backend": "xgrammar"}) == GrammarConfig("xgrammar")
    assert parse_structured_outputs_config({"backend": "guidance", "disable_any_whitespace": True,
                                            "disable_additional_properties": True}) == GrammarConfig(
        "guidance", disable_any_whitespace=True, disable_additional_properties=True)
    with pytest.raises(ValueError, match="structured_outputs_config disable_any_whitespace must be true or "
                                         "false, got 'yes'"):
        parse_structured_outputs_config({"disable_any_whitespace": "yes"})
    with pytest.raises(ValueError, match=r"unknown keys \['enable_in_reasoning'\]; known keys are \['backend', "
                                         r"'disable_any_whitespace', 'disable_additional_properties', "
                                         r"'reasoning_parser'\]"):
        parse_structured_outputs_config({"enable_in_reasoning": True})
    assert parse_structured_outputs_config({"reasoning_parser": "qwen3"}).reasoning_parser == "qwen3"
    with pytest.raises(ValueError, match=r"reasoning_parser 'granite' is not supported; supported parsers are "
                                         r"\['deepseek_r1', 'qwen3'\]"):
        parse_structured_outputs_config({"reasoning_parser": "granite"})
    with pytest.raises(ValueError, match="backend 'outlines' is not supported; supported backends"):
        parse_structured_outputs_config({"backend": "outlines"})
    with pytest.raises(ValueError, match="unknown keys"):
        parse_structured_outputs_config({"backend": "xgrammar", "foo": 1})
