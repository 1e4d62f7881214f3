"""LAMB and LARS (per-tensor trust ratios) against float64 references written from the papers,
through the numpy and the torch classes, with a step schedule and parameter groups; state dicts
name their state as timm's ``Lamb`` and ``Lars`` do, and resume exactly."""

import numpy as np
import pytest

import fusedopt

torch = pytest.importorskip("torch")
import fusedopt.torch as ft  # noqa: E402

STEPS = 120
TOL = 5e-5


def norm(x):
    return float(np.sqrt(np.sum(x * x)))


def lamb_reference(w, m, v, g, t, lr, beta1=0.9, beta2=0.999, eps=1e-6, wd=0.01, bias_correction=True,
                   trust_clip=False, always_adapt=False):
    """You et al. (2020), "Large Batch Optimization for Deep Learning: Training BERT in 76
    minutes", Algorithm 2, in float64, with timm's conventions: the trust ratio ||w|| / ||u|| is
    1 where a norm is 0, and applies only to decayed tensors unless always_adapt."""
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    bc1, bc2 = (1 - beta1**t, 1 - beta2**t) if bias_correction else (1.0, 1.0)
    u = (m / bc1) / (np.sqrt(v / bc2) + eps) + wd * w
    r = 1.0
    if wd != 0 or always_adapt:
        wn, un = norm(w), norm(u)
        r = wn / un if wn > 0 and un > 0 else 1.0
        if trust_clip:
            r = min(r, 1.0)
    return w - lr * r * u, m, v


def lars_reference(w, b, g, t, lr, momentum=0.0, dampening=0.0, wd=0.0, nesterov=False, trust_coeff=0.001,
                   eps=1e-8, trust_clip=False, always_adapt=False):
    """You, Gitman and Ginsburg (2017), "Large Batch Training of Convolutional Networks",
    Algorithm 1, in float64, with the learning rate outside the momentum (timm's Lars, torch's
    SGD): r = eta ||w|| / (||g|| + wd ||w|| + eps), d = r (g + wd w)."""
    d = g
    if wd != 0 or always_adapt:
        wn, gn = norm(w), norm(g)
        r = trust_coeff * wn / (gn + wn * wd + eps) if wn > 0 and gn > 0 else 1.0
        if trust_clip:
            r = min(r / lr, 1.0)
        d = r * (g + wd * w)
    if momentum > 0:
        b = d if t == 1 else momentum * b + (1 - dampening) * d
        d = d + momentum * b if nesterov else b
    return w - lr * d, b


