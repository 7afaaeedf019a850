"""The Triton attention backend against the PyTorch one through the Attention layer, on a
mixed step and a decode-only step; the clear errors of backends whose package is missing.
Without a GPU the Triton kernels run in Triton's interpreter. The FlashInfer and
FlashAttention-4 backends' calls (arguments, index arrays, cache layout, workspace size,
refusals) against stand-ins with those libraries' signatures, no package needed."""
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
@pytest.mark.parametrize("rope", [False, True], ids=["", "rope"])
def test_triton_backend_matches_torch(seqs, rope):
    """With `rope` the layer rotates q and k first: the Triton backend in one launch with
    the cache write (rotary_write_kv), the torch backend rotary then write."""
    from raylm.workers.layers.rotary import RotaryEmbedding

    gen = torch.Generator().manual_seed(len(seqs))
    num_heads, num_kv_heads, head_dim, block_size, num_blocks = 4, 2, 32, 16, 24
    meta = make_step(seqs, block_size, num_blocks, gen)
    num_tokens = sum(new for _, new in seqs)
    q = torch.randn(num_tokens, num_heads, head_dim, generator=gen).to(DEVICE)
    k = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(DEVICE)
    v = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(DEVICE)
    # The cached prefixes: random contents the new tokens' slots are written over.
    cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(DEVICE)

    rotary = RotaryEmbedding(head_dim, 128, 10000.0).to(DEVICE) if rope else None
    positions = torch.cat([torch.arange(c, c + n) for c, n in seqs]).to(DEVICE)

    outs, caches = [], []
    for backend in (TorchAttentionBackend(), get_attention_backend("triton")):
        layer = Attention(num_heads, head_dim, num_kv_heads, head_dim ** -0.5)
        layer.kv_cache = cache.clone()
        outs.append(layer(q.clone(), k.clone(), v, meta, backend, rotary, positions))
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


# ---- FlashInfer and FlashAttention-4 without their packages ---------------------------
# The backends' calls are checked against stand-ins with the signatures of
# flashinfer-python 0.6.14 (flashinfer/decode.py, flashinfer/prefill.py) and flash-attn-4
# 4.0.0b40 (flash_attn/cute/interface.py), parameters in their order up to the last one
# raylm passes: a renamed, reordered or keyword-only argument fails to bind here.
import inspect  # noqa: E402
import sys  # noqa: E402
import types  # noqa: E402

from raylm.workers.attention import flash_attn_backend, flashinfer_backend  # noqa: E402
from raylm.workers.attention_backends import AttentionShape  # noqa: E402


class _Recorder:
    calls: list = []

    def _record(self, fn, *args, **kwargs):
        bound = inspect.signature(fn).bind(self, *args, **kwargs)
        bound.apply_defaults()
        args = dict(bound.arguments)
        args.pop("self")
        _Recorder.calls.append((type(self).__name__, fn.__name__, args))
        return args


class _FIDecode(_Recorder):
    def __init__(self, float_workspace_buffer, kv_layout="NHD", use_cuda_graph=False, use_tensor_cores=False,
                 paged_kv_indptr_buffer=None, paged_kv_indices_buffer=None,
                 paged_kv_last_page_len_buffer=None, backend="auto", jit_args=None):
        self._record(_FIDecode.__init__, float_workspace_buffer, kv_layout, use_cuda_graph, use_tensor_cores,
                     paged_kv_indptr_buffer, paged_kv_indices_buffer, paged_kv_last_page_len_buffer, backend,
                     jit_args)

    def plan(self, indptr, indices, last_page_len, num_qo_heads, num_kv_heads, head_dim, page_size,
             pos_encoding_mode="NONE", window_left=-1, logits_soft_cap=None, q_data_type="float16",
             kv_data_type=None, o_data_type=None, data_type=None, sm_scale=None, rope_scale=None,
             rope_theta=None, non_blocking=True):
        self._record(_FIDecode.plan, **{k: v for k, v in locals().items() if k != "self"})

    def run(self, q, paged_kv_cache, *args, q_scale=None, k_scale=None, v_scale=None, out=None, lse=None,
            return_lse=False):
        self._record(_FIDecode.run, q, paged_kv_cache, *args, q_scale=q_scale, k_scale=k_scale,
                     v_scale=v_scale, out=out, lse=lse, return_lse=return_lse)
        return torch.zeros_like(q)


