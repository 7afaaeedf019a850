"""Stop strings: finding them in growing output text, and how much text a streaming
client must not be sent yet.

Text arrives in deltas (one per generated token), so a stop string can straddle
deltas: its first characters arrived with an earlier token. Each check therefore
looks back `len(stop_str) - 1` characters before the new ones, and no further:
anything entirely older was already checked when it arrived.
"""
from __future__ import annotations

from typing import Optional


def check_stop_strings(output_text: str, new_char_count: int, stop: list[str],
                       include_stop_str_in_output: bool) -> Optional[tuple[str, int]]:
    """Find a stop string completed by the newest `new_char_count` characters of
    `output_text`.

    Returns `(stop_str, truncate_to)`, where `output_text[:truncate_to]` is the text to
    keep: it ends just before the stop string, or just after it when
    `include_stop_str_in_output`. Returns None when no stop string was completed.

    When several complete in the new text, the earliest match wins: the one whose last
    character comes first (the one generation would have hit first, had the text
    arrived a character at a time), and among those the one that starts first. So
    the answer does not depend on how the text was split into deltas.
    """
    if new_char_count <= 0 or not stop:
        return None
    text_len = len(output_text)
    best: Optional[tuple[int, int, str]] = None  # (end, start, stop string)
    for s in stop:
        # A match that ends inside the new characters starts no earlier than this.
        window_start = max(0, text_len - new_char_count - len(s) + 1)
        start = output_text.find(s, window_start)
        if start < 0:
            continue
        # All occurrences of one string have one length, so its first is also the one
        # that ends first.
        candidate = (start + len(s), start, s)
        if best is None or candidate[:2] < best[:2]:
            best = candidate
    if best is None:
        return None
    end, start, s = best
    return s, (end if include_stop_str_in_output else start)


def stream_holdback(stop: list[str]) -> int:
    """How many trailing characters of unfinished output a streaming client must not
    be sent yet: they may be the start of a stop string, which would then have to be
    taken back. It is `max(len(s)) - 1` (0 without stop strings).

    Send `text[:len(text) - stream_holdback(stop)]` while the request runs, and the
    whole (already truncated) text once it has finished.
    """
    return max((len(s) for s in stop), default=1) - 1
