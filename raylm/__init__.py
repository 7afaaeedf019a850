"""raylm: LLM inference and serving with a paged KV cache and continuous batching."""
import importlib

__all__ = ["LLM", "SamplingParams", "StructuredOutputsParams", "RequestOutput", "CompletionOutput", "Logprob", "EngineArgs"]
__version__ = "0.1.0"

# Loaded on first use, so `import raylm.scheduler` stays free of torch and transformers.
_LAZY = {
    "LLM": "raylm.engine.llm",
    "EngineArgs": "raylm.engine.config",
    "SamplingParams": "raylm.engine.sampling_params",
    "StructuredOutputsParams": "raylm.engine.sampling_params",
    "RequestOutput": "raylm.engine.outputs",
    "CompletionOutput": "raylm.engine.outputs",
    "Logprob": "raylm.engine.outputs",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'raylm' has no attribute {name!r}")
