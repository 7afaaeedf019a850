"""Structured outputs through `LLM.generate` on a random tiny llama with a byte-level BPE
tokenizer (tests/helpers.make_tokenizer: every byte is a token, so `{` can be spelled):
JSON schemas, regex, choice and EBNF constraints hold for every output; outputs cut by
max_tokens are valid prefixes; the same requests give the same tokens under chunked
prefill, asynchronous scheduling, neighbours and re-dispatch; bad specs fail naming the
field. Last, the embedded SmolLM2-135M-Instruct returns valid JSON for a schema.

Random weights love whitespace and odd bytes, which the grammar allows (bounded blanks,
any non-quote character in strings), so outputs are checked against the spec, never
against expected text. `json.loads(strict=False)`: xgrammar's rule for strings with
maxLength admits control characters, which JSON forbids unescaped; jsonschema still
checks every field. Likewise xgrammar's character classes admit UTF-16 surrogates (bytes
ED A0..BF xx), which strict UTF-8 decoding turns into three U+FFFD each: the JSON checks
decode the output bytes with "surrogatepass", one character per code point, as the
grammar counts them."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest

from raylm import LLM, SamplingParams, StructuredOutputsParams
from raylm.engine.core_messages import EngineCoreRequest
from tests.helpers import make_tokenizer

SCHEMAS = [
    {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "color": {"enum": ["red", "green", "blue"]}},
     "required": ["name", "age", "color"], "additionalProperties": False},
    {"type": "object", "properties": {
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
        "ok": {"type": "boolean"}},
     "required": ["tags", "ok"], "additionalProperties": False},
    {"type": "object", "properties": {
        "point": {"type": "object", "properties": {"x": {"type": "integer", "minimum": -9, "maximum": 9},
                                                   "y": {"type": "integer", "minimum": -9, "maximum": 9}},
                  "required": ["x", "y"], "additionalProperties": False},
        "label": {"type": "string", "maxLength": 4}},
     "required": ["point", "label"], "additionalProperties": False},
]
PROMPTS = ["The quick brown fox", "Once upon a time", "Paged attention keeps", "1 2 3 4 5"]
MAX_TOKENS = 96


def so(**kw) -> StructuredOutputsParams:
    return StructuredOutputsParams(**kw)


@pytest.fixture(scope="module")
def llm(llama_dir):
    engine = LLM(llama_dir, max_model_len=512, max_num_seqs=16)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


_COMPILER = None


def grammar_accepts(tok, spec: StructuredOutputsParams, token_ids: list[int]) -> bool:
    """xgrammar's matcher, built here independently of the engine, accepts every token
    in order: the output is a valid prefix of the language (EOS included when it ended)."""
    import xgrammar as xgr

    from raylm.engine.structured_outputs import GrammarConfig, build_grammar

    global _COMPILER
    if _COMPILER is None:
        info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=len(tok), stop_token_ids=[tok.eos_token_id])
        _COMPILER = xgr.GrammarCompiler(info)
    matcher = xgr.GrammarMatcher(_COMPILER.compile_grammar(build_grammar(spec, GrammarConfig("xgrammar")).value))
    return all(matcher.accept_token(t) for t in token_ids)


def output_text(tok, token_ids: list[int]) -> str:
    """The output's bytes (byte-level tokens, EOS dropped) decoded as the grammar sees them."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_of = {ch: b for b, ch in bytes_to_unicode().items()}
    raw = bytes(byte_of[ch] for t in token_ids if t != tok.eos_token_id
                for ch in tok.convert_ids_to_tokens(t))
    return raw.decode("utf-8", errors="surrogatepass")


def requests_for(schemas, seeds):
    return [SamplingParams(temperature=0.0 if seed is None else 1.0, seed=seed, max_tokens=MAX_TOKENS,
                           structured_outputs=so(json=schema))
            for schema in schemas for seed in seeds]


def test_json_schemas_valid_or_valid_prefix(llm, tok):
    params = requests_for(SCHEMAS, [None, 1, 2, 3])
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(params))]
    outs = llm.generate(prompts, params, use_tqdm=False)
    stopped = 0
    for p, out in zip(params, outs):
        c = out.outputs[0]
        schema = p.structured_outputs.json
        if c.finish_reason == "stop":
            stopped += 1
            jsonschema.validate(json.loads(output_text(tok, c.token_ids), strict=False), schema)
            assert c.token_ids[-1] == tok.eos_token_id
        else:
            assert c.finish_reason == "length" and len(c.token_ids) == MAX_TOKENS
        assert grammar_accepts(tok, p.structured_outputs, c.token_ids), c.text
    assert stopped >= len(params) // 2, f"only {stopped} of {len(params)} stopped"


