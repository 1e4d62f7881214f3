"""Low precision from Python: compact state (``state_format``) and master weights
(``master_weights=True``) in the numpy classes and the torch drop-ins."""

import io

import numpy as np
import pytest
import torch

import fusedopt
import fusedopt.torch as ft


def _data(n=4096, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    y = torch.sin(x[:, :4].sum(1, keepdim=True)) + 0.1 * x[:, 4:5] ** 2
    # Label noise: the loss levels off near its variance (0.01), as real training's does,
    # instead of falling to where bfloat16's own rounding of the forward pass dominates.
    y = y + 0.1 * torch.randn(n, 1, generator=g)
    return x, y


def _model(dtype, seed=1):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 32), torch.nn.Tanh(),
        torch.nn.Linear(32, 1),
    )
    return m.to(dtype)


def _train(model, opt, steps, x, y):
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x.to(model[0].weight.dtype)).float(), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _final_loss(model, x, y):
    with torch.no_grad():
        return torch.nn.functional.mse_loss(model.float()(x), y).item()


@pytest.mark.parametrize("state_format", ["f32", "bf16", "q8"])
def test_bf16_master_weights_train_like_f32_adamw(state_format):
    x, y = _data()
    ref = _model(torch.float32)
    _train(ref, torch.optim.AdamW(ref.parameters(), lr=3e-3), 200, x, y)
    low = _model(torch.bfloat16)
    opt = ft.AdamW(low.parameters(), lr=3e-3, state_format=state_format, master_weights=True)
    _train(low, opt, 200, x, y)
    assert all(p.dtype == torch.bfloat16 for p in low.parameters())
    a, b = _final_loss(low, x, y), _final_loss(ref, x, y)
    print(f"bf16 weights + master + {state_format} state: {a:.5f}, f32 torch AdamW: {b:.5f}")
    # The model's forward and backward run in bfloat16: the bound is on the training, not on
    # the optimizer's arithmetic (which tests/half.rs checks bitwise).
    assert abs(a - b) / b < 0.15, (a, b)
    initial = _final_loss(_model(torch.float32), x, y)
    assert a < 0.3 * initial


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("state_format", ["f32", "bf16", "q8"])
@pytest.mark.parametrize("flat", [False, True])
def test_state_dict_resumes_bitwise(dtype, state_format, flat):
    x, y = _data(128)
    kwargs = dict(lr=1e-2, state_format=state_format, master_weights=True, flat_grads=flat)
    whole = _model(dtype)
    opt = ft.AdamW(whole.parameters(), **kwargs)
    _train(whole, opt, 12, x, y)

    first = _model(dtype)
    opt1 = ft.AdamW(first.parameters(), **kwargs)
    _train(first, opt1, 5, x, y)
    sd = opt1.state_dict()
    p0 = sd["state"][0]
    assert set(p0) == {"step", "exp_avg", "exp_avg_sq", "master"}
    assert p0["master"].dtype == torch.float32 and p0["exp_avg"].dtype == torch.float32
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    loaded = torch.load(buf)
    second = _model(dtype, seed=7)  # other weights: the master weights must win
    with torch.no_grad():
        for p, q in zip(second.parameters(), first.parameters()):
            p.copy_(q)
    opt2 = ft.AdamW(second.parameters(), **kwargs)
    opt2.load_state_dict(loaded)
    _train(second, opt2, 7, x, y)
    for p, q in zip(second.parameters(), whole.parameters()):
        assert torch.equal(p, q)


def test_torch_optim_state_loads_into_master_weights():
    x, y = _data(128)
    ref = _model(torch.float32)
    topt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    _train(ref, topt, 5, x, y)
    low = _model(torch.bfloat16)
    with torch.no_grad():
        for p, q in zip(low.parameters(), ref.parameters()):
            p.copy_(q)
    opt = ft.AdamW(low.parameters(), lr=1e-2, state_format="q8", master_weights=True)
    opt.load_state_dict(topt.state_dict())
    sd = opt.state_dict()["state"][0]
    assert sd["step"].item() == 5.0
    want = topt.state_dict()["state"][0]["exp_avg"]
    assert torch.allclose(sd["exp_avg"], want, rtol=0.07, atol=1e-3 * want.abs().max().item())
    _train(low, opt, 5, x, y)


