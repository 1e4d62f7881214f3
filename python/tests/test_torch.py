"""fusedopt.torch against torch.optim: parity on a small MLP, torch's semantics, refusals."""

import pytest

torch = pytest.importorskip("torch")
import fusedopt.torch as ft  # noqa: E402

#: |a - b| / (|b| + 0.01) on every weight after 50 steps (the issue's bound).
TOL = 1e-4

X = torch.randn(96, 10, generator=torch.Generator().manual_seed(1))
Y = torch.randn(96, 3, generator=torch.Generator().manual_seed(2))


def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(10, 32), torch.nn.Tanh(), torch.nn.Linear(32, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)
    )


def two_groups(model, lr):
    """Weights and biases in two groups: their own lr and weight decay."""
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return [{"params": weights}, {"params": biases, "lr": lr * 0.5, "weight_decay": 0.0}]


def train(cls, kw, *, groups=False, scheduler=None, flat=False, steps=50, skip=None):
    model = mlp()
    lr = kw["lr"]
    params = two_groups(model, lr) if groups else model.parameters()
    extra = {"flat_grads": True} if flat else {}
    opt = cls(params, **kw, **extra)
    sched = scheduler(opt) if scheduler else None
    losses = []
    for step in range(steps):
        def closure():
            opt.zero_grad()
            loss = ((model(X) - Y) ** 2).mean()
            if kw.get("maximize"):
                loss = -loss  # ascending -loss still fits the data
            loss.backward()
            if skip is not None:
                for i, p in enumerate(model.parameters()):
                    if skip(step, i):
                        p.grad = None
            return loss

        losses.append(float(opt.step(closure).detach()))
        if sched:
            sched.step()
    return [p.detach().clone() for p in model.parameters()], losses, opt


def rel_err(a, b):
    return max(float(((x - y).abs() / (y.abs() + 0.01)).max()) for x, y in zip(a, b))


def step_lr(opt):
    return torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)


def one_cycle(opt):
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.02, total_steps=50)


CASES = [
    ("SGD", dict(lr=0.05), {}),
    ("SGD", dict(lr=0.05, momentum=0.9, weight_decay=0.01), dict(scheduler=step_lr)),
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01), dict(groups=True, scheduler=step_lr)),
    ("SGD", dict(lr=0.02, momentum=0.9, maximize=True), {}),
    ("SGD", dict(lr=0.02, momentum=0.9), dict(scheduler=one_cycle)),
    ("Adagrad", dict(lr=0.05, weight_decay=0.01), dict(groups=True, scheduler=step_lr)),
    ("Adagrad", dict(lr=0.05, maximize=True), {}),
    ("RMSprop", dict(lr=0.002, weight_decay=0.01), dict(groups=True, scheduler=step_lr)),
    ("RMSprop", dict(lr=0.002, alpha=0.9, maximize=True), {}),
    ("Adam", dict(lr=0.01), {}),
    ("Adam", dict(lr=0.01, weight_decay=0.01, amsgrad=True), dict(groups=True, scheduler=step_lr)),
    ("Adam", dict(lr=0.005, maximize=True, betas=(0.8, 0.99)), {}),
    ("Adam", dict(lr=0.01, weight_decay=0.05, decoupled_weight_decay=True), {}),
    ("Adam", dict(lr=0.01), dict(scheduler=one_cycle)),
    ("AdamW", dict(lr=0.01, weight_decay=0.1), dict(groups=True, scheduler=step_lr)),
    ("AdamW", dict(lr=0.01, weight_decay=0.1, amsgrad=True, maximize=True), {}),
]


def case_id(case):
    name, kw, opts = case
    return "-".join([name] + [f"{k}={v}" for k, v in kw.items()] + [k for k in opts if k != "scheduler"]
                    + [opts["scheduler"].__name__] if "scheduler" in opts else [name] + [f"{k}={v}" for k, v in kw.items()] + list(opts))


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("flat", [False, True], ids=["default", "flat_grads"])
def test_matches_torch_optim(case, flat):
    name, kw, opts = case
    ours, our_losses, _ = train(getattr(ft, name), kw, flat=flat, **opts)
    theirs, their_losses, _ = train(getattr(torch.optim, name), kw, **opts)
    err = rel_err(ours, theirs)
    assert err <= TOL, f"{name} {kw}: {err:.2e}"
    assert abs(our_losses[-1]) < abs(our_losses[0])


