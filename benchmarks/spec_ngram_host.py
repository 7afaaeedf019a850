"""Host time of n-gram (prompt-lookup) proposals: µs per batch of `--batch` requests with
`--context`-token contexts, for the first call (indexing the prompts) and for steady
decoding (each step appends 1 to k+1 verified tokens per request, as speculative decoding
does). Pure CPU; run with `python benchmarks/spec_ngram_host.py`."""
from __future__ import annotations

import argparse
import random
import time

from raylm.engine.spec_decode.ngram import NgramProposer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--prompt-lookup-min", type=int, default=2)
    ap.add_argument("--prompt-lookup-max", type=int, default=5)
    ap.add_argument("--steps", type=int, default=50)
    args = ap.parse_args()
    rng = random.Random(0)
    # Text-like: a random walk over a few hundred phrases, so lookups find matches.
    phrases = [[rng.randrange(args.vocab) for _ in range(rng.randrange(3, 12))] for _ in range(300)]
    streams = []  # each request's text: its context, then what it goes on to generate
    for _ in range(args.batch):
        toks: list[int] = []
        while len(toks) < args.context + args.steps * (args.k + 1):
            toks += rng.choice(phrases) if rng.random() < 0.7 else [rng.randrange(args.vocab)]
        streams.append(toks)
    seqs = [t[:args.context] for t in streams]
    ids = [f"r{i}" for i in range(args.batch)]
    prop = NgramProposer(args.k, args.prompt_lookup_min, args.prompt_lookup_max)
    t0 = time.perf_counter()
    out = prop.propose(ids, seqs)
    first = time.perf_counter() - t0
    times, hits, accepted = [], 0, 0
    for _ in range(args.steps):
        for s, p, full in zip(seqs, out, streams):  # verification: accept while it matches
            n = len(s)
            a = 0
            while a < len(p) and p[a] == full[n + a]:
                a += 1
            accepted += a
            s += full[n:n + a + 1]
        t0 = time.perf_counter()
        out = prop.propose(ids, seqs)
        times.append(time.perf_counter() - t0)
        hits += sum(bool(p) for p in out)
    times.sort()
    print(f"batch {args.batch} x {args.context} tokens, n {args.prompt_lookup_min}..{args.prompt_lookup_max}, "
          f"k {args.k}: first call {first * 1e3:.1f} ms; steady median "
          f"{times[len(times) // 2] * 1e6:.0f} µs per batch, p90 {times[int(len(times) * 0.9)] * 1e6:.0f} µs; "
          f"{hits / (args.steps * args.batch):.0%} of rows got proposals, "
          f"{accepted / (args.steps * args.batch):.2f} accepted per row per step")


if __name__ == "__main__":
    main()
