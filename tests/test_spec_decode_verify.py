"""Exact verification of speculative proposals (raylm.workers.spec_verify): one-hot
(n-gram) proposals give token for token what the sampler gives position by position
(greedy and seeded, penalties and filters included); rejection sampling with a draft
distribution q reproduces the target distribution p (chi-square, fixed seeds), not q."""
import random
from dataclasses import replace

import pytest
import torch

from raylm.workers.messages import SamplingOptions
from raylm.workers.sampler import SamplingState, sample
from raylm.workers.spec_verify import (emitted_logprobs, position_states, row_offsets, target_probs,
                                       verify_one_hot, verify_rejection)

CPU = torch.device("cpu")
# 0.999 quantile of chi-square with 7 degrees of freedom (V = 8 categories).
CHI2_7_999 = 24.32


def state(options: SamplingOptions, prompt=(1, 2, 3), outputs=()) -> SamplingState:
    return SamplingState.of_request(list(prompt) + list(outputs),
                                    replace(options, output_offset=len(outputs)), CPU)


def reference(logits, st: SamplingState, off: int, k: int) -> list[int]:
    """Plain decoding: sampler.sample one position at a time, each seeing the tokens
    before it as outputs."""
    toks = []
    for j in range(k + 1):
        s = SamplingState(list(st.prompt_token_ids), st.options, list(st.output_token_ids) + toks,
                          st.generator)
        s.num_sampled = st.num_sampled + j
        toks.append(int(sample(logits[off + j:off + j + 1].clone(), [s])[0]))
    return toks


OPTIONS = [
    SamplingOptions(temperature=0.0),
    SamplingOptions(temperature=0.0, repetition_penalty=1.5, frequency_penalty=0.7),
    SamplingOptions(temperature=0.8, seed=11),
    SamplingOptions(temperature=1.1, top_k=20, top_p=0.9, seed=12),
    SamplingOptions(temperature=0.7, min_p=0.05, presence_penalty=1.2, repetition_penalty=1.3, seed=13),
    SamplingOptions(temperature=0.9, seed=14, min_tokens=4, eos_token_ids=[0, 1, 2, 3, 4],
                    stop_token_ids=[5]),
]


@pytest.mark.parametrize("trial", range(4))
def test_one_hot_verification_equals_plain_decoding(trial):
    rng = random.Random(trial)
    vocab = 50
    rows = []  # (state, k)
    for i in range(12):
        opts = OPTIONS[i % len(OPTIONS)]
        outputs = [rng.randrange(vocab) for _ in range(rng.randrange(0, 4))]
        rows.append((state(opts, outputs=outputs), rng.choice([0, 1, 3, 5])))
    n = sum(k + 1 for _, k in rows)
    # Peaked logits, so proposals equal to the reference are often sampled again.
    logits = torch.randn(n, vocab, generator=torch.Generator().manual_seed(trial)) * 4
    proposals, expected, off = [], [], 0
    for st, k in rows:
        ref = reference(logits, st, off, k)
        props = ref[:k]
        m = rng.randrange(k + 2)  # where the proposals go wrong (k or more: nowhere)
        if m < k:
            props[m] = (props[m] + 1 + rng.randrange(vocab - 1)) % vocab
            expected.append(ref[:m + 1])
        else:
            expected.append(ref)
        proposals.append(props)
        off += k + 1
    states = [st for st, _ in rows]
    res = verify_one_hot(logits, states, proposals)
    assert res.tokens == expected
    assert res.num_accepted == [len(e) - 1 for e in expected]
    assert [st.num_sampled for st in states] == [len(st.output_token_ids) for st in states]  # untouched
    # The emitted positions and tokens line up with the logits rows.
    offs = row_offsets(proposals)
    assert res.positions.tolist() == [offs[i] + j for i, e in enumerate(expected) for j in range(len(e))]
    assert res.token_ids.tolist() == [t for e in expected for t in e]


