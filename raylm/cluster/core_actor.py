"""One worker group's engine core in its own process: a Ray actor.

The actor holds the core (scheduler, block manager, sampling, stop tokens) and, at
tensor_parallel_size=1, the model itself (the GPU is the actor's); larger groups keep
their ranks in Ray actors of their own placement group. The busy loop runs in a thread
of the actor (`CoreLoop`); the actor's event loop only takes requests in and hands each
step's outputs to the subscribed ingress replicas, one msgpack batch per replica per
step, over a TCP connection each replica opens to the core (`open_outputs`; the
replica's requests and aborts come in on it too): a Ray
streaming generator cost about 2.5 ms of CPU per batch on the 2-core CPU (both ends
together), the socket about 0.4 ms (`benchmarks/output_channel.py`), and a core sends one
batch per step to every replica.

`RayCoreClient` is the ingress replica's view of one such actor (a `CoreClient`).
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
import socket
import time
from collections import Counter, deque
from typing import Optional

import msgpack

from raylm.cluster.frontend import detached
from raylm.engine.core import EngineCoreOutput, EngineCoreRequest

logger = logging.getLogger("raylm")


# How often a core checks that each subscribing ingress replica is alive.
OWNER_CHECK_S = 2.0
OWNER_CHECK_TIMEOUT_S = 10.0
# How long snapshots name the requests dropped with a dead subscriber (the router
# releases them: their frontend is gone).
ORPHAN_KEEP_S = 10.0
# How long a replica has to connect to the address open_outputs gave it.
CONNECT_TIMEOUT_S = 60.0
# Frames of the output connection: a 4-byte little-endian length, then that many bytes.
_LEN = 4
# A peer host that vanishes without closing the connection is noticed after about
# IDLE + INTERVAL * COUNT seconds (TCP keepalive on both ends).
KEEPALIVE = {"TCP_KEEPIDLE": 5, "TCP_KEEPINTVL": 2, "TCP_KEEPCNT": 3}


def _keepalive(sock) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in KEEPALIVE.items():
        if hasattr(socket, name):  # Linux names
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


def frame(payload: bytes) -> bytes:
    return len(payload).to_bytes(_LEN, "little") + payload


async def read_frame(reader: asyncio.StreamReader, limit: Optional[int] = None) -> bytes:
    """One frame's payload; IncompleteReadError at the end of the stream, ValueError
    for a frame longer than `limit`."""
    size = int.from_bytes(await reader.readexactly(_LEN), "little")
    if limit is not None and size > limit:
        raise ValueError(f"a frame of {size} bytes, more than the {limit} expected")
    return await reader.readexactly(size)


async def connect(where: dict) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Open the connection an open_outputs or open_snapshots answer names, keepalive on,
    its token sent."""
    reader, writer = await asyncio.open_connection(where["host"], where["port"])
    _keepalive(writer.get_extra_info("socket"))
    writer.write(frame(where["token"].encode("ascii")))
    return reader, writer


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


