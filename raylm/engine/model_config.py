"""What every part of a served model agrees on, read once from the checkpoint: its
directory, HF config, vocabulary, EOS ids, context length and sampling defaults. The
engine core and the ingress (which tokenizes and detokenizes) both build one from the
same engine arguments; the cluster reads models through this, never through the
workers' loaders."""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from raylm.engine.config import EngineArgs, resolve_max_model_len

logger = logging.getLogger("raylm")


@dataclass
class ModelConfig:
    model_dir: str
    hf_config: Any
    vocab_size: int
    max_model_len: int
    eos_token_ids: list[int]
    tokenizer_path: Optional[str]  # None under skip_tokenizer_init
    # The sampling defaults of the checkpoint's generation_config.json, by SamplingParams
    # name, for requests that leave them out (as vLLM's --generation-config auto).
    default_sampling: dict = field(default_factory=dict)
    # Seconds from_args spent on each part (start-up's model_config_s, split).
    timing: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_args(cls, args: EngineArgs, check_support: bool = True) -> "ModelConfig":
        """Resolve the checkpoint; with check_support, unsupported architectures and
        quantization configs fail here, before anything is loaded."""
        marks = [("start", time.perf_counter())]
        from raylm.workers.loader import load_config, resolve_model_path

        marks.append(("imports_s", time.perf_counter()))
        model_dir = resolve_model_path(args.model)
        hf_config = load_config(model_dir)
        marks.append(("hf_config_s", time.perf_counter()))
        if check_support:
            from raylm.workers.models.llama import get_model_class
            from raylm.workers.quantization import get_quant_config

            get_model_class(hf_config)
            get_quant_config(hf_config, args.quantization)
        marks.append(("model_class_s", time.perf_counter()))
        tokenizer_path = None if args.skip_tokenizer_init else (args.tokenizer or model_dir)
        generation = _generation_config(model_dir)
        eos = _eos_token_ids(hf_config, tokenizer_path, generation)
        marks.append(("eos_and_generation_s", time.perf_counter()))
        out = cls(model_dir, hf_config, int(hf_config.vocab_size), resolve_max_model_len(args, hf_config),
                  eos, tokenizer_path, sampling_defaults_for(args.generation_config, model_dir))
        marks.append(("sampling_defaults_s", time.perf_counter()))
        out.timing = {name: round(t - marks[i][1], 3) for i, (name, t) in enumerate(marks[1:])}
        return out

    def load_tokenizer(self):
        """The HF tokenizer (None under skip_tokenizer_init)."""
        if self.tokenizer_path is None:
            return None
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.tokenizer_path)


def _generation_config(model_dir: str):
    """The checkpoint's transformers GenerationConfig, or None without generation_config.json."""
    try:
        from transformers import GenerationConfig

        return GenerationConfig.from_pretrained(model_dir)
    except Exception:  # no generation_config.json
        return None


# generation_config.json fields that become SamplingParams defaults, as vLLM takes them.
_SAMPLING_DEFAULTS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                      "min_p": "min_p", "repetition_penalty": "repetition_penalty",
                      "max_new_tokens": "max_tokens"}


def sampling_defaults_for(generation_config: str, model_dir: str) -> dict:
    """The requests' sampling defaults under vLLM's `--generation-config`: "auto" reads
    the model's generation_config.json, "vllm" none, a folder that folder's file."""
    if generation_config == "vllm":
        return {}
    found = default_sampling(model_dir if generation_config == "auto" else generation_config)
    if found:
        logger.info("sampling defaults from generation_config.json: %s (requests that set a field "
                    "win; --generation-config vllm ignores the file)", found)
    return found


def with_sampling_defaults(given: dict, defaults: dict) -> dict:
    """SamplingParams keyword arguments: `given` (what a request set) over `defaults`
    (`ModelConfig.default_sampling`, max_tokens left out: each front bounds it by the
    context left)."""
    return {**{k: v for k, v in defaults.items() if k != "max_tokens"}, **given}


def default_sampling(model_dir: str) -> dict:
    """The sampling fields that the checkpoint's generation_config.json sets ({"temperature":
    0.6, "top_p": 0.9} for many instruct models), by their SamplingParams names; {} without
    the file. Read from the JSON itself: what transformers fills in is not the model's."""
    path = os.path.join(model_dir, "generation_config.json")
    try:
        with open(path) as f:
            given = json.load(f)
    except (OSError, ValueError):
        return {}
    return {ours: given[theirs] for theirs, ours in _SAMPLING_DEFAULTS.items()
            if given.get(theirs) is not None}


def _eos_token_ids(hf_config, tokenizer_path: Optional[str], generation) -> list[int]:
    """The tokenizer's EOS (the config's without a tokenizer) plus generation_config's."""
    ids = set()
    if tokenizer_path is not None:
        from transformers import AutoTokenizer

        eos = AutoTokenizer.from_pretrained(tokenizer_path).eos_token_id
    else:
        eos = hf_config.eos_token_id
    ids.update([eos] if isinstance(eos, int) else (eos or []))
    if generation is not None:
        eos = generation.eos_token_id
        ids.update([eos] if isinstance(eos, int) else (eos or []))
    return sorted(ids)
