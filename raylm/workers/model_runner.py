"""Runs the model for one step plan on one device: builds the packed inputs and the
attention metadata, runs the forward pass, samples, and computes log-probabilities.

Under tensor parallelism every rank runs the same plan (the forward pass and the LM
head are collectives) but only rank 0 samples and returns tokens."""
from __future__ import annotations

import gc
import logging
import time
from typing import Callable, Optional

import torch

from raylm.workers.attention_backends import AttentionMetadata, get_attention_backend
from raylm.workers.logits_processors import process_logits, unpack_bitmask, uses_processors
from raylm.workers.loader import dummy_checkpoint, iterate_weights, random_weights
from raylm.workers.cuda_graphs import (DecodeGraphs, HostBlockTables, PrefillGraphs, graph_batch_sizes,
                                      prefill_graph_sizes)
from raylm.workers.mixed_graphs import (MIXED_GRAPH_MAX_TOKENS, MixedGraphs, mixed_graph_sizes,
                                        mixed_graphs_enabled)
from raylm.workers.messages import (PLACEHOLDER_TOKEN, NewRequest, SamplingOptions, SeqChunk,
                                    StepPlan, StepResult)
from raylm.workers.pending_step import PendingStep, collect_step
from raylm.workers.models.llama import get_model_class
from raylm.workers.parallel_state import all_reduce, broadcast_from_first, get_tp_rank, get_tp_size
from raylm.workers.quantization import get_quant_config
from raylm.workers.sampler import SamplingState, sample, topk_logprobs
from raylm.workers.spec_verify import (emitted_logprobs, process_positions, verify_one_hot,
                                       verify_rejection)
from raylm.workers.transfer import to_device, to_host

logger = logging.getLogger("raylm")
# Held back from the KV pool for the decode graphs' memory pool (their activations at
# batch <= 512 need far less; capture logs what they took).
GRAPH_MEMORY_RESERVE = 512 << 20
# ... and for the mixed-step graphs' (up to MIXED_GRAPH_MAX_TOKENS tokens).
MIXED_GRAPH_MEMORY_RESERVE = 1 << 30
# What a process's CUDA context and libraries take on the device beyond its allocator
# (counted when groups share a GPU and the device-wide figure includes the others).
CUDA_CONTEXT_BYTES = 1 << 30
# kv_cache_dtype (vLLM's engine argument) -> the cache's torch dtype; "auto" is the model's.
KV_CACHE_DTYPES = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn}


def _timing_event():
    """A CUDA event with timing, recorded now on the current stream."""
    ev = torch.cuda.Event(enable_timing=True)
    ev.record()
    return ev


def _row_index(rows: list[int], device: torch.device):
    """`rows` as an index: a slice when they are consecutive (no host-to-device copy)."""
    if rows == list(range(rows[0], rows[0] + len(rows))):
        return slice(rows[0], rows[0] + len(rows))
    return to_device(rows, torch.long, device)


