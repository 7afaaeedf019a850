"""EAGLE-3 heads (raylm.workers.models.eagle3, raylm.workers.eagle_runner): the aux
layers vLLM picks, the target's aux hidden states equal transformers' layer inputs, a
head saved in vLLM's checkpoint layout (midlayer.*, fc, d2t, t2d, no embed_tokens)
loads, its proposals and q equal a dense PyTorch reference of the head computed from
the saved tensors (also on the step after a rejection), d2t maps draft ids to target
ids, and greedy verification of its proposals emits the target's greedy tokens."""
import json
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import AutoConfig, LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from raylm.workers.eagle_runner import Eagle3Runner, EagleRow
from raylm.workers.messages import SamplingOptions, SeqChunk, StepPlan
from raylm.workers.model_runner import ModelRunner
from raylm.workers.models import get_draft_head_class
from raylm.workers.models.eagle3 import Eagle3LlamaForCausalLM, aux_hidden_state_layers
from raylm.workers.sampler import SamplingState, _filter
from raylm.workers.spec_verify import verify_rejection
from tests.helpers import hf_greedy, hf_model, make_checkpoint

BS = 4
K = 3
LAYERS = 8  # vLLM's default picks (2, 4, 5)
DRAFT_VOCAB = 200
GREEDY = SamplingOptions(temperature=0.0)
PROMPT = [5, 17, 9, 40, 2, 77, 31, 8, 120]


def save_head(path, vocab, own_embed=False, layer_prefix="midlayer.", seed=0, **extra):
    """A random head in vLLM's EAGLE-3 checkpoint layout; returns its tensors."""
    os.makedirs(path, exist_ok=True)
    h, inter, heads, kv, d = 64, 96, 4, 2, 16
    cfg = LlamaConfig(hidden_size=h, intermediate_size=inter, num_attention_heads=heads,
                      num_key_value_heads=kv, num_hidden_layers=1, vocab_size=vocab,
                      rms_norm_eps=1e-6, max_position_embeddings=16, rope_theta=10000.0,
                      tie_word_embeddings=False, architectures=["LlamaForCausalLMEagle3"],
                      draft_vocab_size=DRAFT_VOCAB, **extra)
    cfg.save_pretrained(path)
    g = torch.Generator().manual_seed(seed)

    def w(*shape, scale=0.15):
        return torch.randn(*shape, generator=g) * scale

    ids = torch.randperm(vocab, generator=g)[:DRAFT_VOCAB].sort().values
    t2d = torch.zeros(vocab, dtype=torch.bool)
    t2d[ids] = True
    p = layer_prefix
    sd = {"fc.weight": w(h, 3 * h, scale=0.1), "norm.weight": 1 + w(h, scale=0.1),
          "lm_head.weight": w(DRAFT_VOCAB, h, scale=0.3), "d2t": ids - torch.arange(DRAFT_VOCAB), "t2d": t2d,
          p + "input_layernorm.weight": 1 + w(h, scale=0.1), p + "hidden_norm.weight": 1 + w(h, scale=0.1),
          p + "post_attention_layernorm.weight": 1 + w(h, scale=0.1),
          p + "self_attn.q_proj.weight": w(heads * d, 2 * h), p + "self_attn.k_proj.weight": w(kv * d, 2 * h),
          p + "self_attn.v_proj.weight": w(kv * d, 2 * h), p + "self_attn.o_proj.weight": w(h, heads * d),
          p + "mlp.gate_proj.weight": w(inter, h), p + "mlp.up_proj.weight": w(inter, h),
          p + "mlp.down_proj.weight": w(h, inter)}
    if own_embed:
        sd["embed_tokens.weight"] = w(vocab, h)
    save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(path, "model.safetensors"))
    return sd


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eagle3")
    target = make_checkpoint(str(root / "target"), "llama", seed=5, num_hidden_layers=LAYERS)
    vocab = AutoConfig.from_pretrained(target).vocab_size
    sd = save_head(str(root / "head"), vocab)
    return target, str(root / "head"), sd


