"""Seeded sampling: a seeded request's token at output position p depends only on its
seed and p, so it is the same whatever shares the batch, with or without asynchronous
scheduling, and when the request is re-dispatched by recompute to a fresh worker group
(prompt + the k tokens generated so far, `output_offset=k`): the continuation is the
undisturbed one, penalties and min_tokens counting the k tokens as outputs."""
from dataclasses import replace

import pytest
import torch

from raylm import LLM, SamplingParams
from raylm.engine.config import EngineArgs
from raylm.engine.core import EngineCore, EngineCoreRequest
from raylm.workers.messages import SamplingOptions
from raylm.workers.sampler import SamplingState, _apply_penalties, draw_seed, sample

CPU = torch.device("cpu")
VOCAB = 300


def state(options: SamplingOptions, prompt=(1, 2, 3), outputs=(), num_sampled=None) -> SamplingState:
    st = SamplingState.of_request(list(prompt) + list(outputs), replace(options, output_offset=len(outputs)), CPU)
    if num_sampled is not None:
        st.num_sampled = num_sampled
    return st


def random_logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


# ---- the sampler -------------------------------------------------------------------
def test_seeded_row_is_the_same_in_any_batch():
    logits = random_logits(6)
    options = [SamplingOptions(temperature=0.9, top_p=0.9, seed=5),
               SamplingOptions(temperature=1.0, top_k=20, seed=7),
               SamplingOptions(temperature=1.0),  # unseeded
               SamplingOptions(temperature=0.0),  # greedy
               SamplingOptions(temperature=0.7, min_p=0.05, seed=-3, presence_penalty=0.5,
                               repetition_penalty=1.2),
               SamplingOptions(temperature=1.2, seed=2 ** 64 - 1)]
    states = [state(o, outputs=(4, 4, 9)[:i % 4], num_sampled=3 + i) for i, o in enumerate(options)]
    full = sample(logits, states, torch.Generator().manual_seed(1)).tolist()
    for i, st in enumerate(states):
        if st.generator is None:
            continue
        assert sample(logits[i:i + 1], [st]).tolist() == [full[i]]  # alone: no batched draw
        order = [j for j in range(6) if j != i][::-1] + [i]  # last, among the others
        again = sample(logits[order], [states[j] for j in order], torch.Generator().manual_seed(9))
        assert again[-1].item() == full[i]
    assert full[3] == logits[3].argmax().item()


def test_seeded_draw_follows_the_position():
    flat = torch.zeros(1, VOCAB)  # uniform: the token is the argmin of the draw
    opts = SamplingOptions(temperature=1.0, seed=11)
    tokens = [sample(flat, [state(opts, num_sampled=p)]).item() for p in range(12)]
    assert len(set(tokens)) > 6  # a fresh draw at each position
    assert tokens == [sample(flat, [state(opts, num_sampled=p)]).item() for p in range(12)]
    other = [sample(flat, [state(replace(opts, seed=12), num_sampled=p)]).item() for p in range(12)]
    assert other != tokens
    assert len({draw_seed(s, p) for s in range(50) for p in range(50)}) == 2500


def test_output_offset_tokens_count_as_outputs():
    stops = list(range(100, 160))
    opts = SamplingOptions(temperature=0.8, seed=3, presence_penalty=0.7, frequency_penalty=0.4,
                           repetition_penalty=1.3, min_tokens=4, stop_token_ids=stops)
    st = SamplingState.of_request([5, 6, 7, 8, 120, 9, 120], replace(opts, output_offset=3), CPU)
    assert (st.prompt_token_ids, st.output_token_ids, st.num_sampled) == ([5, 6, 7, 8], [120, 9, 120], 3)
    # As if the three tokens had been sampled here.
    ref = SamplingState([5, 6, 7, 8], opts, [120, 9, 120], torch.Generator())
    logits = random_logits(1, seed=2)
    assert torch.equal(_apply_penalties(logits.clone(), [st]), _apply_penalties(logits.clone(), [ref]))
    assert sample(logits, [st]).item() == sample(logits, [ref]).item()
    # min_tokens=4 counts the three: the stop tokens are banned at position 3 only.
    assert torch.isinf(_apply_penalties(logits.clone(), [st])[0, stops]).all()
    st.num_sampled = 4
    assert not torch.isinf(_apply_penalties(logits.clone(), [st])[0, stops]).any()
    with pytest.raises(ValueError, match="output_offset is 5"):
        SamplingState.of_request([1, 2, 3, 4], replace(opts, output_offset=5), CPU)


# ---- through the engine --------------------------------------------------------------
def ids(n, start):
    return [4 + (start + i * 7) % 250 for i in range(n)]


SEEDED = {
    "plain": ({"prompt_token_ids": ids(9, 1)}, SamplingParams(temperature=1.0, seed=1, max_tokens=10,
                                                             ignore_eos=True)),
    "top": ({"prompt_token_ids": ids(20, 2)}, SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=2,
                                                             max_tokens=10, ignore_eos=True)),
    "n2": ({"prompt_token_ids": ids(5, 3)}, SamplingParams(n=2, temperature=0.7, min_p=0.02, seed=3,
                                                           max_tokens=10, ignore_eos=True)),
    "penalties": ({"prompt_token_ids": ids(14, 4)}, SamplingParams(
        temperature=0.9, seed=4, presence_penalty=0.6, frequency_penalty=0.3, repetition_penalty=1.2,
        min_tokens=3, max_tokens=10, ignore_eos=True)),
}
OTHERS = [({"prompt_token_ids": ids(30, 5)}, SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)),
          ({"prompt_token_ids": ids(3, 6)}, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)),
          ({"prompt_token_ids": ids(11, 7)}, SamplingParams(temperature=0.5, top_p=0.5, max_tokens=15,
                                                            ignore_eos=True))]


