"""The plain PyTorch attention backend: the reference, and the CPU path."""
from __future__ import annotations

import torch
import torch.nn.functional as F

# The one definition of how a value is stored in the cache, shared with the Triton KV
# write's reference (IEEE division by the scale, clamp to +-448, then the cast).
from raylm.kernels.attention.kv_cache import quantize_kv
from raylm.workers.attention_backends import AttentionBackend

FP8_KV_DTYPE = torch.float8_e4m3fn


def dequantize_kv(x: torch.Tensor, dtype: torch.dtype, scale: float) -> torch.Tensor:
    """Cache contents in `dtype` (the query's): float(x) * scale for fp8."""
    if x.dtype == FP8_KV_DTYPE:
        return (x.float() * scale).to(dtype)
    return x.to(dtype)


class TorchAttentionBackend(AttentionBackend):
    """Reference backend: gather each sequence's K/V through its block table, then
    scaled-dot-product attention with a causal offset. GQA by repeating kv heads. An fp8
    cache is quantized on write and dequantized to the query's dtype on read."""

    name = "torch"
    supports_fp8_kv_cache = True

    def write_kv(self, k, v, kv_cache, slot_mapping, k_scale=1.0, v_scale=1.0):
        num_kv_heads, head_dim = kv_cache.shape[-2:]
        kv_cache[0].view(-1, num_kv_heads, head_dim)[slot_mapping] = quantize_kv(k, kv_cache.dtype, k_scale)
        kv_cache[1].view(-1, num_kv_heads, head_dim)[slot_mapping] = quantize_kv(v, kv_cache.dtype, v_scale)

    def attend(self, q, kv_cache, meta, scale, k_scale=1.0, v_scale=1.0):
        block_size = kv_cache.shape[2]
        num_heads = q.shape[1]
        num_kv_heads, head_dim = kv_cache.shape[-2:]
        group = num_heads // num_kv_heads
        out = torch.empty_like(q)
        starts = meta.query_start_loc.tolist()
        for i, (q_len, seq_len) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu)):
            num_blocks = -(-seq_len // block_size)
            blocks = meta.block_tables[i, :num_blocks].long()
            k = dequantize_kv(kv_cache[0, blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len],
                              q.dtype, k_scale)
            v = dequantize_kv(kv_cache[1, blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len],
                              q.dtype, v_scale)
            if group > 1:
                k = k.repeat_interleave(group, dim=1)
                v = v.repeat_interleave(group, dim=1)
            qi = q[starts[i]:starts[i] + q_len]
            mask = None
            if q_len > 1:
                # Query j sits at position seq_len - q_len + j and sees keys up to it.
                qpos = torch.arange(seq_len - q_len, seq_len, device=q.device)
                kpos = torch.arange(seq_len, device=q.device)
                mask = kpos[None, :] <= qpos[:, None]
            o = F.scaled_dot_product_attention(
                qi.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                attn_mask=mask, scale=scale)
            out[starts[i]:starts[i] + q_len] = o.transpose(0, 1)
        return out
