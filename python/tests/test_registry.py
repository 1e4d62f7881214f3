"""Every optimizer of the engine reaches Python through its list (``fusedopt.rules()``): a numpy
class for each, and a ``torch.optim``-style class made the way one is made for an optimizer
that has no hand-written class, stepping bitwise as the engine does."""

import copy
import pickle

import numpy as np
import pytest

import fusedopt
from fusedopt import _numpy
from fusedopt._engine import Engine

torch = pytest.importorskip("torch")
import fusedopt.torch as ft  # noqa: E402

RULES = fusedopt.rules()
NAMES = [r["name"] for r in RULES]


def test_the_list_has_every_optimizer_with_its_defaults():
    assert NAMES == [
        "sgd", "momentum", "nag", "adagrad", "rmsprop", "adam", "adamax", "lion", "radam", "nadam", "ademamix",
        "adamw_schedulefree", "sgd_schedulefree", "lamb", "lars",
    ]
    adam = next(r for r in RULES if r["name"] == "adam")
    assert adam["type_name"] == "Adam" and adam["buffers"] == ["m", "v"]
    assert adam["hyper"] == {
        "lr": 0.001,
        "beta1": 0.9,
        "beta2": 0.999,
        "eps": 1e-7,
        "weight_decay": 0.0,
        "maximize": False,
        "decoupled_weight_decay": False,
        "amsgrad": False,
        "eps_mode": "sqrt_v",
    }
    for rule in RULES:
        assert Engine(rule["name"]).hyper == rule["hyper"]


@pytest.mark.parametrize("name", NAMES)
def test_every_optimizer_has_a_numpy_class(name):
    cls = _numpy._BY_RULE[name]
    assert cls._rule == name and getattr(fusedopt, cls.__name__) is cls
    opt = cls()
    assert opt.hyper == Engine(name).hyper
    w = np.ones(8, np.float32)
    opt.update(w, np.full(8, 0.5, np.float32))
    assert np.all(w < 1) and opt.steps == 1


def test_hyperparameters_are_typed_and_checked_by_the_engine():
    with pytest.raises(TypeError, match="amsgrad must be true or false"):
        fusedopt.Adam(amsgrad=1.0)
    with pytest.raises(TypeError, match="lr must be a number"):
        fusedopt.Adam(learning_rate="fast")
    with pytest.raises(ValueError, match="eps_mode"):
        fusedopt.Adam(eps_mode="sqrt_w")
    with pytest.raises(ValueError, match="beta2 = 1 is invalid"):
        fusedopt.Adam(beta2=1)
    opt = fusedopt.Adam(eps_mode="sqrt_v_hat", beta2=np.float32(0.95))
    assert opt.hyper["eps_mode"] == "sqrt_v_hat" and opt.beta2 == pytest.approx(0.95)
    opt.amsgrad = np.bool_(True)
    assert opt.amsgrad is True
    with pytest.raises(TypeError):
        opt.beta1 = None
    assert opt.beta1 == 0.9
    # Settings are checked by the engine too, and the same way in Rust, C and here.
    sgd = fusedopt.SGD(max_grad_norm=0.0)  # clipping to 0, as torch.nn.utils.clip_grad_norm_
    w = np.ones(2, np.float32)
    sgd.update(w, np.ones(2, np.float32))
    assert np.array_equal(w, np.ones(2)) and sgd.last_grad_norm == pytest.approx(2**0.5)
    with pytest.raises(ValueError, match="max_grad_norm = -1 is invalid"):
        sgd.max_grad_norm = -1
    with pytest.raises(ValueError, match="grad_scale = 0 is invalid"):
        sgd.grad_scale = 0
    assert (sgd.max_grad_norm, sgd.grad_scale) == (0.0, 1.0)
    sgd.set_settings(grad_scale=8.0, non_finite="skip")
    assert (sgd.settings["grad_scale"], sgd.non_finite) == (8.0, "skip")
    with pytest.raises(ValueError, match="grad_scale"):
        sgd.set_settings(non_finite="error", grad_scale=float("nan"))
    assert (sgd.grad_scale, sgd.settings["non_finite"]) == (8.0, "skip")


