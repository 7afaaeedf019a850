"""OpenAI responses, without I/O: logprobs in OpenAI's two formats, and whole or
streamed (chunk) responses to /v1/completions and /v1/chat/completions.

Field names follow vLLM's OpenAI server (itself following OpenAI); the requests they
answer are in `protocol.py`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

from raylm.cluster.protocol import ChatCompletionRequest, CompletionRequest
from raylm.cluster.reasoning import ReasoningSplitter, split_reasoning
from raylm.cluster.tool_calls import ToolDeltas, ToolMode, choice_tool_calls
from raylm.engine.outputs import CompletionOutput, Logprob, RequestOutput
from raylm.engine.sampling_params import SamplingParams
from raylm.engine.stop_checker import stream_holdback

# JSON has no -inf; OpenAI and vLLM send this instead.
_MIN_LOGPROB = -9999.0


# ---- logprobs in OpenAI's two formats ------------------------------------------------
def _token_text(tokenizer, token_id: int, lp: Optional[Logprob]) -> str:
    if lp is not None and lp.decoded_token is not None:
        return lp.decoded_token
    return tokenizer.decode([int(token_id)], skip_special_tokens=False)


def _by_rank(step: dict) -> list:
    return sorted(step.items(), key=lambda kv: (kv[1].rank is None, kv[1].rank or 0, -kv[1].logprob))


def _clamp(logprob: float) -> float:
    return max(float(logprob), _MIN_LOGPROB)


def completion_logprobs(tokenizer, token_ids: list[int], steps: list[Optional[dict]],
                        text_offset: int = 0) -> dict:
    """OpenAI completions logprobs {tokens, token_logprobs, top_logprobs, text_offset};
    a step of None (the first prompt token) gives null entries."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token_id, step in zip(token_ids, steps):
        chosen = step.get(token_id) if step else None
        token = _token_text(tokenizer, token_id, chosen)
        out["tokens"].append(token)
        out["token_logprobs"].append(None if chosen is None else _clamp(chosen.logprob))
        # The engine's step dict holds the top-k plus the chosen token, as OpenAI returns.
        # Tokens may share a text (byte pieces read as U+FFFD): keep the likeliest.
        top = None
        if step is not None:
            top = {}
            for t, lp in _by_rank(step):
                top.setdefault(_token_text(tokenizer, t, lp), _clamp(lp.logprob))
        out["top_logprobs"].append(top)
        out["text_offset"].append(text_offset)
        text_offset += len(token)
    return out


def chat_logprobs(tokenizer, token_ids: list[int], steps: list[dict], top_k: int) -> dict:
    """OpenAI chat logprobs {"content": [{token, logprob, bytes, top_logprobs}]}."""
    content = []
    for token_id, step in zip(token_ids, steps):
        chosen = step.get(token_id)
        token = _token_text(tokenizer, token_id, chosen)
        top = _by_rank(step)
        content.append({
            "token": token, "logprob": _MIN_LOGPROB if chosen is None else _clamp(chosen.logprob),
            "bytes": list(token.encode("utf-8", "replace")),
            "top_logprobs": [{"token": (t := _token_text(tokenizer, tid, lp)), "logprob": _clamp(lp.logprob),
                              "bytes": list(t.encode("utf-8", "replace"))} for tid, lp in top[:top_k]]})
    return {"content": content}


def prompt_logprobs_json(steps: Optional[list[Optional[dict]]]) -> Optional[list]:
    """vLLM's `prompt_logprobs` field: per prompt token null or {token_id: {logprob, rank,
    decoded_token}}."""
    if steps is None:
        return None
    return [None if step is None else {
        str(t): {"logprob": _clamp(lp.logprob), "rank": lp.rank, "decoded_token": lp.decoded_token}
        for t, lp in step.items()} for step in steps]


# ---- responses: whole, and streamed as chunks ----------------------------------------
@dataclass
class PromptInput:
    """One tokenized prompt of a request and the params it runs with."""

    ids: list[int]
    text: Optional[str]  # None for token-id prompts
    params: SamplingParams

    def display_text(self, tokenizer) -> str:
        return self.text if self.text is not None else tokenizer.decode(self.ids)


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def response_head(request_id: str, obj: str, created: int, model: str) -> dict:
    return {"id": request_id, "object": obj, "created": created, "model": model}