class _SnapshotReader:
    """An open_snapshots token's reader: where its first snapshot starts, how often."""

    def __init__(self, since: int, interval: float):
        self.since, self.interval = since, interval


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
        self._server: Optional[asyncio.AbstractServer] = None
        # connection token -> subscriber (see open_outputs), or the router's snapshot reader
        self._tokens: dict[str, object] = {}
        self.calls: Counter = Counter()  # the router's Ray calls for snapshots (call_counts)
        self._orphans: deque = deque()  # (time, request ids) dropped with their subscriber

    async def ready(self) -> dict:
        """Starts the loop (from the actor's event loop); what the router needs to know."""
        if self._aio is None:
            import ray

            self._aio = asyncio.get_running_loop()
            # The output connections: on this node's address (Ray's), any free port.
            self._server = await asyncio.start_server(self._serve_outputs, ray.util.get_node_ip_address(), 0)
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

    async def open_outputs(self, subscriber: str, owner=None) -> dict:
        """Where `subscriber` reads every output of its requests: {"host", "port",
        "token"}. It connects there, sends the token as one frame, then reads frames,
        each a msgpack-encoded list of EngineCoreOutput rows (all that arrived since the
        previous frame). When the connection ends, or `owner` (the subscribing actor)
        dies, the subscriber's unfinished requests are aborted and their blocks freed.
        The token (good for one connection) keeps anyone else who reaches the port from
        reading the outputs."""
        box = self._outbox(subscriber)
        if owner is not None and box.watcher is None:
            box.watcher = detached(self._watch_owner(subscriber, owner))
        token = secrets.token_hex(16)
        self._tokens[token] = subscriber
        self._aio.call_later(CONNECT_TIMEOUT_S, self._tokens.pop, token, None)
        host, port = self._server.sockets[0].getsockname()[:2]
        return {"host": host, "port": port, "token": token}

    async def _serve_outputs(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One subscriber's connection (see open_outputs)."""
        subscriber = None
        try:
            _keepalive(writer.get_extra_info("socket"))
            token = (await asyncio.wait_for(read_frame(reader, limit=64), CONNECT_TIMEOUT_S)).decode(
                "ascii", "replace")  # bounded: whoever reaches the port cannot make it buffer more
            subscriber = next((s for t, s in list(self._tokens.items()) if hmac.compare_digest(t, token)), None)
            if subscriber is None:
                logger.warning("engine core %d: refused an output connection with an unknown token", self.index)
                return
            del self._tokens[token]
            if isinstance(subscriber, _SnapshotReader):
                await self._serve_snapshots(reader, writer, subscriber)
                subscriber = None
                return
            box = self._outbox(subscriber)
            commands = asyncio.ensure_future(self._commands(reader))  # ends with the connection
            commands.add_done_callback(lambda _: (setattr(box, "closed", True), box.event.set()))
            try:
                while not box.closed:
                    await box.event.wait()
                    box.event.clear()
                    outs, box.pending = box.pending, []
                    if outs:
                        writer.write(frame(msgpack.packb([o.to_wire() for o in outs])))
                        await writer.drain()
            finally:
                commands.cancel()
        except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError, OSError):
            pass  # the subscriber went away
        except ValueError as exc:  # not a subscriber's first frame
            logger.warning("engine core %d: refused an output connection: %s", self.index, exc)
        finally:
            writer.close()
            if subscriber is not None:
                self._drop(subscriber)

    async def open_snapshots(self, since: int = -1, interval: float = 0.05) -> dict:
        """Where the router reads this core's snapshots: {"host", "port", "token"}, as
        open_outputs. After the token, the core sends a msgpack frame of
        `CoreLoop.snapshot` every `interval` seconds, the first from `since`, each later
        one from the one before, until the connection ends: the router reads a core's
        state with no Ray call each time (a Ray call a poll cost each end about 1.3 ms of
        CPU on the 2-core CPU: at 20 a second and core, some 0.4 CPU at 8 groups)."""
        self.calls["open_snapshots"] += 1
        token = secrets.token_hex(16)
        self._tokens[token] = _SnapshotReader(since, interval)
        self._aio.call_later(CONNECT_TIMEOUT_S, self._tokens.pop, token, None)
        host, port = self._server.sockets[0].getsockname()[:2]
        return {"host": host, "port": port, "token": token}

    async def _serve_snapshots(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                               who: "_SnapshotReader") -> None:
        since = who.since
        ended = asyncio.ensure_future(reader.read(1))  # the reader sends nothing more: EOF ends it
        try:
            while not ended.done():
                snap = self._snapshot(since)
                since = snap["seq"]
                writer.write(frame(msgpack.packb(snap)))
                await writer.drain()
                await asyncio.wait([ended], timeout=who.interval)
        finally:
            ended.cancel()

    async def _commands(self, reader: asyncio.StreamReader) -> None:
        """The subscriber's requests and aborts on its connection (frames of msgpack
        ["add", rows] and ["abort", request_ids, reason]), until the connection ends."""
        while True:
            try:
                kind, *args = msgpack.unpackb(await read_frame(reader))
            except (asyncio.IncompleteReadError, ConnectionError, OSError):
                return
            try:
                if kind == "add":
                    self.loop.add([EngineCoreRequest.from_wire(r) for r in args[0]])
                elif kind == "abort":
                    await self.abort(*args)
                else:
                    raise ValueError(f"unknown command {kind!r}")
            except Exception:  # a bug: end the connection (the subscriber re-dispatches its requests)
                logger.exception("engine core %d: a subscriber's command failed", self.index)
                return

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
            def drop(core) -> None:  # on the loop's thread
                ids = [rid for rid, sub in core.subscribers.items() if sub == subscriber]
                core.abort(ids)
                if ids:
                    self._orphans.append((time.monotonic(), ids))
            self.loop.call(drop)

    def _snapshot(self, since: int) -> dict:
        """CoreLoop.snapshot, with "orphans": the requests dropped with their subscriber
        in the last ORPHAN_KEEP_S seconds, which no frontend will release at the router."""
        snap = self.loop.snapshot(since)
        now = time.monotonic()
        while self._orphans and self._orphans[0][0] < now - ORPHAN_KEEP_S:
            self._orphans.popleft()
        if self._orphans:
            snap["orphans"] = [rid for _, ids in list(self._orphans) for rid in ids]
        return snap

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
        self.calls["snapshot"] += 1
        snap = self._snapshot(since if hashes else 1 << 62)
        if not hashes:
            snap.pop("events", None)
            snap.pop("hashes", None)
        return snap

    async def call_counts(self) -> dict:
        """How often the router asked for a snapshot by Ray call, and opened a snapshot
        connection."""
        return dict(self.calls)

    async def hang_for_test(self, seconds: float) -> None:
        """Test hook: the loop sleeps `seconds` between two steps, as a hung step would."""
        self.loop.call(lambda core: time.sleep(seconds))

    async def shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        self.loop.stop()
        self.core.shutdown()


