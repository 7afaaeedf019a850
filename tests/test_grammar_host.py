"""The engine core's grammar work per step, on the host: the emitted tokens go to their
matchers on several threads (`GrammarManager.accept_many`) with the same results as one
by one, the bitmask buffers take turns (a step's is not overwritten while its copy to the
device may be queued), an engine whose model runs in its own process hands the workers
the bitmask tensor (no bytes), a step's accepts and next bitmasks run on threads while the
core plans the next step (`GrammarManager.start_step`, pipelined steps), and none of this
changes a single output token."""
from __future__ import annotations

import random

import numpy as np
import pytest

from raylm import LLM, SamplingParams, StructuredOutputsParams
from raylm.engine import grammar as grammar_mod
from raylm.engine.grammar import GrammarManager
from tests.helpers import make_tokenizer
from tests.test_structured_outputs import PROMPTS, SCHEMAS


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def manager(tok) -> GrammarManager:
    return GrammarManager(lambda: tok, len(tok), [tok.eos_token_id])


def trajectories(tok, n: int, steps: int, seed: int = 0):
    """n requests (the schemas in turn) and, per request, `steps` tokens its grammar
    allows in order (random among the allowed; the stop token ends one early)."""
    mgr = manager(tok)
    compiled = [mgr.compile(StructuredOutputsParams(json=SCHEMAS[i % len(SCHEMAS)])).result() for i in range(n)]
    rng = random.Random(seed)
    out = []
    for c in compiled:
        m, toks = mgr.matcher(c, []), []
        for _ in range(steps):
            if m.is_terminated():
                break
            mask = np.frombuffer(mgr.bitmask([m]), dtype=np.uint8)
            allowed = np.flatnonzero(np.unpackbits(mask, bitorder="little")[:mgr.mask_vocab])
            t = int(rng.choice(list(allowed)))
            assert m.accept_token(t)
            toks.append(t)
        out.append(toks)
    mgr.shutdown()
    return compiled, out


def test_accept_many_on_threads_equals_one_by_one(tok, monkeypatch):
    monkeypatch.setattr(grammar_mod, "PARALLEL_ACCEPT_MIN", 4)
    compiled, trajs = trajectories(tok, 24, 40)
    seq, par = manager(tok), manager(tok)
    seq.accept_threads, par.accept_threads = 1, 4
    ms_seq = [seq.matcher(c, []) for c in compiled]
    ms_par = [par.matcher(c, []) for c in compiled]
    for step in range(40):
        live = [i for i, t in enumerate(trajs) if len(t) > step]
        if not live:
            break
        tokens = [trajs[i][step] for i in live]
        a = seq.accept_many([ms_seq[i] for i in live], tokens)
        b = par.accept_many([ms_par[i] for i in live], tokens)
        assert a == b and all(ok for ok, _ in a)
        assert seq.bitmask([ms_seq[i] for i in live if not ms_seq[i].is_terminated()]) == \
            par.bitmask([ms_par[i] for i in live if not ms_par[i].is_terminated()])
    assert par._accept_pool is not None  # the threads did the work
    assert sum(term for term in (m.is_terminated() for m in ms_par)) >= 1
    # A refused token: (False, False), and the matcher is where it was.
    m = par.matcher(compiled[0], [])
    before = par.bitmask([m])
    refused = next(t for t in range(len(tok)) if t not in set(
        np.flatnonzero(np.unpackbits(np.frombuffer(before, dtype=np.uint8), bitorder="little"))))
    assert par.accept_many([m] * 1, [refused]) == [(False, False)]
    assert par.bitmask([m]) == before
    seq.shutdown()
    par.shutdown()