def make_runner(target_dir, head_dir, num_blocks=64):
    target = ModelRunner(target_dir, AutoConfig.from_pretrained(target_dir), torch.float32, "cpu", BS)
    eagle = Eagle3Runner(target, head_dir, AutoConfig.from_pretrained(head_dir), K)
    target.allocate_kv_cache(num_blocks)
    eagle.allocate_kv_cache(num_blocks)
    return target, eagle


@torch.no_grad()
def hf_aux(target_dir, ids, layers):
    out = hf_model(target_dir)(torch.tensor([ids]), output_hidden_states=True)
    return torch.cat([out.hidden_states[i][0] for i in layers], dim=-1)


def rms(x, w, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


@torch.no_grad()
def ref_head(sd, cfg, embed, tokens, hidden):
    """Dense causal forward of the head over positions 0..T-1: (draft logits, pre-norm)."""
    p, n, hd = "midlayer.", len(tokens), 16
    x = torch.cat([rms(embed[tokens], sd[p + "input_layernorm.weight"]),
                   rms(hidden, sd[p + "hidden_norm.weight"])], dim=-1)
    q = (x @ sd[p + "self_attn.q_proj.weight"].T).view(n, -1, hd).transpose(0, 1)[None]
    k = (x @ sd[p + "self_attn.k_proj.weight"].T).view(n, -1, hd).transpose(0, 1)[None]
    v = (x @ sd[p + "self_attn.v_proj.weight"].T).view(n, -1, hd).transpose(0, 1)[None]
    cos, sin = LlamaRotaryEmbedding(cfg)(v, torch.arange(n)[None])
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    rep = q.shape[1] // k.shape[1]
    a = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                       is_causal=True)
    o = a[0].transpose(0, 1).reshape(n, -1) @ sd[p + "self_attn.o_proj.weight"].T
    res = o + hidden
    y = rms(res, sd[p + "post_attention_layernorm.weight"])
    y = (F.silu(y @ sd[p + "mlp.gate_proj.weight"].T) * (y @ sd[p + "mlp.up_proj.weight"].T)) \
        @ sd[p + "mlp.down_proj.weight"].T
    pre = y + res
    return rms(pre, sd["norm.weight"]) @ sd["lm_head.weight"].T, pre


def ref_propose(sd, cfg, embed, fc_hidden, tokens, k, vocab):
    """Greedy proposals and each step's target-vocabulary logits: position i takes
    tokens[i + 1] and fc_hidden[i] (the target computed all but the newest token), then
    each proposal with the head's pre-norm output before it."""
    ids = torch.arange(DRAFT_VOCAB) + sd["d2t"]
    toks, hid = list(tokens[1:]), fc_hidden
    props, logits = [], []
    for _ in range(k):
        draft_logits, pre = ref_head(sd, cfg, embed, torch.tensor(toks), hid)
        full = torch.full((vocab,), float("-inf"))
        full[ids] = draft_logits[-1]
        logits.append(full)
        props.append(int(full.argmax()))
        toks.append(props[-1])
        hid = torch.cat([hid, pre[-1:]])
    return props, torch.stack(logits)


def test_aux_layers_as_vllm_picks_them():
    cfg = LlamaConfig()
    assert aux_hidden_state_layers(cfg, 32) == (2, 16, 29)  # Llama-3.1-8B
    assert aux_hidden_state_layers(cfg, 8) == (2, 4, 5)
    cfg.eagle_aux_hidden_state_layer_ids = [1, 3, 6]
    assert aux_hidden_state_layers(cfg, 8) == (1, 3, 6)
    with pytest.raises(ValueError, match="L >= 7"):
        aux_hidden_state_layers(LlamaConfig(), 6)  # (2, 3, 3)


def test_target_aux_hidden_states_are_the_layer_inputs(setup):
    target_dir, _, _ = setup
    runner = ModelRunner(target_dir, AutoConfig.from_pretrained(target_dir), torch.float32, "cpu", BS)
    runner.allocate_kv_cache(16)
    runner.block_tables["a"] = list(range(4))
    layers = runner.model.get_eagle3_aux_hidden_state_layers()
    assert layers == (2, 4, 5)
    plan = StepPlan(seqs=[SeqChunk("a", PROMPT, 0, [], True)])
    ids, pos, meta, _ = runner._prepare(plan)
    plain = runner.model(ids, pos, meta, runner.backend)
    runner.model.set_aux_hidden_state_layers(layers)
    hidden, aux = runner.model(ids, pos, meta, runner.backend)
    assert torch.allclose(hidden, plain, atol=1e-5)
    assert aux.shape == (len(PROMPT), 3 * 64)
    assert torch.allclose(aux, hf_aux(target_dir, PROMPT, layers), atol=1e-4)
    runner.model.set_aux_hidden_state_layers(())
    assert isinstance(runner.model(ids, pos, meta, runner.backend), torch.Tensor)
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        runner.model.set_aux_hidden_state_layers((2, 8, 5))


