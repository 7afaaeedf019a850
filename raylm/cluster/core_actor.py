"""One worker group's engine core in its own process: a Ray actor.

The actor holds the core (scheduler, block manager, sampling, stop tokens) and, at
tensor_parallel_size=1, the model itself (the GPU is the actor's); larger groups keep
their ranks in Ray actors of their own placement group. The busy loop runs in a thread
of the actor (`CoreLoop`); the actor's event loop only takes requests in and hands each
step's outputs to the subscribed ingress replicas, one msgpack batch per replica per
step (`subscribe`, a Ray streaming generator).

`RayCoreClient` is the ingress replica's view of one such actor (a `CoreClient`).
"""
from __future__ import annotations

import asyncio
import logging
from typing import Optional

import msgpack

from raylm.cluster.frontend import detached
from raylm.engine.core import EngineCoreOutput, EngineCoreRequest

logger = logging.getLogger("raylm")


# How often a core checks that each subscribing ingress replica is alive.
OWNER_CHECK_S = 2.0
OWNER_CHECK_TIMEOUT_S = 10.0


def _current_actor():
    """This process's actor handle (an ingress replica), or None outside an actor."""
    import ray

    try:
        return ray.get_runtime_context().current_actor
    except Exception:
        return None


class _Outbox:
    """The outputs waiting for one subscriber (in the actor's event loop)."""

    def __init__(self):
        self.pending: list[EngineCoreOutput] = []
        self.event = asyncio.Event()
        self.closed = False
        self.watcher: Optional[asyncio.Task] = None


class EngineCoreActor:
    """A Ray actor class (wrapped with ray.remote by the router): see module doc."""

    def __init__(self, engine_args: dict, index: int = 0):
        import os

        from raylm.cluster.startup import StartupMarks

        self.startup = StartupMarks(f"core-{index}")
        self.startup.mark("init_start")
        from raylm.engine.config import EngineArgs
        from raylm.engine.core import EngineCore
        from raylm.engine.core_loop import CoreLoop

        logging.basicConfig(level=logging.INFO)
        kwargs = dict(engine_args)
        backend = kwargs.get("distributed_executor_backend")
        if ":" not in str(backend):  # not a stand-in
            # At TP=1 the model lives in this actor; larger groups keep rank 0 here and
            # ranks 1.. in actors of this actor's placement group, fed by broadcast (start_cores),
            # unless "ray" asks for every rank in an actor of its own.
            tp = kwargs.get("tensor_parallel_size", 1)
            kwargs["distributed_executor_backend"] = ("uni" if tp == 1 else "ray" if backend == "ray"
                                                      else "ray_broadcast")
        self.index = index
        self.pid = os.getpid()
        self.startup.mark("imports_done")
        self.core = EngineCore(EngineArgs(**kwargs))
        self.startup.mark("engine_built")
        self.loop = CoreLoop(self.core, self._deliver, f"raylm-core-{index}")
        self._aio: Optional[asyncio.AbstractEventLoop] = None
        self._outboxes: dict[Optional[str], _Outbox] = {}

    async def ready(self) -> dict:
        """Starts the loop (from the actor's event loop); what the router needs to know."""
        if self._aio is None:
            self._aio = asyncio.get_running_loop()
            self.loop.start()
        return {"index": self.index, "pid": self.pid, "num_blocks": self.core.num_blocks,
                "max_num_seqs": self.core.args.max_num_seqs,
                "startup_timing": self.core.startup_timing}

    async def startup_marks(self) -> dict:
        """This process's start-up marks (raylm.cluster.startup), with the engine's own
        phases (load, memory profile, KV cache and graphs) in seconds."""
        return self.startup.to_dict(phases=dict(self.core.startup_timing))

    # ---- outputs -------------------------------------------------------------------
    def _deliver(self, batches: dict) -> None:  # on the core's thread
        self._aio.call_soon_threadsafe(self._push, batches)

    def _outbox(self, subscriber) -> _Outbox:
        box = self._outboxes.get(subscriber)
        if box is None:
            box = self._outboxes[subscriber] = _Outbox()
        return box

    def _push(self, batches: dict) -> None:
        for sub, outs in batches.items():
            box = self._outbox(sub)
            if not box.closed:
                box.pending.extend(outs)
                box.event.set()

    async def subscribe(self, subscriber: str, owner=None):
        """Every output of `subscriber`'s requests: one msgpack-encoded list of
        EngineCoreOutput rows per yield (all that arrived since the previous one). When
        the stream ends, or `owner` (the subscribing actor) dies, the subscriber's
        unfinished requests are aborted and their blocks freed."""
        box = self._outbox(subscriber)
        if owner is not None:
            box.watcher = detached(self._watch_owner(subscriber, owner))
        try:
            while not box.closed:
                await box.event.wait()
                box.event.clear()
                outs, box.pending = box.pending, []
                if outs:
                    yield msgpack.packb([o.to_wire() for o in outs])
        finally:
            self._drop(subscriber)

    async def unsubscribe(self, subscriber: str) -> None:
        box = self._outboxes.get(subscriber)
        if box is not None:
            box.closed = True
            box.event.set()
        self._drop(subscriber)

    async def _watch_owner(self, subscriber: str, owner) -> None:
        """Ping the subscribing actor; when it is gone, drop its requests (an ingress
        replica that died leaves no stream to notice it otherwise)."""
        while subscriber in self._outboxes:
            await asyncio.sleep(OWNER_CHECK_S)
            try:
                await asyncio.wait_for(owner.__ray_ready__.remote(), OWNER_CHECK_TIMEOUT_S)
            except asyncio.TimeoutError:
                continue  # busy, not gone
            except Exception:  # RayActorError: the replica died
                logger.warning("engine core %d: subscriber %s is gone; aborting its requests",
                               self.index, subscriber)
                await self.unsubscribe(subscriber)
                return

    def _drop(self, subscriber: str) -> None:
        box = self._outboxes.pop(subscriber, None)
        if box is not None and box.watcher is not None:
            box.watcher.cancel()
        if self.loop.alive:
            self.loop.call(lambda core: core.abort(
                [rid for rid, sub in core.subscribers.items() if sub == subscriber]))

    # ---- requests ------------------------------------------------------------------
    async def add_requests(self, wire: bytes) -> None:
        """Queue msgpack-encoded EngineCoreRequest rows (a refusal arrives on the
        subscriber's stream as an error output)."""
        self.loop.add([EngineCoreRequest.from_wire(r) for r in msgpack.unpackb(wire)])

    async def abort(self, request_ids: list[str], reason: str = "abort") -> None:
        if self.loop.alive:
            self.loop.abort(request_ids, reason)

    # ---- introspection -------------------------------------------------------------
    async def snapshot(self, since: int = -1, hashes: bool = True) -> dict:
        """CoreLoop.snapshot; hashes=False leaves the prefix-cache part out."""
        snap = self.loop.snapshot(since if hashes else 1 << 62)
        if not hashes:
            snap.pop("events", None)
            snap.pop("hashes", None)
        return snap

    async def hang_for_test(self, seconds: float) -> None:
        """Test hook: the loop sleeps `seconds` between two steps, as a hung step would."""
        import time

        self.loop.call(lambda core: time.sleep(seconds))

    async def shutdown(self) -> None:
        self.loop.stop()
        self.core.shutdown()