def test_bitmask_buffers_take_turns(tok):
    mgr = manager(tok)
    compiled = mgr.compile(StructuredOutputsParams(json=SCHEMAS[0])).result()
    ms = [mgr.matcher(compiled, []) for _ in range(3)]
    a = mgr.bitmask_tensor(ms)
    b = mgr.bitmask_tensor(ms[:2])
    c = mgr.bitmask_tensor(ms)
    assert a.data_ptr() != b.data_ptr() and a.data_ptr() == c.data_ptr()
    assert a.shape == (3, -(-mgr.mask_vocab // 32)) and b.shape[0] == 2
    assert c.numpy().tobytes() == mgr.bitmask(ms)
    assert mgr.bitmask_tensor([]).shape[0] == 0
    mgr.shutdown()


def test_bitmask_buffers_start_at_the_reserved_rows(tok, llama_dir):
    """Each buffer holds reserve_rows (the engine's max_num_seqs) from its first use, so a
    batch growing to that size never allocates (on CUDA: pins) a new buffer mid-run."""
    mgr = manager(tok)
    mgr.reserve_rows = 40
    compiled = mgr.compile(StructuredOutputsParams(json=SCHEMAS[0])).result()
    ms = [mgr.matcher(compiled, []) for _ in range(3)]
    first = [mgr.bitmask_tensor(ms).data_ptr(), mgr.bitmask_tensor(ms).data_ptr()]
    assert [b.shape[0] for b in mgr._bitmask] == [40, 40]
    big = [mgr.matcher(compiled, []) for _ in range(40)]
    assert [mgr.bitmask_tensor(big).data_ptr(), mgr.bitmask_tensor(big).data_ptr()] == first
    mgr.shutdown()
    llm = LLM(llama_dir, max_model_len=512, max_num_seqs=24)
    try:  # the engine reserves its max_num_seqs
        llm.generate([PROMPTS[0]], SamplingParams(max_tokens=4, structured_outputs=StructuredOutputsParams(
            json=SCHEMAS[0])), use_tqdm=False)
        assert llm.llm_engine.core.grammar_requests.manager.reserve_rows == 24
    finally:
        llm.shutdown()


def test_in_process_engine_hands_tensors_and_outputs_do_not_change(llama_dir, monkeypatch):
    llm = LLM(llama_dir, max_model_len=512, max_num_seqs=16)
    try:
        grammar = llm.llm_engine.core.grammar_requests
        assert grammar.tensor_bitmasks and not grammar.pin_memory  # in process, on the CPU
        params = [SamplingParams(temperature=1.0, seed=s, max_tokens=64,
                                 structured_outputs=StructuredOutputsParams(json=SCHEMAS[s % 3]))
                  for s in range(12)]
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(params))]

        def run():
            return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]

        tensors = run()
        # The matchers on 4 threads at any batch, and the bitmask as bytes (the wire's form).
        monkeypatch.setattr(grammar_mod, "PARALLEL_ACCEPT_MIN", 2)
        grammar.manager.accept_threads = 4
        grammar.tensor_bitmasks = False
        assert run() == tensors
        assert grammar.manager._accept_pool is not None
    finally:
        llm.shutdown()


def test_start_step_on_threads_equals_accepts_then_bitmask(tok, monkeypatch):
    """A step's matcher work on threads (GrammarManager.start_step): each chunk's accepts,
    then its rows of the next bitmask, give what accept_many then bitmask_tensor give,
    whichever matchers take a token, fill a row, or both; a matcher that terminates on
    its token gets an all-allowed row (its request ended); the interpreter's switch
    interval is cut while the threads run and restored after."""
    import sys

    monkeypatch.setattr(grammar_mod, "PARALLEL_STEP_MIN", 4)
    compiled, trajs = trajectories(tok, 30, 60, seed=1)
    seq, par = manager(tok), manager(tok)
    par.accept_threads = 3
    ms_seq = [seq.matcher(c, []) for c in compiled]
    ms_par = [par.matcher(c, []) for c in compiled]
    rng = random.Random(2)
    switch = sys.getswitchinterval()
    saw_terminated_row = False
    for step in range(60):
        live = [i for i, t in enumerate(trajs) if len(t) > step]
        if not live:
            break
        # Some rows take no token this step (a prefill's first sample), some fill no row
        # (their request left the next step).
        take = [i for i in live if rng.random() < 0.85]
        fill = [i for i in live if rng.random() < 0.85]
        tokens = [trajs[i][step] for i in take]
        want_acc = seq.accept_many([ms_seq[i] for i in take], tokens)
        allow = frozenset(k for k, i in enumerate(fill) if ms_seq[i].is_terminated())
        saw_terminated_row |= bool(allow)
        want = seq.bitmask_tensor([ms_seq[i] for i in fill], allow).clone()
        job = par.start_step([ms_par[i] for i in take], tokens, [ms_par[i] for i in fill])
        assert job.accepted() == want_acc
        got = job.bitmask()
        assert sys.getswitchinterval() == switch
        assert got.shape == want.shape and bool((got == want).all()), step
        for k in allow:
            assert bool((got[k] == -1).all())
        for i in live:  # a row that took no token takes this one next step
            if i not in take:
                trajs[i] = trajs[i][:step] + [trajs[i][step]] + trajs[i][step:]
    assert saw_terminated_row
    assert par._accept_pool is not None and (3, 2) in par._chunk_fillers  # 3 chunks on the threads
    seq.shutdown()
    par.shutdown()