def test_engine_settings_read_back_and_refuse_as_a_whole():
    e = Engine("adam")
    assert e.settings == {
        "backend": "simd",
        "chunk_len": 0,
        "grad_scale": 1.0,
        "max_grad_norm": None,
        "non_finite": "propagate",
        "state_format": "f32",
    }
    e.set_settings(chunk_len=1000, backend="portable", non_finite="error")
    assert (e.settings["chunk_len"], e.settings["backend"]) == (1008, "portable")
    before = e.settings
    with pytest.raises(ValueError):
        e.set_settings(chunk_len=64, grad_scale=-1.0)
    with pytest.raises(TypeError, match="unknown setting"):
        e.set_settings(threads=4)
    with pytest.raises(ValueError, match="backend"):
        e.set_settings(backend="avx1024")
    assert e.settings == before


def generic_torch_class(name):
    info = next(r for r in RULES if r["name"] == name)
    cls = ft._rule_class(name, "Generic" + info["type_name"])
    setattr(ft, cls.__name__, cls)  # where pickle looks for it
    return cls


def trained_pair(name, steps=4):
    """The generic torch class of `name` and the numpy class over the same weights and
    gradients: (model, opt, numpy params, numpy opt)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    opt = generic_torch_class(name)(model.parameters(), lr=0.05)
    params = {str(i): p.detach().numpy().copy() for i, p in enumerate(model.parameters())}
    ref = _numpy._BY_RULE[name](learning_rate=0.05)
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        opt.zero_grad()
        (model(x) ** 2).mean().backward()
        ref.update(params, {str(i): p.grad.numpy() for i, p in enumerate(model.parameters())})
        opt.step()
    return model, opt, params, ref


@pytest.mark.parametrize("name", NAMES)
def test_the_generic_torch_class_steps_as_the_engine(name):
    model, opt, params, _ = trained_pair(name)
    for i, p in enumerate(model.parameters()):
        assert np.array_equal(p.detach().numpy(), params[str(i)]), (name, i)
    sd = opt.state_dict()
    buffers = next(r for r in RULES if r["name"] == name)["buffers"]
    keys = [ft._STATE_KEY_NAMES.get(name, {}).get(b, b) for b in buffers]  # torch's, where it has one
    keys += list(ft._DERIVED_STATE.get(name, {}))  # NAdam's mu_product
    for s in sd["state"].values():
        assert sorted(s) == sorted(["step", *keys])
    assert sd["param_groups"][0]["lr"] == 0.05


@pytest.mark.parametrize("name", NAMES)
def test_the_generic_torch_class_resumes_and_copies(name):
    model, opt, _, _ = trained_pair(name, steps=3)
    sd = copy.deepcopy(opt.state_dict())
    twin = copy.deepcopy(model)
    resumed = type(opt)(twin.parameters(), lr=0.05)
    resumed.load_state_dict(sd)
    model3, pickled = pickle.loads(pickle.dumps((model, opt)))
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(3))
    for m, o in ((model, opt), (twin, resumed), (model3, pickled)):
        for _ in range(2):
            o.zero_grad()
            (m(x) ** 2).mean().backward()
            o.step()
    for a, b, c in zip(model.parameters(), twin.parameters(), model3.parameters()):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_the_generic_torch_class_checks_its_arguments():
    cls = generic_torch_class("adam")
    p = [torch.nn.Parameter(torch.ones(3))]
    assert cls(p).defaults["betas"] == (0.9, 0.999)
    with pytest.raises(ValueError, match="beta1"):
        cls(p, betas=(1.5, 0.9))
    with pytest.raises(ValueError, match="lr"):
        cls(p, lr=-1.0)
    with pytest.raises(TypeError):
        cls(p, amsgrad="yes")
    with pytest.raises(ValueError, match="foreach"):
        cls(p, foreach=True)
    with pytest.raises(TypeError):
        cls(p, 0.1, (0.9, 0.99), 1e-8, 0.0, True)  # flags are keyword-only
    opt = cls(p, amsgrad=True)
    p[0].grad = torch.ones(3)
    opt.step()
    assert sorted(opt.state[p[0]]) == ["m", "step", "v", "v_max"]
