"""The workers' host-device copies: raylm.kernels.transfer's (the kernels' wrappers copy
row indices the same way, and kernels import nothing from workers)."""
from raylm.kernels.transfer import to_device, to_host

__all__ = ["to_device", "to_host"]
