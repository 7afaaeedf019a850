"""The Serve app's output path (raylm/cluster/multiplex.py): the delta encoding rebuilds
every cumulative output exactly, mailboxes coalesce without losing a final output or an
error, the demultiplexer fans one subscription out to per-request queues and fails the
open requests when it breaks, and GlobalScheduler.submit delivers to a mailbox what
generate_stream yields."""
from __future__ import annotations

import asyncio
import pickle

import pytest

from raylm import SamplingParams
from raylm.cluster.global_scheduler import GlobalScheduler
from raylm.cluster.multiplex import DeltaDecoder, DeltaEncoder, Demux, Mailbox, next_item
from raylm.engine.config import EngineArgs
from raylm.engine.outputs import CompletionOutput, Logprob, RequestOutput


def _out(rid, texts, ids, logprobs=None, finished=False, reasons=None, prompt_ids=(5, 6, 7)):
    comps = [CompletionOutput(i, t, list(x), -1.5 * i if logprobs else None,
                              None if logprobs is None else list(logprobs[i]),
                              (reasons or [None] * len(texts))[i])
             for i, (t, x) in enumerate(zip(texts, ids))]
    return RequestOutput(rid, "the prompt", list(prompt_ids), None, comps, finished, 2, {"arrival_time": 1.0})


def test_delta_encoding_rebuilds_each_cumulative_output():
    lp = lambda k: [{100 + j: Logprob(-0.1 * j, 1, f"t{j}")} for j in range(k)]  # noqa: E731
    steps = [
        _out("a", ["He", ""], [[1], []], logprobs=[lp(1), lp(0)]),
        _out("a", ["Hello", " w"], [[1, 2], [9]], logprobs=[lp(2), lp(1)]),
        # a stop string held back then dropped: the text shrinks, the ids don't
        _out("a", ["Hel", " wo"], [[1, 2, 3], [9, 8]], logprobs=[lp(3), lp(2)]),
        _out("a", ["Hel!", " wor"], [[1, 2, 3, 4], [9, 8, 7]], logprobs=[lp(4), lp(3)], finished=True,
             reasons=["stop", "length"]),
    ]
    enc, dec = DeltaEncoder(), DeltaDecoder()
    for i, out in enumerate(steps):
        wire = pickle.loads(pickle.dumps(enc.encode("a", out)))
        assert (wire[1] is not None) == (i == 0)  # the prompt travels once
        got = dec.decode("a", wire)
        assert got == out
    # a request's state is dropped when it finishes, on both sides
    assert not enc._held and not dec._state


def test_delta_wire_stays_small_as_sequences_grow():
    enc = DeltaEncoder()
    ids = list(range(2000))
    enc.encode("r", _out("r", ["x" * 4000], [ids[:1999]], prompt_ids=range(3000)))
    step = pickle.dumps(enc.encode("r", _out("r", ["x" * 4001], [ids], prompt_ids=range(3000))))
    whole = pickle.dumps(_out("r", ["x" * 4001], [ids], prompt_ids=range(3000)))
    assert len(step) < 300 < 10_000 < len(whole)


def test_failure_crosses_as_its_kind():
    enc, dec = DeltaEncoder(), DeltaDecoder()
    dec.decode("r", enc.encode("r", _out("r", ["a"], [[1]])))
    err = dec.decode("r", pickle.loads(pickle.dumps(enc.encode("r", RuntimeError("worker group 0 failed")))))
    assert isinstance(err, RuntimeError) and str(err) == "worker group 0 failed"
    bad = dec.decode("s", enc.encode("s", ValueError("max_tokens must be at least 1, got 0")))
    assert isinstance(bad, ValueError) and "max_tokens" in str(bad)
    assert not enc._held and not dec._state


def test_mailbox_keeps_the_newest_and_never_drops_a_final():
    async def main():
        box, dec = Mailbox(), DeltaDecoder()
        box.live.update({"a", "b"})
        box.put("a", _out("a", ["1"], [[1]]))
        box.put("b", _out("b", ["x"], [[4]]))
        box.put("a", _out("a", ["12"], [[1, 2]]))
        box.put("a", _out("a", ["123"], [[1, 2, 3]], finished=True, reasons=["length"]))
        batch = await box.take()
        assert [rid for rid, _ in batch] == ["a", "b"]
        got = {rid: dec.decode(rid, d) for rid, d in batch}
        assert got["a"].finished and got["a"].outputs[0].text == "123" and got["b"].outputs[0].token_ids == [4]
        assert box.live == {"b"}
        waiter = asyncio.ensure_future(box.take())
        await asyncio.sleep(0.01)
        assert not waiter.done()  # nothing pending: take waits
        box.put("b", RuntimeError("boom"))
        assert isinstance(dec.decode("b", (await waiter)[0][1]), RuntimeError) and not box.live
    asyncio.run(main())


