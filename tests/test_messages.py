"""Step plans and results survive the msgpack wire form the Ray executor sends."""
import msgpack

from raylm.workers.messages import (NewRequest, SamplingOptions, SeqChunk, StepPlan, StepResult,
                                    TokenLogprobs)


def roundtrip(obj):
    return type(obj).from_wire(msgpack.unpackb(msgpack.packb(obj.to_wire())))


def test_plan_and_result_roundtrip():
    options = SamplingOptions(temperature=0.5, top_p=0.9, top_k=20, min_p=0.05, seed=2 ** 64 - 1,
                              repetition_penalty=1.2, presence_penalty=-0.5, frequency_penalty=0.25,
                              min_tokens=3, stop_token_ids=[9, 10], eos_token_ids=[2], ignore_eos=True,
                              logprobs=4, prompt_logprobs=0, output_offset=1)
    plan = StepPlan(seqs=[SeqChunk("a", [1, 2], 3, [4, 5], True), SeqChunk("b", [-1], 9, [], False)],
                    new_requests=[NewRequest("a", [1, 2], options), NewRequest("b", [3], SamplingOptions())],
                    finished_ids=["c"], preempted_ids=["d"])
    again = roundtrip(plan)
    assert again == plan
    assert isinstance(again.new_requests[0].sampling, SamplingOptions)
    result = StepResult(sampled={"a": 3}, logprobs={"a": TokenLogprobs([1, 3], [-0.5, -0.9], 3, -0.9, 2)},
                        prompt_logprobs={"a": [TokenLogprobs([], [], 2, -0.1, 1)]}, execute_time_s=0.25)
    assert roundtrip(result) == result
    assert roundtrip(StepPlan()) == StepPlan() and roundtrip(StepResult()) == StepResult()


def test_sampling_options_roundtrip_every_field():
    # Every field a distinct value that is no field's default, so a field out of place on
    # the wire shows.
    options = SamplingOptions(*[i + 0.5 for i in range(15)])
    assert roundtrip(options) == options
