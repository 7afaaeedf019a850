"""Mixed steps (decode rows beside one prefill chunk): the Triton prefill kernel over every
row against the decode kernel on the decode rows plus the prefill kernel on the chunk, at
Llama-3.1-8B / Qwen3-0.6B head layouts (bf16, block 16). On one H200 the single launch was
as fast or faster, so mixed steps keep one kernel (benchmarks/results/mixed_attention_split.json).

    python benchmarks/mixed_attention_split.py   # writes $OUT/mixbench.json
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks import common  # noqa: E402
from raylm.kernels.attention.decode import decode_num_splits, paged_decode_attention  # noqa: E402
from raylm.kernels.attention.prefill import paged_prefill_attention  # noqa: E402

torch.manual_seed(0)
dev = "cuda"
bench = common.cuda_time_us
rows = []
for (hq, hk, name) in [(32, 8, "llama-3.1-8b"), (16, 8, "qwen3-0.6b")]:
  for ndec, ctx, pre_q, pre_ctx in [(256, 700, 512, 512), (256, 700, 2048, 2048), (128, 700, 64, 64), (200, 1500, 300, 300)]:
    D, bs = 128, 16
    seq_lens = [ctx] * ndec + [pre_ctx]
    qlens = [1] * ndec + [pre_q]
    maxb = max(-(-l // bs) for l in seq_lens)
    nblk = len(seq_lens) * maxb + 8
    kv = torch.randn(2, nblk, bs, hk, D, device=dev, dtype=torch.bfloat16)
    perm = torch.randperm(nblk - 1, device=dev)[: len(seq_lens) * maxb].view(len(seq_lens), maxb).to(torch.int32)
    bt = perm
    sl = torch.tensor(seq_lens, dtype=torch.int32, device=dev)
    qsl = torch.tensor([0] + list(__import__("itertools").accumulate(qlens)), dtype=torch.int32, device=dev)
    T = sum(qlens)
    q = torch.randn(T, hq, D, device=dev, dtype=torch.bfloat16)
    sc = D ** -0.5
    full = lambda: paged_prefill_attention(q, kv, bt, sl, qsl, sc, max(qlens))
    ns = decode_num_splits(ndec, hk, dev)
    def split():
        a = paged_decode_attention(q[:ndec], kv, bt[:ndec], sl[:ndec], sc, num_splits=ns)
        b = paged_prefill_attention(q[ndec:], kv, bt[ndec:], sl[ndec:], qsl[ndec:] - ndec, sc, pre_q)
        return torch.cat([a, b])
    err = (full().float() - split().float()).abs().max().item()
    dec_only = lambda: paged_decode_attention(q[:ndec], kv, bt[:ndec], sl[:ndec], sc, num_splits=ns)
    pre_only = lambda: paged_prefill_attention(q[ndec:], kv, bt[ndec:], sl[ndec:], qsl[ndec:] - ndec, sc, pre_q)
    r = dict(model=name, ndec=ndec, ctx=ctx, pre_q=pre_q, full_us=bench(full), split_us=bench(split),
             decode_us=bench(dec_only), prefill_us=bench(pre_only), max_abs_diff=err,
             kv_bytes_floor_us=(ndec * ctx + pre_ctx) * hk * D * 2 * 2 / 4.8e12 * 1e6)
    print(r); rows.append(r)
json.dump(rows, open(os.environ["OUT"] + "/mixbench.json", "w"), indent=1)