def test_next_item_coalesces_up_to_a_final_or_an_error():
    async def main():
        q: asyncio.Queue = asyncio.Queue()
        for item in (_out("a", ["1"], [[1]]), _out("a", ["12"], [[1, 2]]),
                     _out("a", ["123"], [[1, 2, 3]], finished=True, reasons=["stop"])):
            q.put_nowait(item)
        assert (await next_item(q)).finished
        q.put_nowait(_out("a", ["1"], [[1]]))
        q.put_nowait(ValueError("bad"))
        q.put_nowait(_out("a", ["12"], [[1, 2]]))
        assert isinstance(await next_item(q), ValueError)
    asyncio.run(main())


def test_demux_fans_out_and_fails_open_requests_when_the_stream_breaks():
    async def main():
        feeds: list[asyncio.Queue] = []
        subscribers = []

        async def subscribe(sub):
            subscribers.append(sub)
            feed: asyncio.Queue = asyncio.Queue()
            feeds.append(feed)
            while True:
                batch = await feed.get()
                if isinstance(batch, BaseException):
                    raise batch
                yield batch

        enc = DeltaEncoder()
        demux = Demux(subscribe)
        qa, qb = demux.open("a"), demux.open("b")
        with pytest.raises(ValueError, match="request_id 'a' is already in use"):
            demux.open("a")
        await asyncio.sleep(0)
        feeds[0].put_nowait([("a", enc.encode("a", _out("a", ["1"], [[1]]))),
                             ("b", enc.encode("b", _out("b", ["x"], [[4]]))),
                             ("gone", enc.encode("gone", _out("gone", ["z"], [[0]])))])
        assert (await qa.get()).outputs[0].text == "1" and (await qb.get()).outputs[0].text == "x"
        demux.close("b")  # its client left: later outputs are dropped
        feeds[0].put_nowait([("a", enc.encode("a", _out("a", ["12"], [[1, 2]], finished=True,
                                                         reasons=["length"]))),
                             ("b", enc.encode("b", _out("b", ["xy"], [[4, 5]])))])
        assert (await qa.get()).finished and qb.empty()
        demux.close("a")
        qc = demux.open("c")
        feeds[0].put_nowait(ConnectionError("replica died"))
        err = await qc.get()
        assert isinstance(err, RuntimeError) and "replica died" in str(err)
        demux.close("c")
        demux.open("d")  # a new request starts a new subscription under the same id
        await asyncio.sleep(0)
        assert len(feeds) == 2 and subscribers == [demux.subscriber] * 2
        demux.shutdown()
        await asyncio.sleep(0)
    asyncio.run(main())


def test_submit_delivers_what_generate_stream_yields(llama_dir):
    params = SamplingParams(temperature=0.0, max_tokens=8, logprobs=2)

    async def main():
        sched = GlobalScheduler(EngineArgs(model=llama_dir, max_model_len=128), num_groups=1)
        try:
            streamed = [o async for o in sched.generate_stream("a b c d", params, "s")]
            box, dec = Mailbox(), DeltaDecoder()
            sched.submit("a b c d", params, "m", box.put)
            with pytest.raises(ValueError, match="request_id 'm' is already in use"):
                sched.submit("x", params, "m", box.put)
            seen = []
            while not seen or not seen[-1].finished:
                seen += [dec.decode(rid, d) for rid, d in await box.take()]
            assert "m" not in sched.streams  # forgotten once finished
            final, ref = seen[-1], streamed[-1]
            assert final.outputs[0].token_ids == ref.outputs[0].token_ids
            assert final.outputs[0].text == ref.outputs[0].text
            assert final.outputs[0].logprobs == ref.outputs[0].logprobs
            # an abort reaches the mailbox as a final output and frees the blocks
            box2, dec2 = Mailbox(), DeltaDecoder()
            sched.submit("a b c d", SamplingParams(max_tokens=100, ignore_eos=True), "x", box2.put)
            last = [dec2.decode(rid, d) for rid, d in await box2.take()][-1]
            await sched.abort("x")
            while not last.finished:
                last = [dec2.decode(rid, d) for rid, d in await box2.take()][-1]
            assert last.outputs[0].finish_reason == "abort" and len(last.outputs[0].token_ids) < 100
            assert sched.stats()["blocks_in_use"] == 0 and not sched.streams
        finally:
            await sched.shutdown()
    asyncio.run(main())


def test_detached_tasks_do_not_see_the_callers_context():
    import contextvars

    from raylm.cluster.multiplex import detached

    var = contextvars.ContextVar("request", default=None)

    async def main():
        var.set("request-1")

        async def look():
            return var.get()
        return await detached(look()), await asyncio.ensure_future(look())
    assert asyncio.run(main()) == (None, "request-1")
