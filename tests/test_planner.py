"""The engine-worker contract as per-step diffs (raylm/engine/planner.py): a request's
blocks cross the wire once and then only the new ones, the whole table again after a
preemption, and the worker's tables (ModelRunner, HostBlockTables) always equal the
scheduler's. The workers import nothing of the engine or the scheduler."""
from __future__ import annotations

import ast
import os

import pytest
import torch

import raylm.workers
from raylm import LLM, SamplingParams
from raylm.engine.planner import StepPlanner, worker_sampling
from raylm.scheduler.block_manager import BlockManager
from raylm.scheduler.request import PLACEHOLDER_TOKEN as SCHEDULER_PLACEHOLDER
from raylm.scheduler.request import Request, RequestStatus
from raylm.scheduler.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from raylm.workers.messages import PLACEHOLDER_TOKEN, NewRequest, SamplingOptions
from tests.helpers import hf_greedy


def test_workers_import_nothing_of_engine_or_scheduler():
    root = os.path.dirname(raylm.workers.__file__)
    found = []
    for folder, _, files in os.walk(root):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            package = os.path.relpath(folder, os.path.dirname(os.path.dirname(root))).split(os.sep)
            with open(path) as f:
                tree = ast.parse(f.read(), path)
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    modules = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    base = node.module or ""
                    if node.level:  # relative: resolve against this file's package
                        base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
                    modules = [base]
                else:
                    continue
                found += [(path, m) for m in modules
                          if m.split(".")[:2] in (["raylm", "engine"], ["raylm", "scheduler"],
                                                  ["raylm", "cluster"])]
    assert not found, found


def test_placeholder_tokens_agree():
    assert PLACEHOLDER_TOKEN == SCHEDULER_PLACEHOLDER


def test_worker_sampling_defaults_and_prompt_logprobs():
    assert worker_sampling(SamplingParams(), [], 0) == SamplingOptions()
    sp = SamplingParams(temperature=0.7, top_p=0.8, top_k=-1, min_p=0.1, seed=5, repetition_penalty=1.1,
                        presence_penalty=0.2, frequency_penalty=0.3, min_tokens=2, stop_token_ids=[7],
                        ignore_eos=True, logprobs=3, prompt_logprobs=1)
    first = worker_sampling(sp, [2, 3], 0)
    assert first == SamplingOptions(0.7, 0.8, 0, 0.1, 5, 1.1, 0.2, 0.3, 2, [7], [2, 3], True, 3, 1)
    assert worker_sampling(sp, [2, 3], 1).prompt_logprobs is None
    redispatched = worker_sampling(sp, [2, 3], 0, output_offset=4)
    assert redispatched.output_offset == 4 and redispatched.min_tokens == 2  # the original min_tokens
    first.stop_token_ids.append(8)
    assert sp.stop_token_ids == [7]  # no list shared with the user's params


class FakeWorker:
    """The worker's block-table bookkeeping (as ModelRunner._update_states keeps it)."""

    def __init__(self):
        self.tables: dict[str, list[int]] = {}
        self.known: set[str] = set()

    def apply(self, plan) -> None:
        for rid in plan.preempted_ids + plan.finished_ids:
            self.tables.pop(rid, None)
        for rid in plan.finished_ids:
            self.known.discard(rid)
        for new in plan.new_requests:
            assert new.request_id not in self.known
            self.known.add(new.request_id)
        for s in plan.seqs:
            assert s.request_id in self.known
            self.tables.setdefault(s.request_id, []).extend(s.new_block_ids)


def make(num_blocks=16, block_size=4, prefix=True, **cfg):
    config = SchedulerConfig(**{"max_num_seqs": 8, "max_num_batched_tokens": 32, "max_model_len": 64, **cfg})
    sched = Scheduler(config, BlockManager(num_blocks, block_size, prefix))
    planner = StepPlanner(
        lambda rid: NewRequest(rid, sched.requests[rid].prompt_token_ids, SamplingOptions()))
    return sched, planner


def step(sched, planner, worker, token=7):
    """Schedule, plan, let the worker apply the plan, pretend the model ran."""
    out = sched.schedule()
    plan = planner.plan(out)
    worker.apply(plan)
    for s in out.seqs:
        assert worker.tables[s.request_id] == s.block_table
    sched.update_after_step(out)
    for s in out.seqs:
        if s.sample:
            sched.requests[s.request_id].append_output_token(token)
    return out, plan


def test_blocks_cross_once_then_only_new_ones():
    sched, planner = make()
    worker = FakeWorker()
    sched.add_request(Request("a", list(range(10, 20))))  # 10 tokens: 3 blocks of 4
    out, plan = step(sched, planner, worker)
    assert [r.request_id for r in plan.new_requests] == ["a"]
    assert plan.seqs[0].new_block_ids == out.seqs[0].block_table and len(out.seqs[0].block_table) == 3
    sent = []
    for _ in range(6):  # positions 10..15: the 3rd block, then a 4th
        out, plan = step(sched, planner, worker)
        assert not plan.new_requests
        sent.append(plan.seqs[0].new_block_ids)
    assert sent == [[], [], [out.seqs[0].block_table[3]], [], [], []]
    sched.finish_request("a", RequestStatus.FINISHED_STOPPED)
    planner.finished("a")
    assert planner.has_finished
    plan = planner.plan(sched.schedule())
    assert plan.finished_ids == ["a"] and not plan.seqs and not planner.has_finished
    worker.apply(plan)
    assert "a" not in worker.tables
    # The same id again: a new request, its whole table again.
    sched.add_request(Request("a", [1, 2, 3, 4, 5]))
    out, plan = step(sched, planner, worker)
    assert plan.new_requests[0].prompt_token_ids == [1, 2, 3, 4, 5]
    assert plan.seqs[0].new_block_ids == out.seqs[0].block_table