class ModelRunner:
    """Holds the model weights (this rank's shard), the paged KV cache (this rank's kv
    heads) and per-request state: sampling state and block table, kept from the plans'
    per-step diffs (every rank keeps the same)."""

    def __init__(self, model_dir: str, hf_config, dtype: torch.dtype, device: str,
                 block_size: int, attention_backend: Optional[str] = None, load_format: str = "auto",
                 seed: int = 0, enforce_eager: bool = True, max_num_seqs: int = 256,
                 max_model_len: Optional[int] = None, quantization: Optional[str] = None,
                 kv_cache_dtype: str = "auto", gpu_memory_share: float = 1.0,
                 spec_decode: Optional[dict] = None):
        self.hf_config = hf_config
        self.dtype = dtype
        if kv_cache_dtype != "auto" and kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be 'auto' or one of {sorted(KV_CACHE_DTYPES)}, "
                             f"got {kv_cache_dtype!r}")
        self.kv_cache_dtype = dtype if kv_cache_dtype == "auto" else KV_CACHE_DTYPES[kv_cache_dtype]
        self.device = torch.device(device)
        self.block_size = block_size
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        if attention_backend is None:
            from raylm.workers.attention_backends import default_backend

            attention_backend = default_backend(device)
        self.backend = get_attention_backend(attention_backend)
        if self.kv_cache_dtype != dtype and not self.backend.supports_fp8_kv_cache:
            raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r} needs the 'torch' or 'triton' "
                             f"attention backend; attention_backend is {attention_backend!r}")
        self.enforce_eager = enforce_eager
        # The fraction of the GPU this runner's worker group holds (several groups may
        # share one GPU): its KV budget is that share of gpu_memory_utilization.
        self.gpu_memory_share = gpu_memory_share
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len or hf_config.max_position_embeddings
        self.graphs = None
        self.prefill_graphs = None
        self.mixed_graphs = None
        self.host_tables = None
        cls = get_model_class(hf_config)
        quant_config = get_quant_config(hf_config, quantization)
        with torch.device(self.device):
            self.model = cls(hf_config, dtype=dtype, quant_config=quant_config)
        if load_format == "dummy" and getattr(hf_config, "quantization_config", None) is None:
            # Full tensors sliced per rank, so any TP size holds the same model.
            self.model.load_weights(dummy_checkpoint(hf_config, dtype, self.device, seed))
        elif load_format == "dummy":
            random_weights(self.model, seed)
        else:
            self.model.load_weights(iterate_weights(model_dir))
        self.model.eval()
        self.attn_layers = self.model.attention_layers()
        self.kv_caches: list[torch.Tensor] = []
        self.states: dict[str, SamplingState] = {}
        # Requests with logit_bias / allowed_token_ids / bad_words (logits_processors).
        self.processor_ids: set[str] = set()
        # Each scheduled request's block table, grown by the plans' new_block_ids.
        self.block_tables: dict[str, list[int]] = {}
        self.prompt_logprobs_done: dict[str, int] = {}
        self.default_generator = torch.Generator(device=self.device).manual_seed(seed)
        # The last launched step's sampled tokens (on the device) and each request's row
        # in them: asynchronous scheduling plans the next step before they reach the host,
        # with PLACEHOLDER_TOKEN inputs that are filled from here.
        self._last_tokens: Optional[torch.Tensor] = None
        self._last_rows: dict[str, int] = {}
        # A list to trace each collected step's GPU timeline into (CUDA only; benchmarks set
        # it): the forward pass, the device's idle wait before sampling (for a deferred
        # step, the grammar bitmasks) and before the forward pass (the host's launch), the
        # sampling, in ms. See _trace_collected.
        self.gpu_trace: Optional[list] = None
        self._trace_last_end = None
        # The launching step's (before_inputs callback, trace) until its inputs are ready.
        self._before_inputs: Optional[tuple] = None
        # Model-based speculation (a draft model or an EAGLE-3 head; spec_proposer).
        self.spec = None
        if spec_decode is not None:
            from raylm.workers.spec_proposer import WorkerProposer

            self.spec = WorkerProposer(self, spec_decode, attention_backend, load_format, seed)

    # ---- KV cache ------------------------------------------------------------------
    @property
    def kv_shape_per_layer(self) -> tuple[int, int]:
        a = self.attn_layers[0]
        return a.num_kv_heads, a.head_dim

    def kv_bytes_per_block(self) -> int:
        heads, dim = self.kv_shape_per_layer
        elem = torch.empty((), dtype=self.kv_cache_dtype).element_size()
        own = 2 * len(self.attn_layers) * self.block_size * heads * dim * elem
        return own + (self.spec.kv_bytes_per_block() if self.spec is not None else 0)

    def available_kv_memory(self, gpu_memory_utilization: float, max_num_batched_tokens: int) -> int:
        """Bytes the KV pool may take on this GPU: the utilisation share of the device minus
        what is in use now (weights, CUDA context, other tenants), the peak activations of a
        profiled step at `max_num_batched_tokens`, and a reserve for the CUDA graphs."""
        peak = self.profile_run(max_num_batched_tokens)
        free, total = torch.cuda.mem_get_info(self.device)
        used = total - free
        if self.gpu_memory_share < 1.0:
            # Other groups share the device and may be allocating right now: count only
            # this process (its allocator plus a CUDA context) against its share.
            used = torch.cuda.memory_reserved(self.device) + CUDA_CONTEXT_BYTES
        graphs = 0 if self._graphs_wanted() is False else GRAPH_MEMORY_RESERVE
        if graphs and mixed_graphs_enabled():
            graphs += MIXED_GRAPH_MEMORY_RESERVE
        graphs += self._backend_reserve(bool(graphs))
        budget = int(total * gpu_memory_utilization * self.gpu_memory_share - used - peak - graphs)
        logger.info("memory profile: %.2f GiB total, %.2f GiB in use after loading, %.2f GiB peak "
                    "activations at %d tokens, %.2f GiB for CUDA graphs -> %.2f GiB for the KV cache",
                    total / 2**30, used / 2**30, peak / 2**30, max_num_batched_tokens,
                    graphs / 2**30, budget / 2**30)
        self.profile = {"total": total, "used": used, "peak_activations": peak, "kv_budget": budget}
        return budget

    @torch.inference_mode()
    def profile_run(self, num_tokens: int) -> int:
        """Run one step of `num_tokens` prompt tokens (over up to max_num_seqs sequences, all
        sampling with top-p) on a scratch KV cache; return the peak bytes it allocated on top
        of what was allocated before (the scratch cache excluded)."""
        seqs = max(1, min(self.max_num_seqs, num_tokens // 16 or 1))
        lens = [num_tokens // seqs + (1 if i < num_tokens % seqs else 0) for i in range(seqs)]
        lens = [max(1, min(n, self.max_model_len)) for n in lens]
        bs = self.block_size
        need = sum(-(-n // bs) for n in lens)
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(self.device)
        self.allocate_kv_cache(need, capture_graphs=False)
        kv = torch.cuda.memory_allocated(self.device) - base
        torch.cuda.reset_peak_memory_stats(self.device)
        vocab = self.hf_config.vocab_size
        plan = StepPlan()
        block = 0
        # With speculation a row verifies k proposals: k + 1 logits rows (one-hot here).
        k = self.spec.k if self.spec is not None else 0
        for i, n in enumerate(lens):
            rid = f"__profile_{i}"
            table = list(range(block, block + -(-n // bs)))
            block += len(table)
            plan.seqs.append(SeqChunk(rid, [(7 * i + j) % vocab for j in range(n)], 0, table, True,
                                      min(k, n - 1)))
            plan.new_requests.append(NewRequest(rid, plan.seqs[-1].token_ids,
                                                SamplingOptions(temperature=1.0, top_p=0.9, top_k=50)))
        spec, self.spec = self.spec, None  # the profile drafts nothing
        try:
            self.execute(plan)
            self.execute(StepPlan(finished_ids=[s.request_id for s in plan.seqs]))
        finally:
            self.spec = spec
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - base - kv
        self.release_kv_cache()
        torch.cuda.empty_cache()
        return max(0, peak)

    def parameter_bytes(self) -> int:
        """Bytes of this rank's parameters (tied weights counted once)."""
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def allocate_kv_cache(self, num_blocks: int, capture_graphs: bool = True) -> None:
        """Allocate the paged KV cache (in kv_cache_dtype); on CUDA then capture the decode
        graphs and the one-sequence prefill graphs (unless enforce_eager)."""
        heads, dim = self.kv_shape_per_layer
        self.graphs = None
        self.prefill_graphs = None
        self.mixed_graphs = None
        self.host_tables = None
        phases = self.startup_phases = {}  # seconds of each start-up phase below (startup.py)
        mark = [time.perf_counter()]

        def done(name: str) -> None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            now = time.perf_counter()
            phases[name] = round(now - mark[0], 3)
            mark[0] = now

        self.kv_caches = [torch.zeros(2, num_blocks, self.block_size, heads, dim,
                                      dtype=self.kv_cache_dtype, device=self.device)
                          for _ in self.attn_layers]
        for layer, cache in zip(self.attn_layers, self.kv_caches):
            layer.kv_cache = cache
        done("kv_cache_s")
        if self.spec is not None:  # the same block ids in the proposer's own cache
            self.spec.allocate_kv_cache(num_blocks, capture_graphs)
            done("proposer_kv_cache_and_graphs_s")
        if capture_graphs and self._graphs_wanted():
            max_blocks = -(-self.max_model_len // self.block_size)
            self.graphs = DecodeGraphs(self.model, self.backend, self.device, self.max_num_seqs, max_blocks)
            self.graphs.capture()
            done("decode_graphs_s")
            self.host_tables = HostBlockTables(self.max_num_seqs, max_blocks)
            self.prefill_graphs = PrefillGraphs(self.model, self.backend, self.device, self.max_model_len,
                                                max_blocks, self.block_size)
            self.prefill_graphs.capture(self.graphs.pool)
            done("prefill_graphs_s")
            if mixed_graphs_enabled() and MixedGraphs.supported(self.backend):
                self.mixed_graphs = MixedGraphs(self.model, self.backend, self.device, self.max_num_seqs,
                                                MIXED_GRAPH_MAX_TOKENS, max_blocks, self.block_size)
                self.mixed_graphs.capture(self.graphs.pool)
                done("mixed_graphs_s")
        if self.device.type == "cuda":
            # Compile the seeded-noise kernels now: the first seeded request would
            # otherwise wait for Triton (about 0.7 s on the H200) inside a step.
            from raylm.kernels.sampling import seeded_exponential, seeded_uniform, top_k_top_p_filter
            from raylm.workers.sampler import flashinfer_sampling

            vocab = self.hf_config.vocab_size
            seeded_exponential([0], vocab, self.device)
            seeded_uniform([0], 1, self.device, counter=vocab)  # speculative verification's
            # The sort-free top-k / top-p kernel, and FlashInfer's draw where it samples
            # (it compiles with nvcc on first use unless its JIT cache has it).
            top_k_top_p_filter(torch.zeros(1, vocab, device=self.device), [vocab // 2], [0.5])
            fi = flashinfer_sampling(self.device)
            if fi is not None:
                fi.top_k_top_p_sampling_from_logits(torch.zeros(1, vocab, device=self.device), vocab // 2, 0.5)
            # ... and the grammar bitmask's (float32 logits, as sampling sees them).
            from raylm.kernels.bitmask import apply_token_bitmask

            apply_token_bitmask(torch.zeros(1, vocab, device=self.device), [0],
                                torch.full((1, -(-vocab // 32)), -1, dtype=torch.int32, device=self.device))
            done("sampling_kernels_s")

    def release_kv_cache(self) -> None:
        self.graphs = None
        self.prefill_graphs = None
        self.mixed_graphs = None
        self.host_tables = None
        for layer in self.attn_layers:
            layer.kv_cache = None
        self.kv_caches = []
        if self.spec is not None:
            self.spec.release_kv_cache()

    def _backend_reserve(self, with_graphs: bool) -> int:
        """What the attention backend allocates for itself (FlashInfer's workspaces), for
        the graphs allocate_kv_cache would capture."""
        attn = self.attn_layers[0]
        num_graphs, tokens = 0, self.max_num_seqs
        if with_graphs:
            num_graphs = len(graph_batch_sizes(self.max_num_seqs)) + len(prefill_graph_sizes(self.max_model_len))
            if mixed_graphs_enabled():
                num_graphs += len(mixed_graph_sizes(MIXED_GRAPH_MAX_TOKENS))
                tokens = max(tokens, MIXED_GRAPH_MAX_TOKENS)
        return self.backend.memory_reserve_bytes(attn.num_heads, attn.num_kv_heads, attn.head_dim, num_graphs,
                                                 self.max_num_seqs, tokens)

    def _graphs_wanted(self) -> bool:
        # Graphs need a capturable attention backend (ours reads only tensors). With TP > 1
        # every rank captures the same sizes in the same order (allocate_kv_cache runs on
        # all ranks at once), and the graphs hold the NCCL all-reduces of the forward pass;
        # the eager warm-up before each capture has set up the communicator.
        return (self.device.type == "cuda" and not self.enforce_eager
                and getattr(self.backend, "supports_cuda_graphs", False))

    @torch.inference_mode()
    def profile_all_reduce(self, num_tokens: int, iters: int = 10) -> float:
        """Seconds that the all-reduces of one forward pass over `num_tokens` tokens take
        on this rank: two per layer (after attention and after the MLP) of [num_tokens,
        hidden] in the model's dtype, as the row-parallel layers issue them. Every rank must
        call it at once (it is a collective); 0.0 without tensor parallelism."""
        if self.tp_size == 1:
            return 0.0
        x = torch.zeros(num_tokens, self.hf_config.hidden_size, dtype=self.dtype, device=self.device)
        calls = 2 * len(self.attn_layers)
        for _ in range(calls):
            all_reduce(x)  # warm-up
        self._sync()
        t = time.perf_counter()
        for _ in range(iters * calls):
            all_reduce(x)
        self._sync()
        return (time.perf_counter() - t) / iters

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def shutdown(self) -> None:
        self.release_kv_cache()
        self.states.clear()
        self.processor_ids.clear()
        self.block_tables.clear()
        self.model = None
        self.attn_layers = []
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ---- one step ------------------------------------------------------------------
    def _update_states(self, plan: StepPlan) -> None:
        """Apply a plan's per-request diffs before running it: drop the block tables of
        preempted and finished requests (and the sampling state of finished ones), add the
        new requests, then grow block tables by the rows' new_block_ids."""
        if self.host_tables is not None:
            self.host_tables.drop(plan.finished_ids)
            self.host_tables.drop(plan.preempted_ids)
        for rid in plan.preempted_ids:
            self.block_tables.pop(rid, None)
        if self.spec is not None:
            self.spec.drop(plan.preempted_ids + plan.finished_ids)
        for rid in plan.finished_ids:
            self.block_tables.pop(rid, None)
            self.states.pop(rid, None)
            self.processor_ids.discard(rid)
            self.prompt_logprobs_done.pop(rid, None)
        for new in plan.new_requests:
            options = new.sampling
            self.states[new.request_id] = SamplingState.of_request(new.prompt_token_ids, options,
                                                                   self.device)
            if options.prompt_logprobs is not None:
                self.prompt_logprobs_done[new.request_id] = 0
            if uses_processors(options):
                self.processor_ids.add(new.request_id)
        tables = self.block_tables
        for s in plan.seqs:
            if s.new_block_ids:
                tables.setdefault(s.request_id, []).extend(s.new_block_ids)

    def _forward(self, plan: StepPlan):
        """Hidden states of every scheduled token, and each sequence's first row. Decode
        steps, and short prefills of a single sequence, replay a CUDA graph when one fits."""
        graphs, bs = self.graphs, self.block_size
        if self.prefill_graphs is not None and len(plan.seqs) == 1 and len(plan.seqs[0].token_ids) > 1:
            s = plan.seqs[0]
            t = self.prefill_graphs.size_for(len(s.token_ids), s.start_pos)
            if t:
                table, n = self.block_tables[s.request_id], len(s.token_ids)
                slots = [table[p // bs] * bs + p % bs for p in range(s.start_pos, s.start_pos + n)]
                query_start = [0, n]
                hidden = self.prefill_graphs.run(t, list(s.token_ids), s.start_pos, slots, table,
                                                 self._placeholders(plan, query_start))
                return hidden, query_start
        if graphs is not None and all(len(s.token_ids) == 1 for s in plan.seqs):
            tables = [self.block_tables[s.request_id] for s in plan.seqs]
            if graphs.fits(len(plan.seqs), max(len(t) for t in tables)):
                positions = [s.start_pos for s in plan.seqs]
                slots = [t[p // bs] * bs + p % bs for t, p in zip(tables, positions)]
                query_start = list(range(len(plan.seqs) + 1))
                rows = self.host_tables.gather([s.request_id for s in plan.seqs], tables)
                hidden = graphs.run([s.token_ids[0] for s in plan.seqs], positions, slots,
                                    [p + 1 for p in positions], rows, self._placeholders(plan, query_start))
                return hidden, query_start
        if self.mixed_graphs is not None:
            hidden = self._forward_mixed(plan)
            if hidden is not None:
                return hidden
        input_ids, positions, meta, query_start = self._prepare(plan)
        fill = self._placeholders(plan, query_start)
        if fill is not None:
            input_ids.index_copy_(0, *fill)
        return self.model(input_ids, positions, meta, self.backend), query_start

    def _forward_mixed(self, plan: StepPlan):
        """A mixed step (or a prefill too long for the prefill graphs) in the mixed-step
        graph of its padded size: (hidden states, query starts), or None when none fits."""
        tables = [self.block_tables[s.request_id] for s in plan.seqs]
        t = self.mixed_graphs.size_for(sum(len(s.token_ids) for s in plan.seqs), len(plan.seqs),
                                       max(len(tb) for tb in tables))
        if not t:
            return None
        input_ids, positions, slots, query_start, seq_lens = self._packed(plan, tables)
        rows = self.host_tables.gather([s.request_id for s in plan.seqs], tables)
        hidden = self.mixed_graphs.run(t, input_ids, positions, slots, query_start, seq_lens, rows,
                                       self._placeholders(plan, query_start))
        return hidden, query_start

    def _inputs_ready(self) -> None:
        """The launching step's inputs are built on the host: run its before_inputs (see
        launch), once, then mark the start of its device work for gpu_trace."""
        if self._before_inputs is None:
            return
        callback, trace = self._before_inputs
        self._before_inputs = None
        if callback is not None:
            with torch.inference_mode(False):  # the engine's code, as when it calls us itself
                callback()
        if trace is not None:
            trace["forward"] = _timing_event()

    def _placeholders(self, plan: StepPlan, query_start: list[int]):
        """(input rows, their tokens) for the PLACEHOLDER_TOKEN inputs of `plan` (the last
        token of a request that the previous launched step sampled), read from that step's
        tokens on the device; None when there are none. The launch's before_inputs runs
        first (it may queue the previous step's sampling)."""
        self._inputs_ready()
        dst, src = [], []
        for i, s in enumerate(plan.seqs):
            if s.token_ids[-1] == PLACEHOLDER_TOKEN:
                row = self._last_rows.get(s.request_id)
                if row is None:
                    raise RuntimeError(f"request {s.request_id!r} has a placeholder token but the "
                                       f"previous step did not sample it")
                dst.append(query_start[i] + len(s.token_ids) - 1)
                src.append(row)
        if not dst:
            return None
        dev = self.device
        return to_device(dst, torch.long, dev), self._last_tokens.index_select(0, to_device(src, torch.long, dev))

    def _packed(self, plan: StepPlan, tables: list[list[int]]):
        """The step's rows packed by sequence: (input ids, positions, KV slots, query
        starts, sequence lengths), from the sequences' block `tables`."""
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start = [0]
        seq_lens: list[int] = []
        for s, table in zip(plan.seqs, tables):
            n = len(s.token_ids)
            input_ids.extend(s.token_ids)
            pos = range(s.start_pos, s.start_pos + n)
            positions.extend(pos)
            slots.extend(table[p // bs] * bs + p % bs for p in pos)
            query_start.append(query_start[-1] + n)
            seq_lens.append(s.start_pos + n)
        return input_ids, positions, slots, query_start, seq_lens

    def _prepare(self, plan: StepPlan):
        seq_tables = [self.block_tables[s.request_id] for s in plan.seqs]
        input_ids, positions, slots, query_start, seq_lens = self._packed(plan, seq_tables)
        max_blocks = max(len(t) for t in seq_tables)
        tables = [table + [0] * (max_blocks - len(table)) for table in seq_tables]
        dev = self.device
        query_lens = [len(s.token_ids) for s in plan.seqs]
        meta = AttentionMetadata(
            slot_mapping=to_device(slots, torch.long, dev),
            query_start_loc=to_device(query_start, torch.int32, dev),
            seq_lens=to_device(seq_lens, torch.int32, dev),
            block_tables=to_device(tables, torch.int32, dev),
            query_lens_cpu=query_lens, seq_lens_cpu=seq_lens,
            max_query_len=max(query_lens), max_seq_len=max(seq_lens))
        return (to_device(input_ids, torch.long, dev), to_device(positions, torch.long, dev),
                meta, query_start)

    def execute(self, plan: StepPlan) -> StepResult:
        """Run one step and return its sampled tokens (launch, then collect)."""
        return self.collect(self.launch(plan))

    @torch.inference_mode()
    def launch(self, plan: StepPlan, defer_sampling: bool = False,
               before_inputs: Optional[Callable[[], None]] = None) -> PendingStep:
        """Queue one step on the device without waiting for it: the forward pass, sampling
        and log-probabilities, and the copies of their results to the host. On a GPU
        nothing here waits for the device, so the host can plan the next step (whose
        PLACEHOLDER_TOKEN inputs come from this step's tokens) while this one runs.

        `defer_sampling` stops after the logits: `finish_sampling` queues the rest once
        the caller knows the grammar bitmasks (asynchronous scheduling with structured
        outputs: the matchers need the previous step's tokens, which arrive while this
        step's forward pass runs).

        `before_inputs` runs once the step's inputs are built on the host and before
        anything of the step is queued on the device: the engine queues the previous
        step's deferred sampling there (finish_sampling), whose tokens this step's
        placeholders read, so this step's host work overlaps the wait for its bitmasks."""
        pending = PendingStep(StepResult(), time.perf_counter())
        self._update_states(plan)
        if self.gpu_trace is not None and self.device.type == "cuda" and plan.seqs:
            pending.trace = {"rows": len(plan.seqs)}
        self._before_inputs = (before_inputs, pending.trace)
        if not plan.seqs:
            self._inputs_ready()
            return pending
        hidden, query_start = self._forward(plan)  # reads the previous step's tokens
        self._inputs_ready()  # (run by _forward's placeholders already)
        aux = None
        if isinstance(hidden, tuple):  # EAGLE-3: the target's aux hidden states too
            hidden, aux = hidden
        pending.spec_ctx = (query_start, aux)
        self._last_rows = {}
        dev = self.device

        # Rows whose logits are needed: each sampling sequence's last token (all k + 1
        # positions of a row with k proposals), and the prompt positions of requests that
        # asked for prompt logprobs.
        sample_rows, sample_ids = [], []
        spec_rows, spec_ids, proposals = [], [], []
        prompt_rows: list[tuple[str, int, int]] = []  # (request id, row, target token)
        for i, s in enumerate(plan.seqs):
            if s.num_spec_tokens:
                k = s.num_spec_tokens
                spec_rows.extend(range(query_start[i + 1] - k - 1, query_start[i + 1]))
                spec_ids.append(s.request_id)
                proposals.append(s.token_ids[-k:])
            elif s.sample:
                sample_rows.append(query_start[i + 1] - 1)
                sample_ids.append(s.request_id)
            done = self.prompt_logprobs_done.get(s.request_id)
            if done is not None:
                prompt = self.states[s.request_id].prompt_token_ids
                for p in range(max(done, s.start_pos), s.start_pos + len(s.token_ids)):
                    if p + 1 < len(prompt):
                        prompt_rows.append((s.request_id, query_start[i] + p - s.start_pos, prompt[p + 1]))
                        self.prompt_logprobs_done[s.request_id] = p + 1
        rows = sample_rows + spec_rows + [r for _, r, _ in prompt_rows]
        if not rows:
            if self.spec is not None and self.spec.needs_every_step:
                self.spec.after_step(plan, query_start, aux, {})  # the head's KV of the chunks
            return pending
        logits = self.model.compute_logits(hidden[_row_index(rows, dev)])
        if self.tp_rank > 0:
            # Ranks > 0 took part in the gather; rank 0 alone samples and reports. They
            # get its tokens on the device, for the next step's placeholder inputs.
            if sample_ids:
                self._last_tokens = broadcast_from_first(
                    torch.empty(len(sample_ids), dtype=torch.long, device=dev))
                self._last_rows = {rid: i for i, rid in enumerate(sample_ids)}
            if self.spec is not None and (plan.spec_wanted or self.spec.needs_every_step):
                self.spec.after_step(plan, query_start, aux, None)  # with rank 0's _propose
            return pending
        logits = logits.float()
        if pending.trace is not None:
            pending.trace["logits"] = _timing_event()
        # A deferred step keeps its rows' sampling states: a later step's plan may drop a
        # finished request's before this step's sampling runs (see before_inputs).
        states = self.states
        if defer_sampling:
            states = {rid: self.states[rid] for rid in sample_ids}
            states.update((rid, self.states[rid]) for rid, _, _ in prompt_rows)
        args = (pending, plan, logits, sample_ids, spec_ids, spec_rows, proposals, prompt_rows, states)
        if defer_sampling:
            pending.deferred = args
            return pending
        self._sample_step(*args)
        return pending

    def finish_sampling(self, pending: PendingStep, bitmask_ids: list[str], bitmask: Optional[bytes]) -> None:
        """Queue a deferred step's sampling (launch(defer_sampling=True)) with these grammar
        bitmasks (StepPlan.bitmask_ids / bitmask)."""
        args, pending.deferred = pending.deferred, None
        if args is None:
            return  # nothing was sampled in that step (or ranks > 0)
        plan = args[1]
        plan.bitmask_ids, plan.bitmask = list(bitmask_ids), bitmask
        self._sample_step(*args)

    def _sample_step(self, pending: PendingStep, plan: StepPlan, logits: torch.Tensor, sample_ids: list[str],
                     spec_ids: list[str], spec_rows: list[int], proposals: list, prompt_rows: list,
                     row_states: dict) -> None:
        """Sampling, verification of proposals, log-probabilities, and the copies of their
        results to the host (the part of a step after the logits)."""
        dev = self.device
        if pending.trace is not None:
            pending.trace["sample"] = _timing_event()
        if sample_ids:
            states = [row_states[rid] for rid in sample_ids]
            sample_logits = logits[:len(sample_ids)]
            sample_in = sample_logits
            if self.processor_ids or plan.bitmask_ids:  # raw logits stay for logprobs
                sample_in = self._process_logits(plan, sample_ids, states, sample_logits)
            tokens = broadcast_from_first(sample(sample_in, states, self.default_generator).contiguous())
            for st in states:  # the next draw is for the next output position, even while
                st.num_sampled += 1  # this token is still on its way (async scheduling)
            self._last_tokens = tokens
            self._last_rows = {rid: i for i, rid in enumerate(sample_ids)}
            pending.sample_ids, pending.states, pending.tokens = sample_ids, states, to_host(tokens)
            want = [i for i, st in enumerate(states) if st.options.logprobs is not None]
            if want:
                idx = _row_index(want, dev)
                lp = torch.log_softmax(sample_logits[idx], dim=-1)
                k = max(states[i].options.logprobs for i in want)
                pending.want = want
                pending.logprobs = tuple(to_host(t) for t in topk_logprobs(lp, tokens[idx], k))
        if spec_ids:
            n0 = len(sample_ids)
            q = self.spec.draft_probs(spec_ids, proposals) if self.spec is not None else None
            self._verify(pending, spec_ids, proposals, logits[n0:n0 + len(spec_rows)], q, plan)
        if self.spec is not None and (plan.spec_wanted or self.spec.needs_every_step):
            self._propose(pending, plan)
        if prompt_rows:
            lp = torch.log_softmax(logits[len(sample_ids) + len(spec_rows):], dim=-1)
            targets = to_device([t for _, _, t in prompt_rows], torch.long, dev)
            k = max(row_states[rid].options.prompt_logprobs for rid, _, _ in prompt_rows)
            # (request id, target, k): the request's state may be gone by collect time.
            pending.prompt_rows = [(rid, tgt, row_states[rid].options.prompt_logprobs)
                                   for rid, _, tgt in prompt_rows]
            pending.prompt_logprobs = tuple(to_host(t) for t in topk_logprobs(lp, targets, k))
        if dev.type == "cuda":
            pending.event = torch.cuda.Event()
            pending.event.record()
            if pending.trace is not None:
                pending.trace["end"] = _timing_event()

    def _verify(self, pending: PendingStep, spec_ids: list[str], proposals: list[list[int]],
                logits: torch.Tensor, draft_probs: Optional[torch.Tensor] = None,
                plan: Optional[StepPlan] = None) -> None:
        """Verify the proposals of the rows with them (`logits`: their k + 1 positions
        each, raw): one-hot proposals (n-gram) exactly, proposals with draft probabilities
        by rejection sampling. Logits processors apply per position (earlier proposals
        count as outputs), and so do grammar rows' per-position bitmasks
        (StepPlan.spec_bitmask): each position samples as constrained decoding would."""
        states = [self.states[rid] for rid in spec_ids]
        sample_in = logits
        proc = [i for i, rid in enumerate(spec_ids) if rid in self.processor_ids]
        mask_rows, bitmask = [], None
        if plan is not None and plan.spec_bitmask_ids:
            row_of = {rid: i for i, rid in enumerate(spec_ids)}
            missing = [rid for rid in plan.spec_bitmask_ids if rid not in row_of]
            if missing:
                raise RuntimeError(f"the plan has proposal bitmasks for requests that verify none: {missing}")
            mask_rows = [row_of[rid] for rid in plan.spec_bitmask_ids]
            n = sum(len(proposals[i]) + 1 for i in mask_rows)
            bitmask = unpack_bitmask(plan.spec_bitmask, n, logits.device)
        if proc or mask_rows:
            sample_in = process_positions(logits, states, proposals, proc, mask_rows, bitmask)
        if draft_probs is None:
            result = verify_one_hot(sample_in, states, proposals, self.default_generator)
        else:
            result = verify_rejection(sample_in, states, proposals, draft_probs, self.default_generator)
        for st, tokens in zip(states, result.tokens):
            st.num_sampled += len(tokens)
        pending.spec_ids, pending.spec_states, pending.spec_tokens = spec_ids, states, result.tokens
        want = [st.options.logprobs for st in states if st.options.logprobs is not None]
        if want:
            pending.spec_logprobs = tuple(to_host(t) for t in emitted_logprobs(logits, result, max(want)))

    def _propose(self, pending: PendingStep, plan: StepPlan) -> None:
        """Draft the next step's proposals now that this step's tokens are known (a step
        that asks for proposals runs synchronously: this waits for its tokens)."""
        emitted = dict(zip(pending.spec_ids, pending.spec_tokens))
        if pending.sample_ids:  # the device copy: the host one may still be on its way
            emitted.update((rid, [t]) for rid, t in zip(pending.sample_ids, self._last_tokens.tolist()))
        query_start, aux = pending.spec_ctx
        pending.result.spec_proposals = self.spec.after_step(plan, query_start, aux, emitted)

    def _process_logits(self, plan: StepPlan, sample_ids: list[str], states: list[SamplingState],
                        logits: torch.Tensor) -> torch.Tensor:
        """The sampling rows' logits with logit_bias, allowed_token_ids, bad_words and
        the plan's grammar bitmask applied (a copy)."""
        row_of = {rid: i for i, rid in enumerate(sample_ids)}
        proc = [row_of[rid] for rid in self.processor_ids if rid in row_of]
        mask_rows, bitmask = [], None
        if plan.bitmask_ids:
            missing = [rid for rid in plan.bitmask_ids if rid not in row_of]
            if missing:
                raise RuntimeError(f"the plan has bitmasks for requests that sample no token: {missing}")
            mask_rows = [row_of[rid] for rid in plan.bitmask_ids]
            bitmask = unpack_bitmask(plan.bitmask, len(mask_rows), logits.device)
        return process_logits(logits, proc, [states[i].options for i in proc],
                              [states[i].output_token_ids for i in proc], mask_rows, bitmask)

    def collect(self, pending: PendingStep) -> StepResult:
        """Wait for a launched step's results and return them as a StepResult."""
        result = collect_step(pending)
        if pending.trace is not None and self.gpu_trace is not None:
            self._trace_collected(pending.trace)
        return result

    def _trace_collected(self, ev: dict) -> None:
        """Append a collected step's GPU timeline to gpu_trace (ms): `forward_ms` (the
        forward pass and logits), `idle_before_sample_ms` (the device waiting for the host
        to queue the sampling: a deferred step's grammar bitmasks), `sample_ms`, and
        `idle_before_forward_ms` (from the previous traced step's end to this forward
        pass: the device waiting for the host's launch; None for the first). A step that
        sampled nothing has only its forward pass."""
        rec = {"rows": ev["rows"], "idle_before_forward_ms": None}
        if self._trace_last_end is not None:
            rec["idle_before_forward_ms"] = max(0.0, self._trace_last_end.elapsed_time(ev["forward"]))
        if "logits" in ev and "sample" in ev and "end" in ev:
            rec["forward_ms"] = ev["forward"].elapsed_time(ev["logits"])
            rec["idle_before_sample_ms"] = ev["logits"].elapsed_time(ev["sample"])
            rec["sample_ms"] = ev["sample"].elapsed_time(ev["end"])
            self._trace_last_end = ev["end"]
        self.gpu_trace.append(rec)
