"""The sampler's top-k / top-p masks on a GPU (torch.topk's candidates and the sort, as
CUDA runs them) equal the definition's, at Qwen3's vocabulary and a full batch: exactly
for top-k, and up to the one token at the top-p boundary where the GPU's softmax rounds
differently from the CPU's. Skipped without a GPU."""
from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from raylm.workers.sampler import _top_k_top_p  # noqa: E402
from tests.test_sampler_filters import reference  # noqa: E402


@pytest.mark.parametrize("top_k,top_p", [(20, 0.95), (0, 0.9), (50, 1.0), (2000, 0.8)])
def test_masks_on_the_gpu_equal_the_definition(top_k, top_p):
    g = torch.Generator().manual_seed(top_k)
    logits = torch.randn(256, 151936, generator=g) * 3
    rows = [0, 1, 2, 255]  # the definition runs row by row on the CPU: a few rows suffice
    got = _top_k_top_p(logits.cuda(), [top_k] * 256, [top_p] * 256)[rows].cpu()
    want = reference(logits[rows], [top_k] * len(rows), [top_p] * len(rows))
    differ = (torch.isinf(got) != torch.isinf(want)).sum(dim=1)
    assert (differ == 0).all() if top_p == 1.0 else (differ <= 1).all(), differ
