"""The second structured-outputs backend, llguidance (`structured_outputs_config=
{"backend": "guidance"}`, vLLM's name), and "auto" falling back to it.

On a random tiny llama with a byte-level tokenizer: outputs follow their JSON schema,
regex, choice, EBNF, Lark and structural-tag specs; for regex and EBNF specs the tokens
equal xgrammar's, greedy and seeded, so the masks and the end of a grammar (the stop
token sampled after it) agree (a choice's fixed strings llguidance spells in canonical
tokens only, so there the text is checked); n-gram speculation with
the guidance backend gives the tokens of decoding without it; `whitespace_pattern` and
Lark grammars, which xgrammar lacks, work with "guidance" and "auto" and are refused by
"xgrammar" naming the field; over HTTP the edge checks a request with the cores' backend."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest

from raylm import LLM, SamplingParams, StructuredOutputsParams
from raylm.engine.structured_outputs import (GrammarConfig, parse_structured_outputs_config,
                                             validate_structured_outputs)
from tests.helpers import make_tokenizer
from tests.test_spec_decode_grammar import NGRAM, check_valid
from tests.test_spec_decode_grammar import requests as spec_requests
from tests.test_structured_outputs import PROMPTS, SCHEMAS, grammar_accepts, output_text

REGEX = r"[a-z]{2,6}@[0-9]{2,4}\.(com|org)"
CHOICES = ["yes", "no", "maybe so", 'say "hi"']
EBNF = 'root ::= "(" num ("," num){0,3} ")"\nnum ::= [1-9] [0-9]{0,2}'
EBNF_REGEX = r"\([1-9][0-9]{0,2}(,[1-9][0-9]{0,2}){0,3}\)"
LARK = 'start: "<" WORD (" " WORD){0,2} ">"\nWORD: /[a-c]{1,3}/'
LARK_REGEX = r"<[a-c]{1,3}( [a-c]{1,3}){0,2}>"
BLANKS = r"[ ]?"  # at most one space between JSON tokens, no newlines or tabs


def so(**kw) -> StructuredOutputsParams:
    return StructuredOutputsParams(**kw)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def engine(model_dir: str, backend: str, **kw) -> LLM:
    return LLM(model_dir, max_model_len=512, max_num_seqs=16, dtype="float32",
               structured_outputs_config={"backend": backend}, **kw)


@pytest.fixture(scope="module")
def guidance(llama_dir):
    llm = engine(llama_dir, "guidance")
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def xgrammar(llama_dir):
    llm = engine(llama_dir, "xgrammar")
    yield llm
    llm.shutdown()


def params(spec: StructuredOutputsParams, seeds=(None, 1, 2, 3), max_tokens: int = 40) -> list[SamplingParams]:
    return [SamplingParams(temperature=0.0 if s is None else 1.0, seed=s, max_tokens=max_tokens,
                           structured_outputs=spec) for s in seeds]


def generate(llm: LLM, ps: list[SamplingParams]):
    outs = llm.generate([PROMPTS[i % len(PROMPTS)] for i in range(len(ps))], ps, use_tqdm=False)
    return [o.outputs[0] for o in outs]


def test_guidance_json_outputs_fit_their_schemas(guidance, tok):
    ps = [p for schema in SCHEMAS for p in params(so(json=schema), max_tokens=96)]
    stopped = 0
    for p, c in zip(ps, generate(guidance, ps)):
        if c.finish_reason == "stop":
            stopped += 1
            assert c.token_ids[-1] == tok.eos_token_id  # the stop token is sampled, as with xgrammar
            jsonschema.validate(json.loads(output_text(tok, c.token_ids), strict=False), p.structured_outputs.json)
        else:
            assert c.finish_reason == "length" and len(c.token_ids) == 96
    assert stopped >= len(ps) // 2, f"only {stopped} of {len(ps)} stopped"


@pytest.mark.parametrize("spec, pattern", [(so(regex=REGEX), REGEX), (so(grammar=EBNF), EBNF_REGEX)])
def test_guidance_tokens_equal_xgrammar_where_the_languages_agree(guidance, xgrammar, tok, spec, pattern):
    ps = params(spec)
    ours, theirs = generate(guidance, ps), generate(xgrammar, ps)
    assert [c.token_ids for c in ours] == [c.token_ids for c in theirs]
    for c in ours:
        assert c.finish_reason == "stop" and re.fullmatch(pattern, c.text), (c.text, c.finish_reason)
        assert grammar_accepts(tok, spec, c.token_ids)  # xgrammar's matcher, built independently


def test_guidance_choice(guidance, tok):
    """llguidance spells a fixed string in its canonical tokens only ("y" then "es",
    where xgrammar also allows "e", "s"), so the tokens may differ from xgrammar's; the
    text is one of the choices and xgrammar's matcher accepts the tokens."""
    spec = so(choice=CHOICES)
    for c in generate(guidance, params(spec)):
        assert c.finish_reason == "stop" and c.text in CHOICES, c.text
        assert grammar_accepts(tok, spec, c.token_ids)


