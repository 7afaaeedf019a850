"""Step plans and results survive the msgpack wire form the Ray executor sends."""
import msgpack

from raylm.workers.messages import NewRequest, SeqChunk, StepPlan, StepResult, TokenLogprobs


def roundtrip(obj):
    return type(obj).from_wire(msgpack.unpackb(msgpack.packb(obj.to_wire())))


def test_plan_and_result_roundtrip():
    plan = StepPlan(seqs=[SeqChunk("a", [1, 2], 3, [4, 5], True), SeqChunk("b", [-1], 9, [7], False)],
                    new_requests=[NewRequest("a", [1, 2], {"temperature": 0.5, "stop": ["x"]})],
                    finished_ids=["c"], preempted_ids=["d"])
    assert roundtrip(plan) == plan
    result = StepResult(sampled={"a": 3}, logprobs={"a": TokenLogprobs([1, 3], [-0.5, -0.9], 3, -0.9, 2)},
                        prompt_logprobs={"a": [TokenLogprobs([], [], 2, -0.1, 1)]}, execute_time_s=0.25)
    assert roundtrip(result) == result
    assert roundtrip(StepPlan()) == StepPlan() and roundtrip(StepResult()) == StepResult()
