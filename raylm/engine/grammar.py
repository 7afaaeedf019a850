"""Structured outputs, vocabulary half (vLLM V1's design): grammars compile off the step
loop, on a thread pool, at admission, cached by spec; the engine core holds one matcher
per request (an xgrammar `GrammarMatcher`, or a `GuidanceMatcher` over llguidance's) and,
each step, packs the next-token bitmasks of the grammar rows it schedules into the step
plan (`GrammarManager.bitmask`). Both backends' bitmasks have one layout: int32 words,
token i at bit i % 32 of word i // 32.

The tokenizer and each backend's vocabulary (xgrammar's `TokenizerInfo`, llguidance's
`LLTokenizer`) are built on first use, in the pool, so an engine that never sees a
grammar pays nothing. The bitmask covers the tokenizer's vocabulary, and so do both
backends' vocabularies. A model's vocabulary may be larger (padded embeddings): the ids
past the tokenizer's, which no text spells, are past the bitmask, and applying it bans them
(`apply_token_bitmask`). Giving xgrammar the model's vocabulary instead made every padded
id a special token it checks on each accept: with the embedded SmolLM2 tokenizer (49,152
tokens) under Llama-3.1-8B's 128,256 logits, 256 accepts took 4.6 ms against 0.4 ms, and
256 bitmasks 5.5 ms against 2.7 ms, on one core of the 2-core CPU."""
from __future__ import annotations

import os
import threading
import time
from typing import Optional
from collections import OrderedDict, deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from typing import Callable

from raylm.engine.sampling_params import StructuredOutputsParams
from raylm.engine.structured_outputs import DEFAULT_CONFIG, GrammarConfig, build_grammar, spec_key

CACHE_SIZE = 1024  # compiled grammars kept (by spec)
_UNKNOWN = object()  # a cached value not looked up yet


