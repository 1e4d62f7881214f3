"""state_dict interop: fusedopt.torch <-> torch.optim both ways, fusedopt -> fusedopt bitwise,
torch's structure and keys, state shared with the engine, refused dicts change nothing."""

import copy
import io

import pytest

torch = pytest.importorskip("torch")
import fusedopt.torch as ft  # noqa: E402

#: |a - b| / (|b| + 0.01) on every weight (the issue's bound).
TOL = 1e-4

X = torch.randn(64, 10, generator=torch.Generator().manual_seed(11))
Y = torch.randn(64, 3, generator=torch.Generator().manual_seed(12))

CASES = [
    ("SGD", dict(lr=0.05)),
    ("SGD", dict(lr=0.05, momentum=0.9, weight_decay=0.01)),
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True)),
    ("Adagrad", dict(lr=0.05, weight_decay=0.01)),
    ("RMSprop", dict(lr=0.002, alpha=0.9)),
    ("Adam", dict(lr=0.01, weight_decay=0.01)),
    ("Adam", dict(lr=0.01, amsgrad=True)),
    ("AdamW", dict(lr=0.01, weight_decay=0.1)),
    ("AdamW", dict(lr=0.01, amsgrad=True)),
]


def case_id(case):
    return "-".join([case[0]] + [f"{k}={v}" for k, v in case[1].items()])


def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def groups_of(model, lr):
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return [{"params": weights}, {"params": biases, "lr": lr * 0.5}]


def run(model, opt, steps, skip_bias_at=()):
    for step in range(steps):
        opt.zero_grad()
        ((model(X) - Y) ** 2).mean().backward()
        if step in skip_bias_at:
            model[2].bias.grad = None  # a parameter without a gradient this step
        opt.step()


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


def rel_err(a, b):
    return max(float(((x - y).abs() / (y.abs() + 0.01)).max()) for x, y in zip(a, b))


def saved(sd):
    """Through torch.save / torch.load, as a checkpoint goes."""
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def build(module, name, model, kw):
    return getattr(module, name)(groups_of(model, kw["lr"]), **kw)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_torch_to_fusedopt_and_back_continue_as_torch(case):
    name, kw = case
    k, more, skip = 10, 20, (3, 12)
    ref_model = mlp()
    ref = build(torch.optim, name, ref_model, kw)
    run(ref_model, ref, k + more, skip)  # uninterrupted torch.optim
    expected = weights(ref_model)

    # torch.optim for k steps, then fusedopt.
    model = mlp()
    first = build(torch.optim, name, model, kw)
    run(model, first, k, skip)
    second = build(ft, name, model, kw)
    second.load_state_dict(saved(first.state_dict()))
    run(model, second, more, [s - k for s in skip if s >= k])
    err = rel_err(weights(model), expected)
    assert err <= TOL, f"torch -> fusedopt {name} {kw}: {err:.2e}"

    # fusedopt for k steps, then torch.optim.
    model = mlp()
    first = build(ft, name, model, kw)
    run(model, first, k, skip)
    second = build(torch.optim, name, model, kw)
    second.load_state_dict(saved(first.state_dict()))
    run(model, second, more, [s - k for s in skip if s >= k])
    err = rel_err(weights(model), expected)
    assert err <= TOL, f"fusedopt -> torch {name} {kw}: {err:.2e}"


