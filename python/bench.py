"""fusedopt against torch's fused CPU Adam and the reference numpy Adam, side by side.

    python python/bench.py [--threads 2] [--reps 7] [--only NAME,...]

Every case alternates the two sides step by step and prints the median time of each and their
ratio. Both sides use the same thread count (torch.set_num_threads, fusedopt.set_num_threads).
Cases: adam-64M (one tensor of 64M parameters), gpt2 (GPT-2 small's 148 tensors, 124M
parameters), many (10,000 tensors of 1024) in the default mode and with flat_grads=True, and
numpy-1M (fusedopt.Adam against the reference numpy Adam on 1M parameters). For `many` it also
prints where the per-tensor Python time goes.
"""

from __future__ import annotations

import argparse
import operator
import os
import platform
import statistics
import sys
import time

# Import the installed package (`pip install ./python`), not the source folder next to this
# script, which lacks the built extension.
_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]

import numpy as np
import torch

import fusedopt
import fusedopt.torch as ft


def gpt2_small() -> list[tuple[int, ...]]:
    """GPT-2 small's parameter shapes: 148 tensors, 124,439,808 parameters."""
    d, vocab, ctx = 768, 50257, 1024
    shapes = [(vocab, d), (ctx, d)]
    for _ in range(12):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return shapes + [(d,), (d,)]


def model(shapes, seed):
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=g) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 0.01
    return params


def alternate(a, b, reps):
    """Median seconds of a() and b(), called alternately after one warm-up each."""
    a(), b()
    ta, tb = [], []
    for _ in range(reps):
        t = time.perf_counter()
        a()
        ta.append(time.perf_counter() - t)
        t = time.perf_counter()
        b()
        tb.append(time.perf_counter() - t)
    return statistics.median(ta), statistics.median(tb)


def row(name, ours, theirs, against):
    print(f"{name:<28} fusedopt {ours * 1e3:9.2f} ms   {against} {theirs * 1e3:9.2f} ms   speed-up {theirs / ours:6.2f}x", flush=True)


def torch_case(name, shapes, reps, flat=False):
    ours_p, theirs_p = model(shapes, 0), model(shapes, 0)
    ours = ft.Adam(ours_p, lr=1e-3, flat_grads=flat)
    theirs = torch.optim.Adam(theirs_p, lr=1e-3, fused=True)
    t_ours, t_theirs = alternate(ours.step, theirs.step, reps)
    row(name, t_ours, t_theirs, "torch fused")
    if len(shapes) > 1000:
        # zero_grad too, a once-per-iteration cost (torch's drops 10,000 .grad; flat_grads
        # zeroes one buffer). Gradients are put back untimed between calls.
        def zero(opt, params):
            def run():
                t = time.perf_counter()
                opt.zero_grad()
                spent = time.perf_counter() - t
                for p in params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                return spent

            return run

        za, zb = zero(ours, ours_p), zero(theirs, theirs_p)
        times = [(za(), zb()) for _ in range(reps)]
        z_ours = statistics.median(t[0] for t in times)
        z_theirs = statistics.median(t[1] for t in times)
        row("    zero_grad", z_ours, z_theirs, "torch      ")
    return ours, ours_p


def rule_case(name, ours_cls, theirs_cls, kw, shapes, reps):
    """A rule against torch's implementation of it: foreach and single-tensor (torch's fused
    exists only for Adam, AdamW, SGD and Adagrad), the faster of the two."""
    ours_p = model(shapes, 0)
    ours = ours_cls(ours_p, **kw)
    best = None
    for foreach in (True, False):
        theirs_p = model(shapes, 0)
        theirs = theirs_cls(theirs_p, **kw, foreach=foreach)
        t_ours, t_theirs = alternate(ours.step, theirs.step, reps)
        if best is None or t_theirs < best[1]:
            best = (t_ours, t_theirs, "torch foreach" if foreach else "torch single ")
    row(name, *best)


