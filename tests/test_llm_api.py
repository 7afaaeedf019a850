"""The offline API: sampling controls, stop conditions, n > 1, bad input, shutdown."""
import gc

import pytest

from raylm import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(llama_dir):
    engine = LLM(llama_dir, dtype="float32", max_model_len=128, block_size=8)
    yield engine
    engine.shutdown()


def ids(n, start=10):
    return {"prompt_token_ids": [start + (i * 7) % 250 for i in range(n)]}


def test_seed_reproducible_alone_and_in_batch(llm):
    sp = SamplingParams(temperature=1.0, seed=1234, max_tokens=12, ignore_eos=True)
    alone = llm.generate(ids(9), sp, use_tqdm=False)[0].outputs[0].token_ids
    others = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    batch = llm.generate([ids(5, 3), ids(9), ids(20, 40)], [others, sp, others], use_tqdm=False)
    assert batch[1].outputs[0].token_ids == alone
    again = llm.generate(ids(9), SamplingParams(temperature=1.0, seed=99, max_tokens=12, ignore_eos=True),
                         use_tqdm=False)[0].outputs[0].token_ids
    assert again != alone  # a different seed draws differently


def test_top_k_1_equals_greedy(llm):
    greedy = llm.generate(ids(11), SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
                          use_tqdm=False)[0].outputs[0].token_ids
    topk1 = llm.generate(ids(11), SamplingParams(temperature=0.9, top_k=1, max_tokens=10, ignore_eos=True),
                         use_tqdm=False)[0].outputs[0].token_ids
    assert topk1 == greedy


def test_stop_token_ids_and_stop_strings(llm):
    base = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    ref = llm.generate(ids(6), base, use_tqdm=False)[0].outputs[0]
    # stop at the 5th generated token id
    stop_tok = ref.token_ids[4]
    first = ref.token_ids.index(stop_tok)
    out = llm.generate(ids(6), SamplingParams(temperature=0, max_tokens=16, ignore_eos=True,
                                              stop_token_ids=[stop_tok]), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == ref.token_ids[:first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_tok
    # a stop string taken from the middle of the reference text, spanning tokens
    text = ref.text
    assert len(text) > 6
    stop = text[3:7]
    cut = text.index(stop)
    out = llm.generate(ids(6), SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, stop=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert out.text == text[:cut] and out.finish_reason == "stop" and out.stop_reason == stop
    out = llm.generate(ids(6), SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, stop=stop,
                                              include_stop_str_in_output=True), use_tqdm=False)[0].outputs[0]
    assert out.text == text[:cut + len(stop)]


def test_eos_ends_generation_unless_ignored(llm):
    tok = llm.get_tokenizer()
    ref = llm.generate(ids(8), SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    # Make the 3rd greedy token the end-of-sequence token via stop_token_ids semantics:
    # min_tokens keeps it from ending earlier.
    stop_tok = ref.token_ids[2]
    out = llm.generate(ids(8), SamplingParams(temperature=0, max_tokens=10, ignore_eos=True,
                                              stop_token_ids=[stop_tok], min_tokens=6),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) >= 6 and stop_tok not in out.token_ids[:5]
    assert tok.eos_token_id is not None


def test_n_returns_distinct_completions_sharing_prompt(llm):
    before = llm.stats()["prefix_cache_hit_tokens"]
    out = llm.generate(ids(40), SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8, ignore_eos=True),
                       use_tqdm=False)[0]
    assert len(out.outputs) == 3 and [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 8 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    # siblings found the prompt's full blocks in the prefix cache
    assert llm.stats()["prefix_cache_hit_tokens"] - before >= 2 * 32


def test_outputs_in_input_order_and_text(llm):
    tok = llm.get_tokenizer()
    prompts = ["The quick brown fox", "héllo wörld", "Once upon a time"]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=True)
    assert [o.prompt for o in outs] == prompts
    for o in outs:
        assert o.prompt_token_ids == tok.encode(o.prompt)
        assert o.outputs[0].text == tok.decode(o.outputs[0].token_ids, skip_special_tokens=True)
    chat = llm.chat([{"role": "user", "content": "hi"}], SamplingParams(temperature=0, max_tokens=4),
                    use_tqdm=False)
    assert chat[0].prompt_token_ids[-1] == tok.convert_tokens_to_ids("<|assistant|>")


@pytest.mark.parametrize("prompt, sp, match", [
    ("", SamplingParams(), "prompt is empty"),
    ({"prompt_token_ids": list(range(1, 200))}, SamplingParams(), "max_model_len is 128"),
    ({"prompt_token_ids": [1, 2, 99999]}, SamplingParams(), "token id 99999"),
    ({"prompt_token_ids": [1, -1]}, SamplingParams(), "token id -1"),
    ("hi", SamplingParams(logprobs=50), "max_logprobs"),
])
def test_bad_requests_rejected_before_any_work(llm, prompt, sp, match):
    steps = llm.stats()["num_steps"]
    with pytest.raises(ValueError, match=match):
        llm.generate(["fine prompt", prompt], sp, use_tqdm=False)
    assert llm.stats()["num_steps"] == steps  # nothing ran, not even the good prompt
    assert llm.stats()["num_requests_waiting"] == 0
    out = llm.generate("still serving", SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 2


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_tokens=0), "max_tokens"), (dict(top_p=1.5), "top_p"), (dict(top_p=0.0), "top_p"),
    (dict(temperature=-0.1), "temperature"), (dict(n=0), "n"),
])
def test_sampling_params_validate(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_model_errors(tmp_path, llama_dir):
    with pytest.raises(ValueError, match="config.json"):
        LLM(str(tmp_path))
    import json
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(llama_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    cfg["model_type"] = "gpt2"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="not supported"):
        LLM(str(bad))
    with pytest.raises(ValueError, match="does not exist"):
        LLM(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="could not be fetched"):
        LLM("nobody-here/no-such-model")


def test_kv_cache_too_small_fails_with_numbers(llama_dir):
    with pytest.raises(ValueError, match=r"max_model_len=128 sequence needs 8 blocks"):
        LLM(llama_dir, dtype="float32", max_model_len=128, block_size=16, kv_cache_memory_bytes=1000)


def test_many_llms_one_after_another(llama_dir):
    import weakref
    refs = []
    for _ in range(3):
        llm = LLM(llama_dir, dtype="float32", max_model_len=64)
        refs.append(weakref.ref(llm.llm_engine.executor.runner.kv_caches[0]))
        llm.generate("a", SamplingParams(max_tokens=2), use_tqdm=False)
        del llm
        gc.collect()
    assert all(r() is None for r in refs)  # every pool was freed
    llm = LLM(llama_dir, dtype="float32", max_model_len=64)
    ref = weakref.ref(llm.llm_engine.executor.runner.kv_caches[0])
    llm.shutdown()
    gc.collect()
    assert ref() is None
    with pytest.raises(RuntimeError, match="shut down"):
        llm.generate("a")