@pytest.mark.parametrize("flat", [False, True], ids=["default", "flat_grads"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_fusedopt_to_fusedopt_is_bitwise(case, flat):
    name, kw = case
    kw = dict(kw, flat_grads=flat)
    whole_model = mlp()
    whole = build(ft, name, whole_model, kw)
    run(whole_model, whole, 30, (3, 12))

    model = mlp()
    first = build(ft, name, model, kw)
    run(model, first, 10, (3,))
    sd = saved(first.state_dict())
    resumed_model = mlp()
    with torch.no_grad():
        for p, q in zip(resumed_model.parameters(), model.parameters()):
            p.copy_(q)
    second = build(ft, name, resumed_model, kw)
    second.load_state_dict(sd)
    run(resumed_model, second, 20, (2,))
    for a, b in zip(resumed_model.parameters(), whole_model.parameters()):
        assert torch.equal(a, b), name
    if name != "SGD":  # torch's SGD keeps no step count
        assert second.tensor_steps == whole.tensor_steps


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_state_dict_has_torch_structure_and_keys(case):
    name, kw = case
    ours_model, theirs_model = mlp(), mlp()
    ours, theirs = build(ft, name, ours_model, kw), build(torch.optim, name, theirs_model, kw)
    for model, opt in ((ours_model, ours), (theirs_model, theirs)):
        run(model, opt, 3, (0, 1, 2))  # the last bias never has a gradient
    a, b = ours.state_dict(), theirs.state_dict()
    assert a["param_groups"] == b["param_groups"]
    assert sorted(a["state"]) == sorted(b["state"])
    for i, state in b["state"].items():
        assert list(a["state"][i]) == list(state), (name, i)
        for key, value in state.items():
            mine = a["state"][i][key]
            if key == "step":
                assert mine.dtype == value.dtype and mine.shape == value.shape and mine == value
            else:
                assert mine.dtype == value.dtype and mine.shape == value.shape
                assert float(((mine - value).abs() / (value.abs() + 0.01)).max()) < 1e-4


def test_state_dict_before_any_step_matches_torch():
    for name, kw in CASES:
        ours, theirs = build(ft, name, mlp(), kw), build(torch.optim, name, mlp(), kw)
        a, b = ours.state_dict(), theirs.state_dict()
        assert a["param_groups"] == b["param_groups"], name
        assert sorted(a["state"]) == sorted(b["state"]), name  # Adagrad: every parameter
        for i, state in b["state"].items():
            assert {k: v.tolist() for k, v in state.items()} == {
                k: v.tolist() for k, v in a["state"][i].items()
            }


def test_state_tensors_share_memory_with_the_engine():
    model = mlp()
    opt = ft.Adam(model.parameters(), lr=0.01)
    run(model, opt, 2)
    sd = opt.state_dict()
    exp_avg = sd["state"][0]["exp_avg"]
    before = exp_avg.clone()
    again = opt.state_dict()["state"][0]["exp_avg"]
    assert again.data_ptr() == exp_avg.data_ptr()  # no copy per call
    run(model, opt, 1)
    assert not torch.equal(exp_avg, before)  # the live state, as torch's
    p = next(iter(model.parameters()))
    assert opt.state[p]["exp_avg"].data_ptr() == exp_avg.data_ptr()
    assert opt.state[p]["exp_avg"].shape == p.shape
    # Writing the state writes the engine's: zeroed moments make the next step's m = (1-b1) g.
    opt.state[p]["exp_avg"].zero_()
    opt.zero_grad()
    ((model(X) - Y) ** 2).mean().backward()
    g = p.grad.clone()
    opt.step()
    assert torch.allclose(opt.state[p]["exp_avg"], 0.1 * g, rtol=1e-6, atol=1e-9)


def test_state_mapping_reads_sets_and_deletes():
    model = mlp()
    opt = ft.AdamW(model.parameters(), lr=0.01)
    params = list(model.parameters())
    assert len(opt.state) == 0 and params[0] not in opt.state
    run(model, opt, 3, (0, 1, 2))
    assert len(opt.state) == 3 and params[3] not in opt.state  # never had a gradient
    with pytest.raises(KeyError):
        opt.state[params[3]]
    twin_model = mlp()
    twin = ft.AdamW(twin_model.parameters(), lr=0.01)
    for p, q in zip(twin_model.parameters(), params):
        with torch.no_grad():
            p.copy_(q)
    for p, q in zip(twin_model.parameters(), params):
        if q in opt.state:
            twin.state[p] = {k: v.clone() for k, v in opt.state[q].items()}
    run(model, opt, 4)
    run(twin_model, twin, 4)
    for a, b in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(a, b)
    del opt.state[params[0]]
    assert params[0] not in opt.state and opt.tensor_steps[0] == 0
    with pytest.raises(ValueError, match="lacks exp_avg_sq"):
        opt.state[params[1]] = {"step": torch.tensor(1.0), "exp_avg": torch.zeros(16)}


def test_add_param_group_after_steps_keeps_state_as_torch():
    results = []
    for module in (torch.optim, ft):
        model = mlp()
        params = list(model.parameters())
        opt = module.Adam(params[:2], lr=0.01)
        run(model, opt, 5)
        opt.add_param_group({"params": params[2:], "lr": 0.005})
        run(model, opt, 10)
        results.append(weights(model))
        if module is ft:
            assert opt.tensor_steps == [15, 15, 10, 10]
            assert opt.state_dict()["param_groups"][1]["params"] == [2, 3]
    assert rel_err(results[1], results[0]) <= TOL


def trained(name="Adam", kw=None, steps=3):
    kw = kw or dict(lr=0.01)
    model = mlp()
    opt = build(ft, name, model, kw)
    run(model, opt, steps)
    return model, opt


def snapshot(opt):
    sd = opt.state_dict()
    return (
        copy.deepcopy(sd["param_groups"]),
        {i: {k: v.clone() for k, v in s.items()} for i, s in sd["state"].items()},
        list(opt.tensor_steps),
    )


def same(a, b):
    assert a[0] == b[0] and a[2] == b[2]
    assert a[1].keys() == b[1].keys()
    for i in a[1]:
        assert all(torch.equal(a[1][i][k], b[1][i][k]) for k in a[1][i])


def bad_dicts():
    """(what, change to a good Adam state dict, exception, message) for refused dicts."""
    _, sgd = trained("SGD", dict(lr=0.05, momentum=0.9))
    _, adagrad = trained("Adagrad", dict(lr=0.05))
    other_model = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    other = ft.Adam(groups_of(other_model, 0.01), lr=0.01)
    run_other = lambda: (other.zero_grad(), other_model(X).sum().backward(), other.step())  # noqa: E731
    run_other()

    def mut(f):
        """The dict changed in place by ``f``."""
        return lambda sd: (f(sd), sd)[1]

    def drop(key):
        return mut(lambda sd: sd["state"][0].pop(key))

    def setstate(key, value):
        return mut(lambda sd: sd["state"][1].update({key: value(sd["state"][1][key])}))

    return [
        ("SGD's dict", lambda sd: sgd.state_dict(), ValueError, "lack betas"),
        ("Adagrad's dict", lambda sd: adagrad.state_dict(), ValueError, "lack betas"),
        ("another shape", lambda sd: other.state_dict(), ValueError, "shape"),
        ("no state entry", mut(lambda sd: sd.pop("state")), ValueError, "no 'state'"),
        ("fewer groups", mut(lambda sd: sd["param_groups"].pop()), ValueError, "1 parameter groups"),
        ("fewer params", mut(lambda sd: sd["param_groups"][1]["params"].pop()), ValueError, "has 1 parameters"),
        ("missing key", drop("exp_avg_sq"), ValueError, "lacks exp_avg_sq"),
        ("missing step", drop("step"), ValueError, "lacks step"),
        ("extra key", mut(lambda sd: sd["state"][0].update(sum=torch.zeros(16, 10))), ValueError, "has sum"),
        ("float64", setstate("exp_avg", lambda t: t.double()), TypeError, "float64"),
        ("meta device", setstate("exp_avg_sq", lambda t: torch.empty_like(t, device="meta")), ValueError, "meta"),
        ("not a tensor", setstate("exp_avg", lambda t: t.tolist()), TypeError, "list"),
        ("bad step", setstate("step", lambda t: torch.tensor(-1.0)), ValueError, "step"),
        ("fractional step", setstate("step", lambda t: t + 0.5), ValueError, "step"),
        ("unknown index", mut(lambda sd: sd["state"].update({7: sd["state"][0]})), ValueError, "parameter 7"),
        ("negative lr", mut(lambda sd: sd["param_groups"][0].update(lr=-1.0)), ValueError, "lr"),
        ("foreach", mut(lambda sd: sd["param_groups"][0].update(foreach=True)), ValueError, "foreach"),
        ("betas differ", mut(lambda sd: sd["param_groups"][1].update(betas=(0.5, 0.9))), ValueError, "betas"),
        ("not a dict", lambda sd: 3, TypeError, "not int"),
    ]


@pytest.mark.parametrize("case", bad_dicts(), ids=lambda c: c[0] if isinstance(c, tuple) else None)
def test_a_state_dict_that_does_not_fit_changes_nothing(case):
    what, change, exc, message = case
    model, opt = trained()
    twin_model, twin = trained()
    bad = change(copy.deepcopy(opt.state_dict()))
    before = snapshot(opt)
    with pytest.raises(exc, match=message):
        opt.load_state_dict(bad)
    same(snapshot(opt), before)
    run(model, opt, 3)
    run(twin_model, twin, 3)
    for a, b in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(a, b), what


def test_sgd_takes_momentum_from_a_loaded_dict():
    model = mlp()
    with_momentum = ft.SGD(model.parameters(), lr=0.05, momentum=0.9)
    run(model, with_momentum, 3)
    plain = ft.SGD(model.parameters(), lr=0.05)
    plain.load_state_dict(with_momentum.state_dict())
    assert plain.param_groups[0]["momentum"] == 0.9
    run(model, plain, 2)
    assert plain.state_dict()["state"][0]["momentum_buffer"].shape == (16, 10)


def test_adamw_keeps_decoupled_weight_decay_when_loading_an_adam_dict():
    model = mlp()
    adam = ft.Adam(model.parameters(), lr=0.01, weight_decay=0.1)
    run(model, adam, 2)
    adamw = ft.AdamW(model.parameters(), lr=0.01)
    adamw.load_state_dict(adam.state_dict())
    assert adamw.param_groups[0]["decoupled_weight_decay"] is True
