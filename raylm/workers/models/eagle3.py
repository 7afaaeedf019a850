"""EAGLE-3 draft head for Llama-family targets, in the checkpoint layout vLLM loads
(e.g. yuhuili/EAGLE3-LLaMA3.1-Instruct-8B): `fc.weight` [hidden, 3 * target hidden],
one decoder layer `midlayer.*` (or `layers.0.*`) whose q/k/v projections read
2 * hidden (the normed token embedding, then the normed hidden state), `norm.weight`,
`lm_head.weight` over its own `draft_vocab_size` tokens, `d2t` (draft id + d2t[draft
id] = target id) and `t2d` (which target ids the draft vocabulary holds). Without
`embed_tokens.weight` the head shares the target's embedding.

The head's input at position i is the token at i + 1 and a hidden state: for positions
the target computed, fc of the target's low, middle and high layer inputs at i (the
layers `aux_hidden_state_layers` picks, as vLLM); for its own later steps, its
pre-norm output at i - 1.
"""
from __future__ import annotations

import copy
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from raylm.workers.layers.basic import ParallelLMHead, RMSNorm, VocabParallelEmbedding
from raylm.workers.layers.linear import QKVParallelLinear, default_weight_loader
from raylm.workers.models.llama import LlamaAttention, LlamaForCausalLM, LlamaMLP, load_tensor


