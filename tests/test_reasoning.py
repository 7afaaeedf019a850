"""Reasoning outputs (`--reasoning-parser qwen3` / `deepseek_r1`, as in vLLM): chat outputs
split into `reasoning_content` (and `reasoning`) and `content` at `<think>`/`</think>`.

The splitter on its own: outputs that open with `<think>`, prompts that leave one open,
thinking disabled by the template, reasoning cut short, and every way of cutting the
text into stream deltas giving the whole response's fields. Over HTTP on a random tiny
model whose output a regex constraint spells (byte-level tokenizer): the whole response
and the stream carry the same reasoning and content, tool calls are parsed from the
content only, and without the parser the text stays in `content`."""
from __future__ import annotations

import json
import random

import pytest
import torch

from raylm.cluster.reasoning import ReasoningSplitter, check_reasoning_parser, split_reasoning, starts_inside

CASES = [  # (prompt leaves <think> open, output, reasoning, content)
    (False, "<think>step 1\nstep 2</think>\n\nThe answer is 4.", "step 1\nstep 2", "\n\nThe answer is 4."),
    (False, "\n<think>x</think>y", "x", "y"),
    (True, "step 1</think>answer", "step 1", "answer"),
    (False, "no thinking here", None, "no thinking here"),
    (True, "thinking, cut short by max_tokens", "thinking, cut short by max_tokens", None),
    (False, "<think>only thoughts</think>", "only thoughts", None),
    (False, "a <think> later is content", None, "a <think> later is content"),
    (True, "</think>", None, None),
    (False, "<thin", None, "<thin"),
    (True, "a </thinking> is not the end</think>!", "a </thinking> is not the end", "!"),
]


@pytest.mark.parametrize("inside,text,reasoning,content", CASES)
def test_split_and_every_stream_cut_agree(inside, text, reasoning, content):
    assert split_reasoning(text, inside) == (reasoning, content)
    cuts = [sorted(random.Random(seed).sample(range(1, len(text)), min(k, len(text) - 1)))
            for seed in range(20) for k in (1, 3, 8)] + [list(range(1, len(text)))]  # one char at a time
    for cut in cuts:
        s = ReasoningSplitter(inside)
        bounds = [0] + cut + [len(text)]
        parts = [s.feed(text[a:b], final=(b == len(text))) for a, b in zip(bounds, bounds[1:])]
        assert ("".join(r for r, _ in parts) or None, "".join(c for _, c in parts) or None) == (reasoning, content)


def test_where_the_output_starts_and_parser_names():
    assert starts_inside("<|im_start|>assistant\n<think>\n")  # R1 / Qwen3.5 templates
    assert not starts_inside("<|im_start|>assistant\n<think>\n\n</think>\n\n")  # Qwen3, thinking disabled
    assert not starts_inside("<|im_start|>assistant\n") and not starts_inside(None)
    assert check_reasoning_parser("qwen3") == "qwen3" and check_reasoning_parser(None) is None
    with pytest.raises(ValueError, match=r"reasoning_parser 'granite' is not supported; supported parsers are "
                                         r"\['deepseek_r1', 'qwen3'\]"):
        check_reasoning_parser("granite")


# ---- over HTTP --------------------------------------------------------------------------
THINK_REGEX = r"<think>[a-c]{2,6}</think>[x-z]{2,6}"


@pytest.fixture(scope="module")
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="module")
async def cluster(llama_dir):
    from raylm.cluster.local import LocalCluster
    from raylm.engine.config import EngineArgs

    s = LocalCluster(EngineArgs(model=llama_dir, dtype="float32", max_model_len=256, block_size=8, max_num_seqs=8),
                     served_model_name="tiny")
    yield s
    await s.shutdown()


def body(**kw):
    return {"messages": [{"role": "user", "content": "Think, then answer."}], "max_tokens": 40,
            "temperature": 1.0, "seed": 3, "structured_outputs": {"regex": THINK_REGEX}, **kw}


@pytest.mark.anyio
async def test_http_whole_and_streamed_reasoning(cluster):
    from raylm.cluster.openai_api import create_openai_app
    from tests.test_openai_api import _client, events

    async with _client(create_openai_app(cluster, reasoning_parser="qwen3")) as c:
        r = await c.post("/v1/chat/completions", json=body(n=2))
        assert r.status_code == 200, r.text
        whole = [ch["message"] for ch in sorted(r.json()["choices"], key=lambda ch: ch["index"])]
        for m in whole:
            assert m["reasoning_content"] == m["reasoning"] and 2 <= len(m["reasoning"]) <= 6
            assert set(m["reasoning"]) <= set("abc") and set(m["content"]) <= set("xyz"), m
        r = await c.post("/v1/chat/completions", json=body(n=2, stream=True))
        reasoning, content = ["", ""], ["", ""]
        for chunk in events(r):
            for ch in chunk["choices"]:
                d = ch["delta"]
                assert d.get("reasoning_content") == d.get("reasoning")
                reasoning[ch["index"]] += d.get("reasoning") or ""
                content[ch["index"]] += d.get("content") or ""
        assert [(m["reasoning"], m["content"]) for m in whole] == list(zip(reasoning, content))
    async with _client(create_openai_app(cluster)) as c:  # no parser: the text is the content
        r = await c.post("/v1/chat/completions", json=body())
        m = r.json()["choices"][0]["message"]
        assert "reasoning_content" not in m and m["content"].startswith("<think>") and "</think>" in m["content"]


