"""ZeroRedundancyOptimizer over torch.distributed (gloo, CPU) with fusedopt.torch.AdamW: each
rank steps its shard; the result is bitwise that of DDP with an unsharded fusedopt AdamW, the
consolidated state dict resumes a single process and a new ZeroRedundancyOptimizer, and each
rank holds 1/N of the state."""

import copy
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

import torch.multiprocessing as mp  # noqa: E402
from torch.distributed.optim import ZeroRedundancyOptimizer  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

import fusedopt  # noqa: E402
import fusedopt.torch as ft  # noqa: E402

TOL = 1e-4
STEPS = 20
KW = dict(lr=5e-3, weight_decay=0.05)
X = torch.randn(96, 32, generator=torch.Generator().manual_seed(21))
Y = torch.randn(96, 32, generator=torch.Generator().manual_seed(22))


def make_model():
    """Six equal layers: ZeRO's size-balanced partition gives every rank (of 2 or 3) the same
    number of elements."""
    torch.manual_seed(0)
    layers = []
    for _ in range(6):
        layers += [torch.nn.Linear(32, 32), torch.nn.Tanh()]
    return torch.nn.Sequential(*layers[:-1])


def train(model, opt, rank, world, steps, start=0):
    for step in range(start, start + steps):
        rows = torch.arange(len(X))[(step + rank) % world :: world]  # this rank's share
        opt.zero_grad()
        ((model(X[rows]) - Y[rows]) ** 2).mean().backward()
        opt.step()


def worker(rank, world, port, out):
    os.environ["LOCAL_WORLD_SIZE"] = str(world)  # as torchrun sets it: cores/N threads each
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    results = {"threads": fusedopt.get_num_threads()}
    for mode in ("zero", "plain", "torch"):
        model = make_model()
        ddp = DistributedDataParallel(model)
        if mode == "zero":
            opt = ZeroRedundancyOptimizer(ddp.parameters(), optimizer_class=ft.AdamW, **KW)
        elif mode == "plain":
            opt = ft.AdamW(ddp.parameters(), **KW)
        else:
            opt = torch.optim.AdamW(ddp.parameters(), **KW)
        if mode == "torch":
            train(ddp, opt, rank, world, STEPS)
            results[mode] = [p.detach().clone() for p in model.parameters()]
            continue
        # Halfway, a checkpoint: the weights and the (consolidated) state dict, copied (a state
        # dict's tensors are the live state, in torch as here).
        train(ddp, opt, rank, world, STEPS // 2)
        if mode == "zero":
            opt.consolidate_state_dict(to=0)
        half = [copy.deepcopy(opt.state_dict()) if rank == 0 else None]
        dist.broadcast_object_list(half, src=0)
        snapshot = [p.detach().clone() for p in model.parameters()]
        train(ddp, opt, rank, world, STEPS - STEPS // 2, start=STEPS // 2)
        results[mode] = [p.detach().clone() for p in model.parameters()]
        results[f"{mode}_state_bytes"] = (opt.optim if mode == "zero" else opt)._engine.state_bytes
        if mode == "zero":
            opt.consolidate_state_dict(to=0)
        if rank == 0:
            results[f"{mode}_state_dict"] = opt.state_dict()
        # Every rank resumes a new DDP and optimizer from the halfway checkpoint.
        resumed = make_model()
        with torch.no_grad():
            for p, q in zip(resumed.parameters(), snapshot):
                p.copy_(q)
        ddp = DistributedDataParallel(resumed)
        if mode == "zero":
            opt = ZeroRedundancyOptimizer(ddp.parameters(), optimizer_class=ft.AdamW, **KW)
        else:
            opt = ft.AdamW(ddp.parameters(), **KW)
        opt.load_state_dict(half[0])
        train(ddp, opt, rank, world, STEPS - STEPS // 2, start=STEPS // 2)
        results[f"{mode}_resumed"] = [p.detach().clone() for p in resumed.parameters()]
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rel_err(a, b):
    return max(float(((x - y).abs() / (y.abs() + 0.01)).max()) for x, y in zip(a, b))


@pytest.mark.parametrize("world", [2, 3])
def test_zero_with_fusedopt_is_bitwise_unsharded_ddp(world, tmp_path):
    mp.spawn(worker, args=(world, free_port(), str(tmp_path)), nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    for r, res in enumerate(ranks):
        for a, b, c in zip(res["zero"], res["plain"], ranks[0]["zero"]):
            assert torch.equal(a, b), f"rank {r}: sharded != unsharded"
            assert torch.equal(a, c), f"rank {r} differs from rank 0"
        # A new ZeroRedundancyOptimizer loading the halfway checkpoint continues as a new
        # unsharded DDP does. (New DDP instances bucket the gradients differently, which with
        # 3 ranks changes gloo's summation order: not bitwise the uninterrupted run there.)
        for a, b in zip(res["zero_resumed"], res["plain_resumed"]):
            assert torch.equal(a, b), f"rank {r}: resumed ZeRO != resumed unsharded"
        assert rel_err(res["zero_resumed"], res["zero"]) <= TOL
        if world == 2:
            assert all(map(torch.equal, res["zero_resumed"], res["zero"]))
        assert rel_err(res["zero"], res["torch"]) <= TOL
        # Each rank holds 1/N of the unsharded state.
        assert res["zero_state_bytes"] * world == res["plain_state_bytes"], (r, res["zero_state_bytes"])
        assert res["threads"] == max(1, (os.cpu_count() or 1) // world)

    # The consolidated dict is the unsharded optimizer's, and resumes a single process.
    consolidated, plain = ranks[0]["zero_state_dict"], ranks[0]["plain_state_dict"]
    assert consolidated["param_groups"] == plain["param_groups"]
    assert sorted(consolidated["state"]) == sorted(plain["state"])
    for i, state in plain["state"].items():
        for key, value in state.items():
            assert torch.equal(consolidated["state"][i][key], value), (i, key)
    finals = []
    for sd in (consolidated, plain):
        model = make_model()
        with torch.no_grad():
            for p, q in zip(model.parameters(), ranks[0]["zero"]):
                p.copy_(q)
        opt = ft.AdamW(model.parameters(), **KW)
        opt.load_state_dict(sd)
        train(model, opt, 0, 1, 10)
        finals.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*finals))


@pytest.mark.skipif(shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists(),
                    reason="torchrun is not installed")
def test_ddp_zero_example_runs_under_torchrun(tmp_path):
    example = Path(__file__).resolve().parents[1] / "examples" / "ddp_zero.py"
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    checkpoint = tmp_path / "ckpt.pt"
    run = subprocess.run(
        [torchrun, "--nproc-per-node", "2", "--master-port", str(free_port()), str(example),
         "--steps", "4", "--checkpoint", str(checkpoint)],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "step   3  loss" in run.stdout
    saved = torch.load(checkpoint, weights_only=True)
    model_params = len(saved["model"])
    assert sorted(saved["optimizer"]["state"]) == list(range(model_params))
