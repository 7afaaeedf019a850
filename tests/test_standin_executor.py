"""The stand-in executor's draw for grammar rows (raylm/engine/standin_executor.py): one
token per row that the row's packed bitmask allows, below the model's vocabulary."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from raylm.engine.standin_executor import allowed_tokens


def _pack(allowed: list[set[int]], words: int) -> torch.Tensor:
    mask = np.zeros((len(allowed), words), dtype=np.uint32)
    for i, toks in enumerate(allowed):
        for t in toks:
            mask[i, t // 32] |= np.uint32(1 << (t % 32))
    return torch.from_numpy(mask.view(np.int32))


@pytest.mark.parametrize("as_bytes", [False, True])
def test_each_row_gets_a_token_it_allows_below_the_vocabulary(as_bytes):
    vocab = 100  # 4 words, the last one holding tokens 96..99 and 28 bits past the vocabulary
    rows = [{7}, {31, 32, 95}, {99, 120, 127}, set(range(100)), {3, 126}, {96}]
    mask = _pack(rows, 4)
    if as_bytes:
        mask = mask.numpy().tobytes()
    rng = np.random.default_rng(0)
    seen = [set() for _ in rows]
    for _ in range(200):
        got = allowed_tokens(mask, len(rows), vocab, rng)
        for i, t in enumerate(got):
            assert t in rows[i] and t < vocab, (i, t)
            seen[i].add(t)
    assert seen[1] == {31, 32, 95} and seen[2] == {99} and seen[4] == {3} and len(seen[3]) > 10


def test_a_row_with_no_token_below_the_vocabulary_is_an_error():
    mask = _pack([{5}, {110, 127}], 4)  # row 1 allows only ids past a 100-token vocabulary
    with pytest.raises(RuntimeError, match="bitmask row 1 allows no token below 100"):
        allowed_tokens(mask, 2, 100, np.random.default_rng(0))