@pytest.mark.anyio
async def test_http_tool_calls_come_from_the_content(cluster):
    """Reasoning that mentions a tool call is not parsed as one; the call after it is."""
    from raylm.cluster.openai_api import create_openai_app
    from tests.test_openai_api import _client

    call = '<tool_call>{"name": "now", "arguments": {"utc": true}}</tool_call>'
    regex = r"<think><tool_call>x</tool_call></think>" + call.replace("{", r"\{").replace("}", r"\}")
    tools = [{"type": "function", "function": {"name": "now", "parameters": {
        "type": "object", "properties": {"utc": {"type": "boolean"}}, "required": ["utc"]}}}]
    app = create_openai_app(cluster, enable_auto_tool_choice=True, tool_call_parser="hermes", reasoning_parser="qwen3")
    async with _client(app) as c:
        r = await c.post("/v1/chat/completions", json=body(tools=tools, max_tokens=120,
                                                           structured_outputs={"regex": regex}))
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["message"]["reasoning"] == "<tool_call>x</tool_call>"
        assert [json.loads(t["function"]["arguments"]) for t in choice["message"]["tool_calls"]] == [{"utc": True}]
        assert choice["finish_reason"] == "tool_calls"


def test_cli_and_app_arguments_take_the_parser():
    from raylm.cli import build_parser
    from raylm.cluster.app import _front

    ns = build_parser().parse_args(["serve", "--reasoning-parser", "deepseek_r1"])
    assert ns.reasoning_parser == "deepseek_r1"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--reasoning-parser", "granite"])
    assert _front({"reasoning_parser": "qwen3"})["reasoning_parser"] == "qwen3"
    with pytest.raises(ValueError, match="reasoning_parser 'x' is not supported"):
        _front({"reasoning_parser": "x"})