def test_missing_grads_are_skipped_and_keep_their_own_step_count():
    skip = lambda step, i: (i == 1 and step % 3 == 0) or (i == 4 and step < 7)  # noqa: E731
    for name, kw in [("Adam", dict(lr=0.01, weight_decay=0.01)), ("SGD", dict(lr=0.05, momentum=0.9)),
                     ("Adagrad", dict(lr=0.05)), ("RMSprop", dict(lr=0.002)), ("AdamW", dict(lr=0.01))]:
        ours, _, opt = train(getattr(ft, name), kw, skip=skip, steps=20)
        theirs, _, ref = train(getattr(torch.optim, name), kw, skip=skip, steps=20)
        assert rel_err(ours, theirs) <= TOL, name
        if name.startswith("Adam"):
            assert opt.tensor_steps == [int(ref.state[p]["step"]) for p in ref.param_groups[0]["params"]]


def test_step_updates_in_place_and_returns_the_closure_loss():
    model = mlp()
    ptrs = [p.data_ptr() for p in model.parameters()]
    before = [p.detach().clone() for p in model.parameters()]
    opt = ft.AdamW(model.parameters(), lr=1e-2)
    loss = ((model(X) - Y) ** 2).mean()
    loss.backward()
    assert opt.step() is None
    assert opt.step(lambda: torch.tensor(3.5)) == torch.tensor(3.5)
    assert [p.data_ptr() for p in model.parameters()] == ptrs
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert all(p._version > 0 for p in model.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    opt.zero_grad(set_to_none=False)


def test_flat_grads_keep_views_and_zero_in_place():
    model = mlp()
    opt = ft.Adam(model.parameters(), lr=1e-2, flat_grads=True)
    grads = [p.grad for p in model.parameters()]  # the views, installed when built
    assert all(g is not None and not g.any() for g in grads)
    ((model(X) - Y) ** 2).mean().backward()  # accumulates into the views
    assert all(p.grad is g and g.any() for p, g in zip(model.parameters(), grads))
    opt.step()
    opt.zero_grad()
    assert all(p.grad is g and not g.any() for p, g in zip(model.parameters(), grads))
    model.zero_grad()  # torch's Module.zero_grad drops them; the next step copies them back
    ((model(X) - Y) ** 2).mean().backward()
    opt.step()
    assert all(p.grad is g for p, g in zip(model.parameters(), grads))


UNSUPPORTED = [
    (ft.SGD, dict(foreach=True), "foreach"),
    (ft.SGD, dict(differentiable=True), "differentiable"),
    (ft.SGD, dict(fused=False), "fused"),
    (ft.RMSprop, dict(capturable=True), "capturable"),
    (ft.Adam, dict(capturable=True), "capturable"),
    (ft.Adam, dict(foreach=True), "foreach"),
    (ft.AdamW, dict(differentiable=True), "differentiable"),
]


@pytest.mark.parametrize("cls,kw,arg", UNSUPPORTED, ids=lambda x: getattr(x, "__name__", str(x)))
def test_unimplemented_arguments_raise_when_built(cls, kw, arg):
    with pytest.raises(ValueError, match=arg):
        cls(mlp().parameters(), **kw)


def test_torch_argument_checks_and_fused_true():
    with pytest.raises(ValueError, match="learning rate"):
        ft.Adam(mlp().parameters(), lr=-1)
    with pytest.raises(ValueError, match="beta"):
        ft.AdamW(mlp().parameters(), betas=(1.0, 0.999))
    with pytest.raises(ValueError, match="Nesterov"):
        ft.SGD(mlp().parameters(), nesterov=True)
    ft.Adam(mlp().parameters(), fused=True, foreach=False)


def test_groups_that_differ_in_a_shared_hyperparameter_are_refused():
    model = mlp()
    with pytest.raises(ValueError, match="betas"):
        ft.Adam([{"params": [model[0].weight]}, {"params": [model[0].bias], "betas": (0.5, 0.9)}])


def bad_tensor_cases():
    def grad_f64(p):
        p.grad_dtype = None  # torch refuses a float64 .grad on a float32 tensor otherwise
        p.grad = torch.ones_like(p, dtype=torch.float64)

    def grad_strided(p):
        p.grad = torch.ones(p.shape[::-1]).t() if p.dim() == 2 else torch.ones(p.numel() * 2)[::2]

    def grad_sparse(p):
        p.grad = torch.ones_like(p).to_sparse()

    return [
        ("float64 grad", grad_f64, TypeError, "float64"),
        ("strided grad", grad_strided, ValueError, "contiguous"),
        ("sparse grad", grad_sparse, ValueError, "sparse"),
    ]


@pytest.mark.parametrize("case", bad_tensor_cases(), ids=lambda c: c[0])
@pytest.mark.parametrize("flat", [False, True], ids=["default", "flat_grads"])
def test_bad_grads_raise_before_anything_changes(case, flat):
    _, spoil, exc, message = case
    model = mlp()
    opt = ft.Adam(model.parameters(), lr=0.1, flat_grads=flat)
    ((model(X) - Y) ** 2).mean().backward()
    opt.step()
    ((model(X) - Y) ** 2).mean().backward()
    before = [p.detach().clone() for p in model.parameters()]
    spoil(list(model.parameters())[2])
    with pytest.raises(exc, match=message):
        opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert opt.tensor_steps == [1] * len(before)


def test_bad_parameters_raise():
    with pytest.raises(TypeError, match="float64"):
        ft.SGD([torch.nn.Parameter(torch.ones(3, dtype=torch.float64))]).step()
    with pytest.raises(ValueError, match="meta"):
        ft.SGD([torch.nn.Parameter(torch.ones(3, device="meta"))]).step()
    with pytest.raises(ValueError, match="contiguous"):
        ft.SGD([torch.nn.Parameter(torch.ones(3, 4).t())]).step()
    base = torch.ones(10)
    tied = [torch.nn.Parameter(base[:6]), torch.nn.Parameter(base[4:])]
    for p in tied:
        p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match="share memory"):
        ft.SGD(tied).step()
    p = torch.nn.Parameter(torch.ones(4))
    p.grad = p.data
    with pytest.raises(ValueError, match="share memory"):
        ft.SGD([p]).step()
    assert torch.equal(p.data, torch.ones(4))


def test_add_param_group_refused_after_steps_changes_nothing():
    model = mlp()
    params = list(model.parameters())
    opt = ft.Adam(params[:2], lr=0.01)
    opt.add_param_group({"params": params[2:4], "lr": 0.001})  # before the first step
    ((model(X) - Y) ** 2).mean().backward()
    opt.step()
    steps = opt.tensor_steps
    with pytest.raises(TypeError, match="float64"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2, dtype=torch.float64))]})
    with pytest.raises(ValueError, match="betas differs"):
        opt.add_param_group({"params": params[4:], "betas": (0.5, 0.5)})
    assert len(opt.param_groups) == 2 and opt.tensor_steps == steps
    opt.add_param_group({"params": params[4:]})  # after the first step: state kept
    assert opt.tensor_steps == steps + [0, 0]


def test_results_do_not_depend_on_threads():
    import fusedopt

    old, results = fusedopt.get_num_threads(), []
    try:
        for threads in (1, 2, 3):
            fusedopt.set_num_threads(threads)
            results.append(train(ft.AdamW, dict(lr=0.01), steps=10)[0])
    finally:
        fusedopt.set_num_threads(old)
    assert all(torch.equal(a, b) for r in results[1:] for a, b in zip(results[0], r))