def _echo_steps(out: RequestOutput, prompt: PromptInput, steps) -> list:
    return (out.prompt_logprobs or [None] * len(prompt.ids)) + list(steps or [])


def completion_response(head: dict, tokenizer, body: CompletionRequest, prompts: list[PromptInput],
                        finals: list[RequestOutput]) -> dict:
    """The /v1/completions JSON; choice index = prompt index * n + completion index."""
    choices, generated = [], 0
    for pi, (p, out) in enumerate(zip(prompts, finals)):
        for c in out.outputs:
            ids, text, steps = c.token_ids, c.text, c.logprobs
            if body.echo:
                ids, text = p.ids + ids, p.display_text(tokenizer) + text
                steps = _echo_steps(out, p, steps)
            choices.append({
                "index": pi * p.params.n + c.index, "text": text,
                "logprobs": None if body.logprobs is None else completion_logprobs(tokenizer, ids, steps),
                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason,
                "prompt_logprobs": prompt_logprobs_json(out.prompt_logprobs)})
            generated += len(c.token_ids)
    choices.sort(key=lambda c: c["index"])
    return {**head, "choices": choices, "usage": usage(sum(len(p.ids) for p in prompts), generated)}


def chat_response(head: dict, tokenizer, body: ChatCompletionRequest, prompt: PromptInput,
                  final: RequestOutput, tools: ToolMode = ToolMode(), echo: str = "",
                  reasoning_inside: Optional[bool] = None) -> dict:
    """The /v1/chat/completions JSON; under a tool mode, calls parsed into `tool_calls`
    (content null when there are only calls); `echo` leads each content. With a
    reasoning parser (`reasoning_inside` not None: whether the output starts inside its
    reasoning) the reasoning goes to `reasoning_content` and `reasoning`."""
    top_k = body.top_logprobs or 0
    choices = []
    for c in sorted(final.outputs, key=lambda c: c.index):
        text, extra = c.text, {}
        if reasoning_inside is not None:
            reasoning, text = split_reasoning(c.text, reasoning_inside)
            text, extra = text or "", {"reasoning_content": reasoning, "reasoning": reasoning}
        content, calls, finish = choice_tool_calls(tools, text, c.finish_reason)
        if echo:
            content = echo + (content or "")
        choices.append({
            "index": c.index, "message": {"role": "assistant", **extra, "content": content,
                                          "tool_calls": [call.to_json() for call in calls]},
            "logprobs": chat_logprobs(tokenizer, c.token_ids, c.logprobs or [], top_k) if body.logprobs else None,
            "finish_reason": finish, "stop_reason": c.stop_reason})
    return {**head, "choices": choices,
            "usage": usage(len(prompt.ids), sum(len(c.token_ids) for c in final.outputs)),
            "prompt_logprobs": prompt_logprobs_json(final.prompt_logprobs)}


@dataclass
class _Sent:
    """How much of one choice a stream has sent."""

    chars: int = 0  # of the completion text
    tokens: int = 0
    offset: int = 0  # text_offset of the next logprobs token (an echoed prompt included)
    finished: bool = False


class _DeltaStream:
    """Turns cumulative outputs (text and tokens so far) into per-choice deltas.

    While a choice runs, the last `max(len(stop)) - 1` characters are held back: they
    may begin a stop string, and text once sent cannot be taken back. So the streamed
    deltas always join up to the final (non-streamed) text."""

    def __init__(self, head: dict, tokenizer, body, prompts: list[PromptInput]):
        self.head, self.tokenizer, self.body, self.prompts = head, tokenizer, body, prompts
        self.holdback = stream_holdback(prompts[0].params.stop)
        self.sent: dict[int, _Sent] = {}

    def _delta(self, index: int, c: CompletionOutput, want_tokens: bool):
        """(state, new text, first new token position), or None when there is nothing
        to send (no new text, no wanted tokens, not finishing)."""
        s = self.sent.setdefault(index, _Sent())
        if s.finished:
            return None
        text = c.text if c.finish_reason is not None else c.text[:max(0, len(c.text) - self.holdback)]
        text = text[s.chars:]
        if not text and c.finish_reason is None and not (want_tokens and len(c.token_ids) > s.tokens):
            return None
        start = s.tokens
        s.chars, s.tokens, s.finished = s.chars + len(text), len(c.token_ids), c.finish_reason is not None
        return s, text, start

    def first_chunks(self) -> Iterator[dict]:
        """Chunks sent before any output (none by default)."""
        return iter(())

    def usage_chunk(self) -> Optional[dict]:
        """The final chunk (empty choices) with stream_options.include_usage, else None."""
        if not self.body.include_usage:
            return None
        return {**self.head, "choices": [], "usage": usage(
            sum(len(p.ids) for p in self.prompts), sum(s.tokens for s in self.sent.values()))}