class _FIPrefill(_Recorder):
    def __init__(self, float_workspace_buffer, kv_layout="NHD", use_cuda_graph=False, qo_indptr_buf=None,
                 paged_kv_indptr_buf=None, paged_kv_indices_buf=None, paged_kv_last_page_len_buf=None,
                 custom_mask_buf=None, mask_indptr_buf=None, backend="auto", jit_args=None, jit_kwargs=None):
        self._record(_FIPrefill.__init__, **{k: v for k, v in locals().items() if k != "self"})

    def plan(self, qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len, num_qo_heads,
             num_kv_heads, head_dim_qk, page_size, head_dim_vo=None, custom_mask=None,
             packed_custom_mask=None, causal=False, pos_encoding_mode="NONE", use_fp16_qk_reduction=False,
             sm_scale=None, window_left=-1, logits_soft_cap=None, rope_scale=None, rope_theta=None,
             q_data_type="float16", kv_data_type=None, o_data_type=None, non_blocking=True):
        self._record(_FIPrefill.plan, **{k: v for k, v in locals().items() if k != "self"})

    run = _FIDecode.run


def _fa4_varlen(q, k, v, qv=None, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None,
                max_seqlen_k=None, min_seqlen_k=None, seqused_q=None, seqused_k=None, gather_kv_indices=None,
                page_table=None, softmax_scale=None, causal=False, window_size=(None, None),
                learnable_sink=None, softcap=0.0, num_splits=1, pack_gqa=None, deterministic=False,
                return_lse=False):
    _Recorder.calls.append(("fa4", "flash_attn_varlen_func", dict(locals())))
    return torch.zeros_like(q), None  # (out, lse), lse None unless return_lse


class _Event:
    def record(self):
        pass

    def synchronize(self):
        pass


@pytest.fixture
def fake_libraries(monkeypatch):
    fi = types.ModuleType("flashinfer")
    fi.BatchDecodeWithPagedKVCacheWrapper, fi.BatchPrefillWithPagedKVCacheWrapper = _FIDecode, _FIPrefill
    interface = types.ModuleType("flash_attn.cute.interface")
    interface.flash_attn_varlen_func = _fa4_varlen
    monkeypatch.setitem(sys.modules, "flashinfer", fi)
    monkeypatch.setitem(sys.modules, "flash_attn.cute.interface", interface)
    monkeypatch.setattr(torch.cuda, "Event", _Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: types.SimpleNamespace(multi_processor_count=132))  # H200
    _Recorder.calls = []
    return _Recorder.calls


def _hand_step(seq_lens, query_lens, tables):
    """Metadata on the CPU with the given block tables (rows padded with 0)."""
    width = max(len(t) for t in tables)
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    return AttentionMetadata(
        slot_mapping=torch.zeros(starts[-1], dtype=torch.long),
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        query_lens_cpu=list(query_lens), seq_lens_cpu=list(seq_lens),
        max_query_len=max(query_lens), max_seq_len=max(seq_lens))


def _unchecked(backend):
    # Our refusal turns CPU tensors away; these tests only look at the calls.
    backend.check = lambda op, q, kv_cache: AttentionShape.of(q, kv_cache)
    return backend


def _as_lists(args, names):
    return [args[n].tolist() if torch.is_tensor(args[n]) else args[n] for n in names]


