"""Data-parallel training with sharded optimizer state: DDP + ZeroRedundancyOptimizer +
fusedopt.torch.AdamW, on CPU over gloo.

    torchrun --nproc-per-node 2 python/examples/ddp_zero.py

Every rank holds the whole model and computes gradients on its own slice of each batch; DDP
averages the gradients; ZeroRedundancyOptimizer gives each rank 1/N of the parameters, whose
AdamW state (exp_avg, exp_avg_sq) only that rank keeps and steps with fusedopt, then sends the
updated weights to the other ranks. Each rank's fusedopt uses cores/N threads (torchrun sets
LOCAL_WORLD_SIZE). On several machines, run the same command on each with torchrun's
rendezvous options, for example
``--nnodes 2 --node-rank 0 --rdzv-backend c10d --rdzv-endpoint HOST:29400``.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel

import fusedopt
import fusedopt.torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--checkpoint", help="save the consolidated optimizer state here")
    args = parser.parse_args()

    dist.init_process_group("gloo")  # torchrun's environment: rank, world size, address
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same initial model on every rank

    # A regression task every rank generates the same way: y = sin(x W) + noise.
    x = torch.randn(4096, 64)
    y = torch.sin(x @ torch.randn(64, 8) * 0.3) + 0.01 * torch.randn(4096, 8)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 256), torch.nn.GELU(),
        torch.nn.Linear(256, 8),
    )
    ddp = DistributedDataParallel(model)
    opt = ZeroRedundancyOptimizer(
        ddp.parameters(), optimizer_class=fusedopt.torch.AdamW, lr=args.lr, weight_decay=0.01
    )
    if rank == 0:
        print(f"{world} ranks, fusedopt {fusedopt.__version__} with {fusedopt.get_num_threads()} "
              f"thread(s) per rank ({fusedopt.simd_level()})")
    for step in range(args.steps):
        batch = torch.randint(0, len(x), (256,), generator=torch.Generator().manual_seed(step))
        mine = batch[rank::world]  # this rank's share of the batch
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(ddp(x[mine]), y[mine])
        loss.backward()  # DDP averages the gradients over the ranks
        opt.step()  # each rank steps its shard, then the shards are broadcast
        total = loss.detach().clone()
        dist.all_reduce(total)
        if rank == 0:
            print(f"step {step:3d}  loss {total.item() / world:.5f}")

    engine = opt.optim._engine  # this rank's fusedopt engine: its shard's state only
    state = engine.state_bytes if engine is not None else 0
    print(f"rank {rank}: {sum(len(g['params']) for g in opt.optim.param_groups)} of "
          f"{len(list(model.parameters()))} tensors, optimizer state {state / 1e6:.2f} MB")
    if args.checkpoint:
        opt.consolidate_state_dict(to=0)  # every rank takes part
        if rank == 0:
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, args.checkpoint)
            print(f"saved {args.checkpoint}")
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