class RayCoreClient:
    """An ingress replica's view of one engine core actor (a `CoreClient`)."""

    def __init__(self, actor, index: int, generation: int = 0):
        self.actor = actor
        self.index = index
        self.generation = generation  # of its group's core (bumped at each restart)
        self._tasks: dict[str, asyncio.Task] = {}
        # The subscription's connection (its StreamWriter; None once it failed): requests
        # and aborts go to the core on it too, in order, with no Ray call each.
        self._conn: Optional[asyncio.Future] = None

    async def add(self, requests: list[EngineCoreRequest]) -> None:
        rows = [r.to_wire() for r in requests]
        if self._conn is None:  # not subscribed
            await self.actor.add_requests.remote(msgpack.packb(rows))
            return
        writer = await asyncio.shield(self._conn)
        if writer is None or writer.is_closing():
            raise ConnectionError(f"engine core {self.index}: its connection is closed")
        writer.write(frame(msgpack.packb(["add", rows])))
        await writer.drain()

    def abort(self, request_ids: list[str], reason: str = "abort") -> None:
        """Fire and forget: on the connection (after the requests sent before it, once
        it is open), else a Ray call."""
        conn = self._conn
        if conn is not None and not conn.done():
            conn.add_done_callback(lambda _: self.abort(request_ids, reason))
            return
        writer = conn.result() if conn is not None else None
        if writer is not None and not writer.is_closing():
            writer.write(frame(msgpack.packb(["abort", list(request_ids), reason])))
        else:
            self.actor.abort.remote(list(request_ids), reason)

    def subscribe(self, subscriber: str, on_batch, on_error) -> None:
        # Set before the task runs: a request added meanwhile waits for the connection.
        self._conn = asyncio.get_running_loop().create_future()
        self._tasks[subscriber] = detached(self._read(subscriber, on_batch, on_error, self._conn))

    async def _read(self, subscriber: str, on_batch, on_error, conn: asyncio.Future) -> None:
        writer = None
        try:
            where = await self.actor.open_outputs.remote(subscriber, _current_actor())
            reader, writer = await connect(where)
            conn.set_result(writer)
            while True:
                try:
                    rows = msgpack.unpackb(await read_frame(reader))
                except asyncio.IncompleteReadError:
                    raise RuntimeError("the engine core's output stream ended") from None
                on_batch([EngineCoreOutput.from_wire(r) for r in rows])
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # the core actor is gone
            logger.warning("engine core %d: output stream failed: %s", self.index, exc)
            on_error(exc)
        finally:
            if not conn.done():
                conn.set_result(None)
            if writer is not None:
                writer.close()

    def unsubscribe(self, subscriber: str) -> None:
        task = self._tasks.pop(subscriber, None)
        if task is not None:
            task.cancel()
        try:
            self.actor.unsubscribe.remote(subscriber)
        except Exception:  # Ray is shutting down
            pass