def test_flashinfer_calls_match_the_library(fake_libraries):
    """Block size 16, Llama-3.1-8B's heads (32 query, 8 kv, head_dim 128), bf16 cache."""
    calls = fake_libraries
    backend = _unchecked(get_attention_backend("flashinfer"))
    cache = torch.zeros(2, 12, 16, 8, 128, dtype=torch.bfloat16)
    scale = 128 ** -0.5

    # A mixed step: a decode after 20 cached tokens (blocks 7, 3), a 13-token chunk after
    # 37 cached (blocks 5, 6, 1, 9), a fresh 9-token prompt (block 2). Two layers, one plan.
    meta = _hand_step([21, 50, 9], [1, 13, 9], [[7, 3], [5, 6, 1, 9], [2]])
    q = torch.zeros(23, 32, 128, dtype=torch.bfloat16)
    for _ in range(2):
        backend.attend(q, cache, meta, scale, k_scale=0.5, v_scale=2.0)
    assert [c[:2] for c in calls] == [("_FIPrefill", "__init__"), ("_FIPrefill", "plan"),
                                      ("_FIPrefill", "run"), ("_FIPrefill", "run")]
    init, plan, run = calls[0][2], calls[1][2], calls[2][2]
    assert init["kv_layout"] == "NHD" and init["use_cuda_graph"] is False
    assert init["float_workspace_buffer"].numel() == flashinfer_backend.WORKSPACE_BYTES
    assert _as_lists(plan, ["qo_indptr", "paged_kv_indptr", "paged_kv_indices", "paged_kv_last_page_len"]) == [
        [0, 1, 14, 23],          # query rows per sequence
        [0, 2, 6, 7],            # ceil(21 / 16), ceil(50 / 16), ceil(9 / 16) pages
        [7, 3, 5, 6, 1, 9, 2],
        [5, 2, 9]]               # 21 - 16, 50 - 48, 9
    assert all(plan[n].dtype == torch.int32 for n in ("qo_indptr", "paged_kv_indptr", "paged_kv_indices",
                                                      "paged_kv_last_page_len"))
    # Bottom-right causal (a query chunk at the end of its KV), no RoPE in the kernel.
    assert plan["causal"] is True and plan["pos_encoding_mode"] == "NONE"
    assert _as_lists(plan, ["num_qo_heads", "num_kv_heads", "head_dim_qk", "page_size", "sm_scale"]) == [
        32, 8, 128, 16, scale]
    assert plan["q_data_type"] == torch.bfloat16 and plan["kv_data_type"] == torch.bfloat16
    assert run["q"] is q and run["return_lse"] is False
    k, v = run["paged_kv_cache"]  # the (K, V) halves, each [num_blocks, block_size, Hk, D]
    assert k.shape == v.shape == (12, 16, 8, 128) and k.data_ptr() == cache[0].data_ptr()
    assert v.data_ptr() == cache[1].data_ptr() and (run["k_scale"], run["v_scale"]) == (0.5, 2.0)

    # A decode step: tensor cores for grouped heads over a bf16 cache.
    calls.clear()
    meta = _hand_step([21, 50], [1, 1], [[7, 3], [5, 6, 1, 9]])
    backend.attend(torch.zeros(2, 32, 128, dtype=torch.bfloat16), cache, meta, scale)
    init, plan = calls[0][2], calls[1][2]
    assert calls[0][0] == "_FIDecode" and init["use_tensor_cores"] is True and init["use_cuda_graph"] is False
    assert _as_lists(plan, ["indptr", "indices", "last_page_len", "num_qo_heads", "num_kv_heads", "head_dim",
                            "page_size", "pos_encoding_mode"]) == [
        [0, 2, 6], [7, 3, 5, 6, 1, 9], [5, 2], 32, 8, 128, 16, "NONE"]

    # The same decode as a captured graph of 4 rows (the padding: one token on its row's
    # first block), planned again before each replay with the step's lengths.
    calls.clear()
    graph_meta = _hand_step([1] * 4, [1] * 4, [[7, 3, 0], [5, 6, 1], [2], [8]])
    backend.graph_prepare(graph_meta, max_blocks=3)
    backend.graph_plan(graph_meta, [1, 1], [21, 40])
    backend.attend(torch.zeros(4, 32, 128, dtype=torch.bfloat16), cache, graph_meta, scale)
    assert [c[:2] for c in calls] == [("_FIDecode", "__init__"), ("_FIDecode", "plan"), ("_FIDecode", "run")]
    init, plan = calls[0][2], calls[1][2]
    assert init["use_cuda_graph"] is True and init["use_tensor_cores"] is True
    assert [init[n].shape[0] for n in ("paged_kv_indptr_buffer", "paged_kv_indices_buffer",
                                       "paged_kv_last_page_len_buffer")] == [5, 12, 4]
    assert _as_lists(plan, ["indptr", "indices", "last_page_len"]) == [[0, 2, 5, 6, 7], [7, 3, 5, 6, 1, 2, 8],
                                                                       [5, 8, 1, 1]]

    # A one-sequence prefill graph of 16 rows after 24 cached tokens.
    calls.clear()
    graph_meta = _hand_step([16], [16], [[4, 0, 0]])
    backend.graph_prepare(graph_meta, max_blocks=3)
    graph_meta.block_tables[0, :3] = torch.tensor([4, 10, 11])
    backend.graph_plan(graph_meta, [16], [40])
    init, plan = calls[0][2], calls[1][2]
    assert calls[0][0] == "_FIPrefill" and init["use_cuda_graph"] is True
    assert [init[n].shape[0] for n in ("qo_indptr_buf", "paged_kv_indptr_buf", "paged_kv_indices_buf",
                                       "paged_kv_last_page_len_buf")] == [2, 2, 3, 1]
    assert _as_lists(plan, ["qo_indptr", "paged_kv_indptr", "paged_kv_indices", "paged_kv_last_page_len",
                            "causal"]) == [[0, 16], [0, 3], [4, 10, 11], [8], True]


