"""What it costs an engine core and an ingress replica to hand over one step's outputs, by
the way they travel: a Ray streaming generator (one yield per batch, the core's way until
2026-12-05) or the TCP connection the ingress opens to the core (length-prefixed frames,
the way now). One actor sends `--batches` byte strings of `--bytes` at `--rate` a second
(a core's steps) to another; each side's CPU time (every thread, from /proc) is read
before and after, and an idle interval of the same length is subtracted (Ray's own
threads tick while nothing is sent).

    python benchmarks/output_channel.py [--batches 600] [--bytes 8192] [--rate 40]

Writes benchmarks/results/output_channel-<tag>.json: per path, CPU microseconds per batch
at each end, above idle.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _cpu_s() -> float:
    with open(f"/proc/{os.getpid()}/stat") as f:
        t = f.read().rsplit(")", 1)[1].split()
    return (int(t[11]) + int(t[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, default=600)
    p.add_argument("--bytes", type=int, default=8192, help="one batch (256 outputs of a step are about 8 KiB)")
    p.add_argument("--rate", type=float, default=40.0, help="batches a second (a core's steps)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--tag", default="cpu")
    args = p.parse_args()

    import ray

    from benchmarks import common
    from raylm.cluster.core_actor import frame, read_frame

    n, gap = args.batches, 1.0 / args.rate

    @ray.remote
    class Sender:
        def __init__(self):
            self.payload = b"x" * args.bytes

        def cpu(self) -> float:
            return _cpu_s()

        async def generator(self):
            for _ in range(n):
                await asyncio.sleep(gap)
                yield self.payload

        async def listen(self) -> int:
            async def send(reader, writer):
                for _ in range(n):
                    await asyncio.sleep(gap)
                    writer.write(frame(self.payload))
                    await writer.drain()
                writer.close()

            self.server = await asyncio.start_server(send, "127.0.0.1", 0)
            return self.server.sockets[0].getsockname()[1]

    @ray.remote
    class Receiver:
        def cpu(self) -> float:
            return _cpu_s()

        async def from_generator(self, sender) -> int:
            got = 0
            async for ref in sender.generator.options(num_returns="streaming").remote():
                await ref
                got += 1
            return got

        async def from_socket(self, port: int) -> int:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            got = 0
            try:
                while True:
                    await read_frame(reader)
                    got += 1
            except asyncio.IncompleteReadError:
                writer.close()
            return got

    ray.init(num_cpus=4, include_dashboard=False)
    sender, receiver = Sender.remote(), Receiver.remote()
    ray.get([sender.cpu.remote(), receiver.cpu.remote()])
    measured: dict[str, list[tuple[float, float]]] = {"idle": [], "ray streaming generator": [], "tcp frames": []}
    for _ in range(args.repeats):
        for path in measured:
            s0, r0 = ray.get([sender.cpu.remote(), receiver.cpu.remote()])
            if path == "idle":
                time.sleep(n * gap)
                got = n
            elif path == "tcp frames":
                got = ray.get(receiver.from_socket.remote(ray.get(sender.listen.remote())))
            else:
                got = ray.get(receiver.from_generator.remote(sender))
            s1, r1 = ray.get([sender.cpu.remote(), receiver.cpu.remote()])
            assert got == n, (path, got)
            measured[path].append((1e6 * (s1 - s0) / n, 1e6 * (r1 - r0) / n))
            print(f"{path}: sender {measured[path][-1][0]:.0f} us a batch, receiver {measured[path][-1][1]:.0f} "
                  "(idle included)", flush=True)
    ray.shutdown()

    def mean(xs):
        return sum(xs) / len(xs)

    idle = [mean([m[i] for m in measured["idle"]]) for i in (0, 1)]
    rows = []
    for path in ("ray streaming generator", "tcp frames"):
        s, r = (mean([m[i] for m in measured[path]]) - idle[i] for i in (0, 1))
        rows.append({"path": path, "sender_cpu_us_per_batch": round(s), "receiver_cpu_us_per_batch": round(r),
                     "total_cpu_us_per_batch": round(s + r)})
        print(f"{path}: {s + r:.0f} us of CPU a batch above idle (sender {s:.0f}, receiver {r:.0f})")
    result = common.base_result("output_channel", "-")
    result.update({"device": f"cpu ({os.cpu_count()} cores)", "batches": n, "batch_bytes": args.bytes,
                   "rate_per_s": args.rate, "repeats": args.repeats,
                   "idle_cpu_us_per_interval": {"sender": round(idle[0]), "receiver": round(idle[1])},
                   "rows": rows})
    common.save_result(result, f"output_channel-{args.tag}")


if __name__ == "__main__":
    main()
