"""N-gram (prompt-lookup) proposals: for each request, the latest earlier occurrence of
its last n tokens (n from prompt_lookup_max down to prompt_lookup_min) in its prompt and
output, and the k tokens that followed it (continued periodically where they reach the
end of the context: after "a b c a b" the proposal is "c a b c", not "c a b").

The lookup is incremental: each request keeps, per n, a dict from an n-gram (its hash)
to the latest position where it starts, and each call indexes only the n-grams that end
before the request's last token and were not indexed yet. A step then costs a few dict
operations per request whatever the context length (a scan of the whole context would
grow with it, and over a generation quadratically). The first call for a request indexes
its prompt with C-level zip/dict building (about 0.3 ms per n for 2k tokens). Memory:
about 100 bytes per token per n. `benchmarks/spec_ngram_host.py` measures the host time.
"""
from __future__ import annotations

from typing import Optional, Sequence


class _Index:
    """One request's n-gram index: `starts[n][hash(ngram)]` is the latest start of that
    n-gram among the first `num_indexed` n-gram starts considered."""

    __slots__ = ("starts", "num_tokens")

    def __init__(self, ns: Sequence[int]) -> None:
        self.starts = {n: {} for n in ns}
        self.num_tokens = 0  # tokens seen: every n-gram ending before the last is indexed

    def extend(self, tokens: Sequence[int], num_tokens: int) -> None:
        """Index the n-grams that end before the last of the first `num_tokens` tokens."""
        old = self.num_tokens
        self.num_tokens = num_tokens
        if num_tokens - old > 16:  # a prompt (or a long jump): build in C, per n
            for n, starts in self.starts.items():
                lo, hi = max(0, old - n), num_tokens - n  # starts i with old-1 <= i+n-1 <= num_tokens-2
                if hi > lo:
                    grams = zip(*(tokens[lo + j:hi + j] for j in range(n)))
                    starts.update(zip(map(hash, grams), range(lo, hi)))
            return
        items = self.starts.items()
        for end in range(max(1, old), num_tokens):  # n-grams ending at end - 1
            for n, starts in items:
                i = end - n
                if i >= 0:
                    starts[hash(tuple(tokens[i:end]))] = i


class NgramProposer:
    """Proposes up to `num_speculative_tokens` tokens per request by prompt lookup.
    Callers pass each request's whole token list (prompt then verified output), which
    must only grow between calls, and call `remove` when the request ends."""

    def __init__(self, num_speculative_tokens: int, prompt_lookup_min: int, prompt_lookup_max: int):
        if num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1, got {num_speculative_tokens}")
        if not 1 <= prompt_lookup_min <= prompt_lookup_max:
            raise ValueError(f"need 1 <= prompt_lookup_min <= prompt_lookup_max, got "
                             f"{prompt_lookup_min} and {prompt_lookup_max}")
        self.k = num_speculative_tokens
        self.ns = tuple(range(prompt_lookup_min, prompt_lookup_max + 1))
        self._index: dict[str, _Index] = {}

    @classmethod
    def from_config(cls, config) -> "NgramProposer":
        return cls(config.num_speculative_tokens, config.prompt_lookup_min, config.prompt_lookup_max)

    def remove(self, request_id: str) -> None:
        """Forget a finished (or preempted and re-dispatched) request."""
        self._index.pop(request_id, None)

    def propose(self, request_ids: Sequence[str], token_ids: Sequence[Sequence[int]],
                max_num_tokens: Optional[Sequence[int]] = None) -> list[list[int]]:
        """Proposals for each request (possibly none), at most `max_num_tokens[i]` (or k)
        tokens long."""
        out = []
        for i, rid in enumerate(request_ids):
            k = self.k if max_num_tokens is None else min(self.k, max_num_tokens[i])
            out.append(self._propose_one(rid, token_ids[i], k) if k > 0 else [])
        return out

    def _propose_one(self, rid: str, tokens: Sequence[int], k: int) -> list[int]:
        index = self._index.get(rid)
        num = len(tokens)
        if index is None or num < index.num_tokens:
            index = self._index[rid] = _Index(self.ns)
        if num > index.num_tokens:
            index.extend(tokens, num)
        # A suffix that occurred earlier has shorter suffixes that did too: go up from the
        # shortest n and stop at the first miss (most rows miss at once).
        found = None
        for n in self.ns:
            if n >= num:
                break
            suffix = tuple(tokens[num - n:])
            start = index.starts[n].get(hash(suffix))
            # The hash may collide: check the tokens (a cheap slice compare).
            if start is None or tuple(tokens[start:start + n]) != suffix:
                break
            found = start + n
        if found is None:
            return []
        out = list(tokens[found:found + k])
        # Near the end the earlier occurrence's continuation runs into the suffix itself:
        # the context repeats with period num - found, so the copy goes on over the tokens
        # it proposes (an overlapping copy, as LZ77's), and a run or cycle shorter than k
        # still gets k proposals.
        period = num - found
        while len(out) < k:
            out.append(out[len(out) - period])
        return out