def test_flashinfer_fp8_cache_decode(fake_libraries):
    """An fp8 cache: the CUDA-core decode kernel at group 4, kv_data_type float8_e4m3fn."""
    calls = fake_libraries
    backend = _unchecked(get_attention_backend("flashinfer"))
    cache = torch.zeros(2, 12, 16, 8, 128, dtype=torch.float8_e4m3fn)
    backend.attend(torch.zeros(1, 32, 128, dtype=torch.bfloat16), cache, _hand_step([3], [1], [[4]]), 0.1,
                   k_scale=0.5, v_scale=2.0)
    init, plan, run = (c[2] for c in calls)
    assert init["use_tensor_cores"] is False
    assert plan["q_data_type"] == torch.bfloat16 and plan["kv_data_type"] == torch.float8_e4m3fn
    assert (run["k_scale"], run["v_scale"]) == (0.5, 2.0)


def test_flashinfer_decode_kernel_choice():
    uses = flashinfer_backend.decode_uses_tensor_cores
    bf16, fp8 = torch.bfloat16, torch.float8_e4m3fn
    assert not uses(32, 32, bf16, bf16)  # MHA: the CUDA-core kernel
    assert uses(32, 8, bf16, bf16)       # grouped heads: tensor cores
    assert not uses(32, 8, bf16, fp8)    # fp8 cache at group 4: the CUDA-core kernel
    assert not uses(16, 2, bf16, fp8)    # group 8
    # Groups the CUDA-core kernel is not built for (DISPATCH_GQA_GROUP_SIZE: 1, 2, 3, 4, 8)
    # take tensor cores, fp8 cache or not: Qwen2.5-7B's 28 / 4 = 7, 32 / 2 = 16.
    assert uses(28, 4, bf16, fp8) and uses(32, 2, bf16, fp8) and uses(40, 8, bf16, fp8)


