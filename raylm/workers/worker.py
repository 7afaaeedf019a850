"""One tensor-parallel rank: joins the process group, builds this rank's ModelRunner and
runs msgpack-encoded step plans. A plain class: `raylm.engine.ray_executor` wraps it in
a Ray actor, one per rank; `raylm.engine.broadcast_executor` keeps rank 0 in its own
process and the others in Ray actors looping on rank 0's broadcasts (`serve_plans`)."""
from __future__ import annotations

import socket
from typing import Optional

import msgpack
import torch

from raylm.workers import parallel_state
from raylm.workers.messages import StepPlan


class Worker:
    """Rank `rank` of `world_size`: every rank runs every plan; rank 0 returns results."""

    def __init__(self, rank: int, world_size: int, dist_init_method: str, model_dir: str,
                 hf_config, dtype: torch.dtype, device: str, block_size: int,
                 attention_backend: Optional[str] = None, load_format: str = "auto", seed: int = 0,
                 num_threads: Optional[int] = None, runner_options: Optional[dict] = None,
                 message_timeout_s: Optional[float] = None):
        """`message_timeout_s`: also join the gloo group that carries broadcast messages
        (every rank of the group must), waiting at most that long for one."""
        self.rank, self.world_size = rank, world_size
        self.pending = None  # execute_pipelined's step in flight
        dev = torch.device(device)
        if dev.type == "cuda":
            if dev.index is None:
                # Ray gives each actor one visible GPU; without Ray, rank i takes GPU i.
                count = torch.cuda.device_count()
                dev = torch.device("cuda", 0 if count == 1 else rank % count)
            torch.cuda.set_device(dev)
        if num_threads:
            # Ranks share the node's cores: oversubscribed OpenMP pools stall collectives.
            torch.set_num_threads(num_threads)
        parallel_state.init_tensor_parallel(rank, world_size, dist_init_method, dev.type,
                                            cpu_group_timeout_s=message_timeout_s)
        from raylm.workers.model_runner import ModelRunner

        self.runner = ModelRunner(model_dir, hf_config, dtype, str(dev), block_size,
                                  attention_backend=attention_backend, load_format=load_format,
                                  seed=seed, **(runner_options or {}))

    @staticmethod
    def free_port(host: str = "127.0.0.1") -> int:
        """A TCP port on `host` that nothing listens on right now."""
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            return s.getsockname()[1]

    def kv_bytes_per_block(self) -> int:
        return self.runner.kv_bytes_per_block()

    def available_kv_memory(self, gpu_memory_utilization: float, max_num_batched_tokens: int) -> int:
        return self.runner.available_kv_memory(gpu_memory_utilization, max_num_batched_tokens)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.runner.allocate_kv_cache(num_blocks)

    def profile_all_reduce(self, num_tokens: int, iters: int = 10) -> float:
        return self.runner.profile_all_reduce(num_tokens, iters)

    def execute(self, wire: bytes) -> Optional[bytes]:
        """Run one msgpack-encoded StepPlan; rank 0 returns the msgpack-encoded StepResult,
        other ranks None."""
        if self.pending is not None:
            raise RuntimeError("a pipelined step is in flight: flush() it before execute()")
        plan = StepPlan.from_wire(msgpack.unpackb(wire))
        return self._encode(self.runner.execute(plan))

    def execute_pipelined(self, wire: bytes) -> Optional[bytes]:
        """Asynchronous scheduling: launch this plan on the GPU, then return the result of
        the plan launched by the previous call (None after a flush), so the GPU always has
        the next step queued while the driver records and plans."""
        pending = self.runner.launch(StepPlan.from_wire(msgpack.unpackb(wire)))
        previous, self.pending = self.pending, pending
        return self._result_of(previous)

    def flush(self) -> Optional[bytes]:
        """The result of the step in flight (None if there is none)."""
        previous, self.pending = self.pending, None
        return self._result_of(previous)

    def serve_plans(self) -> int:
        """Ranks > 0 of a broadcast executor, once the KV cache is allocated: run every
        message rank 0 broadcasts (`broadcast_message`) until "stop"; returns how many
        steps ran. Rank 0 alone samples and reports, so the steps' results are dropped
        here (the sampled tokens still reach this rank, on the device, for placeholders)."""
        steps = 0
        while True:
            op, arg = msgpack.unpackb(parallel_state.broadcast_bytes())
            if op == "step":
                self.runner.launch(StepPlan.from_wire(arg))
                steps += 1
            elif op == "profile_all_reduce":
                self.runner.profile_all_reduce(*arg)
            elif op == "stop":
                return steps
            else:
                raise ValueError(f"unknown broadcast message {op!r}")

    def _result_of(self, pending) -> Optional[bytes]:
        if pending is None:
            return None
        return self._encode(self.runner.collect(pending))

    def _encode(self, result) -> Optional[bytes]:
        return msgpack.packb(result.to_wire()) if self.rank == 0 else None

    def broadcast_message(self, op: str, arg=None) -> None:
        """Rank 0: send ("step", plan wire) / ("profile_all_reduce", [tokens, iters]) /
        ("stop", None) to the ranks in `serve_plans`."""
        parallel_state.broadcast_bytes(msgpack.packb([op, arg]))

    def info(self) -> dict:
        """What this rank holds: parameter bytes, local head counts, KV bytes per block (a
        proposer's included), threads."""
        attn = self.runner.attn_layers[0]
        return {"rank": self.rank, "world_size": self.world_size,
                "parameter_bytes": self.runner.parameter_bytes(),
                "kv_bytes_per_block": self.runner.kv_bytes_per_block(),
                "num_heads": attn.num_heads, "num_kv_heads": attn.num_kv_heads,
                "head_dim": attn.head_dim, "device": str(self.runner.device),
                "num_threads": torch.get_num_threads()}

    def shutdown(self) -> None:
        """Free the model and KV cache and leave the process group."""
        if self.runner is not None:
            self.runner.shutdown()
            self.runner = None
        parallel_state.destroy_tensor_parallel()
