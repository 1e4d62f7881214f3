"""Schedule-free AdamW and SGD against a float64 reference written from Defazio et al. (2024),
"The Road Less Scheduled", in the form of ``facebookresearch/schedule_free`` (``z`` kept, ``y``
the parameters, ``x`` recovered at ``eval()``), through the numpy and torch classes; the
train/eval swap; state dicts and state files across a restart."""

import copy

import numpy as np
import pytest
import torch

import fusedopt
import fusedopt.torch as ft

STEPS = 120


def reference(kind, w0, grads, lr, beta, beta2=0.999, eps=1e-8, wd=0.0, warmup=0, r=0.0, power=2.0):
    """float64: returns (y, z, x) after the steps, x = y + (1 − 1/β)(z − y)."""
    y = w0.astype(np.float64)
    z = y.copy()
    v = np.zeros_like(y)
    lr_max, weight_sum = -1.0, 0.0
    for k, g in enumerate(grads):
        g = g.astype(np.float64)
        lr_k = lr * ((k + 1) / warmup if k < warmup else 1.0)
        lr_max = max(lr_max, lr_k)
        weight = (k + 1) ** r * lr_max**power
        weight_sum += weight
        c = weight / weight_sum if weight_sum else 0.0
        if kind == "adamw":
            v = beta2 * v + (1 - beta2) * g * g
            u = g / (np.sqrt(v / (1 - beta2 ** (k + 1))) + eps)
        else:
            u = g
        if wd:
            u = u + wd * y
        y = (1 - c) * y + c * z + lr_k * (beta * (1 - c) - 1) * u
        z = z - lr_k * u
    return y, z, y + (1 - 1 / beta) * (z - y)