# ---- grammars start after the reasoning -------------------------------------------------
@pytest.fixture(scope="module")
def think_dir(llama_dir, tmp_path_factory):
    """The tiny llama with `<think>` and `</think>` as tokens of their own (as Qwen3's)."""
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = str(tmp_path_factory.mktemp("think") / "llama")
    shutil.copytree(llama_dir, d)
    tok = AutoTokenizer.from_pretrained(d)
    tok.add_tokens(["<think>", "</think>"])
    model = AutoModelForCausalLM.from_pretrained(d)
    model.resize_token_embeddings(len(tok))
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_reasoning_gate_opens_at_the_end_token_and_rolls_back(think_dir):
    from transformers import AutoTokenizer

    from raylm import StructuredOutputsParams
    from raylm.engine.grammar import GrammarManager, ReasoningGate, reasoning_closed, reasoning_tokens

    tok = AutoTokenizer.from_pretrained(think_dir)
    start, end = reasoning_tokens(tok)
    assert reasoning_closed([5, start, 7, end, 9], (start, end)) and not reasoning_closed([5, start, 7], (start, end))
    assert not reasoning_closed([5, 6], (start, end))
    manager = GrammarManager(lambda: tok, len(tok), [tok.eos_token_id])
    gate = ReasoningGate(manager.matcher(manager.compile(StructuredOutputsParams(choice=["ab"])).result(), []), end)
    manager.shutdown()
    a, b, q = (tok.convert_tokens_to_ids(c) for c in "abq")
    assert gate.accept_token(q) and gate.accept_token(b) and gate.waiting  # reasoning: anything goes
    buf = torch.zeros(1, (len(tok) + 31) // 32, dtype=torch.int32)
    gate.fill_next_token_bitmask(buf, 0)
    assert (buf == -1).all()
    assert gate.accept_token(end) and not gate.waiting
    assert not gate.accept_token(b) and gate.accept_token(a)  # the grammar, from its start
    gate.rollback(2)  # "a" and the end token: reasoning again
    assert gate.waiting and gate.accept_token(q) and gate.accept_token(end) and gate.accept_token(a)
    assert gate.accept_token(b) and gate.accept_token(tok.eos_token_id) and gate.is_terminated()


def test_grammars_start_after_the_reasoning(think_dir):
    """structured_outputs_config {"reasoning_parser": "qwen3"}: while the output reasons
    the grammar allows everything (a token it forbids, pushed by logit_bias, comes out);
    from `</think>` on it holds; a prompt that closes the reasoning gets it at once. With
    asynchronous scheduling too (the step after `</think>` is planned once it is known)."""
    from transformers import AutoTokenizer

    from raylm import LLM, SamplingParams, StructuredOutputsParams

    tok = AutoTokenizer.from_pretrained(think_dir)
    start, end = tok.convert_tokens_to_ids(["<think>", "</think>"])
    a = tok.convert_tokens_to_ids("a")
    so = StructuredOutputsParams(regex="[x-z]{3}")

    def sp(bias):
        return SamplingParams(temperature=0.0, max_tokens=12, logit_bias=bias, structured_outputs=so)

    prompt = tok.encode("Think, then answer.")
    closed = prompt + [start, end]
    gate = {"reasoning_parser": "qwen3"}
    for config, want_gate, asynchronous in ((gate, True, False), (gate, True, True), (None, False, False)):
        llm = LLM(think_dir, dtype="float32", max_model_len=128, structured_outputs_config=config,
                  async_scheduling=asynchronous)
        try:
            outs = llm.generate([{"prompt_token_ids": p} for p in (prompt, prompt, closed)],
                                [sp({a: 100}), sp({end: 100}), sp({a: 100})], use_tqdm=False)
        finally:
            llm.shutdown()
        reasoning, opened, at_once = (o.outputs[0] for o in outs)
        if want_gate:
            assert reasoning.token_ids == [a] * 12 and reasoning.finish_reason == "length"
            assert opened.token_ids[0] == end and opened.finish_reason == "stop"
            assert tok.decode(opened.token_ids[1:-1]) in {x + y + z for x in "xyz" for y in "xyz" for z in "xyz"}
        else:
            assert reasoning.finish_reason == "stop" and a not in reasoning.token_ids
        assert at_once.finish_reason == "stop" and a not in at_once.token_ids and end not in at_once.token_ids


@pytest.mark.parametrize("asynchronous", [False, True])
def test_padded_vocabulary_grammar_rows_and_a_waiting_gate(think_dir, tmp_path, asynchronous):
    """A model whose vocabulary is padded past the tokenizer's (40 ids no text spells): the
    bitmask covers the tokenizer's vocabulary only; a grammar row never samples a padded id,
    however hard logit_bias pushes it, while a row whose reasoning gate still waits samples
    as an unconstrained request does, padded ids included."""
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raylm import LLM, SamplingParams, StructuredOutputsParams

    d = str(tmp_path / "padded")
    shutil.copytree(think_dir, d)
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d)
    model.resize_token_embeddings(len(tok) + 40)
    model.save_pretrained(d)
    # One padded id inside the bitmask's last word, one past the bitmask (the id pushed hardest).
    inside, padded = len(tok) + 1, -(-len(tok) // 32) * 32 + 3
    assert inside < -(-len(tok) // 32) * 32 and padded < len(tok) + 40
    bias = {inside: 90, padded: 100}
    start = tok.convert_tokens_to_ids("<think>")
    prompt = tok.encode("Think, then answer.")
    so = StructuredOutputsParams(regex="[x-z]{3}")
    llm = LLM(d, dtype="float32", max_model_len=128, structured_outputs_config={"reasoning_parser": "qwen3"},
              async_scheduling=asynchronous)
    try:
        outs = llm.generate(
            [{"prompt_token_ids": p} for p in (prompt, prompt + [start, tok.convert_tokens_to_ids("</think>")], prompt)],
            [SamplingParams(temperature=0.0, max_tokens=4, logit_bias=bias, structured_outputs=so),
             SamplingParams(temperature=0.0, max_tokens=6, logit_bias=bias, structured_outputs=so),
             SamplingParams(temperature=0.0, max_tokens=4, logit_bias=bias)], use_tqdm=False)
    finally:
        llm.shutdown()
    waiting, constrained, plain = (o.outputs[0].token_ids for o in outs)
    assert plain == [padded] * 4  # what logit_bias does without a grammar
    assert waiting == plain  # the gate waits: the same as without a grammar
    assert all(t < len(tok) for t in constrained)
    assert tok.decode(constrained[:3]) in {x + y + z for x in "xyz" for y in "xyz" for z in "xyz"}
    from raylm.engine.grammar import GrammarManager

    manager = GrammarManager(lambda: tok, len(tok) + 40, [tok.eos_token_id])
    try:
        m = manager.matcher(manager.compile(so).result(), [])
        assert manager.mask_vocab == len(tok)
        assert manager.bitmask_tensor([m]).shape == (1, -(-len(tok) // 32))
    finally:
        manager.shutdown()


def test_app_arguments_pass_the_parser_to_the_cores():
    from raylm.cluster.app import with_reasoning_parser

    assert with_reasoning_parser({"model": "m"}, None) == {"model": "m"}
    got = with_reasoning_parser({"model": "m", "structured_outputs_config": '{"backend": "xgrammar"}'}, "qwen3")
    assert got["structured_outputs_config"]["backend"] == "xgrammar"
    assert got["structured_outputs_config"]["reasoning_parser"] == "qwen3"
