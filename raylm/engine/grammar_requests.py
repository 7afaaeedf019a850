"""Structured outputs, the engine core's side: the live requests that hold a grammar
matcher (see `raylm.engine.grammar` for compiling, matchers and bitmasks).

A grammar request waits for its compile before the core schedules it; once admitted,
each step that samples it puts its next-token bitmask in the plan (k + 1 of them for a
row verifying k proposals), and each token it emits advances its matcher."""
from __future__ import annotations

import logging
from typing import Callable, Optional

from raylm.engine.grammar import gate_waits, reasoning_closed
from raylm.engine.spec_decode.grammar import position_bitmasks
from raylm.engine.structured_outputs import DEFAULT_CONFIG, GrammarConfig

logger = logging.getLogger("raylm")


class GrammarRequests:
    """The core's grammar requests, over its `requests` dict (id -> core request state,
    whose `grammar` is its matcher once compiled). The `GrammarManager` is built on the
    first grammar request, so an engine that never sees one pays nothing."""

    def __init__(self, requests: dict, load_tokenizer: Callable, vocab_size: int, eos_token_ids,
                 config: GrammarConfig = DEFAULT_CONFIG):
        self.requests = requests
        self._load_tokenizer = load_tokenizer
        self.vocab_size, self.eos_token_ids = vocab_size, eos_token_ids
        self.config = config  # the engine's structured_outputs_config, parsed
        self.manager = None  # GrammarManager, on the first grammar request
        self.num_live = 0  # live requests holding a matcher
        # The workers run in this process (see use_tensors): plans carry the bitmask
        # tensor itself, no bytes, and on CUDA it sits in page-locked memory.
        self.tensor_bitmasks = False
        self.pin_memory = False
        self.reserve_rows = 0  # the bitmask buffers' rows from the start (GrammarManager.reserve_rows)

    def use_tensors(self, pin_memory: bool) -> None:
        """The executor runs the model in this process: put bitmasks in plans as CPU
        tensors (page-locked when `pin_memory`, for an asynchronous copy to the GPU), not
        as bytes, which cost two copies of 4 MB a step at 256 rows of a 128k vocabulary."""
        self.tensor_bitmasks, self.pin_memory = True, pin_memory
        if self.manager is not None:
            self.manager.pin_memory = pin_memory

    @property
    def num_compiling(self) -> int:
        return 0 if self.manager is None else self.manager.num_compiling

    def submit(self, request_id: str, structured_outputs) -> None:
        """Start compiling a request's grammar; `admit` hands it back once compiled."""
        if self.manager is None:
            from raylm.engine.grammar import GrammarManager

            self.manager = GrammarManager(self._load_tokenizer, self.vocab_size, self.eos_token_ids,
                                          config=self.config)
            self.manager.pin_memory = self.pin_memory
            self.manager.reserve_rows = self.reserve_rows
        self.manager.submit(request_id, structured_outputs)

    def admit(self, block: bool) -> list[tuple]:
        """(state, error) of each request whose grammar finished compiling: error None and
        `state.grammar` a matcher advanced over earlier outputs, or the failure's message.
        `block`: nothing else to run, so wait briefly for a compile to finish."""
        done = []
        for rid, fut in self.manager.ready(block):
            state = self.requests[rid]
            req = state.request
            try:
                cut = len(req.prompt_token_ids) - state.output_offset
                prompt, earlier = req.prompt_token_ids[:cut], req.prompt_token_ids[cut:]
                think = self.manager.reasoning_tokens() if self.config.reasoning_parser else None
                gate = think[1] if think is not None and not reasoning_closed(prompt, think) else None
                state.grammar = self.manager.matcher(fut.result(), earlier, reasoning_end=gate)
            except Exception as exc:  # noqa: BLE001 - reported to the caller as its error
                done.append((state, f"{type(exc).__name__}: {exc}"))
                continue
            self.num_live += 1
            done.append((state, None))
        return done

    def rows(self, sched_out) -> list:
        """The live grammar requests that this step samples, in row order."""
        rows = []
        for s in sched_out.seqs:
            state = self.requests.get(s.request_id)
            if s.sample and state is not None and state.grammar is not None:
                rows.append(state)
        return rows

    def bitmask(self, rows: list):
        """The packed next-token bitmasks of `rows` (StepPlan.bitmask: bytes, or a CPU
        tensor with use_tensors; None when there are none)."""
        if not rows:
            return None
        matchers = [st.grammar for st in rows]
        return self.manager.bitmask_tensor(matchers) if self.tensor_bitmasks else self.manager.bitmask(matchers)

    def attach_bitmask(self, plan, sched_out) -> None:
        """Put the next-token bitmasks of this step's sampling grammar rows in the plan:
        one per plain row, k + 1 per row verifying k proposals (StepPlan.spec_bitmask)."""
        plain, spec, props = [], [], []
        for s in sched_out.seqs:
            state = self.requests.get(s.request_id)
            if s.sample and state is not None and state.grammar is not None:
                if s.spec_token_ids:
                    spec.append(state)
                    props.append(list(s.spec_token_ids))
                else:
                    plain.append(state)
        if plain:
            plan.bitmask_ids, plan.bitmask = self.constrained(plain, self.bitmask(plain))
        if spec:
            plan.spec_bitmask_ids = [st.request.request_id for st in spec]
            plan.spec_bitmask = position_bitmasks([st.grammar for st in spec], props, self.manager.mask_vocab)

    def constrained(self, rows: list, bitmask) -> tuple[list[str], object]:
        """(request ids, bitmask) of the `rows` that the grammar constrains now, for a step
        plan, from the bitmask of all `rows` (a CPU tensor or bytes, row i for rows[i]). A
        reasoning gate that still waits allows everything: its row stays out of the plan,
        so its request samples as an unconstrained one, also the model's ids past the
        tokenizer's, which the bitmask does not cover."""
        free = {i for i, st in enumerate(rows) if gate_waits(st.grammar)}
        ids = [st.request.request_id for st in rows]
        if not free:
            return ids, bitmask
        keep = [i for i in range(len(rows)) if i not in free]
        if not keep:
            return [], None
        ids = [ids[i] for i in keep]
        if isinstance(bitmask, (bytes, bytearray)):
            width = len(bitmask) // len(rows)
            return ids, b"".join(bitmask[i * width:(i + 1) * width] for i in keep)
        return ids, bitmask[keep]

    def advance(self, state, token: int) -> bool:
        """Feed an emitted token to the request's matcher; True when the request ends
        ("stop"): its grammar has terminated (its stop token accepted) or, defensively,
        rejected the token."""
        return self.advance_many([state], [token])[0]

    def advance_many(self, states: list, tokens: list[int]) -> list[bool]:
        """`advance` for many requests at once (one token each), their matchers on the
        manager's threads: for each, True when the request ends."""
        return self._stops(states, tokens, self.manager.accept_many([st.grammar for st in states], tokens))

    def _stops(self, states: list, tokens: list[int], results: list) -> list[bool]:
        stops = []
        for st, token, (accepted, terminated) in zip(states, tokens, results):
            if not accepted:
                logger.warning("request %s: token %d does not match its grammar; stopping it",
                               st.request.request_id, token)
            stops.append(not accepted or terminated)
        return stops

    def start_step(self, emitted: dict, rows: list) -> "GrammarStepRequests":
        """Start a step's matcher work (GrammarManager.start_step): the grammar requests'
        tokens in `emitted` (request id -> the token a step emitted) go to their matchers,
        then the bitmasks of `rows` (the live grammar rows of the step whose sampling waits
        for them, as `rows()` gave them) fill, on the manager's threads while the caller
        records the step. Read the results with `stops()` and `bitmask()`."""
        accept = [(st, t) for rid, t in emitted.items()
                  if (st := self.requests.get(rid)) is not None and st.grammar is not None]
        job = self.manager.start_step([st.grammar for st, _ in accept], [t for _, t in accept],
                                      [st.grammar for st in rows])
        return GrammarStepRequests(self, job, accept)

    def release(self, state, was_live: bool) -> None:
        """The request ended: drop its compile, if any, and count its matcher out
        (`was_live`: it was still among the core's requests)."""
        if self.manager is not None:
            self.manager.cancel(state.request.request_id)
        if was_live and state.grammar is not None:
            self.num_live -= 1

    def shutdown(self) -> None:
        if self.manager is not None:
            self.manager.shutdown()


