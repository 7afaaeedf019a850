"""What the HTTP and gRPC fronts need from the engine side: the `Backend` protocol.

`raylm.cluster.frontend.Frontend` provides it, in the Serve ingress replicas
(`ClusterFrontend`) and in-process (`LocalCluster`), so `openai_api` and `grpc_service`
are written once.
"""
from __future__ import annotations

from typing import Any, AsyncIterator, Optional, Protocol, Union

from raylm.engine.outputs import RequestOutput
from raylm.engine.sampling_params import SamplingParams

PromptType = Union[str, list, dict]


async def final_output(stream: AsyncIterator[RequestOutput]) -> Optional[RequestOutput]:
    """The last (finished) output of a generate_stream iterator: a Backend's `generate`."""
    final = None
    async for out in stream:
        final = out
    return final


class Backend(Protocol):
    model_name: str        # the served model name (what /v1/models lists)
    max_model_len: int
    max_logprobs: int      # the largest logprobs / top_logprobs a request may ask for
    tokenizer: Any         # a transformers tokenizer: chat template, decoding token ids

    def generate_stream(self, prompt: PromptType, params: SamplingParams,
                        request_id: Optional[str] = None) -> AsyncIterator[RequestOutput]:
        """Cumulative outputs (text and token_ids so far) each time the request progresses;
        the last has `finished=True`. Bad input raises ValueError (naming the argument, the
        value and the limit) before anything is yielded. Closing the iterator early (client
        gone) aborts the request and frees its KV blocks."""

    async def generate(self, prompt: PromptType, params: SamplingParams,
                       request_id: Optional[str] = None) -> RequestOutput:
        """The final output of one request."""

    async def abort(self, request_id: str) -> None:
        """Stop a request at once; unknown ids are ignored."""

    async def metrics_text(self) -> bytes:
        """Prometheus exposition text, gauges refreshed at call time."""

    async def check_health(self) -> None:
        """Raise if the engine cannot serve."""
