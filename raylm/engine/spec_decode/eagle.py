"""EAGLE-3 speculation, engine side: resolve and check the head checkpoint against the
target before any worker starts. The head runs on the workers
(`raylm.workers.eagle_runner.Eagle3Runner`), reading the target's aux hidden states."""
from __future__ import annotations

from raylm.engine.spec_decode.config import SpeculativeConfig
from raylm.engine.spec_decode.draft import DraftSpec, _check_tp


def resolve_eagle3(config: SpeculativeConfig, target_hf_config, max_model_len: int,
                   tensor_parallel_size: int = 1) -> DraftSpec:
    """The EAGLE-3 head of `config`: a registered head architecture, the target's
    vocabulary and hidden size, a Llama-family target, and the target layers it reads
    (the checkpoint's eagle_aux_hidden_state_layer_ids, else vLLM's (2, L//2, L-3))."""
    from raylm.workers.loader import load_config, resolve_model_path
    from raylm.workers.models import get_draft_head_class
    from raylm.workers.models.eagle3 import aux_hidden_state_layers, head_config_for
    from raylm.workers.models.llama import get_model_class

    _check_tp(config, tensor_parallel_size)
    get_model_class(target_hf_config)  # the aux hidden state hook is in the Llama family
    model_dir = resolve_model_path(config.model)
    head = head_config_for(load_config(model_dir), target_hf_config, max_model_len)
    get_draft_head_class(head)
    layers = aux_hidden_state_layers(head, target_hf_config.num_hidden_layers)
    return DraftSpec("eagle3", model_dir, config.num_speculative_tokens, layers)