def test_regex_choice_and_ebnf(llm, tok):
    regex = r"[a-z]{2,6}@[0-9]{2,4}\.(com|org)"
    choices = ["yes", "no", "maybe so", 'say "hi"']
    ebnf = 'root ::= "(" num ("," num){0,3} ")"\nnum ::= [1-9] [0-9]{0,2}'
    ebnf_regex = r"\([1-9][0-9]{0,2}(,[1-9][0-9]{0,2}){0,3}\)"
    specs = [("regex", so(regex=regex)), ("choice", so(choice=choices)), ("grammar", so(grammar=ebnf))]
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=40, structured_outputs=spec)
              for _, spec in specs for s in range(4)]
    outs = llm.generate([PROMPTS[i % 4] for i in range(len(params))], params, use_tqdm=False)
    for p, out in zip(params, outs):
        c = out.outputs[0]
        assert c.finish_reason == "stop", (c.text, c.finish_reason)
        kind = p.structured_outputs.kind
        if kind == "regex":
            assert re.fullmatch(regex, c.text), c.text
        elif kind == "choice":
            assert c.text in choices
        else:
            assert re.fullmatch(ebnf_regex, c.text), c.text


def test_n2_greedy_and_seeded(llm, tok):
    greedy = SamplingParams(n=2, temperature=0.0, max_tokens=MAX_TOKENS, structured_outputs=so(json=SCHEMAS[0]))
    seeded = SamplingParams(n=2, temperature=1.0, seed=7, max_tokens=MAX_TOKENS,
                            structured_outputs=so(json=SCHEMAS[1], disable_any_whitespace=True))
    g, s = llm.generate([PROMPTS[0], PROMPTS[1]], [greedy, seeded], use_tqdm=False)
    assert g.outputs[0].token_ids == g.outputs[1].token_ids
    for c in g.outputs:
        if c.finish_reason == "stop":
            jsonschema.validate(json.loads(output_text(tok, c.token_ids), strict=False), SCHEMAS[0])
    for c in s.outputs:  # no free whitespace: exactly json.dumps's separators ", " and ": "
        assert c.finish_reason == "stop", c.text
        jsonschema.validate(json.loads(c.text), SCHEMAS[1])
        assert c.text == json.dumps(json.loads(c.text))


def summary(outs):
    return [[(c.token_ids, c.finish_reason) for c in o.outputs] for o in outs]


def test_neighbours_do_not_change_outputs(llm):
    plain = [SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True),
             SamplingParams(temperature=0.8, seed=11, max_tokens=24, ignore_eos=True)]
    alone = llm.generate(PROMPTS[:2], plain, use_tqdm=False)
    grammar = requests_for(SCHEMAS[:2], [None, 5])
    grammar_alone = llm.generate(PROMPTS * 1, grammar, use_tqdm=False)
    mixed = llm.generate(PROMPTS[:2] + PROMPTS, plain + grammar, use_tqdm=False)
    assert summary(mixed[:2]) == summary(alone)
    assert summary(mixed[2:]) == summary(grammar_alone)


@pytest.mark.parametrize("engine_args", [dict(max_num_batched_tokens=16, long_prefill_token_threshold=8),
                                         dict(async_scheduling=True)], ids=["chunked_prefill", "async"])
def test_same_tokens_under_chunked_prefill_and_async_scheduling(llm, llama_dir, engine_args):
    long_prompt = " ".join(PROMPTS) * 2  # several chunks at 16 tokens a step
    params = requests_for(SCHEMAS, [None, 4]) + [
        SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, presence_penalty=0.5)]
    prompts = [long_prompt, PROMPTS[1]] * 3 + [PROMPTS[2]]
    want = llm.generate(prompts, params, use_tqdm=False)
    other = LLM(llama_dir, max_model_len=512, max_num_seqs=16, **engine_args)
    try:
        got = other.generate(prompts, params, use_tqdm=False)
    finally:
        other.shutdown()
    assert summary(got) == summary(want)