@pytest.mark.parametrize("own_embed,prefix", [(False, "midlayer."), (True, "layers.0.")])
def test_checkpoint_round_trip_in_vllms_layout(setup, tmp_path, own_embed, prefix):
    target_dir, _, _ = setup
    vocab = AutoConfig.from_pretrained(target_dir).vocab_size
    sd = save_head(str(tmp_path / "h"), vocab, own_embed=own_embed, layer_prefix=prefix, seed=9)
    head_cfg = AutoConfig.from_pretrained(str(tmp_path / "h"))
    assert get_draft_head_class(head_cfg) is Eagle3LlamaForCausalLM
    target, eagle = make_runner(target_dir, str(tmp_path / "h"))
    m, p = eagle.model, prefix
    attn, mlp = m.layers[0].self_attn, m.layers[0].mlp
    assert torch.equal(attn.qkv_proj.weight, torch.cat([sd[p + f"self_attn.{x}_proj.weight"] for x in "qkv"]))
    assert torch.equal(mlp.gate_up_proj.weight, torch.cat([sd[p + "mlp.gate_proj.weight"],
                                                           sd[p + "mlp.up_proj.weight"]]))
    assert torch.equal(m.layers[0].hidden_norm.weight, sd[p + "hidden_norm.weight"])
    for ours, theirs in [(m.fc.weight, "fc.weight"), (m.lm_head.weight, "lm_head.weight"),
                         (m.norm.weight, "norm.weight"), (m.d2t, "d2t")]:
        assert torch.equal(ours, sd[theirs])
    if own_embed:
        assert torch.equal(m.embed_tokens.weight, sd["embed_tokens.weight"])
    else:  # shared with the target
        assert m.embed_tokens.weight is target.model.model.embed_tokens.weight
    assert eagle.config.max_position_embeddings >= target.max_model_len  # 16 in the checkpoint


def test_d2t_maps_draft_ids_to_target_ids(setup):
    target_dir, head_dir, sd = setup
    _, eagle = make_runner(target_dir, head_dir)
    ids = torch.arange(DRAFT_VOCAB) + sd["d2t"]
    assert torch.equal(eagle.model.target_ids(), ids)
    h = torch.randn(5, 64)
    logits = eagle.model.compute_logits(h)
    assert torch.equal(logits[:, ids], h @ sd["lm_head.weight"].T)
    outside = torch.ones(logits.shape[1], dtype=torch.bool)
    outside[ids] = False
    assert torch.isinf(logits[:, outside]).all()
    bad = dict(sd, d2t=torch.full((DRAFT_VOCAB,), 10_000))
    with pytest.raises(ValueError, match="d2t"):
        Eagle3LlamaForCausalLM(eagle.config).load_weights(bad.items())
    wrong = sd["t2d"].clone()
    wrong[int(ids[0])] = False
    with pytest.raises(ValueError, match="t2d"):
        Eagle3LlamaForCausalLM(eagle.config).load_weights(dict(sd, t2d=wrong).items())
    cfg = AutoConfig.from_pretrained(head_dir)
    cfg.vocab_size = 999
    target = ModelRunner(target_dir, AutoConfig.from_pretrained(target_dir), torch.float32, "cpu", BS)
    with pytest.raises(ValueError, match=r"vocab_size 999.*vocab_size 3\d\d"):
        Eagle3Runner(target, head_dir, cfg, K)


def _step(eagle, target_dir, sd, tokens, start, k, options):
    """Run the head over positions start..len(tokens)-2 (their aux rows from transformers)."""
    layers = eagle.aux_hidden_state_layers
    aux = hf_aux(target_dir, tokens[:-1], layers)[start:]
    row = EagleRow("a", start, list(tokens[start + 1:]), 0, k, options)
    return eagle.propose([row], aux)