def test_lark_grammars_and_whitespace_pattern_with_guidance_and_auto(guidance, llama_dir, tok):
    lark = so(grammar=LARK)
    blanks = so(json=SCHEMAS[1], whitespace_pattern=BLANKS)
    ps = params(lark) + params(blanks, max_tokens=96)
    outs = generate(guidance, ps)
    for c in outs[:4]:
        assert c.finish_reason == "stop" and re.fullmatch(LARK_REGEX, c.text), c.text
    for c in outs[4:]:
        text = output_text(tok, c.token_ids)
        assert not re.search(r"[\n\t\r]|  ", text), repr(text)
        if c.finish_reason == "stop":
            jsonschema.validate(json.loads(text), SCHEMAS[1])
    auto = engine(llama_dir, "auto")  # xgrammar refuses both specs: llguidance takes them
    try:
        assert [c.token_ids for c in generate(auto, ps)] == [c.token_ids for c in outs]
    finally:
        auto.shutdown()


def test_auto_batches_rows_of_both_backends(guidance, xgrammar, llama_dir):
    """Under "auto", regex rows (xgrammar) and Lark rows (llguidance) share steps and one
    bitmask: each row gets its own backend's mask, so its tokens are those of an
    engine with that backend alone."""
    regex, lark = params(so(regex=REGEX)), params(so(grammar=LARK))
    mixed = [p for pair in zip(regex, lark) for p in pair]
    auto = engine(llama_dir, "auto")
    try:
        outs = auto.generate([PROMPTS[i // 2 % len(PROMPTS)] for i in range(len(mixed))], mixed, use_tqdm=False)
    finally:
        auto.shutdown()
    alone_x, alone_g = generate(xgrammar, regex), generate(guidance, lark)
    assert [o.outputs[0].token_ids for o in outs[0::2]] == [c.token_ids for c in alone_x]
    assert [o.outputs[0].token_ids for o in outs[1::2]] == [c.token_ids for c in alone_g]


def test_xgrammar_refuses_what_it_lacks_naming_the_field(xgrammar):
    with pytest.raises(ValueError, match=r"structured_outputs\.grammar is invalid: EBNF (lexer|parser) error"):
        xgrammar.generate(["x"], params(so(grammar=LARK), seeds=[None]), use_tqdm=False)
    with pytest.raises(ValueError, match=r"structured_outputs\.whitespace_pattern '\[ \]\?' is not supported by "
                                         r"the xgrammar backend; .* or the guidance backend"):
        xgrammar.generate(["x"], params(so(json={"type": "object"}, whitespace_pattern=BLANKS), seeds=[None]),
                          use_tqdm=False)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(regex="(ab"), 'structured_outputs.regex is invalid: invalid regex "(ab" (in regex): regex parse error: '
                        'unclosed group'),
    (dict(json={"type": "object"}, whitespace_pattern="("),
     "structured_outputs.json is invalid: regex parse error: unclosed group"),
    (dict(grammar="root ::= foo"), "structured_outputs.grammar is invalid"),
    (dict(json='{"type": "objec"}'), "structured_outputs.json is invalid"),
    (dict(json="{bad"), "structured_outputs.json is invalid: Expecting property name"),
    (dict(choice=["a"], whitespace_pattern=" "), "whitespace_pattern applies to JSON schemas only"),
    (dict(structural_tag='{"type": "structural_tag", "format": {}}'),
     "structured_outputs.structural_tag is invalid: the guidance backend takes the"),
    (dict(structural_tag='{"structures": [{"begin": "<g>", "schema": {}, "end": "</g>"}], "triggers": ["<f"]}'),
     "structure begin '<g>' starts with none of the triggers ['<f']"),
])
def test_guidance_validation_names_the_field(kwargs, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        validate_structured_outputs(so(**kwargs), GrammarConfig("guidance"))


def test_guidance_structural_tag(guidance, tok):
    tag = json.dumps({"structures": [{"begin": "<f>", "schema": {"type": "object", "properties": {
        "x": {"enum": [1, 2]}}, "required": ["x"], "additionalProperties": False}, "end": "</f>"}],
        "triggers": ["<f>"]})
    validate_structured_outputs(so(structural_tag=tag), GrammarConfig("guidance"))
    out = generate(guidance, params(so(structural_tag=tag), seeds=[None], max_tokens=24))[0]
    assert out.token_ids and out.finish_reason in ("stop", "length")


def test_guidance_config_needs_the_package(monkeypatch):
    import raylm.engine.structured_outputs as mod

    monkeypatch.setattr(mod, "guidance_available", lambda: False)
    with pytest.raises(ValueError, match=re.escape("backend 'guidance' needs the llguidance package, which is "
                                                   "not installed: pip install 'raylm[guidance]'")):
        parse_structured_outputs_config({"backend": "guidance"})
    assert parse_structured_outputs_config(None) == GrammarConfig("auto")
    mod._grammar_of_key.cache_clear()
    monkeypatch.undo()  # "auto" with llguidance: its message about a pattern it cannot parse
    with pytest.raises(ValueError, match="structured_outputs.json is invalid: regex parse error: unclosed group"):
        validate_structured_outputs(so(json={"type": "object"}, whitespace_pattern="("))
    monkeypatch.setattr(mod, "guidance_available", lambda: False)
    try:  # "auto" without llguidance: xgrammar's own refusal
        with pytest.raises(ValueError, match="is not supported by the xgrammar backend"):
            validate_structured_outputs(so(json={"type": "object"}, whitespace_pattern=BLANKS))
    finally:
        mod._grammar_of_key.cache_clear()


def test_guidance_matcher_rolls_back_like_xgrammar(tok):
    from raylm.engine.grammar import GrammarManager

    manager = GrammarManager(lambda: tok, len(tok), [tok.eos_token_id], config=GrammarConfig("guidance"))
    m = manager.matcher(manager.compile(so(choice=["ab"])).result(), [])
    manager.shutdown()
    a, b, eos = tok.convert_tokens_to_ids("a"), tok.convert_tokens_to_ids("b"), tok.eos_token_id
    assert not m.accept_token(b) and m.accept_token(a)  # a refused token leaves the state as it was
    assert not m.accept_token(eos) and m.accept_token(b) and not m.is_terminated()
    assert not m.accept_token(a) and m.accept_token(eos) and m.is_terminated()  # only the stop token
    assert not m.accept_token(eos)
    m.rollback(2)  # the stop token (llguidance never saw it) and "b"
    assert not m.is_terminated() and m.accept_token(b) and m.accept_token(eos)
    with pytest.raises(ValueError, match="cannot roll back 4 tokens; at most 3"):
        m.rollback(4)


@pytest.mark.parametrize("seed", [None, 7])
def test_guidance_requests_speculate_exactly(tmp_path_factory, tok, seed):
    """Rollback through llguidance: n-gram proposals on JSON, regex and choice requests
    give the tokens of constrained decoding without speculation."""
    from tests.helpers import make_checkpoint

    model_dir = make_checkpoint(str(tmp_path_factory.mktemp("specg") / "cyc"), "llama", seed=5,
                                initializer_range=0.05)
    reqs = spec_requests(seed)
    outs = {}
    for spec in (None, NGRAM):
        llm = LLM(model_dir, speculative_config=spec, dtype="float32", max_model_len=256,
                  structured_outputs_config={"backend": "guidance"})
        try:
            got = llm.generate([p for p, _ in reqs], [s for _, s in reqs], use_tqdm=False)
            outs[spec is None] = [(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in got]
            stats = llm.stats()
        finally:
            llm.shutdown()
    assert outs[False] == outs[True]
    check_valid(tok, reqs, outs[False])
    assert stats["spec_decode_num_accepted_tokens"] > 0, stats


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.mark.anyio
async def test_http_edge_checks_with_the_cores_backend(llama_dir):
    """The ingress compiles a request's constraint with the cores' backend: a Lark
    grammar is a 400 naming the field under xgrammar and served under guidance."""
    from raylm.cluster.local import LocalCluster
    from raylm.cluster.openai_api import create_openai_app
    from raylm.engine.config import EngineArgs
    from tests.test_openai_api import _client

    body = {"prompt": "The quick brown fox", "max_tokens": 24, "temperature": 1.0, "seed": 3,
            "structured_outputs": {"grammar": LARK}}
    for backend in ("xgrammar", "guidance"):
        cluster = LocalCluster(EngineArgs(model=llama_dir, dtype="float32", max_model_len=256, block_size=8,
                                          max_num_seqs=4, structured_outputs_config={"backend": backend}))
        try:
            async with _client(create_openai_app(cluster)) as client:
                r = await client.post("/v1/completions", json=body)
        finally:
            await cluster.shutdown()
        if backend == "xgrammar":
            assert r.status_code == 400 and r.json()["error"]["param"] == "structured_outputs.grammar", r.text
            assert "EBNF" in r.json()["error"]["message"]
        else:
            assert r.status_code == 200, r.text
            assert re.fullmatch(LARK_REGEX, r.json()["choices"][0]["text"]), r.text


OPEN = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["a"]}  # additionalProperties left out


def json_matcher(tok, schema, config):
    from raylm.engine.grammar import GrammarManager

    manager = GrammarManager(lambda: tok, len(tok), [tok.eos_token_id], config=config)
    m = manager.matcher(manager.compile(so(json=schema)).result(), [])
    manager.shutdown()
    return m


def accepts(tok, m, text: str) -> bool:
    ids = tok.encode(text, add_special_tokens=False)
    taken = 0
    for t in ids:
        if not m.accept_token(t):
            break
        taken += 1
    m.rollback(taken)
    return taken == len(ids)


@pytest.mark.parametrize("backend", ["xgrammar", "guidance"])
def test_config_disable_any_whitespace_compacts_every_json_output(tok, backend):
    """`structured_outputs_config` {"disable_any_whitespace": true}: no blank between
    JSON tokens, whatever the request asks (vLLM's server-wide key)."""
    loose = json_matcher(tok, OPEN, GrammarConfig(backend))
    compact = json_matcher(tok, OPEN, GrammarConfig(backend, disable_any_whitespace=True))
    assert accepts(tok, loose, '{ "a": 1 }') and accepts(tok, loose, '{"a":1}')
    # Each backend's compact form (as in vLLM): xgrammar keeps json.dumps' separators.
    assert accepts(tok, compact, '{"a": 1}' if backend == "xgrammar" else '{"a":1}')
    assert not accepts(tok, compact, '{ "a"') and not accepts(tok, compact, '{"a"  :')


def test_config_disable_additional_properties_closes_guidance_objects(tok):
    """llguidance follows JSON Schema (an object without additionalProperties takes
    other keys); xgrammar does not; disable_additional_properties makes guidance match
    xgrammar, nested objects and $defs included, and leaves values alone."""
    schema = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9},
                                               "p": {"$ref": "#/$defs/point"}},
              "required": ["a"], "$defs": {"point": {"type": "object", "properties": {"x": {"type": "integer"}}}}}
    extra, nested = '{"a": 1, "b"', '{"a": 1, "p": {"x": 2, "y"'
    xg = json_matcher(tok, schema, GrammarConfig("xgrammar"))
    assert not accepts(tok, xg, extra) and not accepts(tok, xg, nested)
    open_g = json_matcher(tok, schema, GrammarConfig("guidance"))
    assert accepts(tok, open_g, extra) and accepts(tok, open_g, nested)
    closed = json_matcher(tok, schema, GrammarConfig("guidance", disable_additional_properties=True))
    assert accepts(tok, closed, '{"a": 1, "p": {"x": 2}}')
    assert not accepts(tok, closed, extra) and not accepts(tok, closed, nested)
    from raylm.engine.structured_outputs import _closed
    kept = {"type": "object", "default": {"properties": {}}, "enum": [{"properties": 1}],
            "properties": {"properties": {"type": "string"}}, "additionalProperties": {"type": "integer"}}
    assert _closed(kept) == kept  # says additionalProperties; values and a key named "properties" untouched
    nullable = {"anyOf": [{"type": ["object", "null"]}], "items": [{"properties": {}}]}
    assert _closed(nullable) == {"anyOf": [{"type": ["object", "null"], "additionalProperties": False}],
                                 "items": [{"properties": {}, "additionalProperties": False}]}


@pytest.mark.parametrize("backend", ["xgrammar", "guidance"])
def test_ids_past_the_tokenizer_are_refused_and_leave_the_matcher_usable(backend):
    """The grammar backends know the tokenizer's vocabulary, not a padded model's: an id past
    it (a padded id proposed by n-gram speculation from a token-id prompt, say) is refused,
    and the matcher goes on accepting (llguidance itself would stay in an error state)."""
    from raylm.engine.grammar import GrammarManager

    tok = make_tokenizer()
    manager = GrammarManager(lambda: tok, len(tok) + 100, [tok.eos_token_id],
                             config=GrammarConfig(backend=backend))
    try:
        m = manager.matcher(manager.compile(StructuredOutputsParams(regex="[a-c]{3}")).result(), [])
        a = tok.convert_tokens_to_ids("a")
        assert not m.accept_token(len(tok) + 5) and not m.accept_token(len(tok) + 99)
        assert m.accept_token(a) and m.accept_token(a) and manager.mask_vocab == len(tok)
    finally:
        manager.shutdown()
