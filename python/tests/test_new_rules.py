"""The optimizers added after the first six: Adamax against torch.optim.Adamax (trajectory under
schedulers and parameter groups, state_dict both ways), Lion against a float64 reference written
from the paper, and both through the numpy classes."""

import numpy as np
import pytest

import fusedopt

torch = pytest.importorskip("torch")
import fusedopt.torch as ft  # noqa: E402

#: The bound of the parity target: |a - b| / (|b| + 0.01) after 120 steps.
TOL = 5e-5
STEPS = 120

X = torch.randn(96, 10, generator=torch.Generator().manual_seed(1))
Y = torch.randn(96, 3, generator=torch.Generator().manual_seed(2))


def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3))


def groups(model, lr):
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return [{"params": weights}, {"params": biases, "lr": lr * 0.5, "weight_decay": 0.0}]


def train(make, kw, *, grouped=False, scheduler=None, steps=STEPS, model=None, opt=None):
    model = model or mlp()
    if opt is None:
        opt = make(groups(model, kw["lr"]) if grouped else model.parameters(), **kw)
    sched = scheduler(opt) if scheduler else None
    for _ in range(steps):
        opt.zero_grad()
        loss = ((model(X) - Y) ** 2).mean()
        (-loss if kw.get("maximize") else loss).backward()
        opt.step()
        if sched:
            sched.step()
    return model, opt


def params(model):
    return [p.detach() for p in model.parameters()]


def rel_err(a, b):
    return max(float(((x - y).abs() / (y.abs() + 0.01)).max()) for x, y in zip(params(a), params(b)))


def cosine(opt):
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS)


def step_lr(opt):
    return torch.optim.lr_scheduler.StepLR(opt, step_size=25, gamma=0.5)


ADAMAX_CASES = [
    (dict(lr=2e-3), dict(scheduler=cosine)),
    (dict(lr=5e-3, betas=(0.8, 0.99), weight_decay=0.01), dict(grouped=True, scheduler=step_lr)),
    (dict(lr=2e-3, eps=1e-3, maximize=True), dict(scheduler=cosine)),
]


@pytest.mark.parametrize("kw,opts", ADAMAX_CASES, ids=lambda x: ",".join(f"{k}={v}" for k, v in x.items()) if isinstance(x, dict) else "")
def test_adamax_matches_torch(kw, opts):
    ours, opt = train(ft.Adamax, kw, **opts)
    theirs, ref = train(torch.optim.Adamax, kw, **opts)
    err = rel_err(ours, theirs)
    assert err <= TOL, f"{kw}: {err:.2e}"
    p, q = next(ours.parameters()), next(theirs.parameters())
    for key in ("exp_avg", "exp_inf"):
        a, b = opt.state[p][key], ref.state[q][key]
        assert float(((a - b).abs() / (b.abs() + 0.01)).max()) <= TOL, key


OPTION_CASES = [
    ("SGD", dict(lr=0.05, momentum=0.9, dampening=0.1), dict(scheduler=cosine)),
    ("SGD", dict(lr=0.05, momentum=0.9, dampening=0.5, weight_decay=0.01), dict(grouped=True, scheduler=step_lr)),
    ("Adagrad", dict(lr=0.05, lr_decay=0.01), dict(scheduler=cosine)),
    ("Adagrad", dict(lr=0.05, lr_decay=0.1, weight_decay=0.01), dict(grouped=True, scheduler=step_lr)),
]


@pytest.mark.parametrize("name,kw,opts", OPTION_CASES, ids=lambda x: x if isinstance(x, str) else "")
def test_torch_options_once_refused_match_torch(name, kw, opts):
    ours, _ = train(getattr(ft, name), kw, **opts)
    theirs, _ = train(getattr(torch.optim, name), kw, **opts)
    err = rel_err(ours, theirs)
    assert err <= TOL, f"{name} {kw}: {err:.2e}"