def test_a_step_without_rows_or_abandoned_restores_the_switch_interval(tok, monkeypatch):
    """A threaded step that fills no row (its requests all left the next step), or is
    abandoned before its bitmask is read (the executor failed), still joins its threads
    and restores the switch interval on close(); a fill-less step takes no bitmask buffer."""
    import sys

    monkeypatch.setattr(grammar_mod, "PARALLEL_STEP_MIN", 2)
    compiled, trajs = trajectories(tok, 6, 2, seed=3)
    mgr = manager(tok)
    mgr.accept_threads = 2
    ms = [mgr.matcher(c, []) for c in compiled]
    switch, turn = sys.getswitchinterval(), mgr._turn
    job = mgr.start_step(ms, [t[0] for t in trajs], [])
    assert sys.getswitchinterval() < switch
    assert all(ok for ok, _ in job.accepted())
    job.close()
    job.close()
    assert sys.getswitchinterval() == switch and mgr._turn == turn
    job = mgr.start_step(ms, [t[1] for t in trajs], ms)
    job.close()  # abandoned: its bitmask never read
    assert sys.getswitchinterval() == switch
    mgr.shutdown()


def test_pipelined_grammar_steps_match_synchronous_steps(llama_dir, monkeypatch):
    """Under asynchronous scheduling with grammar rows, the next step is scheduled,
    planned and launched while this one's bitmasks fill on the grammar threads
    (EngineCore._finish_deferred): the same tokens as synchronous steps, with
    unconstrained neighbours, requests ending mid-flight and an abort."""
    monkeypatch.setattr(grammar_mod, "PARALLEL_STEP_MIN", 2)
    monkeypatch.setattr(grammar_mod, "ACCEPT_THREADS", 2)
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=48,
                             structured_outputs=StructuredOutputsParams(json=SCHEMAS[s % 3]))
              for s in range(10)] + [SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True),
                                     SamplingParams(temperature=0.8, seed=4, max_tokens=7)]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(params))]
    sync = LLM(llama_dir, max_model_len=512, max_num_seqs=16, async_scheduling=False)
    try:
        want = [o.outputs[0].token_ids for o in sync.generate(prompts, params, use_tqdm=False)]
    finally:
        sync.shutdown()
    llm = LLM(llama_dir, max_model_len=512, max_num_seqs=16, async_scheduling=True)
    try:
        core = llm.llm_engine.core
        pipelined = []
        step = core.step

        def counting_step():
            out = step()
            pipelined.append(core._deferred is not None)
            return out

        core.step = counting_step
        # The order of a pipelined launch: N+2's inputs built on the host, then N+1's
        # sampling queued (launch's before_inputs), then N+2's forward pass.
        runner, events = core.executor.runner, []
        launch, finish = runner.launch, runner.finish_sampling

        def logged_launch(plan, defer_sampling=False, before_inputs=None):
            events.append("launch")
            return launch(plan, defer_sampling, before_inputs)

        def logged_finish(*a):
            events.append("sample")
            return finish(*a)

        runner.launch, runner.finish_sampling = logged_launch, logged_finish
        hook = runner.model.register_forward_pre_hook(lambda *_: events.append("forward"))
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        hook.remove()
        runner.launch, runner.finish_sampling = launch, finish
        assert got == want
        assert sum(pipelined) > 5, pipelined  # steps left the next one launched
        order = "".join(e[0] for e in events)  # l, s, f
        assert order.count("lsf") > 5, order  # a step's sampling queued inside the next one's launch
        assert (2, 1) in core.grammar_requests.manager._chunk_fillers  # on the threads, in 2 chunks
        # An abort between steps while two are in flight: the others are unchanged.
        engine = llm.llm_engine
        for i, (p, sp) in enumerate(zip(prompts, params)):
            engine.add_request(f"a{i}", p, sp)
        while not core._deferred:
            engine.step()
        engine.abort_request("a0")
        finished = {}
        while engine.has_unfinished_requests():
            for o in engine.step():
                if o.finished:
                    finished[o.request_id] = o.outputs[0].token_ids
        assert [finished[f"a{i}"] for i in range(1, len(params))] == want[1:]
        assert core.block_manager.num_used_blocks == 0
        for _ in range(3):  # the steps still on the device (tokens of ended requests) drain
            core.step()
        assert not core.step_in_flight and not core.has_unfinished_requests()
    finally:
        llm.shutdown()


