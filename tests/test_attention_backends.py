"""The Triton attention backend against the PyTorch one through the Attention layer, on a
mixed step and a decode-only step; the clear errors of backends whose package is missing.
Without a GPU the Triton kernels run in Triton's interpreter."""
from __future__ import annotations

import importlib.util

import pytest
import torch

if not torch.cuda.is_available():
    from raylm.kernels.interpret import use_interpreter

    use_interpreter()  # before the kernel modules are imported

from raylm.workers.attention.torch_backend import TorchAttentionBackend  # noqa: E402
from raylm.workers.attention.triton_backend import TritonAttentionBackend  # noqa: E402
from raylm.workers.attention_backends import (  # noqa: E402
    AttentionMetadata, default_backend, get_attention_backend)
from raylm.workers.layers.attention import Attention  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 1e-2 if DEVICE == "cuda" else 1e-4


def make_step(seqs, block_size, num_blocks, gen):
    """seqs: (num_cached_tokens, num_new_tokens) per sequence -> metadata built as the
    model runner builds it, with shuffled blocks."""
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables, slots, query_start, seq_lens = [], [], [0], []
    for cached, new in seqs:
        n = -(-(cached + new) // block_size)
        table, perm = perm[:n], perm[n:]
        tables.append(table)
        slots.extend(table[p // block_size] * block_size + p % block_size
                     for p in range(cached, cached + new))
        query_start.append(query_start[-1] + new)
        seq_lens.append(cached + new)
    width = max(len(t) for t in tables)
    query_lens = [new for _, new in seqs]
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.long, device=DEVICE),
        query_start_loc=torch.tensor(query_start, dtype=torch.int32, device=DEVICE),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32,
                                  device=DEVICE),
        query_lens_cpu=query_lens, seq_lens_cpu=seq_lens,
        max_query_len=max(query_lens), max_seq_len=max(seq_lens))


@pytest.mark.parametrize("seqs", [
    # Two decodes, a chunked prefill on a cached prefix, a fresh prompt.
    [(20, 1), (37, 13), (0, 9), (3, 1)],
    # Decode only: the split-K decode kernel.
    [(20, 1), (70, 1), (0, 1)],
], ids=["mixed", "decode"])
def test_triton_backend_matches_torch(seqs):
    gen = torch.Generator().manual_seed(len(seqs))
    num_heads, num_kv_heads, head_dim, block_size, num_blocks = 4, 2, 32, 16, 24
    meta = make_step(seqs, block_size, num_blocks, gen)
    num_tokens = sum(new for _, new in seqs)
    q = torch.randn(num_tokens, num_heads, head_dim, generator=gen).to(DEVICE)
    k = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(DEVICE)
    v = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(DEVICE)
    # The cached prefixes: random contents the new tokens' slots are written over.
    cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(DEVICE)

    outs, caches = [], []
    for backend in (TorchAttentionBackend(), get_attention_backend("triton")):
        layer = Attention(num_heads, head_dim, num_kv_heads, head_dim ** -0.5)
        layer.kv_cache = cache.clone()
        outs.append(layer(q, k, v, meta, backend))
        caches.append(layer.kv_cache)
    assert torch.equal(caches[0], caches[1])
    torch.testing.assert_close(outs[1], outs[0], atol=TOL, rtol=TOL)


def test_triton_backend_is_registered():
    assert isinstance(get_attention_backend("triton"), TritonAttentionBackend)


@pytest.mark.parametrize("name,package,module", [
    ("flash_attn", "flash-attn-4", "flash_attn.cute"),
    ("flashinfer", "flashinfer-python", "flashinfer"),
])
def test_missing_package_names_it(name, package, module):
    try:
        installed = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # the parent package of a dotted name is missing too
        installed = False
    if installed:
        pytest.skip(f"{module} is installed")
    with pytest.raises(ImportError, match=f"attention_backend '{name}' needs the {package} package, "
                                          f"which is not installed"):
        get_attention_backend(name)


def test_default_backend():
    assert default_backend("cuda") == "auto"
    assert default_backend("cuda:1") == "auto"
    assert default_backend("cpu") == "torch"


def test_unknown_backend_names_the_choices():
    with pytest.raises(ValueError, match="attention_backend 'nope' is not available; choose from "
                                         r"\['auto', 'flash_attn', 'flashinfer', 'torch', 'triton'"):
        get_attention_backend("nope")