def test_refusals_change_nothing():
    m32, m16 = _model(torch.float32), _model(torch.bfloat16)
    with pytest.raises(ValueError, match="state_format"):
        ft.Adam(m32.parameters(), state_format="int4")
    with pytest.raises(TypeError, match="master_weights=True"):
        opt = ft.Adam(m16.parameters())
        m16(torch.randn(2, 16, dtype=torch.bfloat16)).sum().backward()
        opt.step()
    with pytest.raises(TypeError, match="float32"):
        opt = ft.Adam(m32.parameters(), master_weights=True)
        m32(torch.randn(2, 16)).sum().backward()
        opt.step()
    mixed = [torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16)),
             torch.nn.Parameter(torch.ones(3, dtype=torch.float16))]
    opt = ft.Adam(mixed, master_weights=True)
    for p in mixed:
        p.grad = torch.ones_like(p)
    with pytest.raises(TypeError, match="one dtype"):
        opt.step()
    assert all(torch.equal(p, torch.ones_like(p)) for p in mixed)
    # torch itself refuses a gradient of another dtype than its parameter.


def test_numpy_float16_master_weights_and_compact_state():
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal(1000).astype(np.float32)
    grads = [rng.standard_normal(1000).astype(np.float32) for _ in range(20)]
    ref = fusedopt.Adam(learning_rate=0.01)
    w = w0.copy()
    for g in grads:
        ref.update(w, g)
    for fmt in ["f32", "bf16", "q8"]:
        opt = fusedopt.Adam(learning_rate=0.01, state_format=fmt, master_weights=True)
        assert opt.state_format == fmt and opt.master_weights
        wh = w0.astype(np.float16)
        for g in grads:
            opt.update(wh, g.astype(np.float16))
        assert wh.dtype == np.float16
        # float16 gradients are not the float32 ones; the weights follow within their rounding.
        assert np.max(np.abs(wh.astype(np.float32) - w)) < 0.02, fmt
        assert opt.state_bytes > 0
    # float16 gradients for float32 weights step as their float32 values.
    a, b = fusedopt.Adam(state_format="q8"), fusedopt.Adam(state_format="q8")
    wa, wb = w0.copy(), w0.copy()
    for g in grads[:3]:
        a.update(wa, g.astype(np.float16))
        b.update(wb, g.astype(np.float16).astype(np.float32))
    assert np.array_equal(wa, wb)
    with pytest.raises(TypeError, match="master_weights=True"):
        fusedopt.Adam().update(w0.astype(np.float16), grads[0])
    with pytest.raises(TypeError, match="float16 weights"):
        fusedopt.Adam(master_weights=True).update(w0.copy(), grads[0])
    with pytest.raises(ValueError, match="state_format"):
        fusedopt.SGD(state_format="fp8")


def test_engine_compact_state_access():
    e = fusedopt._engine.Engine("adam")
    e.set_settings(state_format="q8")
    w, g = np.ones(300, np.float32), np.full(300, 0.5, np.float32)
    e.step_arrays([w], [g], [("w", "g")])
    m = e.read_state("m", 0)
    assert m.dtype == np.float32 and np.allclose(m, 0.05, rtol=0.02)
    with pytest.raises(ValueError, match="read_state"):
        e.state_array("m", 0)
    e.write_state("m", 0, np.zeros(300, np.float32))
    assert not e.read_state("m", 0).any()
    with pytest.raises(ValueError):
        e.write_state("m", 0, np.zeros(5, np.float32))
    with pytest.raises(ValueError, match="no state buffer"):
        e.read_state("v_max", 0)
