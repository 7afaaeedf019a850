"""Speculative decoding with a draft model: a smaller model of the target's vocabulary
proposes k tokens per request, with the distribution q it drew each from (for rejection
sampling, `spec_verify.verify_rejection`).

The draft runs through its own `ModelRunner` (models, paged attention, CUDA graphs: the
k - 1 one-token steps replay its decode graphs on CUDA) with its own KV cache tensors
but the target's block tables: one table per request serves both models, so the draft's
blocks come out of the same block-manager budget (`kv_bytes_per_block` counts both).

Per request the draft remembers what it wrote: positions below the request's token
count at its last call hold those tokens, and after them the proposals it fed back. A
call first catches up on the tokens it has not computed (the newly accepted ones and
the newest sample; a rejected proposal's position is recomputed), then runs k steps.
Positions past the table's blocks cannot be written, so a request proposes at most as
many tokens as its table has slots for (the scheduler's lookahead slots, vLLM's
`num_lookahead_tokens`); a block that left the table since the write is not trusted.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from raylm.workers.messages import PLACEHOLDER_TOKEN, SamplingOptions, SeqChunk, StepPlan
from raylm.workers.model_runner import KV_CACHE_DTYPES, ModelRunner
from raylm.workers.parallel_state import broadcast_from_first
from raylm.workers.sampler import SamplingState, _filter, draw_seed, seeded_noise_rows
from raylm.workers.transfer import to_device

# Keeps a seeded request's draft draws apart from its sampling and acceptance draws.
_DRAFT_SALT = 0x2545F4914F6CDD1D


@dataclass
class Proposals:
    """Per request its proposals (possibly none), and `draft_probs` (float32 [sum k_i,
    V], the rows of every proposal in order): the distribution each was drawn from."""

    token_ids: list[list[int]]
    draft_probs: torch.Tensor


def check_vocab(target_config, draft_config, what: str = "draft model") -> None:
    """The draft must share the target's vocabulary (the proposals are target ids)."""
    tv, dv = target_config.vocab_size, draft_config.vocab_size
    if tv != dv:
        raise ValueError(f"speculative_config['model']: the {what} has vocab_size {dv}; the "
                         f"target model has vocab_size {tv}; they must be equal")


def draft_sample(logits: torch.Tensor, states: Sequence[SamplingState], positions: Sequence[int],
                 generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [B], q [B, V]): one draw per row of `logits` (float32) from q, the
    temperature / top-k / top-p / min-p filtered softmax; greedy rows take the argmax
    (q one-hot). A seeded row's draw depends only on (seed, the token's position)."""
    greedy = [st.is_greedy for st in states]
    argmax = logits.argmax(dim=1)
    if all(greedy):
        return argmax, torch.zeros_like(logits).scatter_(1, argmax.view(-1, 1), 1.0)
    probs = _filter(logits, list(states)).softmax(dim=1)
    noise = torch.empty_like(probs).exponential_(generator=generator)
    seeded = [i for i, st in enumerate(states) if st.generator is not None and not greedy[i]]
    keys = [draw_seed(states[i].options.seed ^ _DRAFT_SALT, positions[i]) for i in seeded]
    seeded_noise_rows(noise, seeded, keys, [states[i].generator for i in seeded])  # one launch on CUDA
    tokens = (probs.log() - noise.log()).argmax(dim=1)  # exponential race: a draw from probs
    if any(greedy):
        rows = to_device([i for i, g in enumerate(greedy) if g], torch.long, logits.device)
        tokens[rows] = argmax[rows]
        probs[rows] = torch.zeros_like(probs[rows]).scatter_(1, argmax[rows].view(-1, 1), 1.0)
    return tokens, probs


def draft_state(states: dict, rid: str, options: SamplingOptions, device) -> SamplingState:
    """The proposer's sampling state of a request in `states` (made again when its options
    changed): a seeded request's draws get a generator of their own."""
    st = states.get(rid)
    if st is None or st.options is not options:
        gen = torch.Generator(device=device) if options.seed is not None else None
        st = states[rid] = SamplingState([], options, [], gen)
    return st


def gather_proposals(steps: list, order: list[str], device) -> Proposals:
    """Proposals per request in `order` from k steps of (request ids, tokens, q): the
    tokens cross to the host in one copy, q's rows are put request-major."""
    if not steps:
        return Proposals([[] for _ in order], torch.empty(0, 0, device=device))
    tokens = torch.cat([t for _, t, _ in steps]).tolist()
    probs = torch.cat([q for _, _, q in steps])
    rows: dict[str, list[int]] = {rid: [] for rid in order}
    g = 0
    for rids, _, _ in steps:
        for rid in rids:
            rows[rid].append(g)
            g += 1
    flat = [r for rid in order for r in rows[rid]]
    return Proposals([[tokens[r] for r in rows[rid]] for rid in order],
                     probs[to_device(flat, torch.long, probs.device)])


