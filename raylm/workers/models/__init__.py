"""Model classes by architecture name. Target models: `llama.MODEL_REGISTRY`. Draft
heads for speculative decoding (EAGLE-3), by the architecture names vLLM registers
them under, are imported only when asked for."""
from __future__ import annotations

import importlib

DRAFT_HEAD_REGISTRY = {
    "LlamaForCausalLMEagle3": "raylm.workers.models.eagle3:Eagle3LlamaForCausalLM",
    "Eagle3LlamaForCausalLM": "raylm.workers.models.eagle3:Eagle3LlamaForCausalLM",
}


def get_draft_head_class(config):
    """The EAGLE-3 head class of a head checkpoint's config (its `architectures`)."""
    archs = getattr(config, "architectures", None) or []
    for arch in archs:
        if arch in DRAFT_HEAD_REGISTRY:
            module, name = DRAFT_HEAD_REGISTRY[arch].split(":")
            return getattr(importlib.import_module(module), name)
    raise ValueError(f"speculative_config['model']: architecture {archs} is not an EAGLE-3 head; "
                     f"supported: {sorted(DRAFT_HEAD_REGISTRY)}")
