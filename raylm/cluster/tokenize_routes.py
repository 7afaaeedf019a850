"""vLLM's `POST /tokenize` and `POST /detokenize` (at the root, not under /v1).

    /tokenize    {model?, prompt, add_special_tokens=true}  or
                 {model?, messages, add_generation_prompt=true, continue_final_message=false,
                  add_special_tokens=false, chat_template_kwargs?, tools?}
                 -> {count, max_model_len, tokens, token_strs}   (token_strs with return_token_strs)
    /detokenize  {model?, tokens} -> {prompt}
"""
from __future__ import annotations

from typing import Any, Optional

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from raylm.cluster.protocol import ApiError, ChatCompletionRequest, ChatMessage, ChatTool, check_text
from raylm.engine.input_processor import off_loop, text_size


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[ChatMessage]] = None
    add_special_tokens: Optional[bool] = None
    add_generation_prompt: Optional[bool] = None
    continue_final_message: Optional[bool] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None
    tools: Optional[list[ChatTool]] = None
    return_token_strs: Optional[bool] = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    model: Optional[str] = None
    tokens: list[int]


async def _tokenize(tok, body: TokenizeRequest) -> list[int]:
    if (body.prompt is None) == (body.messages is None):
        raise ApiError(400, "tokenize takes exactly one of prompt and messages", "prompt")
    if body.prompt is not None:
        if body.add_generation_prompt is not None or body.continue_final_message is not None:
            raise ApiError(400, "add_generation_prompt and continue_final_message apply to messages only",
                           "add_generation_prompt")
        add = body.add_special_tokens if body.add_special_tokens is not None else True
        return await off_loop(lambda: tok.encode(body.prompt, add_special_tokens=add), len(body.prompt))
    chat = ChatCompletionRequest(messages=body.messages, add_generation_prompt=body.add_generation_prompt,
                                 continue_final_message=body.continue_final_message,
                                 chat_template_kwargs=body.chat_template_kwargs, tools=body.tools)
    chat.check(max_n=1)
    return (await render_chat(tok, chat, bool(body.add_special_tokens)))[1]


def add_tokenize_routes(app, backend, guard, check_model) -> None:
    """Add /tokenize and /detokenize to `app`; `guard` turns ApiError into error JSON,
    `check_model` answers 404 for another model's name."""

    async def tokenize(body: TokenizeRequest):
        check_text(body)
        check_model(body.model)
        tok = backend.tokenizer
        ids = await _tokenize(tok, body)
        strs = tok.convert_ids_to_tokens(ids) if body.return_token_strs else None
        return JSONResponse({"count": len(ids), "max_model_len": backend.max_model_len, "tokens": ids,
                             "token_strs": strs})

    async def detokenize(body: DetokenizeRequest):
        check_model(body.model)
        tok = backend.tokenizer
        bad = [t for t in body.tokens if not 0 <= t < len(tok)]
        if bad:
            raise ApiError(400, f"tokens entry {bad[0]} is outside the vocabulary [0, {len(tok)})", "tokens")
        return JSONResponse({"prompt": await off_loop(lambda: tok.decode(body.tokens), len(body.tokens))})

    @app.post("/tokenize")
    async def tokenize_route(body: TokenizeRequest):
        return await guard(tokenize(body))

    @app.post("/detokenize")
    async def detokenize_route(body: DetokenizeRequest):
        return await guard(detokenize(body))


async def render_chat(tok, body: ChatCompletionRequest,
                      add_special_tokens: bool = False) -> tuple[str, list[int]]:
    """The prompt text and token ids of a chat request's messages (a long conversation is
    rendered and tokenized off the event loop); a template that fails is a 400."""
    conversation, kwargs = body.conversation(), body.template_kwargs()

    def render() -> tuple[str, list[int]]:
        try:
            text = tok.apply_chat_template(conversation, **kwargs)
        except Exception as exc:  # no template, or the template rejected the conversation
            raise ApiError(400, f"the chat template could not render messages: {exc}", "messages") from None
        # The template has the special tokens (unless the caller asks for them again).
        return text, tok.encode(text, add_special_tokens=add_special_tokens)

    return await off_loop(render, text_size(conversation) + text_size(kwargs.get("tools")))
