"""SamplingParams: vLLM's defaults, validation messages, normalisation, round trips."""
from __future__ import annotations

import json

import pytest

from raylm.engine.sampling_params import SamplingParams


def test_defaults_match_vllm():
    sp = SamplingParams()
    assert (sp.n, sp.temperature, sp.top_p, sp.top_k, sp.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert (sp.presence_penalty, sp.frequency_penalty, sp.repetition_penalty) == (0.0, 0.0, 1.0)
    assert (sp.max_tokens, sp.min_tokens, sp.seed, sp.logprobs, sp.prompt_logprobs) == (16, 0, None, None, None)
    assert sp.stop == [] and sp.stop_token_ids == []
    assert not sp.ignore_eos and not sp.include_stop_str_in_output
    assert sp.skip_special_tokens and sp.spaces_between_special_tokens


# (kwargs, the argument name and the bad value that the message must contain)
BAD = [
    (dict(n=0), "n", "0"),
    (dict(n=1.5), "n", "1.5"),
    (dict(n=True), "n", "True"),
    (dict(temperature=-0.1), "temperature", "-0.1"),
    (dict(temperature=float("nan")), "temperature", "nan"),
    (dict(temperature=float("inf")), "temperature", "inf"),
    (dict(temperature="hot"), "temperature", "hot"),
    (dict(top_p=1.5), "top_p", "1.5"),
    (dict(top_p=0.0), "top_p", "0.0"),
    (dict(top_p=-0.5), "top_p", "-0.5"),
    (dict(top_k=-2), "top_k", "-2"),
    (dict(top_k=2.0), "top_k", "2.0"),
    (dict(top_k=True), "top_k", "True"),
    (dict(min_p=1.01), "min_p", "1.01"),
    (dict(min_p=-0.01), "min_p", "-0.01"),
    (dict(repetition_penalty=0.0), "repetition_penalty", "0.0"),
    (dict(repetition_penalty=-1), "repetition_penalty", "-1"),
    (dict(presence_penalty=2.5), "presence_penalty", "2.5"),
    (dict(presence_penalty=-2.01), "presence_penalty", "-2.01"),
    (dict(frequency_penalty=3), "frequency_penalty", "3"),
    (dict(frequency_penalty=-3), "frequency_penalty", "-3"),
    (dict(max_tokens=0), "max_tokens", "0"),
    (dict(max_tokens=-5), "max_tokens", "-5"),
    (dict(max_tokens=8.0), "max_tokens", "8.0"),
    (dict(min_tokens=-1), "min_tokens", "-1"),
    (dict(min_tokens=20, max_tokens=10), "min_tokens", "20"),
    (dict(logprobs=-1), "logprobs", "-1"),
    (dict(logprobs=True), "logprobs", "True"),
    (dict(prompt_logprobs=-1), "prompt_logprobs", "-1"),
    (dict(prompt_logprobs=1.0), "prompt_logprobs", "1.0"),
    (dict(seed="42"), "seed", "42"),
    (dict(seed=1.5), "seed", "1.5"),
    (dict(seed=False), "seed", "False"),
    (dict(seed=2 ** 64), "seed", str(2 ** 64)),
    (dict(stop=""), "stop", "''"),
    (dict(stop=["ok", ""]), "stop", "''"),
    (dict(stop=["ok", 3]), "stop", "3"),
    (dict(stop=5), "stop", "int"),
    (dict(stop_token_ids=[1, -2]), "stop_token_ids", "-2"),
    (dict(stop_token_ids=[1, True]), "stop_token_ids", "True"),
    (dict(stop_token_ids=[1.0]), "stop_token_ids", "1.0"),
    (dict(stop_token_ids=7), "stop_token_ids", "int"),
    (dict(ignore_eos=1), "ignore_eos", "1"),
    (dict(skip_special_tokens="yes"), "skip_special_tokens", "yes"),
]


@pytest.mark.parametrize("kwargs, name, value", BAD, ids=[f"{n}={v}" for _, n, v in BAD])
def test_validation_names_argument_and_value(kwargs, name, value):
    with pytest.raises(ValueError) as err:
        SamplingParams(**kwargs)
    message = str(err.value)
    assert name in message and value in message, message


def test_limits_are_in_the_message():
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\], got 1.5"):
        SamplingParams(top_p=1.5)
    with pytest.raises(ValueError, match=r"min_tokens must be <= max_tokens \(10\), got 20"):
        SamplingParams(min_tokens=20, max_tokens=10)


