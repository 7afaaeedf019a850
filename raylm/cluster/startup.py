"""Where a serving process's start-up time goes: wall-clock marks (seconds since the
epoch) from the process's start on, kept by each actor of the Serve application (router,
engine cores, ingress replicas) and read back by `benchmarks/startup.py`, which lays
them on one timeline."""
from __future__ import annotations

import os
import time


def process_start_epoch() -> float:
    """When this process started (Linux /proc; elsewhere: now)."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return time.time()
    return time.time() - uptime + start_ticks / os.sysconf("SC_CLK_TCK")


class StartupMarks:
    """Named wall-clock marks of this process, the first being its start."""

    def __init__(self, role: str):
        self.marks = {"process_start": process_start_epoch()}
        self.role = role

    def mark(self, name: str) -> None:
        self.marks[name] = time.time()

    def to_dict(self, **extra) -> dict:
        return {"role": self.role, "pid": os.getpid(), "marks": dict(self.marks), **extra}