def _pipelined_and_sync(llama_dir, prompts, params, extra_requests=None, **engine_kw):
    """Token ids from a synchronous engine and from an asynchronous one whose grammar
    steps pipeline (threads from 2 rows), and how many of the latter's steps left the next
    one launched. `extra_requests`: (after how many steps, prompt, params) added mid-run."""
    def run(async_scheduling: bool):
        llm = LLM(llama_dir, max_num_seqs=16, async_scheduling=async_scheduling, **engine_kw)
        try:
            engine, core = llm.llm_engine, llm.llm_engine.core
            for i, (p, sp) in enumerate(zip(prompts, params)):
                engine.add_request(str(i), p, sp)
            late = sorted(extra_requests or [], key=lambda x: x[0])
            done, steps, pipelined = {}, 0, 0
            while engine.has_unfinished_requests() or late:
                while late and late[0][0] <= steps:
                    _, p, sp = late.pop(0)
                    engine.add_request(f"late{len(done)}-{steps}", p, sp)
                for o in engine.step():
                    if o.finished:
                        done[o.request_id] = o.outputs[0].token_ids
                steps += 1
                pipelined += core._deferred is not None
            stats = core.stats()
            return done, pipelined, stats
        finally:
            llm.shutdown()

    want, _, _ = run(False)
    got, pipelined, stats = run(True)
    return want, got, pipelined, stats


def test_pipelined_grammar_steps_under_preemption(llama_dir, monkeypatch):
    """A KV cache too small for every request at once: the scheduler preempts requests
    whose next step is already launched (two steps in flight) and recomputes them; the
    tokens are the synchronous engine's and no block leaks."""
    monkeypatch.setattr(grammar_mod, "PARALLEL_STEP_MIN", 2)
    probe = LLM(llama_dir, max_model_len=256, block_size=4)
    per_block = probe.llm_engine.executor.kv_bytes_per_block()
    probe.shutdown()
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=40,
                             structured_outputs=StructuredOutputsParams(json=SCHEMAS[s % 3]))
              for s in range(8)]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(params))]
    want, got, pipelined, stats = _pipelined_and_sync(llama_dir, prompts, params, max_model_len=256,
                                                      block_size=4, kv_cache_memory_bytes=64 * per_block)
    assert got == want
    assert pipelined > 5 and stats["num_preemptions"] > 0 and stats["blocks_in_use"] == 0


def test_a_penalty_request_arriving_mid_pipeline_drains_it(llama_dir, monkeypatch):
    """A request whose sampling reads its outputs so far (a repetition penalty) arrives
    while grammar steps pipeline: the pipeline drains (its next step waits for the tokens
    in flight) and resumes once it is gone; every request's tokens are the synchronous
    engine's."""
    monkeypatch.setattr(grammar_mod, "PARALLEL_STEP_MIN", 2)
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=60,
                             structured_outputs=StructuredOutputsParams(json=SCHEMAS[s % 3]))
              for s in range(6)]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(params))]
    late = [(8, PROMPTS[0], SamplingParams(temperature=0.9, seed=11, max_tokens=6, repetition_penalty=1.3,
                                           ignore_eos=True)),
            (10, PROMPTS[1], SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))]
    want, got, pipelined, _ = _pipelined_and_sync(llama_dir, prompts, params, extra_requests=late,
                                                  max_model_len=512)
    assert pipelined > 5
    assert {k: v for k, v in got.items() if not k.startswith("late")} == \
        {k: v for k, v in want.items() if not k.startswith("late")}
    # The late requests' ids carry the step they came in at; their tokens do not depend on it.
    assert sorted(v for k, v in got.items() if k.startswith("late")) == \
        sorted(v for k, v in want.items() if k.startswith("late"))