@pytest.mark.parametrize("kwargs", [
    dict(temperature=0), dict(top_p=1), dict(top_k=-1), dict(top_k=1), dict(min_p=1),
    dict(presence_penalty=-2, frequency_penalty=2), dict(max_tokens=None, min_tokens=100),
    dict(min_tokens=5, max_tokens=5), dict(logprobs=0, prompt_logprobs=0), dict(seed=-1),
    dict(seed=0), dict(repetition_penalty=1e-3),
])
def test_edge_values_accepted(kwargs):
    SamplingParams(**kwargs)


def test_normalisations():
    assert SamplingParams(top_k=-1).top_k == 0
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(stop=None).stop == []
    assert SamplingParams(stop_token_ids=(3, 4)).stop_token_ids == [3, 4]
    sp = SamplingParams(temperature=0, top_p=1, presence_penalty=1)
    assert type(sp.temperature) is float and type(sp.top_p) is float
    assert type(sp.presence_penalty) is float


def test_caller_lists_are_copied():
    stop, ids = ["x"], [1]
    sp = SamplingParams(stop=stop, stop_token_ids=ids)
    stop.append("y")
    ids.append(2)
    assert sp.stop == ["x"] and sp.stop_token_ids == [1]


def test_numpy_scalars_become_plain_python():
    np = pytest.importorskip("numpy")
    sp = SamplingParams(n=np.int64(2), temperature=np.float32(0.5), stop_token_ids=[np.int32(3)])
    assert type(sp.n) is int and type(sp.temperature) is float and type(sp.stop_token_ids[0]) is int
    json.dumps(sp.to_dict())


@pytest.mark.parametrize("temperature, greedy", [(0.0, True), (1e-6, True), (1e-5, False), (0.7, False)])
def test_is_greedy(temperature, greedy):
    assert SamplingParams(temperature=temperature).is_greedy is greedy


def test_clone_is_independent():
    sp = SamplingParams(stop=["a"], stop_token_ids=[1], seed=3)
    child = sp.clone()
    assert child == sp and child is not sp
    child.stop.append("b")
    child.stop_token_ids.append(2)
    child.max_tokens = 99
    assert sp.stop == ["a"] and sp.stop_token_ids == [1] and sp.max_tokens == 16


def test_dict_round_trip_through_json():
    sp = SamplingParams(n=3, temperature=0.7, top_p=0.9, top_k=-1, min_p=0.05, seed=11,
                        stop="END", stop_token_ids=[7], max_tokens=None, min_tokens=2,
                        logprobs=3, prompt_logprobs=0, presence_penalty=0.5,
                        frequency_penalty=-0.5, repetition_penalty=1.2, ignore_eos=True,
                        include_stop_str_in_output=True, skip_special_tokens=False,
                        spaces_between_special_tokens=False)
    d = sp.to_dict()
    assert d["stop"] == ["END"] and d["top_k"] == 0 and d["max_tokens"] is None
    again = SamplingParams.from_dict(json.loads(json.dumps(d)))
    assert again == sp and again.to_dict() == d
    assert SamplingParams.from_dict({}) == SamplingParams()


def test_dict_round_trip_through_msgpack():
    msgpack = pytest.importorskip("msgpack")
    sp = SamplingParams(stop=["a", "b"], seed=5, temperature=0.0)
    assert SamplingParams.from_dict(msgpack.unpackb(msgpack.packb(sp.to_dict()))) == sp


def test_from_dict_rejects_unknown_and_invalid():
    with pytest.raises(ValueError, match="best_of"):
        SamplingParams.from_dict({"best_of": 2})
    with pytest.raises(ValueError, match="top_p must be in"):
        SamplingParams.from_dict({"top_p": 2.0})


def test_to_dict_does_not_share_lists():
    sp = SamplingParams(stop=["a"])
    sp.to_dict()["stop"].append("b")
    assert sp.stop == ["a"]


def test_repr_is_readable():
    assert repr(SamplingParams()) == "SamplingParams()"
    sp = SamplingParams(temperature=0, max_tokens=10, stop="x")
    assert repr(sp) == "SamplingParams(temperature=0.0, stop=['x'], max_tokens=10)"
    assert eval(repr(sp)) == sp  # and it is valid Python for the same params