def test_proposals_equal_the_reference_head_also_after_a_rejection(setup):
    target_dir, head_dir, sd = setup
    target, eagle = make_runner(target_dir, head_dir)
    target.block_tables["a"] = list(range(8))
    vocab, cfg, embed = target.hf_config.vocab_size, eagle.config, target.model.model.embed_tokens.weight
    layers = eagle.aux_hidden_state_layers
    tokens = PROMPT + [hf_greedy(target_dir, PROMPT, 1)[0][0]]
    out = _step(eagle, target_dir, sd, tokens, 0, K, GREEDY)
    fc = hf_aux(target_dir, tokens[:-1], layers) @ sd["fc.weight"].T
    props, _ = ref_propose(sd, cfg, embed, fc, tokens, K, vocab)
    assert out.token_ids == [props]
    assert set(props) <= set((torch.arange(DRAFT_VOCAB) + sd["d2t"]).tolist())
    # The target accepts one proposal and emits another token; the head rewrites the
    # positions of its rejected steps from the target's hidden states.
    n = len(tokens)
    tokens2 = tokens + [props[0], (props[1] + 1) % vocab]
    out2 = _step(eagle, target_dir, sd, tokens2, n - 1, K, GREEDY)
    fc2 = hf_aux(target_dir, tokens2[:-1], layers) @ sd["fc.weight"].T
    assert out2.token_ids == [ref_propose(sd, cfg, embed, fc2, tokens2, K, vocab)[0]]


@pytest.mark.parametrize("options", [SamplingOptions(temperature=0.9, seed=3),
                                     SamplingOptions(temperature=1.1, top_k=30, top_p=0.9, seed=4)])
def test_q_is_the_filtered_softmax_of_the_heads_logits(setup, options):
    target_dir, head_dir, sd = setup
    target, eagle = make_runner(target_dir, head_dir)
    target.block_tables["a"] = list(range(8))
    tokens = PROMPT + [7]
    out = _step(eagle, target_dir, sd, tokens, 0, K, options)
    props = out.token_ids[0]
    assert len(props) == K
    fc = hf_aux(target_dir, tokens[:-1], eagle.aux_hidden_state_layers) @ sd["fc.weight"].T
    # The reference fed back the same proposals: rebuild its logits along them.
    vocab, ids = target.hf_config.vocab_size, torch.arange(DRAFT_VOCAB) + sd["d2t"]
    toks, hid, ref = list(tokens[1:]), fc, []
    for p in props:
        draft_logits, pre = ref_head(sd, eagle.config, target.model.model.embed_tokens.weight,
                                     torch.tensor(toks), hid)
        full = torch.full((vocab,), float("-inf"))
        full[ids] = draft_logits[-1]
        ref.append(full)
        toks.append(p)
        hid = torch.cat([hid, pre[-1:]])
    expect = _filter(torch.stack(ref), [SamplingState([], options)] * K).softmax(dim=1)
    assert torch.allclose(out.draft_probs, expect, atol=1e-5)
    assert torch.allclose(out.draft_probs.sum(dim=1), torch.ones(K), atol=1e-5)
    assert (out.draft_probs[:, ~sd["t2d"]] == 0).all()


def test_greedy_verification_emits_the_targets_greedy_tokens(setup):
    target_dir, head_dir, sd = setup
    target, eagle = make_runner(target_dir, head_dir)
    target.block_tables["a"] = list(range(12))
    expected = hf_greedy(target_dir, PROMPT, 12)[0]
    tokens = PROMPT + expected[:1]
    start = 0
    while len(tokens) < len(PROMPT) + 12:
        out = _step(eagle, target_dir, sd, tokens, start, K, GREEDY)
        props = out.token_ids[0]
        logits = hf_model(target_dir)(torch.tensor([tokens + props])).logits[0, len(tokens) - 1:].float()
        res = verify_rejection(logits, [SamplingState(list(tokens), GREEDY)], [props], out.draft_probs)
        start = len(tokens) - 1  # the rows the target keeps: the last token and the accepted
        tokens = tokens + res.tokens[0]
    assert tokens[len(PROMPT):len(PROMPT) + 12] == expected