class CompletionStream(_DeltaStream):
    """/v1/completions chunks; with echo, a choice's first chunk starts with the prompt."""

    def chunks(self, prompt_index: int, out: RequestOutput) -> Iterator[dict]:
        p, body = self.prompts[prompt_index], self.body
        for c in out.outputs:
            index = prompt_index * p.params.n + c.index
            first = index not in self.sent
            delta = self._delta(index, c, body.logprobs is not None)
            if delta is None:
                continue
            s, text, start = delta
            ids, steps = c.token_ids[start:s.tokens], (c.logprobs or [])[start:s.tokens]
            if body.echo and first:
                text, ids = p.display_text(self.tokenizer) + text, p.ids + ids
                steps = _echo_steps(out, p, steps)
            logprobs = None
            if body.logprobs is not None:
                logprobs = completion_logprobs(self.tokenizer, ids, steps, s.offset)
                s.offset += sum(len(t) for t in logprobs["tokens"])
            yield {**self.head, "choices": [{"index": index, "text": text, "logprobs": logprobs,
                                             "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}]}


class ChatStream(_DeltaStream):
    """/v1/chat/completions chunks: a role chunk per choice (then the echo, if any),
    content or tool-call deltas, then the finish_reason (with the last delta)."""

    def __init__(self, head: dict, tokenizer, body, prompts: list[PromptInput], tools: ToolMode = ToolMode(),
                 echo: str = "", reasoning_inside: Optional[bool] = None):
        super().__init__(head, tokenizer, body, prompts)
        self.tools, self.echo = tools, echo
        self.tool_deltas: dict[int, ToolDeltas] = {}
        self.reasoning_inside = reasoning_inside  # None: no reasoning parser
        self.splitters: dict[int, ReasoningSplitter] = {}

    def first_chunks(self) -> Iterator[dict]:
        for i in range(self.prompts[0].params.n):
            yield self._chunk(i, {"role": "assistant", "content": ""})
            if self.echo:
                yield self._chunk(i, {"content": self.echo})

    def _chunk(self, index: int, delta: dict, finish_reason: Optional[str] = None) -> dict:
        return {**self.head, "choices": [{"index": index, "delta": delta, "logprobs": None,
                                          "finish_reason": finish_reason}]}

    def chunks(self, prompt_index: int, out: RequestOutput) -> Iterator[dict]:
        body = self.body
        for c in out.outputs:
            delta = self._delta(c.index, c, bool(body.logprobs))
            if delta is None:
                continue
            s, text, start = delta
            deltas, finish = [], c.finish_reason
            if self.reasoning_inside is not None:
                splitter = self.splitters.setdefault(c.index, ReasoningSplitter(self.reasoning_inside))
                reasoning, text = splitter.feed(text, final=c.finish_reason is not None)
                if reasoning:
                    deltas.append({"reasoning_content": reasoning, "reasoning": reasoning})
            if self.tools.active:
                tools = self.tool_deltas.setdefault(c.index, ToolDeltas(self.tools))
                calls, finish = tools.feed(text, c.finish_reason)
                deltas += calls
            elif text or not deltas:
                deltas.append({"content": text})
            deltas = deltas or [{}]
            chunks = [self._chunk(c.index, d) for d in deltas]
            last = chunks[-1]["choices"][0]
            if body.logprobs:
                chunks[0]["choices"][0]["logprobs"] = chat_logprobs(
                    self.tokenizer, c.token_ids[start:s.tokens], (c.logprobs or [])[start:s.tokens],
                    body.top_logprobs or 0)
            if c.finish_reason is not None:
                last["finish_reason"], last["stop_reason"] = finish, c.stop_reason
            for chunk in chunks:  # a tool mode may have nothing to send yet
                ch = chunk["choices"][0]
                if ch["delta"] or ch["logprobs"] or ch["finish_reason"]:
                    yield chunk
