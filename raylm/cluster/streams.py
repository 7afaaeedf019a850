"""One backend stream per prompt of a request, drained together (see `Streams`)."""
from __future__ import annotations

import asyncio
from typing import AsyncIterator, Optional

import anyio

from raylm.engine.outputs import RequestOutput
from raylm.engine.sampling_params import SamplingParams


class Streams:
    """One backend stream per prompt, each drained by its own task into one queue, so a
    batch progresses together; `close()` cancels them, which aborts unfinished requests.
    A single prompt (most requests) is read in the caller's task, without a drain task
    and a queue between: one task switch less per token."""

    def __init__(self, backend, requests: list[tuple[dict, SamplingParams, str]]):
        self._queue: asyncio.Queue = asyncio.Queue()
        self._live = self._count = len(requests)
        self._early: list[tuple[int, RequestOutput]] = []
        self._single = None
        self._tasks: list[asyncio.Future] = []
        if len(requests) == 1:
            prompt, params, request_id = requests[0]
            self._single = backend.generate_stream(prompt, params, request_id=request_id)
        else:
            self._tasks = [asyncio.ensure_future(self._drain(i, backend, *r)) for i, r in enumerate(requests)]

    async def _drain(self, i: int, backend, prompt: dict, params: SamplingParams, request_id: str):
        stream = None
        try:
            stream = backend.generate_stream(prompt, params, request_id=request_id)
            async for out in stream:
                self._queue.put_nowait((i, out))
            self._queue.put_nowait((i, None))
        except Exception as exc:
            self._queue.put_nowait((i, exc))
        finally:
            if stream is not None and hasattr(stream, "aclose"):
                await stream.aclose()  # a no-op once the stream has ended

    async def _next(self) -> Optional[tuple[int, RequestOutput]]:
        while self._live:
            i, item = await self._queue.get()
            if item is None:
                self._live -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                return i, item
        return None

    async def start(self) -> None:
        """Wait for each stream's first output, so that bad input (the backend's
        ValueError) is known before a response starts."""
        if self._single is not None:
            try:
                self._early.append((0, await self._single.__anext__()))
            except StopAsyncIteration:
                raise RuntimeError("the backend ended a stream without any output") from None
            return
        waiting = set(range(len(self._tasks)))
        while waiting:
            item = await self._next()
            if item is None:
                raise RuntimeError("the backend ended a stream without any output")
            self._early.append(item)
            waiting.discard(item[0])

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, cumulative output) as the requests progress. Outputs are
        cumulative, so when several are already queued (the response is written more
        slowly than tokens arrive) only each prompt's newest is yielded: fewer, larger
        chunks, nothing lost."""
        while self._early:
            yield self._early.pop(0)
        if self._single is not None:
            async for out in self._single:  # the backend coalesces what queued meanwhile
                yield 0, out
            return
        while (item := await self._next()) is not None:
            newest = {item[0]: item[1]}
            while self._live and not self._queue.empty():
                i, out = self._queue.get_nowait()
                if out is None:
                    self._live -= 1
                elif isinstance(out, BaseException):
                    raise out
                else:
                    newest[i] = out
            for i, out in newest.items():
                yield i, out

    async def finals(self) -> list[RequestOutput]:
        last: dict[int, RequestOutput] = {}
        async for i, out in self.outputs():
            last[i] = out
        return [last[i] for i in range(self._count)]

    async def close(self) -> None:
        if self._single is not None and hasattr(self._single, "aclose"):
            with anyio.CancelScope(shield=True):
                await self._single.aclose()  # an unfinished request is aborted
        for t in self._tasks:
            t.cancel()
        with anyio.CancelScope(shield=True):
            await asyncio.gather(*self._tasks, return_exceptions=True)