def test_penalties_see_earlier_proposals_as_outputs():
    vocab = 10
    logits = torch.zeros(3, vocab)
    logits[:, 3] = 5.0
    logits[:, 7] = 4.0
    st = state(SamplingOptions(temperature=0.0, presence_penalty=3.0), prompt=(1, 2))
    res = verify_one_hot(logits, [st], [[3, 3]])
    # Position 0 takes 3; position 1 sees it as an output: 3 drops to 2.0, 7 wins.
    assert res.tokens == [[3, 7]] and res.num_accepted == [1]
    st = state(SamplingOptions(temperature=0.0, min_tokens=2, eos_token_ids=[3]), prompt=(1, 2))
    # EOS (3) is banned at output positions 0 and 1, allowed at 2.
    logits[:, 3] = 9.0
    assert verify_one_hot(logits, [st], [[7, 7]]).tokens == [[7, 7, 3]]


def test_seeded_verification_does_not_depend_on_the_batch():
    vocab = 40
    logits = torch.randn(4, vocab, generator=torch.Generator().manual_seed(0))
    opts = SamplingOptions(temperature=1.0, seed=99)
    q = torch.softmax(torch.randn(3, vocab, generator=torch.Generator().manual_seed(1)), dim=1)
    alone = verify_rejection(logits, [state(opts)], [[4, 5, 6]], q).tokens[0]
    other = torch.randn(2, vocab)
    both = verify_rejection(torch.cat([other, logits]), [state(SamplingOptions(temperature=1.0, seed=1)), state(opts)],
                            [[9], [4, 5, 6]], torch.cat([torch.full((1, vocab), 1 / vocab), q]))
    assert both.tokens[1] == alone
    assert verify_one_hot(logits, [state(opts)], [[4, 5, 6]]).tokens[0] == \
        verify_one_hot(torch.cat([other, logits]), [state(opts), state(opts)], [[1], [4, 5, 6]]).tokens[1]


def chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    keep = expected > 0
    assert counts[~keep].sum() == 0, "a token of probability 0 was emitted"
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


def run_rejection(m, p_logits, q_probs, options, seeds=None, k=2):
    """m rows, each k proposals drawn from q; the target's logits are the same per row."""
    g = torch.Generator().manual_seed(7)
    props = torch.multinomial(q_probs, m, replacement=True, generator=g).T.tolist()  # [m, k]
    logits = p_logits.repeat(m, 1)
    states = [state(options if seeds is None else replace(options, seed=seeds[i])) for i in range(m)]
    return verify_rejection(logits, states, props, q_probs.repeat(m, 1),
                            default_generator=torch.Generator().manual_seed(3))


def counts_at(res, j, vocab=8):
    toks = [t[j] for t in res.tokens if len(t) > j]
    return torch.bincount(torch.tensor(toks), minlength=vocab).double(), len(toks)


@pytest.mark.parametrize("options,seeded", [
    (SamplingOptions(temperature=1.0), False),
    (SamplingOptions(temperature=0.7, top_k=5), False),
    (SamplingOptions(temperature=1.0, top_p=0.8), True),
])
def test_rejection_sampling_reproduces_the_target_not_the_draft(options, seeded):
    vocab, k = 8, 2
    g = torch.Generator().manual_seed(0)
    p_logits = torch.randn(k + 1, vocab, generator=g) * 1.5
    q_probs = torch.softmax(torch.randn(k, vocab, generator=g) * 1.5, dim=1)
    m = 4000 if seeded else 20000
    res = run_rejection(m, p_logits, q_probs, options, seeds=list(range(m)) if seeded else None)
    p = target_probs(p_logits, [state(options)] * (k + 1)).double()
    for j in range(k + 1):  # first token, second (after an accepted first), bonus
        counts, total = counts_at(res, j)
        assert total > 150  # top_p=0.8 keeps few tokens: few rows accept both
        assert chi2(counts, p[j]) < CHI2_7_999, (j, counts / total, p[j])
        if j < k:
            assert chi2(counts, q_probs[j].double()) > 10 * CHI2_7_999
    assert 0 < sum(res.num_accepted) < k * m


