"""Draft-model speculation, engine side: resolve and check the draft checkpoint before
any worker starts, and size what the scheduler and the KV pool must hold for it. The
proposing itself runs on the workers (`raylm.workers.draft_runner.DraftModelRunner`)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from raylm.engine.spec_decode.config import SpeculativeConfig


@dataclass
class DraftSpec:
    """What a worker needs to build its proposer: the method ("draft_model" or
    "eagle3"), the checkpoint directory, k, and for EAGLE-3 the target layers whose
    inputs the head reads."""

    method: str
    model_dir: str
    num_speculative_tokens: int
    aux_hidden_state_layers: tuple[int, ...] = ()
    draft_tensor_parallel_size: Optional[int] = None  # 1: a draft model on TP rank 0 alone


def worker_spec_decode(config: Optional[SpeculativeConfig], target_hf_config, max_model_len: int,
                       tensor_parallel_size: int = 1) -> Optional[dict]:
    """The checked DraftSpec of a model-based method as the workers take it (a plain
    dict, `ModelRunner(spec_decode=...)`); None for n-gram speculation or none."""
    if config is None or config.method == "ngram":
        return None
    if config.method == "draft_model":
        spec = resolve_draft_model(config, target_hf_config, max_model_len, tensor_parallel_size)
    else:
        from raylm.engine.spec_decode.eagle import resolve_eagle3

        spec = resolve_eagle3(config, target_hf_config, max_model_len, tensor_parallel_size)
    return dataclasses.asdict(spec)


def num_lookahead_tokens(config: Optional[SpeculativeConfig]) -> int:
    """Slots past a decode's verified tokens that the scheduler should hold for the
    proposer (vLLM's num_lookahead_tokens): a model writes its proposals' KV there.
    N-gram proposals need none."""
    if config is None or config.method == "ngram":
        return 0
    return config.num_speculative_tokens


def num_kv_blocks(kv_budget_bytes: int, target_bytes_per_block: int, draft_bytes_per_block: int) -> int:
    """Blocks of the shared pool: each block id holds the target's and the draft's KV."""
    return max(0, kv_budget_bytes // (target_bytes_per_block + draft_bytes_per_block))


def _check_tp(config: SpeculativeConfig, tensor_parallel_size: int, solo: bool = False) -> None:
    """`solo`: the proposer can also run whole on TP rank 0 (draft_tensor_parallel_size 1)."""
    tp = config.draft_tensor_parallel_size
    if tp is not None and tp != tensor_parallel_size and not (solo and tp == 1):
        allowed = f"1 or the target's tensor_parallel_size ({tensor_parallel_size})" if solo else \
            f"the target's tensor_parallel_size ({tensor_parallel_size}): an EAGLE-3 head runs on the target's ranks"
        raise ValueError(f"speculative_config['draft_tensor_parallel_size'] is {tp}; it must be {allowed}")


def resolve_draft_model(config: SpeculativeConfig, target_hf_config, max_model_len: int,
                        tensor_parallel_size: int = 1) -> DraftSpec:
    """The draft checkpoint of `config` (method "draft_model"), checked against the
    target: same vocabulary, positions up to max_model_len, a supported architecture."""
    from raylm.workers.draft_runner import check_vocab
    from raylm.workers.loader import load_config, resolve_model_path
    from raylm.workers.models.llama import get_model_class

    _check_tp(config, tensor_parallel_size, solo=True)
    model_dir = resolve_model_path(config.model)
    draft = load_config(model_dir)
    check_vocab(target_hf_config, draft)
    get_model_class(draft)
    max_pos = getattr(draft, "max_position_embeddings", None)
    if max_pos is not None and max_pos < max_model_len:
        raise ValueError(f"speculative_config['model']: the draft model's max_position_embeddings is "
                         f"{max_pos}; max_model_len is {max_model_len}; lower max_model_len or pick "
                         f"a draft that covers it")
    tp = config.draft_tensor_parallel_size
    return DraftSpec("draft_model", model_dir, config.num_speculative_tokens,
                     draft_tensor_parallel_size=1 if tp == 1 and tensor_parallel_size > 1 else None)
