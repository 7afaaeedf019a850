"""Builders for test checkpoints and the transformers reference."""
from __future__ import annotations

import os
import random
import socket
from functools import lru_cache

import torch

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paged attention keeps the KV cache in fixed-size blocks.",
    "Continuous batching schedules work at every iteration.",
    "héllo wörld café naïve 日本語 🙂 emoji and unicode text",
    "Once upon a time there was a small language model that could.",
    "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
] * 4

BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6,
            initializer_range=0.2)

ARCH_CONFIGS = {
    "llama": ("LlamaConfig", dict(tie_word_embeddings=False)),
    "llama31": ("LlamaConfig", dict(tie_word_embeddings=True, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64})),
    "mistral": ("MistralConfig", dict(tie_word_embeddings=False, sliding_window=None)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(tie_word_embeddings=False, head_dim=32)),
}


@lru_cache(maxsize=None)
def make_tokenizer():
    """A byte-level BPE (vocab 320) trained here on a small corpus: no hub needed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|bos|>", "<|eos|>", "<|user|>", "<|assistant|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>")
    fast.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
                          "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    return fast


def make_checkpoint(path: str, arch: str, seed: int | None = None, sharded: bool = False,
                    **overrides) -> str:
    """Save a random-initialised transformers model of `arch` plus the tiny tokenizer."""
    import transformers

    cls_name, extra = ARCH_CONFIGS[arch]
    tok = make_tokenizer()
    cfg_kwargs = {**BASE, **extra, **overrides, "vocab_size": len(tok),
                  "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    config = getattr(transformers, cls_name)(**cfg_kwargs)
    torch.manual_seed(seed if seed is not None else sorted(ARCH_CONFIGS).index(arch))
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path, max_shard_size="200KB" if sharded else "5GB")
    tok.save_pretrained(path)
    return path


@lru_cache(maxsize=8)
def hf_model(path: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval()


@torch.no_grad()
def hf_greedy(path: str, prompt_ids: list[int], max_tokens: int):
    """transformers' greedy continuation and each chosen token's log-softmax."""
    model = hf_model(path)
    ids = list(prompt_ids)
    out, lps = [], []
    for _ in range(max_tokens):
        logits = model(torch.tensor([ids])).logits[0, -1].float()
        lp = torch.log_softmax(logits, -1)
        tok = int(logits.argmax())
        out.append(tok)
        lps.append(float(lp[tok]))
        ids.append(tok)
    return out, lps


@torch.no_grad()
def hf_prompt_logprobs(path: str, prompt_ids: list[int]) -> list[float]:
    """log p(prompt[i] | prompt[:i]) for i >= 1."""
    model = hf_model(path)
    logits = model(torch.tensor([prompt_ids])).logits[0].float()
    lp = torch.log_softmax(logits, -1)
    return [float(lp[i - 1, prompt_ids[i]]) for i in range(1, len(prompt_ids))]


def free_port() -> int:
    """A free port below Linux's ephemeral range (32768+), where Ray's own processes take
    theirs while the server starts (a port from bind(0) was once taken that way), and
    above Ray's worker ports (10002-19999)."""
    rng = random.Random()
    while True:
        port = rng.randrange(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