class GrammarStepRequests:
    """A started step's matcher work, by request (GrammarRequests.start_step)."""

    def __init__(self, owner: GrammarRequests, job, accept: list):
        self._owner, self._job = owner, job
        self._index = {st.request.request_id: i for i, (st, _) in enumerate(accept)}
        self._tokens = [t for _, t in accept]

    def stops(self, states: list, tokens: list[int]) -> list[bool]:
        """GrammarRequests.advance_many's answer for these (state, token) pairs: the
        started accepts' results where the job took the token, an advance now otherwise."""
        results = self._job.accepted()
        got = [self._index.get(st.request.request_id) for st in states]
        late = {k for k, j in enumerate(got) if j is None or self._tokens[j] != tokens[k]}
        out: list = [None] * len(states)
        taken = [k for k in range(len(states)) if k not in late]
        if taken:
            answers = self._owner._stops([states[k] for k in taken], [tokens[k] for k in taken],
                                         [results[got[k]] for k in taken])
            for k, stop in zip(taken, answers):
                out[k] = stop
        if late:  # tokens the job did not take: advance now
            ks = sorted(late)
            for k, stop in zip(ks, self._owner.advance_many([states[k] for k in ks], [tokens[k] for k in ks])):
                out[k] = stop
        return out

    def bitmask(self):
        """The rows' bitmasks (StepPlan.bitmask: a CPU tensor, or bytes unless the
        engine uses tensors); call it once, after stops()."""
        buf = self._job.bitmask()
        return buf if self._owner.tensor_bitmasks else buf.numpy().tobytes()

    def close(self) -> None:
        """Wait for the work's threads, if any (always call it, also after bitmask())."""
        self._job.close()