def test_a_draft_equal_to_the_target_is_always_accepted_and_greedy_rejection_is_one_hot():
    vocab, k, m = 16, 3, 50
    g = torch.Generator().manual_seed(4)
    p_logits = torch.randn(k + 1, vocab, generator=g)
    opts = SamplingOptions(temperature=0.9)
    p = target_probs(p_logits, [state(opts)] * (k + 1))
    res = run_rejection(m, p_logits, p[:k].contiguous(), opts, k=k)
    assert res.num_accepted == [k] * m
    # Greedy: rejection sampling with any q gives what one-hot verification gives.
    greedy = SamplingOptions(temperature=0.0, repetition_penalty=1.3)
    logits = torch.randn(2 * (k + 1), vocab, generator=g)
    states = [state(greedy), state(greedy)]
    best = [reference(logits, states[0], 0, k), reference(logits, states[1], k + 1, k)]
    proposals = [best[0][:k], best[1][:1] + [(best[1][1] + 1) % vocab, 0]]
    q = torch.softmax(torch.randn(2 * k, vocab, generator=g), dim=1)
    assert verify_rejection(logits, states, proposals, q).tokens == \
        verify_one_hot(logits, states, proposals).tokens == [best[0], best[1][:2]]


def test_logprobs_are_the_raw_log_softmax_of_the_emitted_tokens():
    vocab = 12
    logits = torch.randn(5, vocab, generator=torch.Generator().manual_seed(2))
    states = [state(SamplingOptions(temperature=0.0, repetition_penalty=2.0)), state(SamplingOptions(temperature=0.0))]
    best = logits[:3].argmax(dim=1).tolist()
    res = verify_one_hot(logits, states, [[best[0], best[1]], [0]])
    top_ids, top_lp, chosen_lp, ranks = emitted_logprobs(logits, res, 3)
    raw = torch.log_softmax(logits, dim=1)
    want = raw[res.positions, res.token_ids]
    assert torch.allclose(chosen_lp, want)
    assert torch.equal(top_ids, raw[res.positions].topk(3, dim=1).indices)
    assert len(chosen_lp) == sum(len(t) for t in res.tokens)


def test_shape_errors_name_the_counts():
    st = state(SamplingOptions())
    with pytest.raises(ValueError, match="logits have 2 rows; the proposals need 3"):
        verify_one_hot(torch.zeros(2, 5), [st], [[1, 2]])
    with pytest.raises(ValueError, match=r"draft_probs has shape \(1, 5\); the proposals need \(2, 5\)"):
        verify_rejection(torch.zeros(3, 5), [st], [[1, 2]], torch.zeros(1, 5))
    with pytest.raises(ValueError, match="2 sampling states for 1 rows"):
        verify_one_hot(torch.zeros(3, 5), [st, st], [[1, 2]])


def test_position_states_share_plain_rows_and_copy_the_others():
    plain, seeded = state(SamplingOptions(temperature=0.5)), state(SamplingOptions(seed=3, frequency_penalty=1.0))
    ps = position_states([plain, seeded], [[1, 2], [4, 5]])
    assert ps[:3] == [plain] * 3
    assert [s.num_sampled for s in ps[3:]] == [0, 1, 2]
    assert [s.output_token_ids for s in ps[3:]] == [[], [4], [4, 5]]
    assert seeded.output_token_ids == [] and seeded.num_sampled == 0


def test_acceptance_draws_of_seeded_rows_take_nothing_from_the_default_generator():
    """Rejection sampling's acceptance draws: a seeded row's depend on (seed, position)
    alone, whatever its neighbours; a batch of seeded rows draws nothing from the default
    generator (no unseeded draw it would overwrite), and unseeded rows still draw from it."""
    from raylm.workers.spec_verify import _acceptance_noise

    seeded = [state(SamplingOptions(temperature=0.8, seed=s)) for s in (3, 4)]
    free = state(SamplingOptions(temperature=0.8))
    props = [[5, 6], [7]]
    gen = torch.Generator().manual_seed(0)
    before = gen.get_state()
    u, noise = _acceptance_noise(seeded, props, 3, 50, torch.device("cpu"), gen)
    assert torch.equal(gen.get_state(), before)
    u2, noise2 = _acceptance_noise([seeded[0], free, seeded[1]], [props[0], [9, 9], props[1]], 5, 50,
                                   torch.device("cpu"), gen)
    assert not torch.equal(gen.get_state(), before)
    assert torch.equal(u2[[0, 1, 4]], u) and torch.equal(noise2[[0, 1, 4]], noise)
    assert bool((noise2[2:4] > 0).all()) and bool(((u2[2:4] >= 0) & (u2[2:4] < 1)).all())
