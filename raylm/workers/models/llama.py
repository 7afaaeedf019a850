"""Llama-family decoder (Llama 2/3/3.1, Mistral, Qwen2, Qwen3 differ only in flags):
qkv bias (Qwen2), per-head q/k RMSNorm (Qwen3), llama3 RoPE scaling, GQA, a head_dim
that need not be hidden_size / num_heads, tied or untied embeddings."""
from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn

from raylm.workers.layers.attention import Attention, AttentionBackend, AttentionMetadata
from raylm.workers.layers.basic import ParallelLMHead, RMSNorm, SiluAndMul, VocabParallelEmbedding
from raylm.workers.layers.linear import (MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear,
                                        gate_up_silu)
from raylm.workers.layers.rotary import RotaryEmbedding, rope_parameters


class LlamaAttention(nn.Module):
    def __init__(self, config, dtype, qkv_bias: bool, qk_norm: bool, quant_config=None, prefix: str = ""):
        super().__init__()
        hidden = config.hidden_size
        self.total_num_heads = config.num_attention_heads
        self.total_num_kv_heads = getattr(config, "num_key_value_heads", None) or self.total_num_heads
        self.head_dim = getattr(config, "head_dim", None) or hidden // self.total_num_heads
        self.qkv_proj = QKVParallelLinear(hidden, self.head_dim, self.total_num_heads,
                                          self.total_num_kv_heads, bias=qkv_bias, dtype=dtype,
                                          quant_config=quant_config, prefix=f"{prefix}.qkv_proj")
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.o_proj = RowParallelLinear(self.total_num_heads * self.head_dim, hidden,
                                        bias=getattr(config, "o_bias", False), dtype=dtype,
                                        quant_config=quant_config, prefix=f"{prefix}.o_proj")
        self.qk_norm = qk_norm
        if qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, dtype=dtype)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, dtype=dtype)
        theta, scaling = rope_parameters(config)
        self.rotary_emb = RotaryEmbedding(self.head_dim, config.max_position_embeddings, theta, scaling)
        self.attn = Attention(self.num_heads, self.head_dim, self.num_kv_heads, self.head_dim ** -0.5)

    def forward(self, positions, hidden, meta: AttentionMetadata, backend: AttentionBackend):
        qkv = self.qkv_proj(hidden)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return self.o_proj(self.attn(q, k, v, meta, backend, self.rotary_emb, positions))


class LlamaMLP(nn.Module):
    def __init__(self, config, dtype, quant_config=None, prefix: str = ""):
        super().__init__()
        inter = config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [inter, inter],
                                                       bias=getattr(config, "mlp_bias", False), dtype=dtype,
                                                       quant_config=quant_config, prefix=f"{prefix}.gate_up_proj")
        self.down_proj = RowParallelLinear(inter, config.hidden_size,
                                           bias=getattr(config, "mlp_bias", False), dtype=dtype,
                                           quant_config=quant_config, prefix=f"{prefix}.down_proj")
        self.act = SiluAndMul()

    def forward(self, x):
        h = gate_up_silu(x, self.gate_up_proj)
        if h is None:
            h = self.act(self.gate_up_proj(x))
        return self.down_proj(h)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, dtype, qkv_bias: bool, qk_norm: bool, quant_config=None, prefix: str = ""):
        super().__init__()
        self.self_attn = LlamaAttention(config, dtype, qkv_bias, qk_norm, quant_config, f"{prefix}.self_attn")
        self.mlp = LlamaMLP(config, dtype, quant_config, f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)

    def forward(self, positions, hidden, residual, meta, backend):
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, meta, backend)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, config, dtype, qkv_bias: bool, qk_norm: bool, quant_config=None):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, dtype, qkv_bias, qk_norm, quant_config,
                                                      f"model.layers.{i}")
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
        # EAGLE-3: layers whose input (hidden + residual) the forward pass also returns.
        self.aux_hidden_state_layers: tuple[int, ...] = ()

    def forward(self, input_ids, positions, meta, backend):
        hidden = self.embed_tokens(input_ids)
        if self.aux_hidden_state_layers:
            return self._forward_with_aux(hidden, positions, meta, backend)
        residual = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, meta, backend)
        hidden, _ = self.norm(hidden, residual)
        return hidden

    def _forward_with_aux(self, hidden, positions, meta, backend):
        """(final hidden, [T, len(aux layers) * hidden]): the input of each aux layer
        (hidden + residual, as vLLM takes it), concatenated in layer order."""
        aux, residual = [], None
        for i, layer in enumerate(self.layers):
            if i in self.aux_hidden_state_layers:
                aux.append(hidden if residual is None else hidden + residual)
            hidden, residual = layer(positions, hidden, residual, meta, backend)
        hidden, _ = self.norm(hidden, residual)
        return hidden, torch.cat(aux, dim=-1)


