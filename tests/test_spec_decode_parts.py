"""The pieces that wire speculation into the engine, alone: the planner resends tables
that rejected proposals truncated (and nothing else), plans and results with proposals
survive the wire, logits processors per verified position equal a row-by-row reference,
adaptive k, the batch-size limit, and the config's checks."""
import msgpack
import pytest
import torch

from raylm.engine.config import EngineArgs
from raylm.engine.planner import StepPlanner
from raylm.engine.spec_decode.config import ADAPTIVE_DISABLE_BY_BATCH_SIZE, parse_speculative_config
from raylm.engine.spec_decode.speculator import (MAX_BACKOFF_STEPS, AdaptiveK, Speculator,
                                                acceptance_summary)
from raylm.scheduler.block_manager import BlockManager
from raylm.scheduler.request import Request
from raylm.scheduler.scheduler import Scheduler, SchedulerConfig
from raylm.workers.logits_processors import apply_processors
from raylm.workers.messages import (NewRequest, SamplingOptions, SeqChunk, StepPlan, StepResult,
                                    TokenLogprobs)
from raylm.workers.sampler import SamplingState
from raylm.workers.spec_verify import process_positions


def roundtrip(obj):
    return type(obj).from_wire(msgpack.unpackb(msgpack.packb(obj.to_wire())))


def test_plan_and_result_with_proposals_roundtrip_and_plain_wire_unchanged():
    plan = StepPlan(seqs=[SeqChunk("a", [5, 6, 7], 3, [1], True, 2), SeqChunk("b", [9], 4, [], True)],
                    new_requests=[NewRequest("a", [1, 2, 3], SamplingOptions())])
    assert roundtrip(plan) == plan
    assert [len(row) for row in plan.to_wire()["seqs"]] == [6, 5]  # plain rows stay 5 long
    lp = TokenLogprobs([6, 1], [-0.1, -2.0], 6, -0.1, 1)
    result = StepResult(sampled={"b": 4}, spec_sampled={"a": [6, 8]}, spec_logprobs={"a": [lp, lp]})
    assert roundtrip(result) == result
    assert "spec" not in StepResult(sampled={"b": 4}).to_wire()
    # Model-based speculation: what to draft after a row, and the drafted token ids.
    plan.spec_wanted = {"a": 3}
    assert roundtrip(plan) == plan
    result.spec_proposals = {"b": [7, 7, 1]}
    assert roundtrip(result) == result
    assert "spec_wanted" not in StepPlan().to_wire() and "spec_proposals" not in StepResult().to_wire()


class _Seq:  # the ScheduledSeq fields the planner reads
    def __init__(self, rid, token_ids, start_pos, block_table, spec=()):
        self.request_id, self.token_ids, self.start_pos = rid, token_ids, start_pos
        self.block_table, self.sample, self.spec_token_ids = block_table, True, spec


class _Out:
    def __init__(self, seqs, truncated=None):
        self.seqs, self.preempted_ids, self.truncated_block_tables = seqs, [], truncated or {}


def test_planner_resends_truncated_tables_only():
    planner = StepPlanner(lambda rid: NewRequest(rid, [1, 2, 3], SamplingOptions()))
    p = planner.plan(_Out([_Seq("a", [3, 10, 11, 12], 2, [0, 1], spec=(10, 11, 12))]))
    assert p.seqs[0].num_spec_tokens == 3 and p.seqs[0].new_block_ids == [0, 1]
    # One proposal accepted: the next row starts right after it, no table resent.
    p = planner.plan(_Out([_Seq("a", [7], 4, [0, 1])]))
    assert p.preempted_ids == [] and p.seqs[0].new_block_ids == []
    # A rollback freed block 1 and a new one took its place: the whole table goes again.
    p = planner.plan(_Out([_Seq("a", [8], 5, [0, 5])], truncated={"a": 1}))
    assert p.preempted_ids == ["a"] and p.seqs[0].new_block_ids == [0, 5]
    # A truncated table of a request not scheduled this step is dropped now, sent later.
    p = planner.plan(_Out([], truncated={"a": 1}))
    assert p.preempted_ids == ["a"]
    p = planner.plan(_Out([_Seq("a", [9], 6, [0, 6])]))
    assert p.seqs[0].new_block_ids == [0, 6]


def _states(options_list, outputs_list):
    return [SamplingState([1, 2], o, list(out)) for o, out in zip(options_list, outputs_list)]