@pytest.mark.parametrize("prefix", [False, True])
def test_preempted_request_gets_its_whole_table_again(prefix):
    # As test_scheduler's preemption test: 6 blocks of 4, two 10-token prompts that
    # cannot both grow to a 4th block.
    sched, planner = make(num_blocks=6, prefix=prefix, max_num_batched_tokens=64)
    worker = FakeWorker()
    sched.add_request(Request("old", list(range(1, 11)), arrival_time=1.0))
    sched.add_request(Request("new", list(range(20, 30)), arrival_time=2.0))
    for _ in range(3):
        step(sched, planner, worker)
    out, plan = step(sched, planner, worker)
    assert plan.preempted_ids == ["new"] and "new" not in worker.tables
    sched.finish_request("old", RequestStatus.FINISHED_STOPPED)
    planner.finished("old")
    out, plan = step(sched, planner, worker)
    row = plan.seqs[0]
    # With prefix caching its two leading blocks come back from the cache: the workers
    # dropped its table all the same, so they come again too.
    assert row.request_id == "new" and row.start_pos == (8 if prefix else 0)
    assert row.new_block_ids == out.seqs[0].block_table and len(row.new_block_ids) == 4
    assert plan.finished_ids == ["old"] and not plan.new_requests  # its sampling state stays


def test_restart_without_its_preemption_plan_is_caught():
    """A step that only preempted (no rows, nothing finished) may reach no plan; the
    request's next row starts before where its last ended, so it starts over."""
    sched, planner = make()
    worker = FakeWorker()
    sched.add_request(Request("a", list(range(10, 20))))
    step(sched, planner, worker)
    step(sched, planner, worker)
    request = sched.requests["a"]
    sched._preempt(request)  # the SchedulerOutput saying so is never planned
    out = sched.schedule()
    plan = planner.plan(out)
    assert plan.preempted_ids == ["a"] and plan.seqs[0].new_block_ids == out.seqs[0].block_table
    worker.apply(plan)
    assert worker.tables["a"] == out.seqs[0].block_table


def test_empty_step_carries_preemptions():
    planner = StepPlanner(lambda rid: None)
    plan = planner.plan(SchedulerOutput(preempted_ids=["x"]))
    assert plan.preempted_ids == ["x"] and not plan.seqs
    assert planner.plan(None).preempted_ids == []


# ---- the real worker -------------------------------------------------------------------
def _check_worker_tables(llm, monkeypatch):
    """After every plan the runner applies, its block tables (and HostBlockTables' rows,
    as the decode graphs read them) equal the scheduler's tables of that step."""
    engine = llm.llm_engine
    runner = engine.executor.runner
    expected = {}
    planner = getattr(engine, "core", engine).planner  # the engine core's, where there is one
    plan_of = planner.plan

    def plan(sched_out):
        p = plan_of(sched_out)
        expected[id(p)] = {s.request_id: list(s.block_table) for s in (sched_out.seqs if sched_out else ())}
        return p

    # HostBlockTables pins host memory; a CPU-only torch has no pinned allocator.
    from raylm.workers.cuda_graphs import HostBlockTables

    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: self)
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, pin_memory=False, **k: empty(*a, **k))
    max_blocks = -(-runner.max_model_len // runner.block_size)
    runner.host_tables = HostBlockTables(engine.args.max_num_seqs, max_blocks)
    update = runner._update_states
    checked = {"plans": 0, "rows": 0}

    def update_states(p):
        update(p)
        want = expected.pop(id(p))
        assert {rid: runner.block_tables[rid] for rid in want} == want
        if want:
            ids = list(want)
            rows, width = runner.host_tables.gather(ids, [runner.block_tables[r] for r in ids])
            assert width == max(len(t) for t in want.values())
            assert [rows[i, :len(want[r])].tolist() for i, r in enumerate(ids)] == [want[r] for r in ids]
        checked["plans"] += 1
        checked["rows"] += len(want)

    planner.plan = plan
    runner._update_states = update_states
    return planner, checked


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_worker_tables_equal_the_schedulers(llama_dir, monkeypatch, async_scheduling):
    """Preemptions (a 16-block pool), prefix hits and chunked prefill; greedy tokens
    stay transformers'."""
    probe = LLM(llama_dir, dtype="float32", max_model_len=64, block_size=4)
    per_block = probe.llm_engine.executor.kv_bytes_per_block()
    probe.shutdown()
    llm = LLM(llama_dir, dtype="float32", max_model_len=64, block_size=4,
              kv_cache_memory_bytes=16 * per_block, max_num_batched_tokens=16,
              async_scheduling=async_scheduling)
    planner, checked = _check_worker_tables(llm, monkeypatch)
    gen = torch.Generator().manual_seed(4)
    shared = torch.randint(4, 300, (20,), generator=gen).tolist()
    prompts = [torch.randint(4, 300, (n,), generator=gen).tolist() for n in (30, 25)]
    prompts += [shared + [5, 6, 7], shared + [8, 9]]
    sp = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    stats = llm.stats()
    executor = llm.llm_engine.executor
    executor.execute(planner.plan(None))  # the last finished ids, if still unsent
    runner = executor.runner
    assert stats["num_preemptions"] > 0 and stats["prefix_cache_hit_tokens"] > 0
    assert checked["plans"] > 10 and checked["rows"] > 20
    assert not runner.block_tables and not runner.host_tables.known
    llm.shutdown()
    for p, o in zip(prompts, outs):
        assert list(o.outputs[0].token_ids) == hf_greedy(llama_dir, p, 8)[0]