def rel(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


def problem(seed, n=257):
    rng = np.random.default_rng(seed)
    w0 = rng.standard_normal(n).astype(np.float32)
    grads = [rng.standard_normal(n).astype(np.float32) for _ in range(STEPS)]
    return w0, grads


CASES = [
    ("adamw", dict(lr=0.01), {}),
    ("adamw", dict(lr=0.02, betas=(0.8, 0.95), weight_decay=0.05, warmup_steps=10), {}),
    ("adamw", dict(lr=0.005, eps=1e-4, r=0.5, weight_lr_power=1.0, warmup_steps=30), {}),
    ("sgd", dict(lr=0.05), {}),
    ("sgd", dict(lr=0.02, momentum=0.7, weight_decay=0.01, warmup_steps=20, r=1.0), {}),
]


def ref_args(kind, kw):
    args = dict(lr=kw["lr"], wd=kw.get("weight_decay", 0.0), warmup=kw.get("warmup_steps", 0),
                r=kw.get("r", 0.0), power=kw.get("weight_lr_power", 2.0))
    if kind == "adamw":
        b1, b2 = kw.get("betas", (0.9, 0.999))
        args.update(beta=b1, beta2=b2, eps=kw.get("eps", 1e-8))
    else:
        args.update(beta=kw.get("momentum", 0.9))
    return args


def numpy_class(kind, kw):
    kw = dict(kw)
    lr = kw.pop("lr")
    if "betas" in kw:
        kw["beta1"], kw["beta2"] = kw.pop("betas")
    cls = fusedopt.ScheduleFreeAdamW if kind == "adamw" else fusedopt.ScheduleFreeSgd
    return cls(lr, **kw)


@pytest.mark.parametrize("kind,kw,_", CASES)
def test_numpy_classes_follow_the_float64_reference(kind, kw, _):
    w0, grads = problem(1)
    y_ref, _z, x_ref = reference(kind, w0, grads, **ref_args(kind, kw))
    opt = numpy_class(kind, kw)
    w = w0.copy()
    for g in grads:
        opt.update(w, g)
    assert rel(w, y_ref) <= 5e-5
    opt.eval(w)
    assert opt.is_eval and rel(w, x_ref) <= 5e-5
    with pytest.raises(RuntimeError, match="train"):
        opt.update(w, grads[0])
    opt.train(w)
    assert not opt.is_eval and rel(w, y_ref) <= 5e-5


def torch_class(kind, params, kw):
    cls = ft.ScheduleFreeAdamW if kind == "adamw" else ft.ScheduleFreeSgd
    return cls(params, **kw)


def run_torch(opt, params, grads_per_param, steps):
    for s in steps:
        for p, gs in zip(params, grads_per_param):
            p.grad = torch.from_numpy(gs[s].copy())
        opt.step()


@pytest.mark.parametrize("kind,kw,_", CASES)
def test_torch_classes_follow_the_float64_reference(kind, kw, _):
    problems = [problem(2), problem(3, n=31)]
    params = [torch.tensor(w0) for w0, _g in problems]
    opt = torch_class(kind, params, kw)
    opt.train()  # as the reference asks; already in train mode here
    run_torch(opt, params, [g for _w, g in problems], range(STEPS))
    refs = [reference(kind, w0, g, **ref_args(kind, kw)) for w0, g in problems]
    for p, (y_ref, _z, _x) in zip(params, refs):
        assert rel(p.detach().numpy(), y_ref) <= 5e-5
    opt.eval()
    for p, (_y, _z, x_ref) in zip(params, refs):
        assert rel(p.detach().numpy(), x_ref) <= 5e-5
    opt.eval()  # a no-op in eval mode
    for p, (_y, _z, x_ref) in zip(params, refs):
        assert rel(p.detach().numpy(), x_ref) <= 5e-5
    with pytest.raises(RuntimeError, match="train"):
        opt.step()
    opt.train()
    for p, (y_ref, _z, _x) in zip(params, refs):
        assert rel(p.detach().numpy(), y_ref) <= 5e-5


def test_the_reference_names_are_the_same_classes():
    assert ft.AdamWScheduleFree is ft.ScheduleFreeAdamW and ft.SGDScheduleFree is ft.ScheduleFreeSgd
    sig = ft.AdamWScheduleFree(
        [torch.zeros(3)], lr=0.0025, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
        warmup_steps=0, r=0.0, weight_lr_power=2.0,
    )
    assert sig.defaults["warmup_steps"] == 0


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_a_state_dict_saved_in_eval_mode_resumes_exactly(kind):
    kw = dict(lr=0.01, warmup_steps=5, weight_decay=0.01)
    problems = [problem(4), problem(5, n=40)]
    grads = [g for _w, g in problems]
    first = [torch.tensor(w0) for w0, _g in problems]
    opt1 = torch_class(kind, first, kw)
    run_torch(opt1, first, grads, range(50))
    opt1.eval()  # as the reference recommends before saving
    saved_model = [p.detach().clone() for p in first]
    saved = copy.deepcopy(opt1.state_dict())
    group = saved["param_groups"][0]
    assert group["k"] == 50 and group["train_mode"] is False and group["weight_sum"] > 0

    resumed = [p.clone() for p in saved_model]
    opt2 = torch_class(kind, resumed, kw)
    opt2.load_state_dict(saved)
    assert opt2.is_eval
    opt2.train()
    # The run that was saved goes on too: both continue bitwise alike.
    opt1.train()
    run_torch(opt1, first, grads, range(50, STEPS))
    run_torch(opt2, resumed, grads, range(50, STEPS))
    for a, b in zip(resumed, first):
        assert torch.equal(a, b)


def test_a_bad_state_dict_changes_nothing():
    params = [torch.ones(4)]
    opt = ft.ScheduleFreeAdamW(params, lr=0.1)
    params[0].grad = torch.ones(4)
    opt.step()
    good = opt.state_dict()
    bad = copy.deepcopy(good)
    bad["param_groups"][0]["weight_sum"] = -1.0
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="weight_sum"):
        opt.load_state_dict(bad)
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert torch.equal(after["state"][0]["d"], before["state"][0]["d"])


@pytest.mark.parametrize("cls", [fusedopt.ScheduleFreeAdamW, fusedopt.ScheduleFreeSgd])
def test_a_state_file_keeps_the_averaging_and_the_mode(tmp_path, cls):
    w0, grads = problem(6)
    whole, w = w0.copy(), w0.copy()
    a = cls(0.01, warmup_steps=4)
    for g in grads:
        a.update(whole, g)
    b = cls(0.01, warmup_steps=4)
    for g in grads[:30]:
        b.update(w, g)
    b.eval(w)
    b.save_state(tmp_path / "sf.safetensors")
    c = cls(0.01, warmup_steps=4)
    c.load_state(tmp_path / "sf.safetensors")
    assert c.is_eval
    c.train(w)
    for g in grads[30:]:
        c.update(w, g)
    # eval then train rounds twice: within float32 rounding of the uninterrupted run.
    assert rel(w, whole.astype(np.float64)) <= 1e-5


def test_other_optimizers_have_one_point():
    w = np.ones(5, np.float32)
    opt = fusedopt.Adam(0.1)
    opt.update(w, np.ones(5, np.float32))
    before = w.copy()
    opt.eval(w)
    opt.train(w)
    assert not opt.is_eval and np.array_equal(w, before)
