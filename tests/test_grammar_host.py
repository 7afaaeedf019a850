"""The engine core's grammar work per step, on the host: the emitted tokens go to their
matchers on several threads (`GrammarManager.accept_many`) with the same results as one
by one, the bitmask buffers take turns (a step's is not overwritten while its copy to the
device may be queued), an engine whose model runs in its own process hands the workers
the bitmask tensor (no bytes), and none of this changes a single output token."""
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
