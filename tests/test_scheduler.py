"""Block manager and scheduler unit tests: pure Python, no model."""
import subprocess
import sys

import pytest

from raylm.scheduler.block_manager import BlockManager
from raylm.scheduler.request import Request, RequestStatus
from raylm.scheduler.scheduler import Scheduler, SchedulerConfig


def make(num_blocks=16, block_size=4, prefix=True, **cfg):
    bm = BlockManager(num_blocks, block_size, prefix)
    config = SchedulerConfig(**{"max_num_seqs": 8, "max_num_batched_tokens": 32, "max_model_len": 64, **cfg})
    return Scheduler(config, bm), bm


def run_step(sched, sample_token=7):
    """Plan one step and pretend the model ran it: sampling rows get `sample_token`."""
    out = sched.schedule()
    sched.update_after_step(out)
    for s in out.seqs:
        if s.sample:
            sched.requests[s.request_id].append_output_token(sample_token)
    return out


def assert_no_leak(bm):
    assert bm.num_free_blocks == bm.num_blocks
    assert all(b.ref_count == 0 for b in bm.blocks)


def test_scheduler_imports_no_torch_or_ray():
    code = ("import sys, raylm.scheduler.scheduler, raylm.scheduler.block_manager; "
            "assert 'torch' not in sys.modules and 'ray' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_budget_and_max_num_seqs_respected():
    sched, bm = make(num_blocks=64, max_num_seqs=3, max_num_batched_tokens=10)
    for i in range(5):
        sched.add_request(Request(f"r{i}", list(range(1, 8))))
    for _ in range(20):
        out = run_step(sched)
        assert out.total_num_scheduled_tokens <= 10
        assert len(out.seqs) <= 3
        assert len(sched.running) <= 3
    for rid in list(sched.requests):
        sched.finish_request(rid, RequestStatus.FINISHED_STOPPED)
    assert_no_leak(bm)


def test_chunked_prefill_mixed_with_decode():
    sched, bm = make(num_blocks=64, max_num_batched_tokens=8)
    sched.add_request(Request("a", [1, 2, 3]))
    out = run_step(sched)
    assert out.num_scheduled_tokens == {"a": 3} and out.seqs[0].sample
    sched.add_request(Request("b", list(range(10, 30))))  # 20 tokens: needs 3 chunks of <= 7
    out = run_step(sched)
    assert out.num_scheduled_tokens == {"a": 1, "b": 7}
    assert out.is_mixed and not out.seqs[1].sample
    out = run_step(sched)
    assert out.num_scheduled_tokens == {"a": 1, "b": 7}
    out = run_step(sched)
    assert out.num_scheduled_tokens == {"a": 1, "b": 6} and out.seqs[1].sample
    assert sched.num_mixed_steps == 3
    # block tables cover exactly the computed tokens
    b = sched.requests["b"]
    assert b.num_computed_tokens == 20 and len(b.block_ids) == 5
    sched.abort_requests(["a", "b"])
    assert_no_leak(bm)


def test_slot_positions_follow_block_table():
    sched, bm = make(num_blocks=8, block_size=4)
    sched.add_request(Request("a", list(range(1, 11))))
    out = run_step(sched)
    seq = out.seqs[0]
    assert seq.start_pos == 0 and len(seq.block_table) == 3
    out = run_step(sched)
    assert out.seqs[0].start_pos == 10 and out.seqs[0].token_ids == [7]


def test_prefix_cache_hit_and_lru_eviction():
    sched, bm = make(num_blocks=12, block_size=4, max_num_batched_tokens=64)
    shared = list(range(1, 13))  # 3 full blocks
    sched.add_request(Request("a", shared + [50, 51]))
    run_step(sched)
    sched.finish_request("a", RequestStatus.FINISHED_STOPPED)
    assert_no_leak(bm)  # cached blocks count as free
    sched.add_request(Request("b", shared + [60]))
    out = run_step(sched)
    assert sched.requests["b"].num_cached_tokens == 12
    assert out.seqs[0].start_pos == 12 and out.seqs[0].token_ids == [60]
    assert bm.prefix_hit_tokens == 12
    # A full-prompt hit still computes the last token.
    sched.add_request(Request("c", shared))
    out = run_step(sched)
    assert out.num_scheduled_tokens["c"] == 4 and sched.requests["c"].num_cached_tokens == 8
    sched.abort_requests(["b", "c"])
    assert_no_leak(bm)
    # Filling the pool with unrelated prompts evicts the cached prefix.
    sched.add_request(Request("d", list(range(100, 146))))
    run_step(sched)
    sched.abort_requests(["d"])
    sched.add_request(Request("e", shared + [70]))
    run_step(sched)
    assert sched.requests["e"].num_cached_tokens == 0
    sched.abort_requests(["e"])
    assert_no_leak(bm)


def test_prefix_group_siblings_share_prompt_blocks():
    sched, bm = make(num_blocks=32, block_size=4)
    prompt = list(range(1, 18))  # 4 full blocks + 1 token
    for i in range(3):
        sched.add_request(Request(f"{i}_x", prompt, prefix_group="x"))
    out = run_step(sched)
    assert list(out.num_scheduled_tokens) == ["0_x"]  # siblings wait for the prefix
    out = run_step(sched)
    assert out.num_scheduled_tokens == {"0_x": 1, "1_x": 1, "2_x": 1}
    first = sched.requests["0_x"].block_ids[:4]
    assert sched.requests["1_x"].block_ids[:4] == first == sched.requests["2_x"].block_ids[:4]
    assert all(bm.blocks[b].ref_count == 3 for b in first)
    sched.abort_requests(["0_x", "1_x", "2_x"])
    assert_no_leak(bm)


@pytest.mark.parametrize("prefix", [False, True])
def test_preemption_newest_first_and_resume(prefix):
    # 6 blocks of 4 tokens: two 10-token prompts fit (3 blocks each) but cannot both grow.
    sched, bm = make(num_blocks=6, block_size=4, max_num_batched_tokens=64, prefix=prefix)
    sched.add_request(Request("old", list(range(1, 11)), arrival_time=1.0))
    sched.add_request(Request("new", list(range(20, 30)), arrival_time=2.0))
    run_step(sched)
    for _ in range(2):
        run_step(sched)  # 12 tokens each: still 3 blocks
    out = run_step(sched)  # each needs a 4th block: "new" is preempted
    assert out.preempted_ids == ["new"]
    assert sched.requests["new"].status == RequestStatus.PREEMPTED
    assert sched.requests["new"].num_computed_tokens == 0 and not sched.requests["new"].block_ids
    assert sched.num_preemptions == 1
    sched.finish_request("old", RequestStatus.FINISHED_STOPPED)
    out = run_step(sched)  # "new" recomputes prompt + its outputs, then samples
    # Without prefix caching it recomputes everything; with it, the blocks it held that
    # were not evicted in between (the two leading ones) come back from the cache.
    cached = 8 if prefix else 0
    assert out.num_scheduled_tokens == {"new": 13 - cached} and out.seqs[0].sample
    assert out.seqs[0].token_ids == (list(range(20, 30)) + [7, 7, 7])[cached:]
    sched.finish_request("new", RequestStatus.FINISHED_STOPPED)
    assert_no_leak(bm)


def test_priority_orders_waiting_queue():
    sched, bm = make(num_blocks=64, max_num_seqs=1)
    sched.add_request(Request("low", [1, 2], priority=5, arrival_time=1.0))
    sched.add_request(Request("high", [3, 4], priority=0, arrival_time=2.0))
    out = run_step(sched)
    assert list(out.num_scheduled_tokens) == ["high"]


def test_abort_frees_blocks_at_once_and_rejects_long_prompt():
    sched, bm = make(num_blocks=16)
    sched.add_request(Request("a", list(range(1, 20))))
    run_step(sched)
    assert bm.num_used_blocks == 5
    sched.abort_requests(["a", "unknown"])
    assert_no_leak(bm)
    with pytest.raises(ValueError, match="max_model_len is 64"):
        sched.add_request(Request("long", list(range(65))))
    with pytest.raises(ValueError, match="already in use"):
        sched.add_request(Request("b", [1]))
        sched.add_request(Request("b", [1]))


def test_random_workload_never_leaks():
    import random

    rng = random.Random(0)
    sched, bm = make(num_blocks=20, block_size=4, max_num_batched_tokens=16, max_num_seqs=4)
    for step in range(400):
        if rng.random() < 0.3:
            n = rng.randint(1, 30)
            sched.add_request(Request(f"q{step}", [rng.randint(0, 5) for _ in range(n)]))
        out = run_step(sched, sample_token=rng.randint(0, 5))
        assert out.total_num_scheduled_tokens <= 16
        for rid, req in list(sched.requests.items()):
            if req.num_output_tokens >= 5 or (req.num_tokens >= 60):
                sched.finish_request(rid, RequestStatus.FINISHED_LENGTH)
            elif rng.random() < 0.02:
                sched.abort_requests([rid])
        used = sum(len(r.block_ids) for r in sched.requests.values())
        assert used >= bm.num_used_blocks  # shared blocks counted once in the pool
    sched.abort_requests(list(sched.requests))
    assert_no_leak(bm)
