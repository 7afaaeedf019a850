"""ModelConfig.default_sampling: the sampling defaults of a checkpoint's
generation_config.json, as vLLM takes them (the fields the file sets; max_new_tokens as
max_tokens)."""
from __future__ import annotations

import json
import os
import shutil

from raylm.engine.config import EngineArgs
from raylm.engine.model_config import ModelConfig
from raylm.engine.sampling_params import SamplingParams


def _with_generation_config(src: str, dst: str, config) -> str:
    shutil.copytree(src, dst)
    path = os.path.join(dst, "generation_config.json")
    if config is None:
        if os.path.exists(path):
            os.remove(path)
    else:
        with open(path, "w") as f:
            json.dump(config, f)
    return dst


def test_default_sampling_from_generation_config(llama_dir, tmp_path):
    given = {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1,
             "max_new_tokens": 100, "do_sample": True, "eos_token_id": [5, 6], "bos_token_id": 1}
    model = ModelConfig.from_args(EngineArgs(model=_with_generation_config(llama_dir, str(tmp_path / "a"),
                                                                          given)))
    assert model.default_sampling == {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "min_p": 0.05,
                                      "repetition_penalty": 1.1, "max_tokens": 100}
    SamplingParams(**model.default_sampling)  # valid SamplingParams values
    assert {5, 6} <= set(model.eos_token_ids)  # generation_config's EOS ids still count

    # Only what the file sets: transformers' own defaults (top_k 50) are not the model's.
    few = {"temperature": 0.7, "eos_token_id": 2}
    model = ModelConfig.from_args(EngineArgs(model=_with_generation_config(llama_dir, str(tmp_path / "b"),
                                                                          few)))
    assert model.default_sampling == {"temperature": 0.7}
    none = ModelConfig.from_args(EngineArgs(model=_with_generation_config(llama_dir, str(tmp_path / "c"),
                                                                         None)))
    assert none.default_sampling == {}
