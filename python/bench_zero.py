"""Sharded (ZeroRedundancyOptimizer, gloo) against unsharded fusedopt AdamW steps on one
machine, at 64M parameters.

    python python/bench_zero.py [--ranks 2] [--reps 7] [--params 64]

Spawns N ranks on 127.0.0.1, each with cores/N fusedopt threads (N x cores/N in all), holding
a model of 16 equal tensors (64M parameters by default) with gradients set. Each repetition
times, in turn: every rank's local fusedopt step over its shard (``optim.step()``), ZeRO's
parameter sync (a gloo broadcast of every shard to every rank), and, on rank 0 while the
others wait, an unsharded fusedopt AdamW step over a copy of the whole model on every core.
Prints medians and ratios, and the optimizer state bytes per rank.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import sys
import time

_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch.distributed.optim import ZeroRedundancyOptimizer  # noqa: E402

import fusedopt  # noqa: E402
import fusedopt.torch as ft  # noqa: E402


def params(total_m: int, seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    n = total_m * (1 << 20) // 16
    out = []
    for _ in range(16):
        p = torch.nn.Parameter(torch.randn(n, generator=g) * 0.02)
        p.grad = torch.randn(n, generator=g) * 0.01
        out.append(p)
    return out


def worker(rank: int, world: int, port: int, reps: int, total_m: int, queue) -> None:
    cores = os.cpu_count() or 1
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    shard_threads = max(1, cores // world)
    zero = ZeroRedundancyOptimizer(params(total_m, 0), optimizer_class=ft.AdamW, lr=1e-3)
    whole = ft.AdamW(params(total_m, 1), lr=1e-3) if rank == 0 else None
    local, sync, unsharded = [], [], []
    for rep in range(reps + 1):  # the first is a warm-up
        fusedopt.set_num_threads(shard_threads)
        dist.barrier()
        t = time.perf_counter()
        zero.optim.step()
        t_local = time.perf_counter() - t
        dist.barrier()
        t = time.perf_counter()
        zero._sync_params()  # what ZeroRedundancyOptimizer.step does after the local step
        t_sync = time.perf_counter() - t
        dist.barrier()
        if rank == 0:
            fusedopt.set_num_threads(cores)
            t = time.perf_counter()
            whole.step()
            t_whole = time.perf_counter() - t
        dist.barrier()
        if rep:
            local.append(t_local)
            sync.append(t_sync)
            if rank == 0:
                unsharded.append(t_whole)
    med = statistics.median
    queue.put(
        (
            rank,
            med(local),
            med(sync),
            med(unsharded) if unsharded else None,
            zero.optim._engine.state_bytes,
            whole._engine.state_bytes if whole is not None else None,
            shard_threads,
        )
    )
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--params", type=int, default=64, help="millions (2^20) of parameters")
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.spawn(worker, args=(args.ranks, port, args.reps, args.params, queue), nprocs=args.ranks, join=True)
    rows = sorted(queue.get() for _ in range(args.ranks))
    cpu = platform.processor() or platform.machine()
    print(f"fusedopt {fusedopt.__version__} ({fusedopt.simd_level()}), torch {torch.__version__}, "
          f"{os.cpu_count()} cores, {cpu}; AdamW over {args.params}M parameters, medians of "
          f"{args.reps}")
    whole = rows[0][3]
    print(f"unsharded, 1 process x {os.cpu_count()} threads: step {whole * 1e3:8.1f} ms, "
          f"state {rows[0][5] / 2**20:.0f} MiB")
    for rank, local, sync, _, state, _, threads in rows:
        print(f"rank {rank} ({threads} thread): local step {local * 1e3:8.1f} ms "
              f"({local / whole:.2f}x unsharded), sync (broadcast) {sync * 1e3:8.1f} ms, "
              f"ZeRO step {(local + sync) * 1e3:8.1f} ms ({(local + sync) / whole:.2f}x), "
              f"state {state / 2**20:.0f} MiB ({state / rows[0][5]:.3f} of unsharded)")


if __name__ == "__main__":
    main()