def test_flashinfer_workspace_size():
    """float_workspace_bytes on an H200 (132 SMs), worked by hand from FlashInfer's
    PrefillPlan: split-KV partials float32 [heads, tiles, cta_tile_q, head_dim + 1], plus
    1 MiB of alignment, rounded up to MiB, at least 128 MiB."""
    ws = flashinfer_backend.float_workspace_bytes
    mib = 1 << 20
    # Eager, Llama-3.1-8B's heads: tiles <= 2 * 132 // 8 = 33, cta_tile_q <= 128:
    # 32 * 33 * 128 * 129 * 4 = 69,746,688 bytes (67 MiB), under the 128 MiB floor.
    assert ws(32, 8, 128, 132) == 128 * mib
    # A 512-row decode graph (tensor cores): cta_tile_q 16 (4 packed query rows), tiles
    # max(33, 512 * 4 / 16 + 511) = 639: 32 * 639 * 16 * 129 * 4 = 168,818,688 bytes
    # (161.0 MiB) + 1 MiB -> 162 MiB. The fixed 128 MiB would overflow.
    assert ws(32, 8, 128, 132, rows=512, tokens=512) == 162 * mib
    # 256 rows: 64 + 255 = 319 tiles, 84,277,248 bytes: the floor.
    assert ws(32, 8, 128, 132, rows=256, tokens=256) == 128 * mib
    # One kv head (MQA), eagerly: 264 tiles of 128 rows for all 32 query heads:
    # 32 * 264 * 128 * 129 * 4 = 557,973,504 bytes (532.1 MiB) + 1 MiB -> 534 MiB.
    assert ws(32, 1, 128, 132) == 534 * mib
    # head_dim 256 takes 64-row tiles: 16 * (264 // 2) * 64 * 257 * 4 = 138,952,704 bytes
    # (132.5 MiB) + 1 MiB -> 134 MiB.
    assert ws(16, 2, 256, 132) == 134 * mib
    # A 512-token one-sequence prefill graph at group 4: cta_tile_q 128, 16 tiles < 33.
    assert ws(32, 8, 128, 132, rows=1, tokens=512) == ws(32, 8, 128, 132)
    assert [flashinfer_backend._fa2_cta_tile_q(n, 128) for n in (1, 16, 17, 64, 65)] == [16, 16, 64, 64, 128]
    assert flashinfer_backend._fa2_cta_tile_q(1 << 20, 256) == 64


def test_flashinfer_memory_reserve_counts_its_workspaces(llama_dir):
    """The KV cache is sized after what FlashInfer allocates for itself: an 8 MiB int
    workspace per wrapper (a captured graph's, or an eager operation's) and the float
    workspace at the largest graph; the model runner asks its backend for it with the
    graphs it would capture (a stand-in backend records the question here)."""
    reserve = flashinfer_backend.FlashInferBackend.memory_reserve_bytes
    mib = 1 << 20
    ws = flashinfer_backend.float_workspace_bytes
    assert reserve(None, 32, 8, 128, 0, 256, 256, num_sms=132) == 2 * 8 * mib + ws(32, 8, 128, 132)
    assert reserve(None, 32, 8, 128, 60, 512, 2048, num_sms=132) == \
        62 * 8 * mib + ws(32, 8, 128, 132, rows=512, tokens=2048)
    from raylm import LLM
    from raylm.workers.cuda_graphs import graph_batch_sizes, prefill_graph_sizes
    from raylm.workers.mixed_graphs import MIXED_GRAPH_MAX_TOKENS, mixed_graph_sizes, mixed_graphs_enabled

    llm = LLM(llama_dir, dtype="float32", device="cpu", max_model_len=256, max_num_seqs=8)
    try:
        runner = llm.llm_engine.executor.runner
        asked = []

        class Stub:
            def memory_reserve_bytes(self, *args):
                asked.append(args)
                return 7

        runner.backend = Stub()
        assert runner._backend_reserve(False) == 7 and asked[-1] == (4, 2, 16, 0, 8, 8)
        assert runner._backend_reserve(True) == 7
        graphs = len(graph_batch_sizes(8)) + len(prefill_graph_sizes(256))
        if mixed_graphs_enabled():
            graphs += len(mixed_graph_sizes(MIXED_GRAPH_MAX_TOKENS))
        assert asked[-1][3] == graphs and asked[-1][5] == (MIXED_GRAPH_MAX_TOKENS if mixed_graphs_enabled() else 8)
    finally:
        llm.shutdown()
    # "auto" counts every backend it may choose (Triton's is 0).
    from raylm.workers.attention_backends import AutoAttentionBackend

    assert AutoAttentionBackend({"decode": ["triton"]}).memory_reserve_bytes(32, 8, 128, 10, 256, 2048) == 0


