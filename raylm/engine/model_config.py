"""What every part of a served model agrees on, read once from the checkpoint: its
directory, HF config, vocabulary, EOS ids and context length. The engine core and the
ingress (which tokenizes and detokenizes) both build one from the same engine arguments;
the cluster reads models through this, never through the workers' loaders."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from raylm.engine.config import EngineArgs, resolve_max_model_len


@dataclass
class ModelConfig:
    model_dir: str
    hf_config: Any
    vocab_size: int
    max_model_len: int
    eos_token_ids: list[int]
    tokenizer_path: Optional[str]  # None under skip_tokenizer_init

    @classmethod
    def from_args(cls, args: EngineArgs, check_support: bool = True) -> "ModelConfig":
        """Resolve the checkpoint; with check_support, unsupported architectures and
        quantization configs fail here, before anything is loaded."""
        from raylm.workers.loader import load_config, resolve_model_path

        model_dir = resolve_model_path(args.model)
        hf_config = load_config(model_dir)
        if check_support:
            from raylm.workers.models.llama import get_model_class
            from raylm.workers.quantization import get_quant_config

            get_model_class(hf_config)
            get_quant_config(hf_config, args.quantization)
        tokenizer_path = None if args.skip_tokenizer_init else (args.tokenizer or model_dir)
        return cls(model_dir, hf_config, int(hf_config.vocab_size), resolve_max_model_len(args, hf_config),
                   _eos_token_ids(model_dir, hf_config, tokenizer_path), tokenizer_path)

    def load_tokenizer(self):
        """The HF tokenizer (None under skip_tokenizer_init)."""
        if self.tokenizer_path is None:
            return None
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.tokenizer_path)


def _eos_token_ids(model_dir: str, hf_config, tokenizer_path: Optional[str]) -> list[int]:
    """The tokenizer's EOS (the config's without a tokenizer) plus generation_config's."""
    ids = set()
    if tokenizer_path is not None:
        from transformers import AutoTokenizer

        eos = AutoTokenizer.from_pretrained(tokenizer_path).eos_token_id
    else:
        eos = hf_config.eos_token_id
    ids.update([eos] if isinstance(eos, int) else (eos or []))
    try:
        from transformers import GenerationConfig

        eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
        ids.update([eos] if isinstance(eos, int) else (eos or []))
    except Exception:  # no generation_config.json
        pass
    return sorted(ids)