def test_async_scheduling_defers_grammar_sampling(llm, llama_dir):
    """Under asynchronous scheduling a step with grammar rows launches its forward pass
    before the step in flight is recorded and queues its sampling once the matchers have
    seen that step's tokens (finish_sampling): the same tokens as synchronous steps, with
    unconstrained neighbours and requests that end while the next step is in flight."""
    params = requests_for(SCHEMAS, [None, 4, 11]) + [SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True),
                                                     SamplingParams(temperature=0.7, seed=3, max_tokens=30)]
    prompts = (PROMPTS * 3)[:len(params)]
    want = llm.generate(prompts, params, use_tqdm=False)
    other = LLM(llama_dir, max_model_len=512, max_num_seqs=16, async_scheduling=True)
    runner = other.llm_engine.executor.runner
    finish, calls = runner.finish_sampling, []
    runner.finish_sampling = lambda pending, ids, mask: calls.append(len(ids)) or finish(pending, ids, mask)
    try:
        got = other.generate(prompts, params, use_tqdm=False)
    finally:
        other.shutdown()
    assert summary(got) == summary(want)
    assert calls and max(calls) > 1, calls  # deferred steps, several grammar rows at once


def test_redispatch_advances_matcher_over_earlier_outputs(llm):
    """A request re-dispatched after k outputs (they arrive as the prompt's tail, with
    output_offset=k) continues exactly as the undisturbed run."""
    params = SamplingParams(temperature=1.0, seed=9, max_tokens=MAX_TOKENS, structured_outputs=so(json=SCHEMAS[2]))
    full = llm.generate([PROMPTS[3]], params, use_tqdm=False)[0]
    prompt_ids, out_ids = full.prompt_token_ids, full.outputs[0].token_ids
    k = 10
    assert len(out_ids) > k + 2
    rest = params.clone()
    rest.max_tokens = MAX_TOKENS - k
    core = llm.llm_engine.core
    core.add_requests([EngineCoreRequest("redispatch-0", prompt_ids + out_ids[:k], rest, output_offset=k)])
    tokens, reason = [], None
    while core.has_unfinished_requests():
        for o in core.step():
            tokens += o.new_token_ids
            reason = o.finish_reason or reason
    assert tokens == out_ids[k:]
    assert reason == full.outputs[0].finish_reason


@pytest.mark.parametrize("spec, field, message", [
    (dict(json={"type": "object", "properties": {"a": {"type": "strin"}}}), "structured_outputs.json",
     'Unsupported type "strin"'),
    (dict(regex="a(b"), "structured_outputs.regex", "The parenthesis is not closed"),
    (dict(grammar='root ::= "a" | missing'), "structured_outputs.grammar", 'Rule "missing" is not defined'),
])
def test_invalid_specs_raise_naming_the_field(llm, spec, field, message):
    with pytest.raises(ValueError, match=re.escape(field) + ".*" + re.escape(message)):
        llm.generate(["hi"], SamplingParams(structured_outputs=so(**spec)), use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()


@pytest.fixture(scope="module")
def smol():
    engine = LLM(None, dtype="float32", max_model_len=512, max_num_seqs=4)
    yield engine
    engine.shutdown()


@pytest.mark.parametrize("params", [dict(temperature=0.0), dict(temperature=1.0, seed=1)], ids=["greedy", "seeded"])
def test_smollm_json_schema(smol, params):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                               "population": {"type": "integer", "minimum": 0, "maximum": 100000000}},
              "required": ["city", "population"], "additionalProperties": False}
    out = smol.chat([{"role": "user", "content": "Give the capital of France and its population as JSON."}],
                    SamplingParams(max_tokens=64, structured_outputs=so(json=schema), **params), use_tqdm=False)
    c = out[0].outputs[0]
    assert c.finish_reason == "stop", c.text
    jsonschema.validate(json.loads(c.text), schema)


def test_abort_while_compiling_leaves_nothing_behind(llm):
    engine = llm.llm_engine
    schema = {"type": "object", "properties": {"never_seen_before": {"type": "integer", "minimum": 0,
                                                                     "maximum": 7}},
              "required": ["never_seen_before"]}
    engine.add_request("compiling-0", "hi", SamplingParams(structured_outputs=so(json=schema)))
    engine.abort_request("compiling-0")
    core = engine.core
    assert not core.requests and core._num_compiling == 0 and not engine.has_unfinished_requests()
    out = llm.generate(["hi"], SamplingParams(max_tokens=40, structured_outputs=so(json=schema)), use_tqdm=False)
    assert json.loads(out[0].outputs[0].text)["never_seen_before"] in range(8)
