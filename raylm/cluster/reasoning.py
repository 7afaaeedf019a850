"""Reasoning outputs on /v1/chat/completions (vLLM's `--reasoning-parser`): the text a
reasoning model writes between `<think>` and `</think>` goes to the message's
`reasoning_content` (and `reasoning`, vLLM's newer name for it), the rest to `content`.

Where the output starts: inside its reasoning when the rendered prompt leaves a `<think>`
open (DeepSeek-R1's and Qwen3.5's templates end the prompt with it; Qwen3's with thinking
disabled closes it there), else as content, entering reasoning if the output itself opens
with `<think>` (Qwen3's template, older R1 distills). Reasoning ends at `</think>`;
everything after it is content. A stream runs the same state machine over the deltas,
holding back a tail that may be the start of a marker, so the concatenated deltas equal
the whole response's fields. `deepseek_r1` and `qwen3` name the same parser (both
models mark reasoning with `<think>`/`</think>`), for vLLM's command lines."""
from __future__ import annotations

from typing import Optional

from raylm.cluster.tool_parsers import partial_suffix
from raylm.engine.structured_outputs import REASONING_PARSERS, check_reasoning_parser  # noqa: F401

START, END = "<think>", "</think>"


def starts_inside(prompt_text: Optional[str]) -> bool:
    """Does the rendered prompt leave a `<think>` open (the output starts in reasoning)?"""
    if not prompt_text:
        return False
    return prompt_text.rfind(START) > prompt_text.rfind(END)


class ReasoningSplitter:
    """One choice's output text, fed in deltas: each `feed` returns (reasoning, content)
    text to send now; `final=True` flushes what was held back."""

    def __init__(self, inside: bool):
        # "open": before any output, where a leading <think> may start reasoning
        self.state = "reasoning" if inside else "open"
        self.pending = ""

    def feed(self, delta: str, final: bool = False) -> tuple[str, str]:
        text, self.pending = self.pending + delta, ""
        reasoning, content = "", ""
        while text:
            if self.state == "open":
                stripped = text.lstrip()
                if stripped.startswith(START):
                    text, self.state = stripped[len(START):], "reasoning"
                elif START.startswith(stripped) and not final:
                    self.pending = text  # maybe the start of <think>
                    return reasoning, content
                else:
                    self.state = "content"
            elif self.state == "reasoning":
                i = text.find(END)
                if i >= 0:
                    reasoning += text[:i]
                    text, self.state = text[i + len(END):], "content"
                    continue
                hold = 0 if final else partial_suffix(text, END)
                reasoning += text[:len(text) - hold]
                self.pending = text[len(text) - hold:]
                return reasoning, content
            else:
                content += text
                text = ""
        return reasoning, content


def split_reasoning(text: str, inside: bool) -> tuple[Optional[str], Optional[str]]:
    """(reasoning, content) of a whole output, None for an empty part."""
    reasoning, content = ReasoningSplitter(inside).feed(text, final=True)
    return reasoning or None, content or None
