"""Model-based speculation on the worker, beside the target's ModelRunner: a draft model
(`draft_runner.DraftModelRunner`) or an EAGLE-3 head (`eagle_runner.Eagle3Runner`)
drafts each step's proposals for the next step right after the step is verified, with
its tokens on the host; the draft distributions q stay here (`ProposalStore`) until the
next step verifies the proposals by rejection sampling. Only the proposals' token ids
go back to the engine (`StepResult.spec_proposals`).

`spec` is the engine's DraftSpec as a plain dict: method ("draft_model" or "eagle3"),
model_dir, num_speculative_tokens, and draft_tensor_parallel_size 1 for a draft model
that runs whole on TP rank 0 (vLLM's option: no collective per draft step; the other
ranks hold no draft and go on to the next step)."""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import msgpack
import torch

from raylm.workers.loader import load_config
from raylm.workers.parallel_state import broadcast_from_first_bytes, single_rank

METHODS = ("draft_model", "eagle3")


class WorkerProposer:
    """Builds the proposer of `spec` beside `target` and runs it after each step."""

    def __init__(self, target, spec: dict, attention_backend: Optional[str] = None,
                 load_format: str = "auto", seed: int = 0):
        from raylm.workers.draft_runner import DraftModelRunner, ProposalStore
        from raylm.workers.eagle_runner import Eagle3Runner

        method, model_dir = spec["method"], spec["model_dir"]
        k = spec["num_speculative_tokens"]
        if method not in METHODS:
            raise ValueError(f"speculative method {method!r} has no worker-side proposer; "
                             f"expected one of {list(METHODS)}")
        self.method, self.k, self.target = method, k, target
        # A draft model on rank 0 alone (unsharded); ranks > 0 hold none.
        self.solo = spec.get("draft_tensor_parallel_size") == 1 and target.tp_size > 1
        hf_config = load_config(model_dir)
        if method == "draft_model":
            self.proposer = None
            if not (self.solo and target.tp_rank > 0):
                with self._scope():
                    self.proposer = DraftModelRunner(target, model_dir, hf_config, k, attention_backend,
                                                     load_format, seed)
        else:
            self.proposer = Eagle3Runner(target, model_dir, hf_config, k, seed)
            self.proposer.enable_target_aux()
        self.store = ProposalStore()

    def _scope(self):
        """Where the proposer's model is built and run: as without TP when it is solo."""
        return single_rank() if self.solo else contextlib.nullcontext()

    @property
    def needs_every_step(self) -> bool:
        """EAGLE-3 writes its KV from each step's aux hidden states: it must see every
        step (a draft model catches up on tokens it has not seen)."""
        return self.method == "eagle3"

    # ---- KV cache: one pool of block ids for both models ------------------------------
    def kv_bytes_per_block(self) -> int:
        return 0 if self.proposer is None else self.proposer.kv_bytes_per_block()

    def allocate_kv_cache(self, num_blocks: int, capture_graphs: bool = True) -> None:
        if self.proposer is None:
            return
        with self._scope():
            if self.method == "draft_model":
                self.proposer.runner.allocate_kv_cache(num_blocks, capture_graphs)
            else:
                self.proposer.allocate_kv_cache(num_blocks)

    def release_kv_cache(self) -> None:
        if self.proposer is not None:
            self.proposer.release_kv_cache()

    def drop(self, request_ids: Sequence[str]) -> None:
        """Forget finished and preempted requests (their proposals and draft state)."""
        if request_ids and self.proposer is not None:
            self.proposer.drop(request_ids)
            self.store.drop(request_ids)

    # ---- one step --------------------------------------------------------------------
    def draft_probs(self, request_ids: Sequence[str], proposals: Sequence[Sequence[int]]) -> torch.Tensor:
        """q of the proposals a step verifies (each a prefix of what was drafted)."""
        return self.store.take(request_ids, proposals)

    def _limit(self, rid: str, wanted: dict, num_tokens: int) -> int:
        # The next step emits up to k + 1 tokens, none past max_model_len.
        return max(0, min(self.k, wanted.get(rid, 0), self.target.max_model_len - num_tokens - 1))

    def after_step(self, plan, query_start: list[int], aux: Optional[torch.Tensor],
                   emitted: Optional[dict[str, list[int]]]) -> dict[str, list[int]]:
        """Draft the next step's proposals of the rows `plan.spec_wanted` names (and, for
        EAGLE-3, write the head's KV for every row); `emitted[rid]`: the tokens the row
        emitted this step, on the host. Returns the non-empty proposals.

        With tensor parallelism every rank calls this at the same point of the step:
        rank 0, which alone knows the emitted tokens (`emitted`; None on the others),
        decides what the proposer computes and broadcasts it as plain data; all ranks
        then run the proposer's sharded forward passes together. A solo draft runs on
        rank 0 alone: the others return at once."""
        t = self.target
        if self.method == "eagle3" and aux is None:
            return {}  # (alike on every rank: the same forward path)
        if self.solo and t.tp_rank > 0:
            return {}
        if t.tp_rank == 0:
            call = self._call(plan, query_start, emitted)
            if t.tp_size > 1 and not self.solo:
                broadcast_from_first_bytes(msgpack.packb(call), t.device)
        else:
            call = msgpack.unpackb(broadcast_from_first_bytes(None, t.device))
        if not call:
            return {}
        options = {c[0]: t.states[c[0]].options for c in call}
        if self.method == "eagle3":
            from raylm.workers.eagle_runner import EagleRow

            rows = [EagleRow(rid, start, list(nxt), h, k, options[rid]) for rid, start, nxt, h, k in call]
            rids = [r.request_id for r in rows]
            out = self.proposer.propose(rows, aux)
        else:
            rids = [c[0] for c in call]
            with self._scope():
                out = self.proposer.run_planned(call, options)
        if t.tp_rank > 0:  # rank 0 alone verifies, with the draft distributions it drew
            return {}
        self.store.put(rids, out)
        return {rid: props for rid, props in zip(rids, out.token_ids) if props}

    def _call(self, plan, query_start: list[int], emitted: dict[str, list[int]]) -> list[list]:
        """Rank 0: what the proposer computes after this step, as plain data. EAGLE-3: its
        rows [request id, start position, next tokens, first aux row, k]; a draft model:
        `DraftModelRunner.plan`'s rows."""
        states = self.target.states
        wanted = plan.spec_wanted
        if self.method == "eagle3":
            from raylm.workers.eagle_runner import eagle_rows

            idx = [i for i, s in enumerate(plan.seqs) if s.request_id in states]
            if not idx:
                return []
            seqs = [plan.seqs[i] for i in idx]
            starts = [query_start[i] for i in idx]
            known = {s.request_id: states[s.request_id].prompt_token_ids
                     + states[s.request_id].output_token_ids for s in seqs}
            ks = {rid: self._limit(rid, wanted, len(known[rid]) + len(toks)) for rid, toks in emitted.items()}
            rows = eagle_rows(seqs, starts, emitted, known, {rid: states[rid].options for rid in known}, ks)
            return [[r.request_id, r.start_pos, list(r.next_token_ids), r.hidden_start,
                     r.num_speculative_tokens] for r in rows]
        rids, tokens, ks = [], [], []
        for rid, toks in emitted.items():
            st = states.get(rid)
            if st is None or wanted.get(rid, 0) <= 0:
                continue
            all_tokens = st.prompt_token_ids + st.output_token_ids + list(toks)
            rids.append(rid)
            tokens.append(all_tokens)
            ks.append(self._limit(rid, wanted, len(all_tokens)))
        return self.proposer.plan(rids, tokens, ks) if rids else []