@dataclass
class _Written:
    """What the draft's cache holds for a request: `num_tokens` verified tokens, then
    `tail` (fed-back proposals), in the blocks of its table `blocks` at the time."""

    num_tokens: int = 0
    tail: list[int] = field(default_factory=list)
    blocks: tuple = ()


def _first_change(table: list[int], old: tuple) -> int:
    """Index of the first block of `old` that `table` no longer holds (len(old): none)."""
    if tuple(table[:len(old)]) == old:
        return len(old)
    return next((i for i, (a, b) in enumerate(zip(table, old)) if a != b), min(len(table), len(old)))


class DraftModelRunner:
    """Proposes with a draft model beside `target` (a ModelRunner, whose block tables
    it shares). Every TP rank calls `propose` at once; all get the same proposals."""

    def __init__(self, target: ModelRunner, model_dir: str, hf_config, num_speculative_tokens: int,
                 attention_backend: Optional[str] = None, load_format: str = "auto", seed: int = 0):
        check_vocab(target.hf_config, hf_config)
        max_pos = getattr(hf_config, "max_position_embeddings", None)
        if max_pos is not None and max_pos < target.max_model_len:
            raise ValueError(f"speculative_config['model']: the draft model's max_position_embeddings "
                             f"is {max_pos}; max_model_len is {target.max_model_len}; the draft must "
                             f"cover every position of the target")
        if num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1, got {num_speculative_tokens}")
        self.k = num_speculative_tokens
        kv_dtype = "auto" if target.kv_cache_dtype == target.dtype else next(
            name for name, dt in KV_CACHE_DTYPES.items() if dt == target.kv_cache_dtype)
        self.runner = ModelRunner(model_dir, hf_config, target.dtype, str(target.device), target.block_size,
                                  attention_backend, load_format, seed, target.enforce_eager,
                                  target.max_num_seqs, target.max_model_len, None, kv_dtype,
                                  target.gpu_memory_share)
        self.runner.block_tables = target.block_tables  # one table per request, both models
        self.written: dict[str, _Written] = {}
        self.states: dict[str, SamplingState] = {}
        self.generator = torch.Generator(device=self.runner.device).manual_seed(seed + 1)

    # ---- KV cache (the caller sizes the pool for both models) -------------------------
    def kv_bytes_per_block(self) -> int:
        return self.runner.kv_bytes_per_block()

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """The draft's cache, as many blocks as the target's (same block ids)."""
        self.runner.allocate_kv_cache(num_blocks)

    def release_kv_cache(self) -> None:
        self.runner.release_kv_cache()

    def drop(self, request_ids: Sequence[str]) -> None:
        """Forget finished and preempted requests (a preempted one starts over). A table
        the plan resends after a rollback needs no drop: changed blocks are noticed."""
        for rid in request_ids:
            self.written.pop(rid, None)
            self.states.pop(rid, None)
        if self.runner.host_tables is not None:
            self.runner.host_tables.drop(request_ids)

    # ---- proposing ---------------------------------------------------------------------
    def _valid(self, rid: str, tokens: Sequence[int], table: list[int]) -> int:
        """How many leading positions of the draft's cache hold `tokens` (at most all but
        the newest token, which the draft has not seen)."""
        w = self.written.get(rid)
        n = len(tokens)
        if w is None or w.num_tokens > n:
            return 0
        v = w.num_tokens
        for t in w.tail:
            if v >= n or tokens[v] != t:
                break
            v += 1
        v = min(v, _first_change(table, w.blocks) * self.runner.block_size)  # a block that
        return max(0, min(v, n - 1))  # left the table (a rollback gave it back) lost its KV

    @torch.inference_mode()
    def propose(self, request_ids: Sequence[str], token_ids: Sequence[Sequence[int]],
                options: Sequence[SamplingOptions],
                max_num_tokens: Optional[Sequence[int]] = None) -> Proposals:
        """Up to k proposals per request (`token_ids[i]`: its prompt and verified outputs,
        the newest last; at most `max_num_tokens[i]`) and their draft distributions."""
        return self.run_planned(self.plan(request_ids, token_ids, max_num_tokens),
                                dict(zip(request_ids, options)), list(request_ids))

    def plan(self, request_ids: Sequence[str], token_ids: Sequence[Sequence[int]],
             max_num_tokens: Optional[Sequence[int]] = None) -> list[list]:
        """What each request's draft must compute (TP rank 0 decides; `run_planned` runs
        it on every rank): [request id, first position to compute, the tokens from
        there on, its token count, k], plain data, for the requests that propose."""
        r, bs = self.runner, self.runner.block_size
        planned = []
        for i, rid in enumerate(request_ids):
            tokens, table = token_ids[i], r.block_tables.get(rid, [])
            n = len(tokens)
            k = min(self.k, len(table) * bs - n + 1)
            if max_num_tokens is not None:
                k = min(k, max_num_tokens[i])
            if k <= 0 or n == 0:
                continue
            if any(t == PLACEHOLDER_TOKEN for t in tokens[-2:]):
                raise ValueError(f"request {rid!r}: the draft model needs every token on the host")
            v = self._valid(rid, tokens, table)
            planned.append([rid, v, list(tokens[v:]), n, k])
        return planned

    @torch.inference_mode()
    def run_planned(self, planned: Sequence[Sequence], options: dict,
                    order: Optional[list[str]] = None) -> Proposals:
        """Run `plan`'s output (every TP rank at once; `options[rid]` for sampling on rank
        0): the proposals per request of `order` (default: the planned ones; none for a
        request not planned)."""
        r = self.runner
        plan, ks, states = StepPlan(), {}, {}
        for rid, v, tokens, n, k in planned:
            w = self.written.get(rid)
            if w is not None and r.host_tables is not None and \
                    _first_change(r.block_tables.get(rid, []), w.blocks) < len(w.blocks):
                r.host_tables.drop([rid])  # its graph row only ever appends: rewrite it whole
            plan.seqs.append(SeqChunk(rid, list(tokens), v, [], True))
            ks[rid], states[rid] = k, draft_state(self.states, rid, options[rid], r.device)
        order = [p[0] for p in planned] if order is None else order
        if not plan.seqs:
            return gather_proposals([], order, r.device)
        out = gather_proposals(self._run(plan, ks, states), order, r.device)
        drafted = dict(zip(order, out.token_ids))
        for rid, _, _, n, _ in planned:
            self._remember(rid, n, drafted[rid][:-1])
        return out

    def _remember(self, rid: str, n: int, tail: list[int]) -> None:
        """The cache now holds the request's n tokens, then `tail` (positions n..), in
        the blocks of its table now (rollbacks give the tail blocks back)."""
        self.written[rid] = _Written(n, list(tail), tuple(self.runner.block_tables[rid]))

    def _run(self, plan: StepPlan, ks: dict, states: dict) -> list:
        """The catch-up pass, then one-token steps; per step (ids, tokens, q)."""
        r, dev = self.runner, self.runner.device
        steps = []
        seqs = plan.seqs
        for j in range(max(ks.values())):
            hidden, query_start = r._forward(StepPlan(seqs=seqs))
            last = to_device([query_start[i + 1] - 1 for i in range(len(seqs))], torch.long, dev)
            logits = r.model.compute_logits(hidden[last])
            rids = [s.request_id for s in seqs]
            positions = [s.start_pos + len(s.token_ids) for s in seqs]  # the proposal's position
            if r.tp_rank == 0:
                tokens, q = draft_sample(logits.float(), [states[rid] for rid in rids], positions,
                                         self.generator)
            else:  # ranks > 0 take part in the forward passes; rank 0 samples
                tokens = torch.empty(len(rids), dtype=torch.long, device=dev)
                q = torch.empty(len(rids), 0, device=dev)
            tokens = broadcast_from_first(tokens.contiguous())
            steps.append((rids, tokens, q))
            r._last_tokens, r._last_rows = tokens, {rid: i for i, rid in enumerate(rids)}
            seqs = [SeqChunk(rid, [PLACEHOLDER_TOKEN], pos, [], True)
                    for rid, pos in zip(rids, positions) if ks[rid] > j + 1]
            if not seqs:
                break
        return steps