def test_flashinfer_graph_grows_the_workspace(fake_libraries):
    """A 512-row decode graph needs more than the eager 128 MiB: it gets a larger shared
    workspace, and the eager wrappers are made again on it at the next eager step."""
    calls = fake_libraries
    backend = _unchecked(get_attention_backend("flashinfer"))
    cache = torch.zeros(2, 12, 16, 8, 128, dtype=torch.bfloat16)
    q = torch.zeros(1, 32, 128, dtype=torch.bfloat16)
    backend.attend(q, cache, _hand_step([3], [1], [[4]]), 0.1)
    eager_ws = calls[0][2]["float_workspace_buffer"]
    graph_meta = _hand_step([1] * 512, [1] * 512, [[0]] * 512)
    backend.graph_prepare(graph_meta, max_blocks=1)
    graph_ws = calls[-1][2]["float_workspace_buffer"]
    assert eager_ws.numel() == 128 << 20 and graph_ws.numel() == 162 << 20
    # The CUDA-core decode kernel (an fp8 cache at group 4) needs no more than eagerly.
    calls.clear()
    fp8 = torch.zeros(2, 12, 16, 8, 128, dtype=torch.float8_e4m3fn)
    fp8_backend = _unchecked(get_attention_backend("flashinfer"))
    fp8_backend.attend(q, fp8, _hand_step([3], [1], [[4]]), 0.1)
    fp8_backend.graph_prepare(graph_meta, max_blocks=1)
    assert calls[-1][2]["use_tensor_cores"] is False and calls[-1][2]["use_cuda_graph"] is True
    assert calls[-1][2]["float_workspace_buffer"] is calls[0][2]["float_workspace_buffer"]
    backend.graph_prepare(graph_meta, max_blocks=1)  # the bf16 one again: no new workspace
    assert calls[-1][2]["float_workspace_buffer"] is graph_ws
    calls.clear()
    backend.attend(q, cache, _hand_step([5], [1], [[4]]), 0.1)
    assert [c[:2] for c in calls] == [("_FIDecode", "__init__"), ("_FIDecode", "plan"), ("_FIDecode", "run")]
    assert calls[0][2]["float_workspace_buffer"] is graph_ws


def test_flash_attn_call_matches_the_library(fake_libraries):
    calls = fake_libraries
    backend = _unchecked(get_attention_backend("flash_attn"))
    cache = torch.zeros(2, 12, 16, 8, 128, dtype=torch.bfloat16)
    meta = _hand_step([21, 50, 9], [1, 13, 9], [[7, 3], [5, 6, 1, 9], [2]])
    q = torch.zeros(23, 32, 128, dtype=torch.bfloat16)
    out = backend.attend(q, cache, meta, 0.125)
    assert out.shape == q.shape  # the out of (out, lse)
    (_, _, args), = calls
    assert args["q"] is q
    assert args["k"].shape == args["v"].shape == (12, 16, 8, 128)  # (num_pages, page_size, Hk, D)
    assert args["k"].data_ptr() == cache[0].data_ptr() and args["v"].data_ptr() == cache[1].data_ptr()
    assert args["cu_seqlens_q"] is meta.query_start_loc and args["seqused_k"] is meta.seq_lens
    assert args["page_table"] is meta.block_tables and args["page_table"].dtype == torch.int32
    assert args["cu_seqlens_k"] is None  # FA4 refuses it next to a page table
    assert (args["max_seqlen_q"], args["max_seqlen_k"], args["softmax_scale"]) == (13, 50, 0.125)
    assert args["causal"] is True and args["return_lse"] is False
    assert args["num_splits"] < 1  # automatic (one split on SM90)


@pytest.mark.parametrize("major,head_dim,kv_dtype,refused", [
    (9, 128, torch.bfloat16, None),
    (9, 64, torch.bfloat16, None),
    (9, 256, torch.bfloat16, None),
    (9, 80, torch.bfloat16, None),
    (9, 72, torch.bfloat16, "multiple of 16"),   # the paged gather path's "irregular head dim"
    (10, 128, torch.bfloat16, None),
    (10, 256, torch.bfloat16, None),
    (10, 192, torch.bfloat16, "to 128, or 256, on SM100"),
    (9, 128, torch.float8_e4m3fn, "no fp8 KV cache"),
    (8, 128, torch.bfloat16, "not SM8x"),
    (12, 128, torch.bfloat16, "not SM12x"),
])
def test_flash_attn_refusals(major, head_dim, kv_dtype, refused):
    shape = AttentionShape(32, 8, head_dim, 16, torch.bfloat16, kv_dtype, torch.device("cuda", 0))
    reason = flash_attn_backend.paged_refusal(major, shape)
    assert reason is None if refused is None else refused in reason