def _cpus() -> int:
    """The CPUs this process may run on (a container's or a Ray worker's share)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# Grammars compile on this many threads: xgrammar's compile releases the GIL and one
# compile uses one core (a JSON schema took 8.5 ms on one thread of this 2-core CPU and
# 3.7 ms each on two; its own max_threads did not help), and a burst of new schemas holds
# their requests back until each compiles (half the CPUs, as vLLM's pool).
COMPILE_THREADS = max(2, min(8, _cpus() // 2))
# A step's emitted tokens go to their xgrammar matchers on this many Python threads, a
# chunk and one batch call each (once there are PARALLEL_ACCEPT_MIN of them), and each
# thread then fills its chunk's bitmasks on its share of FILL_THREADS. One: on an H100
# machine's 16 CPUs (structured.py --trace, 256 JSON requests, Llama-3.1-8B) the offline
# engine made 0.97 and 0.90 of its unconstrained throughput with one such thread, 0.90
# with 2 and 0.83 with 8: each thread takes the GIL around its calls, and the main
# thread, which records the step meanwhile, waited 0.7-0.9 ms a step for one thread's
# accepts of all 256 rows against 4.5 ms for eight threads' 32 each.
ACCEPT_THREADS = 1
# The bitmask fill's threads (xgrammar's own, GIL-free) in a step's matcher work (start_step).
FILL_THREADS = max(1, min(8, _cpus() // 2))
PARALLEL_ACCEPT_MIN = 64
# A step's accepts and next bitmasks go to threads (GrammarManager.start_step) from this
# many rows: below it the hand-off costs more than it overlaps.
PARALLEL_STEP_MIN = 32
# While a step's matcher work runs on threads, the interpreter's switch interval (5 ms by
# default) is cut to this, so a thread's return from a GIL-free call does not wait up to
# 5 ms for the main thread's Python: on 2 cores, 50 fills of 200 rows beside a busy main
# thread took 319 ms at 5 ms, 105 ms at 1 ms, 62 ms at 0.2 ms and 55 ms at 0.05 ms,
# against 48 ms alone (the main thread's loop ran 10% slower at 0.05 ms).
STEP_SWITCH_INTERVAL = 5e-5
GUIDANCE_ROLLBACK = 1024  # tokens a GuidanceMatcher can roll back (a step's proposals are fewer)


class GuidanceMatcher:
    """llguidance's `LLMatcher` behind xgrammar's matcher methods, with xgrammar's
    meaning: `accept_token` refuses a token the grammar does not allow and leaves the
    state unchanged (llguidance's own would enter an error state for good), and
    `is_terminated` holds once a stop token is accepted. llguidance stops as soon as
    nothing but a stop token can follow; the stop token that xgrammar then asks for is
    accepted here without reaching llguidance, and rolled back likewise."""

    __slots__ = ("_m", "_stop", "_vocab", "_consumed", "_terminated")

    def __init__(self, matcher, stop_token_ids, vocab: int):
        self._m = matcher
        self._stop = stop_token_ids
        self._vocab = vocab  # the tokenizer's: llguidance errors for good on an id past it
        self._consumed: list[bool] = []  # per accepted token, newest last: did llguidance see it
        self._terminated = False

    def accept_token(self, token: int) -> bool:
        if self._terminated or not 0 <= token < self._vocab:
            return False
        if self._m.is_stopped():  # only a stop token may follow
            if token not in self._stop:
                return False
            consumed = False
        else:
            if self._m.try_consume_tokens([token]) != 1:  # 0: refused, the state unchanged
                return False
            consumed = True
        self._consumed.append(consumed)
        if len(self._consumed) > 2 * GUIDANCE_ROLLBACK:
            del self._consumed[:-GUIDANCE_ROLLBACK]
        self._terminated = token in self._stop
        return True

    def is_terminated(self) -> bool:
        return self._terminated

    @property
    def llmatcher(self):
        """llguidance's matcher (its bitmask is this matcher's: a stopped one allows
        only the stop tokens)."""
        return self._m

    def rollback(self, num_tokens: int) -> None:
        if num_tokens > len(self._consumed):
            raise ValueError(f"cannot roll back {num_tokens} tokens; at most {len(self._consumed)}")
        undo = sum(self._consumed[-num_tokens:]) if num_tokens else 0
        del self._consumed[len(self._consumed) - num_tokens:]
        if undo and not self._m.rollback(undo):
            raise RuntimeError(f"llguidance could not roll back {undo} tokens: {self._m.get_error()}")
        if num_tokens:
            self._terminated = False

    def fill_next_token_bitmask(self, bitmask, index: int = 0) -> None:
        from llguidance.torch import fill_next_token_bitmask

        fill_next_token_bitmask(self._m, bitmask, index)


class ReasoningGate:
    """A grammar that starts once the reasoning ends (vLLM's behaviour with a reasoning
    parser): while `waiting`, every token is allowed; the reasoning's end token opens the
    gate and `inner` (a matcher) constrains every later token. Rolls back like a matcher,
    the end token included (the gate closes again)."""

    __slots__ = ("inner", "end_token_id", "waiting", "_log")

    def __init__(self, inner, end_token_id: int):
        self.inner, self.end_token_id, self.waiting = inner, end_token_id, True
        self._log: list[str] = []  # per accepted token: "w" reasoning, "e" its end, "i" the grammar's

    def accept_token(self, token: int) -> bool:
        if self.waiting:
            kind = "e" if token == self.end_token_id else "w"
            self.waiting = kind == "w"
        elif self.inner.accept_token(token):
            kind = "i"
        else:
            return False
        self._log.append(kind)
        if len(self._log) > 2 * GUIDANCE_ROLLBACK:
            del self._log[:-GUIDANCE_ROLLBACK]
        return True

    def is_terminated(self) -> bool:
        return not self.waiting and self.inner.is_terminated()

    def rollback(self, num_tokens: int) -> None:
        if num_tokens > len(self._log):
            raise ValueError(f"cannot roll back {num_tokens} tokens; at most {len(self._log)}")
        undone = self._log[len(self._log) - num_tokens:]
        del self._log[len(self._log) - num_tokens:]
        if undone.count("i"):
            self.inner.rollback(undone.count("i"))
        if "e" in undone:
            self.waiting = True

    def fill_next_token_bitmask(self, bitmask, index: int = 0) -> None:
        if self.waiting:
            bitmask[index].fill_(-1)
        else:
            self.inner.fill_next_token_bitmask(bitmask, index)


def gate_waits(matcher) -> bool:
    """A reasoning gate that still waits: its grammar allows every token for now."""
    return isinstance(matcher, ReasoningGate) and matcher.waiting


def reasoning_tokens(tokenizer) -> Optional[tuple[int, int]]:
    """The ids of `<think>` and `</think>` when the tokenizer spells each as one token."""
    ids = []
    for marker in ("<think>", "</think>"):
        encoded = tokenizer.encode(marker, add_special_tokens=False)
        if len(encoded) != 1:
            return None
        ids.append(encoded[0])
    return ids[0], ids[1]


def reasoning_closed(prompt_token_ids, think_ids: tuple[int, int]) -> bool:
    """Does the prompt close the reasoning (its last `</think>` after its last `<think>`:
    a template that disables thinking)? Otherwise the output reasons first."""
    start, end = think_ids
    last = {start: -1, end: -1}
    for i, t in enumerate(prompt_token_ids):
        if t in last:
            last[t] = i
    return last[end] > last[start]


class GrammarManager:
    """Compiles grammars for one model's vocabulary and builds matchers and bitmasks.

    `load_tokenizer()` returns the HF tokenizer (called once, in the pool);
    `vocab_size` is the model's (logits') vocabulary, the bitmask's width until the
    tokenizer is loaded; `stop_token_ids` end a grammar; `config` the engine's
    `structured_outputs_config`, parsed."""

    def __init__(self, load_tokenizer: Callable, vocab_size: int, stop_token_ids: list[int],
                 max_workers: int = COMPILE_THREADS, config: GrammarConfig = DEFAULT_CONFIG):
        self._load_tokenizer = load_tokenizer
        self.stop_token_ids = list(stop_token_ids)
        self.config = config
        self._pool = ThreadPoolExecutor(max_workers, thread_name_prefix="raylm-grammar")
        self._lock = threading.Lock()
        self._compiler = None
        self._guidance_tokenizer = None
        self._executor = None  # llguidance's threads for batched bitmasks
        self._cache: OrderedDict[tuple, Future] = OrderedDict()
        self._bitmask = [None, None]  # two buffers, used in turn (see bitmask_tensor)
        self._turn = 0
        self.pin_memory = False  # bitmask buffers in page-locked memory (CUDA, in process)
        self.reserve_rows = 0  # rows each bitmask buffer starts with (the engine's max_num_seqs)
        self._batch = None
        self._chunk_fillers: dict = {}  # (chunks, chunk) -> its BatchGrammarMatcher (start_step)
        self.accept_threads = ACCEPT_THREADS
        self._accept_pool = None
        self._accept_pool_size = 0
        self.mask_vocab = vocab_size  # the bitmask's vocabulary: the tokenizer's, once loaded
        self.compile_seconds: deque[float] = deque(maxlen=4096)  # per compile, for benchmarks
        self._compiling: dict[str, Future] = {}  # request id -> its grammar's future
        self._think = _UNKNOWN  # the tokenizer's (<think>, </think>) ids, once looked up

    @property
    def num_compiling(self) -> int:
        return len(self._compiling)

    def submit(self, request_id: str, so: StructuredOutputsParams) -> None:
        """Start compiling a request's grammar (or share the compile of an equal spec);
        `ready()` hands the request back once it is done."""
        self._compiling[request_id] = self.compile(so)

    def ready(self, block: bool = False) -> list[tuple[str, Future]]:
        """The requests whose compile is done (a failed one raises ValueError from
        `result()`). `block`: wait up to 50 ms for one when none is."""
        if block:
            wait_futures(list(self._compiling.values()), timeout=0.05, return_when=FIRST_COMPLETED)
        done = [(rid, fut) for rid, fut in self._compiling.items() if fut.done()]
        for rid, _ in done:
            del self._compiling[rid]
        return done

    def cancel(self, request_id: str) -> None:
        """The request ended while its grammar compiled (the compile itself goes on: the
        cache keeps it for the next request with that spec)."""
        self._compiling.pop(request_id, None)

    def compile(self, so: StructuredOutputsParams) -> Future:
        """A future of the spec's `CompiledGrammar` (shared by requests with equal specs;
        a failed compile raises ValueError from `result()` and is not cached)."""
        key = spec_key(so)
        with self._lock:
            fut = self._cache.get(key)
            if fut is not None and not (fut.done() and fut.exception() is not None):
                self._cache.move_to_end(key)
                return fut
            fut = self._pool.submit(self._compile, so)
            self._cache[key] = fut
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
            return fut

    def _compile(self, so: StructuredOutputsParams):
        """xgrammar's `CompiledGrammar`, or for llguidance a matcher in its start state
        (its construction is the compile; requests get copies)."""
        t0 = time.perf_counter()
        special = frozenset(self._tokenizer().all_special_tokens) if so.kind == "structural_tag" else frozenset()
        grammar = build_grammar(so, self.config, special)  # ValueError naming the field when it does not compile
        if grammar.backend == "xgrammar":
            compiled = self._get_compiler().compile_grammar(grammar.value)
        else:
            from llguidance import LLMatcher

            compiled = LLMatcher(self._get_guidance_tokenizer(), grammar.value, log_level=0)
            if compiled.is_error():
                raise ValueError(f"structured_outputs.{so.kind} is invalid: {compiled.get_error()}")
        self.compile_seconds.append(time.perf_counter() - t0)
        return compiled

    def _tokenizer(self):
        tokenizer = self._load_tokenizer()
        if tokenizer is None:
            raise ValueError("structured_outputs needs a tokenizer, and skip_tokenizer_init is set")
        self.mask_vocab = len(tokenizer)
        return tokenizer

    def _stop_ids(self) -> Optional[list[int]]:
        """The stop tokens the tokenizer spells (None: the backend finds the tokenizer's)."""
        ids = [t for t in self.stop_token_ids if t < self.mask_vocab]
        return ids or None

    def reasoning_tokens(self) -> Optional[tuple[int, int]]:
        """The tokenizer's `<think>` and `</think>` ids (None unless each is one token)."""
        if self._think is _UNKNOWN:
            self._think = reasoning_tokens(self._tokenizer())
        return self._think

    def _get_compiler(self):
        import xgrammar as xgr

        with self._lock:
            if self._compiler is None:
                tokenizer = self._tokenizer()
                info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=self.mask_vocab,
                                                          stop_token_ids=self._stop_ids())
                self._compiler = xgr.GrammarCompiler(info)
            return self._compiler

    def _get_guidance_tokenizer(self):
        import llguidance.hf

        with self._lock:
            if self._guidance_tokenizer is None:
                tokenizer = self._tokenizer()
                self._guidance_tokenizer = llguidance.hf.from_tokenizer(
                    tokenizer, n_vocab=self.mask_vocab, eos_token=self._stop_ids())
            return self._guidance_tokenizer

    def matcher(self, compiled, earlier_outputs: list[int], reasoning_end: Optional[int] = None):
        """A fresh matcher for one request, advanced over `earlier_outputs` (the outputs
        generated before a re-dispatch, which arrive as the end of its prompt); behind a
        `ReasoningGate` that opens at `reasoning_end` when that is given."""
        import xgrammar as xgr

        if isinstance(compiled, xgr.CompiledGrammar):
            m = xgr.GrammarMatcher(compiled)
        else:
            m = GuidanceMatcher(compiled.deep_copy(), frozenset(self.stop_token_ids), self.mask_vocab)
        if reasoning_end is not None:
            m = ReasoningGate(m, reasoning_end)
        for t in earlier_outputs:
            if not m.accept_token(t):
                raise ValueError(f"an earlier output token {t} does not match the request's grammar")
        return m

    def bitmask(self, matchers: list) -> bytes:
        """The next-token bitmasks of `matchers`, packed int32 rows (StepPlan.bitmask)."""
        return self.bitmask_tensor(matchers).numpy().tobytes()

    def bitmask_tensor(self, matchers: list, allow_all: frozenset = frozenset()):
        """The next-token bitmasks of `matchers`: an int32 [len(matchers), words] CPU
        tensor (page-locked when `pin_memory`), valid until the call after next: the two
        buffers take turns, so a step's bitmask is not overwritten while its copy to the
        device may still be queued (the next step's is filled only once that step's
        tokens are in, which is after its copy). Rows in `allow_all` allow every token."""
        buf = self._next_buffer(len(matchers))
        if matchers:
            self._fill(matchers, buf, allow_all)
        return buf

    def _next_buffer(self, n: int):
        """Rows [0, n) of the bitmask buffer whose turn it is (see bitmask_tensor)."""
        import xgrammar as xgr

        self._turn ^= 1
        held = self._bitmask[self._turn]
        if held is None or held.shape[0] < n:
            rows = max(n, 8, self.reserve_rows, 0 if held is None else 2 * held.shape[0])
            held = xgr.allocate_token_bitmask(rows, self.mask_vocab)
            if self.pin_memory:
                held = held.pin_memory()
            self._bitmask[self._turn] = held
        return held[:n]

    def _fill(self, matchers: list, buf, allow_all: frozenset = frozenset()) -> None:
        import xgrammar as xgr

        # A waiting reasoning gate allows everything; an open one is its grammar's row.
        waiting = {i for i, m in enumerate(matchers) if gate_waits(m)} | allow_all
        for i in waiting:
            buf[i].fill_(-1)
        matchers = [m.inner if isinstance(m, ReasoningGate) else m for m in matchers]
        xg = [i for i, m in enumerate(matchers) if i not in waiting and isinstance(m, xgr.GrammarMatcher)]
        gd = [i for i, m in enumerate(matchers) if i not in waiting and isinstance(m, GuidanceMatcher)]
        for rows, batched in ((xg, self._fill_xgrammar), (gd, self._fill_guidance)):
            if len(rows) == 1:
                matchers[rows[0]].fill_next_token_bitmask(buf, rows[0])
            elif rows:  # on the backend's own threads
                batched([matchers[i] for i in rows], buf, rows)

    def start_step(self, accept: list, tokens: list[int], fill: list) -> "GrammarStep":
        """A step's matcher work, started: `accept[i]` takes `tokens[i]` (the tokens the
        last step emitted), then the next-token bitmasks of `fill` (the matchers of the
        step whose sampling waits for them; a matcher may be in both) are filled. With
        enough plain xgrammar matchers this runs on the manager's threads, each a chunk
        of matchers, its accepts and then its rows, in GIL-free calls, while the caller
        goes on (recording the step, planning the next); otherwise the accepts run now
        and the fill when the bitmask is asked for. See GrammarStep."""
        import xgrammar as xgr

        plain = (all(type(m) is xgr.GrammarMatcher for m in accept)
                 and all(type(m) is xgr.GrammarMatcher for m in fill))
        if not plain or max(len(accept), len(fill)) < PARALLEL_STEP_MIN:
            return GrammarStep(self, self.accept_many(accept, tokens) if accept else [], fill)
        return GrammarStep.threaded(self, accept, tokens, fill)

    def accept_many(self, matchers: list, tokens: list[int]) -> list[tuple[bool, bool]]:
        """Feed tokens[i] to matchers[i]: (accepted, terminated) for each. xgrammar's
        matchers take theirs in `batch_accept_token` calls, one per thread of
        `accept_threads` once there are PARALLEL_ACCEPT_MIN of them: the call releases the
        GIL for the whole chunk. (One Python call per token on several threads does not
        scale: each return waits for the GIL that the other threads hold.)"""
        import xgrammar as xgr

        n = len(matchers)
        accepted: list = [None] * n
        xg = [i for i, m in enumerate(matchers) if isinstance(m, xgr.GrammarMatcher)]
        for i in range(n):  # llguidance's and reasoning gates: one by one
            if not isinstance(matchers[i], xgr.GrammarMatcher):
                accepted[i] = matchers[i].accept_token(tokens[i])

        def run(idx: list[int]) -> list[bool]:
            return xgr.BatchGrammarMatcher.batch_accept_token([matchers[i] for i in idx],
                                                              [tokens[i] for i in idx])

        threads = max(1, self.accept_threads) if len(xg) >= PARALLEL_ACCEPT_MIN else 1
        step = max(1, -(-len(xg) // threads))
        chunks = [xg[lo:lo + step] for lo in range(0, len(xg), step)]
        if len(chunks) > 1:
            pool = self._step_pool(threads)
            results = [f.result() for f in [pool.submit(run, c) for c in chunks]]
        else:
            results = [run(c) for c in chunks]
        for chunk, oks in zip(chunks, results):
            for i, ok in zip(chunk, oks):
                accepted[i] = ok
        return [(bool(ok), bool(ok) and m.is_terminated()) for m, ok in zip(matchers, accepted)]

    def _fill_xgrammar(self, matchers: list, buf, rows: list[int]) -> None:
        import xgrammar as xgr

        if self._batch is None:
            self._batch = xgr.BatchGrammarMatcher()
        self._batch.batch_fill_next_token_bitmask(matchers, buf, indices=rows)

    def _fill_guidance(self, matchers: list, buf, rows: list[int]) -> None:
        from llguidance import LLExecutor
        from llguidance.torch import fill_next_token_bitmask_par

        if self._executor is None:
            self._executor = LLExecutor()
        fill_next_token_bitmask_par(self._executor, [(m.llmatcher, i) for m, i in zip(matchers, rows)], buf)

    def _step_pool(self, threads: int) -> ThreadPoolExecutor:
        """The threads of the per-step matcher work (at least `threads` of them)."""
        if self._accept_pool is None or self._accept_pool_size < threads:
            if self._accept_pool is not None:
                self._accept_pool.shutdown(wait=False)
            self._accept_pool = ThreadPoolExecutor(threads, thread_name_prefix="raylm-grammar-accept")
            self._accept_pool_size = threads
        return self._accept_pool

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._accept_pool is not None:
            self._accept_pool.shutdown(wait=False)


class GrammarStep:
    """A step's matcher work (GrammarManager.start_step): `accepted()` gives each accept's
    (accepted, terminated), `bitmask()` the fill's rows (StepPlan.bitmask, a CPU tensor;
    a matcher that terminated allows every token: its request ended, its token is
    dropped). `close()` joins the threads and restores the switch interval: `bitmask()`
    calls it; a caller that may not reach `bitmask()` calls it too (it is idempotent)."""

    def __init__(self, manager: GrammarManager, accepted: list, fill: list):
        self._manager, self._accepted, self._fill = manager, accepted, fill
        self._acc_futures: list = []
        self._fill_futures: list = []
        self._buf = None
        self._threaded = False
        self._switch = None  # the interpreter's switch interval to restore, while threads run

    @classmethod
    def threaded(cls, manager: GrammarManager, accept: list, tokens: list[int], fill: list) -> "GrammarStep":
        import sys

        import xgrammar as xgr

        self = cls(manager, None, fill)
        self._threaded = True
        threads = max(1, manager.accept_threads)
        self._buf = buf = manager._next_buffer(len(fill)) if fill else None  # no turn taken without rows
        size = max(1, -(-len(fill) // threads))
        fill_chunks = [list(range(lo, min(lo + size, len(fill)))) for lo in range(0, len(fill), size)] or [[]]
        chunk_of = {id(fill[i]): c for c, rows in enumerate(fill_chunks) for i in rows}
        acc_chunks: list[list[int]] = [[] for _ in fill_chunks]
        for j, m in enumerate(accept):
            acc_chunks[chunk_of.get(id(m), j % len(fill_chunks))].append(j)
        # Each chunk fills its rows on its share of FILL_THREADS of xgrammar's own (GIL-free)
        # threads: one chunk (accept_threads 1) on all of them, 8 chunks on one each.
        fillers = []
        for c in range(len(fill_chunks)):
            key = (len(fill_chunks), c)
            if key not in manager._chunk_fillers:
                share = max(1, FILL_THREADS // len(fill_chunks))
                manager._chunk_fillers[key] = xgr.BatchGrammarMatcher(max_threads=share)
            fillers.append(manager._chunk_fillers[key])
        self._acc_index = acc_chunks
        self._acc_futures = [Future() for _ in fill_chunks]

        def run(c: int) -> None:
            try:
                idx = acc_chunks[c]
                oks = xgr.BatchGrammarMatcher.batch_accept_token([accept[j] for j in idx],
                                                                 [tokens[j] for j in idx]) if idx else []
                self._acc_futures[c].set_result([(bool(ok), bool(ok) and accept[j].is_terminated())
                                                 for j, ok in zip(idx, oks)])
            except BaseException as exc:  # noqa: BLE001 - re-raised by accepted()
                self._acc_futures[c].set_exception(exc)
                raise
            rows = []
            for i in fill_chunks[c]:
                if fill[i].is_terminated():
                    buf[i].fill_(-1)
                else:
                    rows.append(i)
            if rows:
                fillers[c].batch_fill_next_token_bitmask([fill[i] for i in rows], buf, indices=rows)

        self._switch = sys.getswitchinterval()
        sys.setswitchinterval(min(self._switch, STEP_SWITCH_INTERVAL))
        pool = manager._step_pool(threads)
        self._fill_futures = [pool.submit(run, c) for c in range(len(fill_chunks))]
        return self

    def accepted(self) -> list[tuple[bool, bool]]:
        """(accepted, terminated) of each accept, in order (waits for the accepts only)."""
        if self._accepted is None:
            n = sum(len(ix) for ix in self._acc_index)
            out: list = [None] * n
            for ix, fut in zip(self._acc_index, self._acc_futures):
                for j, r in zip(ix, fut.result()):
                    out[j] = r
            self._accepted = out
        return self._accepted

    def bitmask(self):
        """The fill's bitmask rows (waits for the threads)."""
        if not self._threaded:  # inline: fill now
            allow = frozenset(i for i, m in enumerate(self._fill) if m.is_terminated())
            return self._manager.bitmask_tensor(self._fill, allow)
        self.close()
        for fut in self._fill_futures:
            fut.result()  # raises what a thread raised
        return self._buf

    def close(self) -> None:
        """Wait for the threads and restore the switch interval (idempotent; also when a
        step is abandoned, e.g. its executor failed, or it filled no row)."""
        if self._switch is None:
            return
        import sys

        try:
            wait_futures(self._fill_futures)
        finally:
            sys.setswitchinterval(self._switch)
            self._switch = None