def test_seeded_tokens_do_not_depend_on_the_batch_or_async_scheduling(llama_dir):
    def tokens(llm, names, others):
        items = [SEEDED[n] for n in names] + others
        outs = llm.generate([p for p, _ in items], [sp for _, sp in items], use_tqdm=False)
        return {n: [c.token_ids for c in o.outputs] for n, o in zip(names, outs)}

    results = []
    for mode, max_num_seqs in ((False, 256), (True, 256), (True, 3)):
        llm = LLM(llama_dir, dtype="float32", max_model_len=128, block_size=8,
                  async_scheduling=mode, max_num_seqs=max_num_seqs)
        got = {}
        for name in SEEDED:  # alone
            got.update(tokens(llm, [name], []))
        results.append(got)
        results.append(tokens(llm, list(SEEDED), OTHERS))
        results.append(tokens(llm, list(SEEDED)[::-1], OTHERS[::-1] + OTHERS))
        llm.shutdown()
    assert all(r == results[0] for r in results[1:]), results
    assert results[0]["n2"][0] != results[0]["n2"][1]


class RedispatchCore(EngineCore):
    """What the core does for a re-dispatched request: the worker gets the original
    min_tokens and the number of earlier outputs at the end of the prompt (`offsets`:
    request id -> (output_offset, original min_tokens))."""

    offsets: dict = {}

    def _new_request(self, request_id):
        new = super()._new_request(request_id)
        if request_id in self.offsets:
            new.sampling.output_offset, new.sampling.min_tokens = self.offsets[request_id]
        return new


def run_core(llama_dir, reqs, offsets=None, **kw):
    core = RedispatchCore(EngineArgs(model=llama_dir, dtype="float32", max_model_len=128, block_size=8, **kw))
    core.offsets = offsets or {}
    core.add_requests(reqs)
    tokens, reasons = {r.request_id: [] for r in reqs}, {}
    while core.has_unfinished_requests():
        for out in core.step():
            tokens[out.request_id] += out.new_token_ids
            if out.finished:
                reasons[out.request_id] = out.finish_reason
    core.shutdown()
    return tokens, reasons


def test_redispatch_by_recompute_continues_the_undisturbed_run(llama_dir):
    n, m = 16, 7
    stops = list(range(40, 280))  # most of the vocabulary, so min_tokens matters
    params = {
        "top": SamplingParams(temperature=0.9, top_p=0.9, top_k=40, seed=21, max_tokens=n, ignore_eos=True),
        "penalties": SamplingParams(temperature=1.0, top_p=0.95, top_k=100, seed=22, presence_penalty=0.8,
                                    frequency_penalty=0.5, repetition_penalty=1.3, max_tokens=n,
                                    ignore_eos=True, min_tokens=m, stop_token_ids=stops),
        # Peaky enough to repeat itself, so presence and frequency penalties matter.
        "penalties_len": SamplingParams(temperature=0.2, seed=23, presence_penalty=1.0, frequency_penalty=0.5,
                                        max_tokens=n, ignore_eos=True),
    }
    prompts = {"top": ids(12, 8), "penalties": ids(6, 9), "penalties_len": ids(17, 12)}
    filler = EngineCoreRequest("filler", ids(25, 10),
                               SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True))
    first, reasons = run_core(llama_dir, [EngineCoreRequest(r, prompts[r], sp) for r, sp in params.items()]
                              + [filler], async_scheduling=False)
    assert len(first["top"]) == n and len(first["penalties_len"]) == n
    assert reasons["penalties"] == "stop" and len(first["penalties"]) == m + 1, first  # held back to m
    assert not set(first["penalties"][:m]) & set(stops)

    # The group failed after k tokens: a fresh one gets prompt + those k, beside other
    # requests, scheduled synchronously or asynchronously.
    k = {"top": 5, "penalties": 3, "penalties_len": 6}  # 3 < min_tokens: the ban spans the hand-over
    again, offsets = {}, {}
    for r, sp in params.items():
        # The core's own stop check sees only the new outputs (its params); the worker
        # gets the original min_tokens and the offset.
        rest = replace(sp, max_tokens=n - k[r], min_tokens=max(0, sp.min_tokens - k[r]))
        again[r] = EngineCoreRequest(r, prompts[r] + first[r][:k[r]], rest)
        offsets[r] = (k[r], sp.min_tokens)
    others = [EngineCoreRequest(f"o{i}", ids(7 + 9 * i, 11 + i),
                                SamplingParams(temperature=1.0, seed=i, max_tokens=9)) for i in range(3)]
    # (Asynchronously without "penalties": when a stop ends a request while the core
    # records the step in flight between scheduling and launching the next, the core
    # still plans the ended request and fails (KeyError in _new_request).)
    for mode, names in ((False, list(params)), (True, ["top", "penalties_len"])):
        second, reasons2 = run_core(llama_dir, others + [again[r] for r in names], offsets, async_scheduling=mode)
        for r in names:
            assert second[r] == first[r][k[r]:], (mode, r)
            assert reasons2[r] == reasons[r]

    # Without the offset the continuation draws from position 0 and treats the k tokens
    # as prompt: a different run.
    control, _ = run_core(llama_dir, [again["top"]], async_scheduling=True)
    assert control["top"] != first["top"][k["top"]:]
