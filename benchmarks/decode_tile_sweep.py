"""The Triton decode kernel's tile (block_n) and split count, swept at Llama-3.1-8B's layout
(32 query heads, 8 kv heads, bf16, block 16) against the default choice and the bandwidth
floor (benchmarks/results/decode_tile_sweep.json).

    python benchmarks/decode_tile_sweep.py   # writes $OUT/decsweep.json
"""
import itertools
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks import common  # noqa: E402
from raylm.kernels.attention.decode import decode_num_splits, paged_decode_attention  # noqa: E402

dev = "cuda"
bench = common.cuda_time_us
rows = []
for hq, hk in [(32, 8)]:
  for n, ctx in [(256, 700), (256, 1500), (64, 4096), (1, 8192), (16, 2048)]:
    D, bs = 128, 16
    maxb = -(-ctx // bs); nblk = n * maxb + 8
    kv = torch.randn(2, nblk, bs, hk, D, device=dev, dtype=torch.bfloat16)
    bt = torch.randperm(nblk - 1, device=dev)[: n * maxb].view(n, maxb).to(torch.int32)
    sl = torch.full((n,), ctx, dtype=torch.int32, device=dev)
    q = torch.randn(n, hq, D, device=dev, dtype=torch.bfloat16)
    floor = n * ctx * hk * D * 4 / 4.8e12 * 1e6
    default = bench(lambda: paged_decode_attention(q, kv, bt, sl, D ** -0.5, num_splits=decode_num_splits(n, hk, dev)))
    best = (default, "default")
    for bn, ns in itertools.product([16, 32, 64, 128], [1, 2, 4, 8, 16, 32]):
        try:
            t = bench(lambda: paged_decode_attention(q, kv, bt, sl, D ** -0.5, num_splits=ns, block_n=bn))
        except Exception:  # a tile the kernel cannot take at this shape
            continue
        if t < best[0]: best = (t, f"block_n={bn} splits={ns}")
    r = dict(n=n, ctx=ctx, default_us=default, default_splits=decode_num_splits(n, hk, dev), best_us=best[0], best=best[1], floor_us=floor)
    print(r); rows.append(r)
json.dump(rows, open(os.environ["OUT"] + "/decsweep.json", "w"), indent=1)