def overhead(opt, params, reps):
    """Where a default-mode step's time goes, per tensor."""
    n = len(params)
    ptrs = opt._grad_ptrs(params)

    def timed(f):
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t)
        return statistics.median(ts)

    parts = {
        "weights unmoved (data_ptr)": timed(lambda: list(map(torch.Tensor.data_ptr, params)) == opt._weight_ptrs),
        "grad checks + addresses": timed(lambda: opt._grad_ptrs(params)),
        "hyperparameters from groups": timed(opt._sync_hyper),
        "engine step (GIL released)": timed(lambda: opt._engine.step_bound(ptrs)),
        "autograd version bump": timed(lambda: torch.autograd.graph.increment_version(params)),
        "flat mode: .grad is its view": timed(
            lambda: all(map(operator.is_, map(operator.attrgetter("grad"), params), list(map(operator.attrgetter("grad"), params))))
        ),
    }
    for what, t in parts.items():
        print(f"    {what:<32} {t * 1e3:7.2f} ms  {t / n * 1e6:6.3f} us/tensor")


class RefAdam:
    """The reference numpy Adam."""

    def __init__(self, lr=0.001, beta1=0.9, beta2=0.999):
        self.lr, self.beta1, self.beta2 = lr, beta1, beta2
        self.iter, self.m, self.v = 0, None, None

    def update(self, params, grads):
        if self.m is None:
            self.m = {k: np.zeros_like(v) for k, v in params.items()}
            self.v = {k: np.zeros_like(v) for k, v in params.items()}
        self.iter += 1
        lr_t = self.lr * np.sqrt(1.0 - self.beta2**self.iter) / (1.0 - self.beta1**self.iter)
        for key in params.keys():
            self.m[key] += (1 - self.beta1) * (grads[key] - self.m[key])
            self.v[key] += (1 - self.beta2) * (grads[key] ** 2 - self.v[key])
            params[key] -= lr_t * self.m[key] / (np.sqrt(self.v[key]) + 1e-7)


def numpy_case(reps):
    rng = np.random.default_rng(0)
    n = 1 << 20
    ours_p = {"W": rng.standard_normal(n).astype(np.float32)}
    ref_p = {"W": ours_p["W"].copy()}
    grads = {"W": rng.standard_normal(n).astype(np.float32)}
    ours, ref = fusedopt.Adam(), RefAdam()
    t_ours, t_ref = alternate(lambda: ours.update(ours_p, grads), lambda: ref.update(ref_p, grads), reps)
    row("numpy Adam, 1M", t_ours, t_ref, "reference  ")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--only", default="adam-64M,gpt2,many,numpy-1M,rules")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    fusedopt.set_num_threads(args.threads)
    only = set(args.only.split(","))
    print(f"fusedopt {fusedopt.__version__} ({fusedopt.simd_level()}), torch {torch.__version__}, "
          f"{args.threads} threads, {platform.processor() or platform.machine()}, medians of {args.reps}")
    if "adam-64M" in only:
        torch_case("Adam, one 64M tensor", [(1 << 26,)], args.reps)
    if "gpt2" in only:
        torch_case("Adam, GPT-2 small (148)", gpt2_small(), args.reps)
    if "many" in only:
        opt, params = torch_case("Adam, 10,000 x 1024", [(1024,)] * 10_000, args.reps)
        overhead(opt, params, args.reps)
        torch_case("  same, flat_grads=True", [(1024,)] * 10_000, args.reps, flat=True)
    if "numpy-1M" in only:
        numpy_case(args.reps)
    if "rules" in only:
        # The rules after the first six that torch.optim has.
        for label, shapes in (("64M", [(1 << 26,)]), ("10,000 x 1024", [(1024,)] * 10_000)):
            rule_case(f"Adamax, {label}", ft.Adamax, torch.optim.Adamax, dict(lr=2e-3), shapes, args.reps)
            rule_case(f"RAdam, {label}", ft.RAdam, torch.optim.RAdam, dict(lr=1e-3), shapes, args.reps)
            rule_case(f"NAdam, {label}", ft.NAdam, torch.optim.NAdam, dict(lr=2e-3), shapes, args.reps)
            rule_case(f"RMSprop centered+momentum, {label}", ft.RMSprop, torch.optim.RMSprop,
                      dict(lr=1e-3, centered=True, momentum=0.9), shapes, args.reps)


if __name__ == "__main__":
    main()