def test_sgd_dampening_resumes_from_torchs_state_dict():
    kw = dict(lr=0.05, momentum=0.9, dampening=0.3)
    model, opt = train(torch.optim.SGD, kw, steps=20)
    twin, twin_opt = train(torch.optim.SGD, kw, steps=20)
    resumed = ft.SGD(model.parameters(), **kw)
    resumed.load_state_dict(opt.state_dict())  # buffers present: the next step is dampened
    train(None, kw, steps=20, model=model, opt=resumed)
    train(None, kw, steps=20, model=twin, opt=twin_opt)
    assert rel_err(model, twin) <= TOL
    with pytest.raises(ValueError, match="Nesterov"):
        ft.SGD(mlp().parameters(), lr=0.1, momentum=0.9, nesterov=True, dampening=0.1)


def test_adamax_state_dict_loads_both_ways():
    kw = dict(lr=3e-3, weight_decay=0.01)
    for first, second in ((ft.Adamax, torch.optim.Adamax), (torch.optim.Adamax, ft.Adamax)):
        model, opt = train(first, kw, steps=30)
        saved = opt.state_dict()
        resumed = second(model.parameters(), **kw)
        resumed.load_state_dict(saved)
        twin, twin_opt = train(first, kw, steps=30)
        train(None, kw, steps=30, model=model, opt=resumed)
        train(None, kw, steps=30, model=twin, opt=twin_opt)
        assert rel_err(model, twin) <= TOL, (first, second)
        assert sorted(saved["state"][0]) == ["exp_avg", "exp_inf", "step"]


def lion_reference(w, grads, lr, beta1, beta2, wd, steps):
    """Chen et al. (2023), "Symbolic Discovery of Optimization Algorithms", Algorithm 2, in
    float64: c = β1·m + (1−β1)·g; θ ← θ − η·(sign(c) + λ·θ) (as θ·(1 − ηλ) − η·sign(c));
    m = β2·m + (1−β2)·g."""
    w = w.astype(np.float64)
    m = np.zeros_like(w)
    for t in range(steps):
        g = grads(w, t)
        c = beta1 * m + (1 - beta1) * g
        w = w * (1 - lr * wd) - lr * np.sign(c)
        m = beta2 * m + (1 - beta2) * g
    return w, m


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_lion_follows_the_papers_update_in_float64(wd):
    n, lr = 4099, 3e-3
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal(n)
    # A fixed gradient sequence (a drift plus noise), so that both sides see the same inputs and
    # only the rule's arithmetic differs.
    drift = rng.standard_normal(n)
    grads = [(drift + 0.5 * rng.standard_normal(n)).astype(np.float32) for _ in range(STEPS)]
    ref_w, ref_m = lion_reference(w0, lambda w, t: grads[t].astype(np.float64), lr, 0.9, 0.99, wd, STEPS)
    opt = fusedopt.Lion(learning_rate=lr, weight_decay=wd)
    w = w0.astype(np.float32)
    for g in grads:
        opt.update(w, g)
    m = opt._engine.read_state("m", 0)
    assert float(np.max(np.abs(m - ref_m) / (np.abs(ref_m) + 0.01))) <= TOL
    # Where β1·m + (1−β1)·g falls within rounding of 0 the two signs may differ: a whole step
    # of lr. Everywhere else the weights agree to f32 rounding.
    err = np.abs(w - ref_w) / (np.abs(ref_w) + 0.01)
    assert np.mean(err > TOL) <= 1e-3 and float(np.max(np.abs(w - ref_w))) <= 2 * lr + 1e-5


def test_lion_torch_class_trains_and_names_its_state_as_lion_pytorch():
    model, opt = train(ft.Lion, dict(lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1), steps=60)
    p = next(model.parameters())
    assert sorted(opt.state_dict()["state"][0]) == ["exp_avg", "step"]
    assert torch.equal(opt.state[p]["exp_avg"], opt.state[p]["exp_avg"])
    with pytest.raises(ValueError, match="beta"):
        ft.Lion(model.parameters(), betas=(1.5, 0.99))


def test_numpy_classes_for_the_new_rules():
    for cls, kw in ((fusedopt.Adamax, dict(learning_rate=0.01)), (fusedopt.Lion, dict(learning_rate=0.01))):
        opt = cls(**kw)
        w = np.ones(1000, np.float32)
        for _ in range(200):
            opt.update(w, (w - 0.5).astype(np.float32))
        assert np.all(np.abs(w - 0.5) < 0.05), cls
