"""Host-to-device copies that never wait for the GPU.

`torch.tensor(values, device="cuda")` copies from pageable memory, which makes the host
wait until the GPU has finished everything queued before it. With asynchronous scheduling
the GPU is still running the previous step while the host prepares the next one, so every
input of a step goes through pinned memory with a non-blocking copy instead (PyTorch's
pinned-memory cache keeps each buffer alive until its copy has run)."""
from __future__ import annotations

import torch


def to_device(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A tensor of `values` on `device`, copied without synchronising on CUDA."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def to_host(t: torch.Tensor) -> torch.Tensor:
    """Start copying a device tensor to the host; read it after the step's event."""
    if t.device.type != "cuda":
        return t
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return out.copy_(t, non_blocking=True)
