"""Speculative decoding with an EAGLE-3 head (raylm.workers.models.eagle3) beside the
target's ModelRunner: the head's one-layer KV cache uses the target's block tables
(same block ids, its own tensor), and it reads the target's aux hidden states.

Each step the head runs over every row the target computed and kept (prefill chunks,
the last known token and the accepted proposals), position i taking the token at i + 1
and fc of the target's aux hidden states at i; it thereby rewrites whatever it wrote
past them before (its own proposals). Rows that want proposals then take k - 1 more
steps, each feeding back the proposal and the head's pre-norm hidden state. Those steps
write positions the target has not computed: like the draft model's, they need slots
in the block table (the scheduler's lookahead), and a row proposes at most as many
tokens as its table has slots for. These steps run eagerly (no CUDA graphs yet).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from raylm.workers.draft_runner import Proposals, draft_sample, draft_state, gather_proposals
from raylm.workers.loader import iterate_weights
from raylm.workers.messages import SamplingOptions, SeqChunk, StepPlan
from raylm.workers.model_runner import ModelRunner
from raylm.workers.models import get_draft_head_class
from raylm.workers.models.eagle3 import aux_hidden_state_layers, head_config_for
from raylm.workers.parallel_state import broadcast_from_first
from raylm.workers.sampler import SamplingState
from raylm.workers.transfer import to_device


@dataclass
class EagleRow:
    """One request's rows of the target's step that the head consumes: positions
    start_pos .. start_pos + m - 1, whose aux hidden states are rows hidden_start ..
    hidden_start + m - 1 of the step's aux tensor, and `next_token_ids` (m tokens): the
    token after each of those positions (for the last row of a prompt chunk, the next
    prompt token; for a sampling row, the token the step emitted). A row of a decode
    with proposals keeps only its last known token and the accepted ones (m = a + 1).
    `num_speculative_tokens` proposals are wanted after them (0: only the KV)."""

    request_id: str
    start_pos: int
    next_token_ids: list[int]
    hidden_start: int
    num_speculative_tokens: int
    options: SamplingOptions


class Eagle3Runner:
    """Proposes with an EAGLE-3 head. Construct it before the target's KV cache: it
    turns on the target's aux hidden states (`target.model.set_aux_hidden_state_layers`),
    after which the target's forward returns (hidden, aux [T, 3 * hidden])."""

    def __init__(self, target: ModelRunner, model_dir: str, hf_config, num_speculative_tokens: int,
                 seed: int = 0, weights=None):
        if num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1, got {num_speculative_tokens}")
        self.k = num_speculative_tokens
        self.target = target
        self.config = head_config_for(hf_config, target.hf_config, target.max_model_len)
        cls = get_draft_head_class(self.config)
        with torch.device(target.device):
            self.model = cls(self.config, dtype=target.dtype)
        self.model.load_weights(iterate_weights(model_dir) if weights is None else weights)
        if not self.model.has_own_embedding:
            if self.config.hidden_size != target.hf_config.hidden_size:
                raise ValueError(f"the EAGLE-3 head has no embed_tokens and hidden_size "
                                 f"{self.config.hidden_size}; it can share the target's only at "
                                 f"the target's hidden_size {target.hf_config.hidden_size}")
            self.model.share_embedding(target.model)
        self.model.eval()
        self.aux_hidden_state_layers = aux_hidden_state_layers(self.config, len(target.model.model.layers))
        self.attn = self.model.attention_layers()[0]
        self.kv_cache: Optional[torch.Tensor] = None
        self.states: dict[str, SamplingState] = {}
        self.generator = torch.Generator(device=target.device).manual_seed(seed + 2)

    def enable_target_aux(self) -> None:
        """Make the target's forward return the aux hidden states the head reads."""
        self.target.model.set_aux_hidden_state_layers(self.aux_hidden_state_layers)

    # ---- KV cache (one layer; the caller sizes the pool for both models) --------------
    def kv_bytes_per_block(self) -> int:
        t = self.target
        elem = torch.empty((), dtype=t.kv_cache_dtype).element_size()
        return 2 * t.block_size * self.attn.num_kv_heads * self.attn.head_dim * elem

    def allocate_kv_cache(self, num_blocks: int) -> None:
        t = self.target
        self.kv_cache = torch.zeros(2, num_blocks, t.block_size, self.attn.num_kv_heads, self.attn.head_dim,
                                    dtype=t.kv_cache_dtype, device=t.device)
        self.attn.kv_cache = self.kv_cache

    def release_kv_cache(self) -> None:
        self.attn.kv_cache = self.kv_cache = None

    def drop(self, request_ids: Sequence[str]) -> None:
        for rid in request_ids:
            self.states.pop(rid, None)

    # ---- proposing ---------------------------------------------------------------------
    @torch.inference_mode()
    def propose(self, rows: Sequence[EagleRow], aux_hidden: torch.Tensor) -> Proposals:
        """Write the head's KV for `rows` and propose up to each row's
        num_speculative_tokens (and k) tokens with their draft distributions."""
        t, dev = self.target, self.target.device
        order = [r.request_id for r in rows]
        if not rows:
            return gather_proposals([], order, dev)
        src = [r.hidden_start + j for r in rows for j in range(len(r.next_token_ids))]
        hidden = self.model.combine_hidden_states(aux_hidden[to_device(src, torch.long, dev)])
        plan = StepPlan(seqs=[SeqChunk(r.request_id, list(r.next_token_ids), r.start_pos, [], True)
                              for r in rows])
        input_ids, positions, meta, query_start = t._prepare(plan)
        normed, prenorm = self.model(input_ids, positions, hidden, meta, t.backend)
        ks, bs = {}, t.block_size
        for r in rows:
            end = r.start_pos + len(r.next_token_ids)  # the first proposal's position
            k = min(self.k, r.num_speculative_tokens, len(t.block_tables[r.request_id]) * bs - end + 1)
            if k > 0:
                ks[r.request_id] = (k, end, draft_state(self.states, r.request_id, r.options, dev))
        live = [i for i, r in enumerate(rows) if r.request_id in ks]
        if not live:
            return gather_proposals([], order, dev)
        last = to_device([query_start[i + 1] - 1 for i in live], torch.long, dev)
        return gather_proposals(self._decode(normed[last], prenorm[last], [order[i] for i in live], ks),
                                order, dev)

    def _decode(self, normed, prenorm, rids: list[str], ks: dict) -> list:
        """Sample from the head's logits, then feed each proposal back (k - 1 steps)."""
        t, dev = self.target, self.target.device
        steps = []
        for j in range(max(k for k, _, _ in ks.values())):
            positions = [ks[rid][1] + j for rid in rids]
            logits = self.model.compute_logits(normed)
            if t.tp_rank == 0:
                tokens, q = draft_sample(logits.float(), [ks[rid][2] for rid in rids], positions,
                                         self.generator)
            else:
                tokens = torch.empty(len(rids), dtype=torch.long, device=dev)
                q = torch.empty(len(rids), 0, device=dev)
            tokens = broadcast_from_first(tokens.contiguous())
            steps.append((rids, tokens, q))
            keep = [i for i, rid in enumerate(rids) if ks[rid][0] > j + 1]
            if not keep:
                break
            idx = to_device(keep, torch.long, dev)
            rids = [rids[i] for i in keep]
            plan = StepPlan(seqs=[SeqChunk(rid, [0], ks[rid][1] + j, [], True) for rid in rids])
            _, pos, meta, _ = t._prepare(plan)
            normed, prenorm = self.model(tokens[idx], pos, prenorm[idx], meta, t.backend)
        return steps


def eagle_rows(seqs: Sequence[SeqChunk], query_start: Sequence[int], emitted: dict,
               prompts: dict, options: dict, num_speculative_tokens: dict) -> list[EagleRow]:
    """The head's rows for a target step: `seqs` the plan's rows (the last
    `num_spec_tokens` of a row's tokens are proposals), `query_start` their first rows in
    the step's aux states, `emitted[rid]` what a sampling row emitted (its token, or its
    accepted proposals and the token after them), `prompts[rid]` the prompt (for a chunk
    that samples nothing, the token after its last position is the next prompt token),
    `num_speculative_tokens[rid]` the proposals wanted from a sampling row."""
    rows = []
    for i, s in enumerate(seqs):
        rid = s.request_id
        n = len(s.token_ids) - getattr(s, "num_spec_tokens", 0)
        if rid in emitted:
            nxt, k = list(s.token_ids[1:n]) + list(emitted[rid]), num_speculative_tokens.get(rid, 0)
        else:
            nxt, k = list(prompts[rid][s.start_pos + 1:s.start_pos + n + 1]), 0
        rows.append(EagleRow(rid, s.start_pos, nxt, query_start[i], k, options[rid]))
    return rows