class ProposalStore:
    """Each request's latest proposals and their draft distribution, kept on the device
    from the step that drafted them to the step that verifies them (q never crosses the
    wire: the engine sees only the token ids)."""

    def __init__(self):
        self._rows: dict[str, tuple[list[int], torch.Tensor]] = {}

    def put(self, request_ids: Sequence[str], proposals: Proposals) -> None:
        g = 0
        for rid, props in zip(request_ids, proposals.token_ids):
            if props:
                self._rows[rid] = (props, proposals.draft_probs[g:g + len(props)])
            else:
                self._rows.pop(rid, None)
            g += len(props)

    def take(self, request_ids: Sequence[str], proposals: Sequence[Sequence[int]]) -> torch.Tensor:
        """q rows [sum k_i, V] of the proposals a step verifies: a prefix of each request's
        stored proposals (the scheduler may trim them)."""
        out = []
        for rid, props in zip(request_ids, proposals):
            stored, q = self._rows.pop(rid, ([], None))
            if list(props) != stored[:len(props)]:
                raise RuntimeError(f"request {rid!r} verifies proposals {list(props)}; the draft "
                                   f"proposed {stored}")
            out.append(q[:len(props)])
        return torch.cat(out)

    def drop(self, request_ids: Sequence[str]) -> None:
        for rid in request_ids:
            self._rows.pop(rid, None)