def aux_hidden_state_layers(head_config, num_target_layers: int) -> tuple[int, ...]:
    """The target layers whose inputs feed the head: the checkpoint's
    `eagle_aux_hidden_state_layer_ids` when it names them, else vLLM's default
    (2, L // 2, L - 3) for an L-layer target. Three distinct layers of the target."""
    ids = getattr(head_config, "eagle_aux_hidden_state_layer_ids", None)
    layers = tuple(int(i) for i in ids) if ids else (2, num_target_layers // 2, num_target_layers - 3)
    if len(layers) != 3 or len(set(layers)) != 3 or not all(0 <= i < num_target_layers for i in layers):
        raise ValueError(f"EAGLE-3 needs 3 distinct target layers in [0, {num_target_layers}); "
                         f"the target has {num_target_layers} layers, which gives {list(layers)}"
                         + ("" if ids else " (vLLM's default (2, L // 2, L - 3) needs L >= 7)"))
    return layers


class Eagle3DecoderLayer(nn.Module):
    """A Llama decoder layer whose attention reads [norm(embedding), norm(hidden)]."""

    def __init__(self, config, dtype):
        super().__init__()
        bias = bool(getattr(config, "attention_bias", False))
        self.self_attn = LlamaAttention(config, dtype, bias, False, prefix="layers.0.self_attn")
        a = self.self_attn
        a.qkv_proj = QKVParallelLinear(2 * config.hidden_size, a.head_dim, a.total_num_heads,
                                       a.total_num_kv_heads, bias=bias, dtype=dtype,
                                       prefix="layers.0.self_attn.qkv_proj")
        self.mlp = LlamaMLP(config, dtype, prefix="layers.0.mlp")
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps, dtype=dtype)
        self.hidden_norm = RMSNorm(config.hidden_size, eps, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps, dtype=dtype)
        self.norm_before_residual = bool(getattr(config, "norm_before_residual", False))

    def forward(self, positions, embeds, hidden, meta, backend):
        embeds = self.input_layernorm(embeds)
        if self.norm_before_residual:
            hidden = self.hidden_norm(hidden)
            residual = hidden
        else:
            residual = hidden
            hidden = self.hidden_norm(hidden)
        x = self.self_attn(positions, torch.cat([embeds, hidden], dim=-1), meta, backend)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class Eagle3LlamaForCausalLM(nn.Module):
    """The head: `forward` returns (normed hidden, for logits; pre-norm hidden, the
    next step's input); `compute_logits` gives target-vocabulary logits (-inf outside
    the draft vocabulary)."""

    def __init__(self, config, dtype: Optional[torch.dtype] = None, quant_config=None):
        super().__init__()
        if quant_config is not None:
            raise ValueError("quantized EAGLE-3 heads are not supported")
        layers = getattr(config, "num_hidden_layers", 1)
        if layers != 1:
            raise ValueError(f"EAGLE-3 head has num_hidden_layers {layers}; only 1 is supported")
        self.config = config
        hidden = config.hidden_size
        self.vocab_size = config.vocab_size
        self.draft_vocab_size = getattr(config, "draft_vocab_size", None) or config.vocab_size
        target_hidden = getattr(config, "target_hidden_size", None) or hidden
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, hidden, dtype=dtype)
        self.embed_tokens.weight.optional = True  # shared with the target when absent
        self.fc = nn.Module()
        self.fc.weight = nn.Parameter(torch.empty(hidden, 3 * target_hidden, dtype=dtype),
                                      requires_grad=False)
        self.fc.weight.weight_loader = default_weight_loader
        self.layers = nn.ModuleList([Eagle3DecoderLayer(config, dtype)])
        self.norm = RMSNorm(hidden, config.rms_norm_eps, dtype=dtype)
        self.lm_head = ParallelLMHead(self.draft_vocab_size, hidden, dtype=dtype)
        self.register_buffer("d2t", torch.zeros(self.draft_vocab_size, dtype=torch.long))
        self.has_own_embedding = False

    def combine_hidden_states(self, aux: torch.Tensor) -> torch.Tensor:
        """fc of the target's concatenated aux hidden states [T, 3 * target hidden]."""
        return F.linear(aux, self.fc.weight)

    def forward(self, input_ids, positions, hidden, meta, backend):
        h, residual = self.layers[0](positions, self.embed_tokens(input_ids), hidden, meta, backend)
        return self.norm(h, residual)

    def compute_logits(self, hidden: torch.Tensor) -> Optional[torch.Tensor]:
        logits = self.lm_head(hidden)
        if logits is None:  # TP ranks > 0
            return None
        out = logits.new_full((logits.shape[0], self.vocab_size), float("-inf"))
        out[:, self.target_ids()] = logits
        return out

    def target_ids(self) -> torch.Tensor:
        return torch.arange(self.draft_vocab_size, device=self.d2t.device) + self.d2t

    def attention_layers(self):
        return [self.layers[0].self_attn.attn]

    def share_embedding(self, target: LlamaForCausalLM) -> None:
        self.embed_tokens.weight = target.model.embed_tokens.weight

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load a checkpoint in vLLM's EAGLE-3 layout; returns the names loaded."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        t2d = None
        for name, tensor in weights:
            name = name.removeprefix("model.").replace("midlayer.", "layers.0.")
            if name == "d2t":
                self._load_d2t(tensor)
                loaded.add(name)
                continue
            if name == "t2d":
                t2d = tensor
                continue
            loaded.add(load_tensor(params, LlamaForCausalLM.stacked_params, name, tensor,
                                   "EAGLE-3 checkpoint"))
        missing = sorted(n for n in set(params) - loaded if not getattr(params[n], "optional", False))
        if missing:
            raise ValueError(f"EAGLE-3 checkpoint is missing weights: {missing[:8]}")
        if "d2t" not in loaded and self.draft_vocab_size != self.vocab_size:
            raise ValueError(f"EAGLE-3 checkpoint has draft_vocab_size {self.draft_vocab_size} "
                             f"< vocab_size {self.vocab_size} but no d2t mapping")
        if t2d is not None:
            self._check_t2d(t2d)
        self.has_own_embedding = "embed_tokens.weight" in loaded
        return loaded

    def _load_d2t(self, d2t: torch.Tensor) -> None:
        if tuple(d2t.shape) != (self.draft_vocab_size,):
            raise ValueError(f"EAGLE-3 d2t has shape {tuple(d2t.shape)}; draft_vocab_size is "
                             f"{self.draft_vocab_size}")
        ids = torch.arange(self.draft_vocab_size) + d2t.long().cpu()
        if ids.min() < 0 or ids.max() >= self.vocab_size or len(set(ids.tolist())) != len(ids):
            raise ValueError(f"EAGLE-3 d2t must map the {self.draft_vocab_size} draft ids to distinct "
                             f"target ids in [0, {self.vocab_size})")
        self.d2t.copy_(d2t)

    def _check_t2d(self, t2d: torch.Tensor) -> None:
        mask = torch.zeros(self.vocab_size, dtype=torch.bool)
        mask[self.target_ids().cpu()] = True
        if tuple(t2d.shape) != (self.vocab_size,) or not torch.equal(t2d.bool().cpu(), mask):
            raise ValueError("EAGLE-3 t2d does not mark exactly the target ids that d2t maps to")


def head_config_for(head_config, target_config, max_model_len: int):
    """A copy of the head's config checked against the target's, with positions up to
    max_model_len (heads ship a short max_position_embeddings, as vLLM overrides)."""
    if head_config.vocab_size != target_config.vocab_size:
        raise ValueError(f"speculative_config['model']: the EAGLE-3 head has vocab_size "
                         f"{head_config.vocab_size}; the target model has vocab_size "
                         f"{target_config.vocab_size}; they must be equal")
    target_hidden = getattr(head_config, "target_hidden_size", None) or head_config.hidden_size
    if target_hidden != target_config.hidden_size:
        raise ValueError(f"speculative_config['model']: the EAGLE-3 head reads target hidden states "
                         f"of size {target_hidden}; the target's hidden_size is {target_config.hidden_size}")
    cfg = copy.deepcopy(head_config)
    cfg.max_position_embeddings = max(getattr(cfg, "max_position_embeddings", 0) or 0, max_model_len)
    return cfg