def test_engine_resolves_and_checks_the_head(setup, tmp_path):
    from raylm.engine.spec_decode.config import parse_speculative_config
    from raylm.engine.spec_decode.eagle import resolve_eagle3

    target_dir, head_dir, _ = setup
    target = AutoConfig.from_pretrained(target_dir)

    def spec(model):
        return parse_speculative_config({"method": "eagle3", "model": model, "num_speculative_tokens": 2})

    out = resolve_eagle3(spec(head_dir), target, 512)
    assert (out.method, out.model_dir, out.aux_hidden_state_layers) == ("eagle3", head_dir, (2, 4, 5))

    def head_with(name, **changes):
        d = tmp_path / name
        d.mkdir()
        cfg = json.loads((open(os.path.join(head_dir, "config.json")).read()))
        cfg.update(changes)
        (d / "config.json").write_text(json.dumps(cfg))
        return str(d)

    with pytest.raises(ValueError, match="target hidden states of size 128; the target's hidden_size is 64"):
        resolve_eagle3(spec(head_with("h", target_hidden_size=128)), target, 512)
    with pytest.raises(ValueError, match="not an EAGLE-3 head"):
        resolve_eagle3(spec(head_with("a", architectures=["LlamaForCausalLM"])), target, 512)
    assert resolve_eagle3(spec(head_with("l", eagle_aux_hidden_state_layer_ids=[1, 3, 7])), target,
                          512).aux_hidden_state_layers == (1, 3, 7)
    solo = parse_speculative_config({"method": "eagle3", "model": head_dir, "num_speculative_tokens": 2,
                                     "draft_tensor_parallel_size": 1})
    with pytest.raises(ValueError, match=r"draft_tensor_parallel_size'\] is 1; it must be the target's "
                                         r"tensor_parallel_size \(2\): an EAGLE-3 head runs on the target's ranks"):
        resolve_eagle3(solo, target, 512, 2)


def test_chunked_prefill_and_spec_rows_through_eagle_rows(setup):
    from types import SimpleNamespace

    from raylm.workers.eagle_runner import eagle_rows

    target_dir, head_dir, sd = setup
    target, eagle = make_runner(target_dir, head_dir)
    target.block_tables["a"] = list(range(8))
    layers, opts = eagle.aux_hidden_state_layers, {"a": GREEDY}
    aux = hf_aux(target_dir, PROMPT, layers)
    first = SimpleNamespace(request_id="a", token_ids=PROMPT[:4], start_pos=0, num_spec_tokens=0)
    rows = eagle_rows([first], [0, 4], {}, {"a": PROMPT}, opts, {"a": K})
    assert (rows[0].next_token_ids, rows[0].num_speculative_tokens) == (PROMPT[1:5], 0)
    assert eagle.propose(rows, aux[:4]).token_ids == [[]]
    sampled = hf_greedy(target_dir, PROMPT, 1)[0][0]
    last = SimpleNamespace(request_id="a", token_ids=PROMPT[4:], start_pos=4, num_spec_tokens=0)
    rows = eagle_rows([last], [0, len(PROMPT) - 4], {"a": [sampled]}, {"a": PROMPT}, opts, {"a": K})
    out = eagle.propose(rows, aux[4:])
    tokens = PROMPT + [sampled]
    fc = aux @ sd["fc.weight"].T
    props = ref_propose(sd, eagle.config, target.model.model.embed_tokens.weight, fc, tokens, K,
                        target.hf_config.vocab_size)[0]
    assert out.token_ids == [props]
    # A verifying row keeps its last token and the accepted proposals: m = a + 1 rows.
    spec = SimpleNamespace(request_id="a", token_ids=[sampled] + props, start_pos=len(PROMPT),
                           num_spec_tokens=K)
    rows = eagle_rows([spec], [0, K + 1], {"a": props[:1] + [3]}, {"a": PROMPT}, opts, {"a": 2})
    assert (rows[0].start_pos, rows[0].next_token_ids, rows[0].num_speculative_tokens) == \
        (len(PROMPT), [props[0], 3], 2)
