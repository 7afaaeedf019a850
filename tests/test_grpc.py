"""The gRPC front: a real grpc.aio server over the in-process cluster (LocalCluster), driven by
the blocking GenerateClient, compared with the offline LLM."""
from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest

from raylm.cluster import raylm_pb2 as pb
from raylm.cluster import raylm_pb2_grpc as pb_grpc
from raylm.cluster.grpc_client import GenerateClient, build_request
from raylm.cluster.grpc_service import StreamDeltas, make_grpc_servicer, request_to_inputs
from raylm.engine.config import EngineArgs
from raylm.engine.outputs import CompletionOutput, RequestOutput
from raylm.engine.sampling_params import SamplingParams

ENGINE = dict(max_model_len=256, kv_cache_memory_bytes=8 << 20, max_num_seqs=8, seed=0)
PROMPT = "The quick brown fox"


class _Recording:
    """The scheduler, noting each request's last output (to tell aborts from finishes)."""

    def __init__(self, inner):
        self.inner = inner
        self.last = {}

    def __getattr__(self, name):
        return getattr(self.inner, name)

    async def generate_stream(self, prompt, params, request_id=None):
        async for out in self.inner.generate_stream(prompt, params, request_id):
            self.last[out.request_id] = out
            yield out


class _LoopThread:
    """An asyncio loop on a daemon thread: the server side lives there, tests call in."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout=60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="module")
def served(llama_dir):
    """{sched, recorder, target}: a grpc.aio server on a free 127.0.0.1 port over the
    scheduler (seen through a _Recording), served from a loop on another thread."""
    from raylm.cluster.local import LocalCluster

    lt = _LoopThread()

    async def start():
        sched = LocalCluster(EngineArgs(model=llama_dir, **ENGINE), num_groups=1)
        recorder = _Recording(sched)
        server = grpc.aio.server()
        pb_grpc.add_GenerateServicer_to_server(make_grpc_servicer(recorder), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return sched, recorder, server, port

    sched, recorder, server, port = lt.run(start())
    yield {"sched": sched, "recorder": recorder, "target": f"127.0.0.1:{port}", "loop": lt}

    async def stop():
        await server.stop(None)
        await sched.shutdown()

    lt.run(stop())
    lt.stop()


@pytest.fixture(scope="module")
def client(served):
    with GenerateClient(served["target"], timeout=60) as c:
        yield c


def _joined(deltas) -> dict[int, tuple[str, list[int]]]:
    """Per completion index: the concatenated text and token ids of a stream."""
    acc: dict[int, tuple[str, list[int]]] = {}
    for d in deltas:
        for c in d.completions:
            text, ids = acc.get(c.index, ("", []))
            acc[c.index] = (text + c.text, ids + list(c.token_ids))
    return acc


def test_request_conversion_defaults_and_optionals():
    prompt, sp = request_to_inputs(build_request("hi"))
    assert prompt == "hi" and sp.to_dict() == SamplingParams().to_dict()
    prompt, sp = request_to_inputs(build_request([5, 6], temperature=0, seed=0, logprobs=0,
                                                 skip_special_tokens=False, stop="x"))
    assert prompt == [5, 6]
    assert (sp.temperature, sp.seed, sp.logprobs, sp.skip_special_tokens, sp.stop) == (0.0, 0, 0, False, ["x"])
    with pytest.raises(ValueError, match="prompt_token_ids"):
        request_to_inputs(pb.GenerateRequest())
    with pytest.raises(ValueError, match="top_p"):
        request_to_inputs(build_request("hi", top_p=0))
    with pytest.raises(TypeError, match="best_of"):
        build_request("hi", best_of=2)


def test_unary_stream_and_offline_agree(client, llama_dir):
    from raylm.engine.llm import LLM

    unary = client.generate(PROMPT, max_tokens=12, temperature=0, ignore_eos=True)
    deltas = list(client.generate_stream(PROMPT, max_tokens=12, temperature=0, ignore_eos=True))
    (comp,) = unary.completions
    assert unary.finished and comp.finish_reason == "length" and len(comp.token_ids) == 12
    assert deltas[-1].finished and all(not d.finished for d in deltas[:-1])
    assert len(deltas) > 2  # it really streamed
    assert _joined(deltas) == {0: (comp.text, list(comp.token_ids))}
    assert unary.usage.completion_tokens == 12
    assert unary.usage.total_tokens == unary.prompt_token_count + 12

    llm = LLM(llama_dir, **ENGINE)
    try:
        offline = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                               use_tqdm=False)[0]
    finally:
        llm.shutdown()
    assert comp.text == offline.outputs[0].text
    assert list(comp.token_ids) == offline.outputs[0].token_ids
    assert unary.prompt_token_count == len(offline.prompt_token_ids)


def test_token_id_prompt(client, served):
    ids = served["sched"].tokenizer.encode(PROMPT)
    by_text = client.generate(PROMPT, max_tokens=8, temperature=0, ignore_eos=True)
    by_ids = client.generate(ids, max_tokens=8, temperature=0, ignore_eos=True)
    assert by_ids.prompt_token_count == len(ids) == by_text.prompt_token_count
    assert by_ids.completions[0].token_ids == by_text.completions[0].token_ids


def test_n2_seeded_stream_matches_unary(client):
    kw = dict(n=2, max_tokens=8, temperature=1.0, seed=7, ignore_eos=True)
    unary = client.generate(PROMPT, **kw)
    assert sorted(c.index for c in unary.completions) == [0, 1]
    assert all(len(c.token_ids) == 8 for c in unary.completions)
    assert unary.usage.completion_tokens == 16
    streamed = _joined(client.generate_stream(PROMPT, **kw))
    assert streamed == {c.index: (c.text, list(c.token_ids)) for c in unary.completions}


def test_stop_string(client):
    full = client.generate(PROMPT, max_tokens=16, temperature=0, ignore_eos=True).completions[0].text
    # A stop string from the middle of the greedy text, first occurring there.
    k = next(i for i in range(4, len(full) - 3) if full[i:i + 3].strip() and full.find(full[i:i + 3]) == i)
    stop = full[k:k + 3]
    for include in (False, True):
        (comp,) = client.generate(PROMPT, max_tokens=16, temperature=0, ignore_eos=True, stop=[stop],
                                  include_stop_str_in_output=include).completions
        assert comp.text == full[:k] + (stop if include else "")
        assert comp.finish_reason == "stop"
        assert comp.WhichOneof("stop_reason") == "stop_str" and comp.stop_str == stop
    streamed = _joined(client.generate_stream(PROMPT, max_tokens=16, temperature=0, ignore_eos=True,
                                              stop=[stop]))
    assert streamed[0][0] == full[:k]


def test_logprobs(client):
    (comp,) = client.generate(PROMPT, max_tokens=4, temperature=0, ignore_eos=True, logprobs=2).completions
    assert len(comp.logprobs) == 4 and comp.HasField("cumulative_logprob")
    for tok, lp in zip(comp.token_ids, comp.logprobs):
        assert lp.token_id == tok and len(lp.top_logprobs) == 2
        assert lp.rank == 1 and lp.top_logprobs[0].token_id == tok  # greedy: the top token
        assert lp.top_logprobs[0].logprob >= lp.top_logprobs[1].logprob
    assert comp.cumulative_logprob == pytest.approx(sum(lp.logprob for lp in comp.logprobs), abs=1e-4)
    plain = client.generate(PROMPT, max_tokens=4, temperature=0).completions[0]
    assert not plain.logprobs and not plain.HasField("cumulative_logprob")


@pytest.mark.parametrize("kw, field", [
    (dict(temperature=-1.0), "temperature"),
    (dict(n=0), "n"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(min_tokens=5, max_tokens=2), "min_tokens"),
    (dict(stop_token_ids=[-3]), "stop_token_ids"),
])
def test_bad_sampling_is_invalid_argument(client, kw, field):
    for call in (client.generate, lambda *a, **k: list(client.generate_stream(*a, **k))):
        with pytest.raises(grpc.RpcError) as info:
            call(PROMPT, **kw)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in info.value.details()


def test_bad_prompt_is_invalid_argument(client, served):
    cases = [(pb.GenerateRequest(prompt="x", prompt_token_ids=[1]), "prompt_token_ids"),
             (pb.GenerateRequest(), "prompt"),
             (build_request([1] * 300, max_tokens=4), "max_model_len")]  # caught by the engine
    for request, field in cases:
        for rpc in (client.stub.Generate, lambda r: list(client.stub.GenerateStream(r))):
            with pytest.raises(grpc.RpcError) as info:
                rpc(request)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert field in info.value.details()


def test_client_cancel_aborts_request(client, served):
    sched, recorder = served["sched"], served["recorder"]
    stream = client.generate_stream(PROMPT, max_tokens=240, temperature=0, ignore_eos=True,
                                    request_id="cancel-me")
    first = next(stream)
    assert first.request_id == "cancel-me" and not first.finished
    stream.close()  # cancels the call
    deadline = time.monotonic() + 60
    while ("cancel-me" in sched.open_request_ids or sched.cores[0].requests) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "cancel-me" not in sched.open_request_ids
    assert not sched.cores[0].requests
    last = recorder.last["cancel-me"]
    assert len(last.outputs[0].token_ids) < 240  # stopped early, not run to max_tokens
    # The server still serves, and the id is free again.
    again = client.generate(PROMPT, max_tokens=2, temperature=0, request_id="cancel-me")
    assert again.finished and again.request_id == "cancel-me"


def test_stream_deltas_hold_back_a_possible_stop_string():
    """The engine's cumulative text may end in the start of a stop string that a later
    step cuts off; deltas must never send what is cut."""
    def out(text, ids, reason=None):
        comp = CompletionOutput(0, text, ids, None, None, reason, "it " if reason else None)
        return RequestOutput("r", None, [1, 2], None, [comp], reason is not None)

    deltas = StreamDeltas(SamplingParams(stop=["it "]))
    msgs = [deltas.response(o) for o in (out("ab", [5]), out("abit", [5, 6]),
                                         out("ab", [5, 6, 7], "stop"))]
    sent = [m.completions[0].text if m and m.completions else "" for m in msgs]
    assert sent == ["", "ab", ""]  # the last len("it ") - 1 chars wait; "it" is never sent
    assert [list(m.completions[0].token_ids) for m in msgs] == [[5], [6], [7]]
    assert msgs[-1].finished and msgs[-1].completions[0].stop_str == "it "


def test_own_server_needs_the_key_caps_n_and_limits_messages(served):
    """serve_grpc, as each ingress replica runs it: the API key in the metadata, max_n,
    and max_message_bytes (the HTTP body limit) as the largest request."""
    from raylm.cluster.grpc_server import serve_grpc
    from tests.helpers import free_port

    lt, port = served["loop"], free_port()

    async def start():
        return serve_grpc(make_grpc_servicer(served["sched"], api_key="k", max_n=2), "127.0.0.1", port,
                          max_message_bytes=4096)

    server = lt.run(start())
    target = f"127.0.0.1:{port}"
    try:
        kw = dict(max_tokens=4, temperature=0)
        with GenerateClient(target, timeout=60) as anonymous:
            grpc.channel_ready_future(anonymous.channel).result(timeout=60)
            with pytest.raises(grpc.RpcError) as info:
                anonymous.generate(PROMPT, **kw)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with GenerateClient(target, timeout=60, api_key="k") as client:
            assert client.generate(PROMPT, **kw).completions[0].finish_reason == "length"
            with pytest.raises(grpc.RpcError) as info:
                client.generate(PROMPT, n=3, **kw)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_n" in info.value.details()
            with pytest.raises(grpc.RpcError) as info:
                client.generate("x" * 5000, **kw)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        lt.run(server.stop(None))