class RayCoreClient:
    """An ingress replica's view of one engine core actor (a `CoreClient`)."""

    def __init__(self, actor, index: int, generation: int = 0):
        self.actor = actor
        self.index = index
        self.generation = generation  # of its group's core (bumped at each restart)
        self._tasks: dict[str, asyncio.Task] = {}

    async def add(self, requests: list[EngineCoreRequest]) -> None:
        await self.actor.add_requests.remote(msgpack.packb([r.to_wire() for r in requests]))

    def abort(self, request_ids: list[str], reason: str = "abort") -> None:
        self.actor.abort.remote(list(request_ids), reason)  # fire and forget

    def subscribe(self, subscriber: str, on_batch, on_error) -> None:
        self._tasks[subscriber] = detached(self._read(subscriber, on_batch, on_error))

    async def _read(self, subscriber: str, on_batch, on_error) -> None:
        try:
            stream = self.actor.subscribe.options(num_returns="streaming").remote(subscriber, _current_actor())
            async for ref in stream:
                rows = msgpack.unpackb(await ref)
                on_batch([EngineCoreOutput.from_wire(r) for r in rows])
            raise RuntimeError("the engine core's output stream ended")
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # the core actor is gone
            logger.warning("engine core %d: output stream failed: %s", self.index, exc)
            on_error(exc)

    def unsubscribe(self, subscriber: str) -> None:
        task = self._tasks.pop(subscriber, None)
        if task is not None:
            task.cancel()
        try:
            self.actor.unsubscribe.remote(subscriber)
        except Exception:  # Ray is shutting down
            pass