def schedule(lr, s):
    """The learning rate of step s (from 0): StepLR(step_size=25, gamma=0.5)."""
    return lr * 0.5 ** (s // 25)


def problem(seed, n):
    rng = np.random.default_rng(seed)
    w0 = rng.standard_normal(n).astype(np.float32)
    drift = rng.standard_normal(n)
    grads = [(drift + rng.standard_normal(n)).astype(np.float32) for _ in range(STEPS)]
    return w0, grads


def run_reference(kind, w0, grads, kw, lr_scale=1.0, wd=None):
    kw = dict(kw)
    lr = kw.pop("lr") * lr_scale
    if "betas" in kw:
        kw["beta1"], kw["beta2"] = kw.pop("betas")
    kw["wd"] = kw.pop("weight_decay", 0.01 if kind == "lamb" else 0.0) if wd is None else wd
    kw.pop("weight_decay", None)
    w = w0.astype(np.float64)
    s1, s2 = np.zeros_like(w), np.zeros_like(w)
    for s, g in enumerate(grads):
        g = g.astype(np.float64)
        if kind == "lamb":
            w, s1, s2 = lamb_reference(w, s1, s2, g, s + 1, schedule(lr, s), **kw)
        else:
            w, s1 = lars_reference(w, s1, g, s + 1, schedule(lr, s), **kw)
    return w


def rel(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


CASES = [
    ("lamb", dict(lr=0.01)),
    ("lamb", dict(lr=0.02, betas=(0.8, 0.95), eps=1e-4, weight_decay=0.1, trust_clip=True)),
    ("lamb", dict(lr=0.01, weight_decay=0.0, always_adapt=True, bias_correction=False)),
    ("lars", dict(lr=0.5, momentum=0.9, weight_decay=0.01)),
    ("lars", dict(lr=0.2, momentum=0.9, weight_decay=5e-4, nesterov=True, trust_coeff=0.02)),
    ("lars", dict(lr=2.0, momentum=0.8, dampening=0.25, weight_decay=0.1, trust_clip=True, eps=1e-3)),
]
IDS = [f"{k}-{i}" for i, (k, _) in enumerate(CASES)]


def numpy_class(kind, kw):
    kw = dict(kw)
    lr = kw.pop("lr")
    if "betas" in kw:
        kw["beta1"], kw["beta2"] = kw.pop("betas")
    return (fusedopt.Lamb if kind == "lamb" else fusedopt.Lars)(lr, **kw)


@pytest.mark.parametrize("kind,kw", CASES, ids=IDS)
def test_numpy_classes_follow_the_float64_reference(kind, kw):
    w0, grads = problem(1, 4099)
    want = run_reference(kind, w0, grads, kw)
    opt = numpy_class(kind, kw)
    w = w0.copy()
    for s, g in enumerate(grads):
        opt.lr = schedule(kw["lr"], s)
        opt.update(w, g)
    assert rel(w, want) <= TOL


@pytest.mark.parametrize("kind,kw", CASES, ids=IDS)
def test_torch_classes_follow_the_float64_reference_per_tensor_with_groups_and_a_schedule(kind, kw):
    problems = [problem(2, 9000), problem(3, 31), problem(4, 300)]
    params = [torch.tensor(w0) for w0, _ in problems]
    cls = ft.Lamb if kind == "lamb" else ft.Lars
    # The last tensor in a group without decay and with half the learning rate: LAMB and LARS
    # leave it unadapted unless always_adapt.
    opt = cls([{"params": params[:2]}, {"params": params[2:], "lr": kw["lr"] * 0.5, "weight_decay": 0.0}], **kw)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=25, gamma=0.5)
    for s in range(STEPS):
        for p, (_, grads) in zip(params, problems):
            p.grad = torch.from_numpy(grads[s].copy())
        opt.step()
        sched.step()
    for i, (p, (w0, grads)) in enumerate(zip(params, problems)):
        want = run_reference(kind, w0, grads, kw, *((0.5, 0.0) if i == 2 else ()))
        assert rel(p.detach().numpy(), want) <= TOL, i


@pytest.mark.parametrize("kind,keys", [("lamb", ["exp_avg", "exp_avg_sq", "step"]), ("lars", ["momentum_buffer", "step"])])
def test_state_dicts_use_timms_names_and_resume_exactly(kind, keys):
    kw = dict(lr=0.01, weight_decay=0.01) if kind == "lamb" else dict(lr=0.5, momentum=0.9, weight_decay=0.01)
    cls = ft.Lamb if kind == "lamb" else ft.Lars
    problems = [problem(5, 500), problem(6, 20)]

    def run(opt, params, steps):
        for s in steps:
            for p, (_, grads) in zip(params, problems):
                p.grad = torch.from_numpy(grads[s].copy())
            opt.step()

    params = [torch.tensor(w0) for w0, _ in problems]
    opt = cls(params, **kw)
    run(opt, params, range(40))
    saved = opt.state_dict()
    assert sorted(saved["state"][0]) == keys
    twin_params = [p.detach().clone() for p in params]
    twin = cls(twin_params, **kw)
    twin.load_state_dict(saved)
    run(opt, params, range(40, 80))
    run(twin, twin_params, range(40, 80))
    for p, q in zip(params, twin_params):
        assert torch.equal(p, q)


def test_bad_settings_raise_and_change_nothing():
    p = torch.nn.Parameter(torch.ones(10))
    with pytest.raises(ValueError, match="trust_coeff"):
        ft.Lars([p], trust_coeff=-1.0)
    with pytest.raises(ValueError, match="Nesterov"):
        ft.Lars([p], momentum=0.9, nesterov=True, dampening=0.5)
    with pytest.raises(ValueError, match="beta"):
        ft.Lamb([p], betas=(1.0, 0.999))
    opt = fusedopt.Lamb(0.01)
    w = np.ones(8, np.float32)
    with pytest.raises(ValueError):
        opt.update(w, np.ones(9, np.float32))
    assert np.all(w == 1.0)


def test_lamb_and_lars_train_a_model():
    torch.manual_seed(0)
    x = torch.randn(256, 10)
    y = x @ torch.randn(10, 1)
    for cls, kw in [(ft.Lamb, dict(lr=0.02)), (ft.Lars, dict(lr=2.0, momentum=0.9, weight_decay=1e-4))]:
        model = torch.nn.Linear(10, 1)
        opt = cls(model.parameters(), **kw)
        first = None
        for _ in range(300):
            opt.zero_grad()
            loss = ((model(x) - y) ** 2).mean()
            loss.backward()
            opt.step()
            first = first if first is not None else loss.item()
        assert loss.item() < 0.05 * first, cls