def test_processors_per_position_see_earlier_proposals_as_outputs():
    torch.manual_seed(0)
    vocab = 12
    opts = [SamplingOptions(bad_words_token_ids=[[3, 4], [9]], logit_bias=[(2, 1.5)]),
            SamplingOptions(allowed_token_ids=[1, 3, 4, 5]),
            SamplingOptions()]
    states = _states(opts, [[3], [], [7]])
    proposals = [[4, 3], [5], [1, 1, 1]]
    logits = torch.randn(sum(len(p) + 1 for p in proposals), vocab)
    got = process_positions(logits, states, proposals, [0, 1])
    ref = logits.clone()
    row = 0
    for st, props in zip(states, proposals):
        for j in range(len(props) + 1):
            if st.options is not opts[2]:
                apply_processors(ref, [row], [st.options], [st.output_token_ids + props[:j]])
            row += 1
    assert torch.equal(got, ref)
    # Position 0 of row 0 follows [3]: bad word [3, 4] bans 4 there; position 1 follows [3, 4].
    assert got[0, 4] == float("-inf") and got[1, 4] != float("-inf") and got[2, 4] == float("-inf")
    assert torch.equal(got[6:], logits[6:])  # the row without processors is untouched


def test_adaptive_k_shrinks_grows_and_backs_off():
    ak = AdaptiveK(4, enabled=True)
    assert ak.k_of("r") == 4
    ak.update("r", 4, 1)  # rejected at the second proposal
    assert ak.k_of("r") == 2
    ak.update("r", 2, 2)
    assert ak.k_of("r") == 3
    ak.update("r", 3, 0)
    assert ak.k_of("r") == 1
    ak.update("r", 1, 0)  # a miss at k = 1: sit out 2 steps, then 4, ...
    assert [ak.k_of("r") for _ in range(3)] == [0, 0, 1]
    ak.update("r", 1, 0)
    assert [ak.k_of("r") for _ in range(5)] == [0, 0, 0, 0, 1]
    for _ in range(10):
        ak.update("r", 1, 0)
        waits = 0
        while ak.k_of("r") == 0:
            waits += 1
    assert waits == MAX_BACKOFF_STEPS
    ak.update("r", 1, 1)
    assert ak.k_of("r") == 2
    ak.remove("r")
    assert ak.k_of("r") == 4
    fixed = AdaptiveK(3, enabled=False)
    fixed.update("r", 3, 0)
    assert fixed.k_of("r") == 3


class _Proposer:
    def __init__(self):
        self.calls = []

    def propose(self, ids, tokens, ks):
        self.calls.append((list(ids), list(ks)))
        return [[t + 1 for t in toks[-k:]] for toks, k in zip(tokens, ks)]

    def remove(self, rid):
        pass


def _running(n, max_tokens=10):
    sched = Scheduler(SchedulerConfig(max_model_len=64), BlockManager(64, 4, False))
    for i in range(n):
        req = Request(f"r{i}", [1, 2, 3, 4 + i], max_output_tokens=max_tokens)
        sched.add_request(req)
    sched.update_after_step(sched.schedule())
    for req in sched.running:
        req.append_output_token(9)
    return sched


def test_speculator_proposes_for_plain_decodes_within_max_tokens_and_batch_limit():
    cfg = parse_speculative_config({"method": "ngram", "num_speculative_tokens": 3,
                                    "disable_by_batch_size": 2})
    spec = Speculator(cfg, _Proposer())
    sched = _running(3, max_tokens=3)
    assert not spec.active(3) and spec.active(2) and not spec.active(0)
    got = spec.propose(sched.running, lambda r: r.request_id != "r2")
    assert [r.request_id for r in got] == ["r0", "r1"]
    # max_tokens 3 with one output: the step may emit 2 tokens, so 1 proposal.
    assert spec.proposer.calls == [(["r0", "r1"], [1, 1])]
    assert got[0].spec_token_ids == [10]
    spec.record("r0", 1, 1)
    spec.record("r1", 1, 0)
    st = spec.stats()
    assert (st["spec_decode_num_drafts"], st["spec_decode_num_draft_tokens"],
            st["spec_decode_num_accepted_tokens"]) == (2, 2, 1)
    assert st["spec_decode_num_accepted_tokens_per_pos"] == [1, 0, 0]
    assert acceptance_summary(st) == {"spec_decode_acceptance_rate": 0.5,
                                      "spec_decode_mean_acceptance_length": 1.5}
    assert acceptance_summary({"num_steps": 3}) == {}


def test_config_batch_limit_and_model_methods_at_any_tp():
    cfg = parse_speculative_config({"method": "ngram", "num_speculative_tokens": 2,
                                    "adaptive_num_speculative_tokens": True})
    assert cfg.max_batch_size == ADAPTIVE_DISABLE_BY_BATCH_SIZE
    cfg = parse_speculative_config({"method": "ngram", "num_speculative_tokens": 2,
                                    "adaptive_num_speculative_tokens": True, "disable_by_batch_size": 8})
    assert cfg.max_batch_size == 8
    assert parse_speculative_config({"method": "ngram", "num_speculative_tokens": 2}).max_batch_size is None
    EngineArgs(speculative_config={"method": "draft_model", "model": "x", "num_speculative_tokens": 2})
    # A draft model or EAGLE head runs sharded on the target's ranks (test_spec_decode_models).
    for backend in (None, "ray_broadcast"):
        EngineArgs(speculative_config={"method": "draft_model", "model": "x", "num_speculative_tokens": 2},
                   tensor_parallel_size=2, distributed_executor_backend=backend)