def load_tensor(params: dict, stacked_params, name: str, tensor: torch.Tensor,
                what: str = "checkpoint") -> str:
    """Copy one checkpoint tensor (HF name) into its parameter: a stacked parameter's shard
    when `stacked_params` ((ours, theirs, shard id) triples) maps the name, else the
    parameter of that name. Returns the parameter's name; `what` names the checkpoint in
    errors."""
    for ours, theirs, shard_id in stacked_params:
        if theirs in name:
            target = name.replace(theirs, ours)
            if target not in params:
                raise ValueError(f"{what} tensor {name!r} has no matching parameter")
            params[target].weight_loader(params[target], tensor, shard_id)
            return target
    if name not in params:
        raise ValueError(f"{what} tensor {name!r} has no matching parameter")
    loader = getattr(params[name], "weight_loader", None)
    if loader is None:
        raise ValueError(f"parameter {name!r} has no weight loader")
    loader(params[name], tensor)
    return name


class LlamaForCausalLM(nn.Module):
    """The causal LM: `forward` returns final hidden states for every packed token;
    `compute_logits` projects the rows that need them.

    Under tensor parallelism each rank holds num_heads/tp query heads and num_kv_heads/tp
    kv heads (one replicated kv head when num_kv_heads < tp), 1/tp of the MLP and of the
    vocabulary; norms (Qwen3's per-head q/k norms too) are replicated."""

    qkv_bias_default = False
    qk_norm = False
    # checkpoint name fragment -> (our parameter fragment, shard id)
    stacked_params = [
        (".qkv_proj.", ".q_proj.", "q"),
        (".qkv_proj.", ".k_proj.", "k"),
        (".qkv_proj.", ".v_proj.", "v"),
        (".gate_up_proj.", ".gate_proj.", 0),
        (".gate_up_proj.", ".up_proj.", 1),
    ]

    def __init__(self, config, dtype: Optional[torch.dtype] = None, quant_config=None):
        super().__init__()
        self.config = config
        qkv_bias = getattr(config, "attention_bias", self.qkv_bias_default) or self.qkv_bias_default
        # The LM head and embeddings stay dense; quant_config covers the decoder's linears.
        self.model = LlamaModel(config, dtype, qkv_bias, self.qk_norm, quant_config)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, dtype=dtype)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids, positions, meta: AttentionMetadata, backend: AttentionBackend):
        return self.model(input_ids, positions, meta, backend)

    def compute_logits(self, hidden: torch.Tensor) -> Optional[torch.Tensor]:
        """Logits over the whole vocabulary for `hidden`'s rows; every TP rank must call
        it (it is a collective), and only rank 0 gets the logits (others get None)."""
        return self.lm_head(hidden)

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.model.layers]

    def get_eagle3_aux_hidden_state_layers(self) -> tuple[int, ...]:
        """vLLM's default EAGLE-3 layers: low, middle and high (2, L // 2, L - 3)."""
        n = len(self.model.layers)
        return (2, n // 2, n - 3)

    def set_aux_hidden_state_layers(self, layers) -> None:
        """Make `forward` return (hidden, aux) with the inputs of `layers` (empty: off)."""
        layers = tuple(int(i) for i in layers)
        n = len(self.model.layers)
        if any(not 0 <= i < n for i in layers) or len(set(layers)) != len(layers):
            raise ValueError(f"aux hidden state layers {list(layers)} must be distinct layer "
                             f"indices in [0, {n}) (the target has {n} layers)")
        self.model.aux_hidden_state_layers = layers

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy checkpoint tensors (HF names) into this rank's parameters; returns the
        names of the parameters that were loaded."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            if name == "lm_head.weight" and self.tie_word_embeddings:
                continue
            loaded.add(load_tensor(params, self.stacked_params, name, tensor))
        if self.tie_word_embeddings:
            loaded.add("lm_head.weight")
        missing = {n for n in set(params) - loaded if not getattr(params[n], "optional", False)}
        if missing:
            raise ValueError(f"checkpoint is missing weights: {sorted(missing)[:8]}")
        del params  # let online quantization free each dense weight as it goes
        for module in self.modules():
            if hasattr(module, "process_weights_after_loading") and module is not self:
                module.process_weights_after_loading()
        return loaded


class MistralForCausalLM(LlamaForCausalLM):
    """Mistral is Llama's architecture (its sliding window is not used: max_model_len
    is capped at the window)."""


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2/Qwen2.5: Llama with a bias on the q, k and v projections."""

    qkv_bias_default = True


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Qwen3: Llama with RMSNorm on each head of q and k before RoPE."""

    qk_norm = True


MODEL_REGISTRY = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
}


def get_model_class(config):
    archs = getattr(config, "architectures", None) or []
    for arch in archs:
        if arch in MODEL_REGISTRY:
            return MODEL_REGISTRY[arch]
    raise ValueError(f"architecture {archs} is not supported; supported: {sorted(MODEL_REGISTRY)}")
