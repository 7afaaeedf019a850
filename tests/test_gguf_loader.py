"""GGUF conversion against transformers' own GGUF loader as the oracle, using the embedded
SmolLM2-135M-Instruct Q4_1 file (converted once per module)."""
from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch

from raylm.workers import gguf_loader

PROMPT = "The capital of France is"
TEXTS = ["Hello, world!", "naïve café — 東京 😀🚀", "  leading spaces\nand\ttabs", "def f(x):\n    return x**2"]
MESSAGES = [{"role": "user", "content": "What is 2+2? Answer with emoji 🤔."}]


@pytest.fixture(scope="module")
def gguf_path():
    return gguf_loader.default_model_path()


@pytest.fixture(scope="module")
def converted(gguf_path, tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("gguf_cache"))
    start = time.perf_counter()
    model_dir = gguf_loader.convert_gguf(gguf_path, cache_dir=cache)
    return {"dir": model_dir, "cache": cache, "seconds": time.perf_counter() - start}


def _from_gguf(cls, gguf_path, **kwargs):
    return cls.from_pretrained(os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path), **kwargs)


@pytest.fixture(scope="module")
def reference_model(gguf_path):
    from transformers import AutoModelForCausalLM

    return _from_gguf(AutoModelForCausalLM, gguf_path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizers(gguf_path, converted):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(converted["dir"]), _from_gguf(AutoTokenizer, gguf_path)


def test_default_model_path_points_at_gguf(gguf_path):
    assert gguf_loader.is_gguf(gguf_path)
    assert os.path.basename(gguf_path) == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_directory_layout(converted):
    files = set(os.listdir(converted["dir"]))
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", "special_tokens_map.json"} <= files
    assert converted["seconds"] < 60, f"conversion took {converted['seconds']:.1f}s"


def test_weights_equal_transformers_gguf_loader(converted, reference_model):
    from safetensors.torch import load_file

    ours = load_file(os.path.join(converted["dir"], "model.safetensors"))
    ref = reference_model.state_dict()
    # Tied embeddings: lm_head is the embedding, so the file omits it.
    assert set(ours) == set(ref) - {"lm_head.weight"}
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32, name
        assert tensor.shape == ref[name].shape, name
        assert torch.equal(tensor, ref[name]), name


def test_unpermute_inverts_llama_cpp_permutation():
    rng = np.random.default_rng(0)
    for n_head, rest in ((9, (5,)), (3, (7,)), (4, ())):
        w = rng.standard_normal((n_head * 8, *rest)).astype(np.float32)
        # llama.cpp converter's permutation of q/k rows.
        permuted = w.reshape(n_head, 2, 4, *rest).swapaxes(1, 2).reshape(w.shape)
        assert not np.array_equal(permuted, w)
        np.testing.assert_array_equal(gguf_loader._unpermute_rotary(permuted, n_head), w)


def test_config_matches_transformers(converted, gguf_path):
    from transformers import AutoConfig

    ours = AutoConfig.from_pretrained(converted["dir"])
    ref = _from_gguf(AutoConfig, gguf_path)
    assert ours.architectures == ["LlamaForCausalLM"] and ours.model_type == "llama"
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
                "max_position_embeddings", "tie_word_embeddings", "bos_token_id", "eos_token_id"):
        assert getattr(ours, key) == getattr(ref, key), key
    assert ours.rope_parameters["rope_theta"] == ref.rope_parameters["rope_theta"] == 100000.0
    assert ours.tie_word_embeddings is True


def test_tokenizer_matches_transformers(tokenizers):
    ours, ref = tokenizers
    for text in TEXTS:
        assert ours(text).input_ids == ref(text).input_ids, text
        assert ours.decode(ours(text).input_ids) == text
    assert (ours.bos_token_id, ours.eos_token_id) == (ref.bos_token_id, ref.eos_token_id) == (1, 2)


def test_chat_template_survives(tokenizers, converted):
    ours, ref = tokenizers
    assert ours.chat_template and ours.chat_template == ref.chat_template
    # transformers 5 returns a BatchEncoding here (older versions a plain list).
    ids, ref_ids = (tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
                    for tok in (ours, ref))
    ids, ref_ids = (x["input_ids"] if hasattr(x, "keys") else x for x in (ids, ref_ids))
    assert list(ids) == list(ref_ids) and len(ids) > 10
    text = ours.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n") and "🤔" in text
    assert ours(text).input_ids == ref(text).input_ids


def test_cache_hit_does_not_reconvert(converted, gguf_path):
    weights = os.path.join(converted["dir"], "model.safetensors")
    before = os.stat(weights).st_mtime_ns
    start = time.perf_counter()
    again = gguf_loader.convert_gguf(gguf_path, cache_dir=converted["cache"])
    assert again == converted["dir"]
    assert time.perf_counter() - start < 1.0
    assert os.stat(weights).st_mtime_ns == before
    # Only the finished directory: no temp dirs left behind.
    assert os.listdir(converted["cache"]) == [os.path.basename(converted["dir"])]


def test_cache_key_follows_size_and_mtime(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    key = gguf_loader.cache_key(str(f))
    assert key.startswith("m-") and key == gguf_loader.cache_key(str(f))
    os.utime(f, ns=(1_000_000_000, 1_000_000_000))
    assert gguf_loader.cache_key(str(f)) != key


def test_default_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("RAYLM_CACHE_DIR", str(tmp_path))
    assert gguf_loader.default_cache_dir() == os.path.join(str(tmp_path), "gguf")
    monkeypatch.delenv("RAYLM_CACHE_DIR")
    assert gguf_loader.default_cache_dir() == os.path.expanduser("~/.cache/raylm/gguf")


def test_missing_file_names_path(tmp_path):
    missing = str(tmp_path / "nope.gguf")
    assert not gguf_loader.is_gguf(missing)
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        gguf_loader.convert_gguf(missing, cache_dir=str(tmp_path / "cache"))


def test_unsupported_architecture_is_refused(tmp_path):
    import gguf

    path = str(tmp_path / "tiny-mamba.gguf")
    writer = gguf.GGUFWriter(path, arch="mamba")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match=r"'mamba'.*supported architectures: llama"):
        gguf_loader.convert_gguf(path, cache_dir=str(cache))
    assert os.listdir(cache) == []  # the failed conversion left nothing behind


def test_greedy_generate_matches_gguf_model(converted, reference_model, tokenizers):
    from transformers import LlamaForCausalLM

    ours_tok, _ = tokenizers
    model = LlamaForCausalLM.from_pretrained(converted["dir"], dtype=torch.float32).eval()
    ids = torch.tensor([ours_tok(PROMPT).input_ids])
    kwargs = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=2)
    with torch.no_grad():
        ours = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
        ref = reference_model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    assert ours.shape[1] == ids.shape[1] + 8
    assert torch.equal(ours, ref), (ours_tok.decode(ours[0]), ours_tok.decode(ref[0]))
