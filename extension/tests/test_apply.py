"""Functional application on real torch modules."""

import pytest
import torch
import torch.nn.functional as F

from spm_ft.apply import MembraneHooks
from spm_ft.membranes import PlanEntry, build_plan, lora_scale

torch.manual_seed(0)
TOL = dict(atol=1e-5, rtol=1e-5)


def make_factors(layer, rank, alpha):
    if isinstance(layer, torch.nn.Conv2d):
        k = layer.kernel_size
        down = torch.randn(rank, layer.in_channels, *k) * 0.3
        up = torch.randn(layer.out_channels, rank, 1, 1) * 0.3
    else:
        down = torch.randn(rank, layer.in_features) * 0.3
        up = torch.randn(layer.out_features, rank) * 0.3
    return down, up, alpha


def merged(layer, down, up, alpha, strength):
    """A static LoRA of strength s merged into a copy of the layer (the reference)."""
    import copy

    m = copy.deepcopy(layer)
    m._forward_hooks.clear()  # the copy must not carry the hooks under test
    scale = lora_scale(down, alpha)
    with torch.no_grad():
        if isinstance(m, torch.nn.Conv2d):
            if down.shape[2:] == (1, 1):
                dw = (up.flatten(1) @ down.flatten(1)).reshape(m.weight.shape)
            else:
                dw = torch.einsum("or,rikl->oikl", up.flatten(1), down)
        else:
            dw = up @ down
        m.weight += strength * scale * dw
    return m


LAYERS = [
    ("linear", lambda: torch.nn.Linear(8, 6), lambda n: torch.randn(n, 5, 8)),
    ("conv1x1", lambda: torch.nn.Conv2d(8, 6, 1), lambda n: torch.randn(n, 8, 4, 4)),
    ("conv3x3s2", lambda: torch.nn.Conv2d(8, 6, 3, stride=2, padding=1), lambda n: torch.randn(n, 8, 6, 6)),
]


def hooked(layer, down, up, alpha, name="spm"):
    h = MembraneHooks()
    h.add(name, [PlanEntry("k", layer, down, up, lora_scale(down, alpha))])
    return h


@pytest.mark.parametrize("kind,mk,inp", LAYERS)
@pytest.mark.parametrize("rank,alpha", [(1, 1.0), (4, 1.0), (4, 2.0), (4, None)])
def test_gate_zero_is_no_membrane(kind, mk, inp, rank, alpha):
    layer = mk()
    x = inp(3)
    ref = layer(x)
    h = hooked(layer, *make_factors(layer, rank, alpha))
    h.ctx.set({"spm": [0.0, 0.0, 0.0]})
    assert torch.equal(layer(x), ref)
    h.ctx.set({"spm": 0.0})
    assert torch.equal(layer(x), ref)
    h.ctx.clear()
    assert torch.equal(layer(x), ref)
    h.remove()
    assert torch.equal(layer(x), ref)


@pytest.mark.parametrize("kind,mk,inp", LAYERS)
@pytest.mark.parametrize("rank,alpha", [(1, 1.0), (4, 1.0), (4, 2.0), (4, None)])
@pytest.mark.parametrize("g", [1.0, 0.83, 0.3])
def test_gate_g_equals_static_lora(kind, mk, inp, rank, alpha, g):
    layer = mk()
    down, up, a = make_factors(layer, rank, alpha)
    x = inp(2)
    want = merged(layer, down, up, a, g)(x)
    h = hooked(layer, down, up, a)
    h.ctx.set({"spm": g})
    torch.testing.assert_close(layer(x), want, **TOL)
    h.ctx.set({"spm": [g, g]})
    torch.testing.assert_close(layer(x), want, **TOL)
    h.remove()


@pytest.mark.parametrize("kind,mk,inp", LAYERS)
@pytest.mark.parametrize("rank,alpha", [(1, 1.0), (4, 2.0)])
def test_mixed_batch_per_row(kind, mk, inp, rank, alpha):
    layer = mk()
    down, up, a = make_factors(layer, rank, alpha)
    gates = [0.0, 1.0, 0.37, 0.9]
    x = inp(len(gates))
    h = hooked(layer, down, up, a)
    h.ctx.set({"spm": gates})
    out = layer(x)
    for i, g in enumerate(gates):
        torch.testing.assert_close(out[i:i + 1], merged(layer, down, up, a, g)(x[i:i + 1]), **TOL)
    # a call whose length does not match the gates uses the batch max for every row
    out2 = layer(x[:3])
    torch.testing.assert_close(out2, merged(layer, down, up, a, max(gates))(x[:3]), **TOL)
    h.remove()


def test_two_membranes_on_one_layer_sum():
    layer = torch.nn.Linear(8, 6)
    f1, f2 = make_factors(layer, 1, 1.0), make_factors(layer, 4, 2.0)
    x = torch.randn(2, 8)
    h = MembraneHooks()
    h.add("a", [PlanEntry("k", layer, f1[0], f1[1], lora_scale(f1[0], 1.0))])
    h.add("b", [PlanEntry("k", layer, f2[0], f2[1], lora_scale(f2[0], 2.0))])
    h.add("b", [PlanEntry("k", layer, f2[0], f2[1], lora_scale(f2[0], 2.0))])  # idempotent
    assert len(h) == 1
    h.ctx.set({"a": [0.5, 0.0], "b": [0.0, 0.25]})
    out = layer(x)
    ref0 = merged(layer, *f1, 0.5)(x[:1])
    ref1 = merged(layer, *f2, 0.25)(x[1:])
    torch.testing.assert_close(out, torch.cat([ref0, ref1]), **TOL)
    h.remove()


def test_linear_with_conv_shaped_factors_and_dtype_cast():
    # kohya stores SD1 proj_in/out as (r, in, 1, 1) even when the live layer is a Linear (SD2)
    layer = torch.nn.Linear(8, 6).to(torch.float64)
    down = torch.randn(1, 8, 1, 1)
    up = torch.randn(6, 1, 1, 1)
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    h = MembraneHooks()
    h.add("spm", [PlanEntry("k", layer, down, up, 1.0)])
    h.ctx.set({"spm": [1.0, 0.5]})
    out = layer(x)
    assert out.dtype == torch.float64
    d = F.linear(F.linear(x, down.flatten(1).double()), up.flatten(1).double())
    torch.testing.assert_close(out, layer.weight.new_tensor(0) + F.linear(x, layer.weight, layer.bias)
                               + d * torch.tensor([1.0, 0.5], dtype=torch.float64).view(2, 1, 1))
    h.remove()


def test_plan_from_fixture_on_a_tiny_unet():
    import os
    from conftest import FIXTURES
    from spm_ft.membranes import load_factors

    f = load_factors(os.path.join(FIXTURES, "spm.safetensors"))
    names = [k for k in f if k.endswith("proj_in") or k.endswith("proj_out")][:4]
    mods = {k: torch.nn.Conv2d(8, 8, 1) for k in names}
    plan, missing = build_plan(f, mods.get)
    assert len(plan) == 4
    h = MembraneHooks()
    h.add("spm", plan)
    x = torch.randn(2, 8, 3, 3)
    for k, m in mods.items():
        d, u, a = f[k]
        h.ctx.set({"spm": [0.0, 0.6]})
        out = m(x)
        torch.testing.assert_close(out[:1], F.conv2d(x[:1], m.weight, m.bias), **TOL)
        torch.testing.assert_close(out[1:], merged(m, d, u, a, 0.6)(x[1:]), **TOL)
    h.remove()
    assert len(h) == 0


@pytest.mark.parametrize("device,dtype", [("cpu", torch.bfloat16)] + (
    [("cuda", torch.float16)] if torch.cuda.is_available() else []))
def test_factors_cast_to_layer_device_and_dtype(device, dtype):
    layer = torch.nn.Conv2d(8, 6, 1).to(device=device, dtype=dtype)
    down, up, a = make_factors(torch.nn.Conv2d(8, 6, 1), 1, 1.0)  # fp32 on the CPU, as loaded
    x = torch.randn(2, 8, 4, 4, device=device, dtype=dtype)
    h = hooked(layer, down, up, a)
    h.ctx.set({"spm": [0.0, 1.0]})
    out = layer(x)
    assert out.dtype == dtype and out.device.type == device
    plain = F.conv2d(x, layer.weight, layer.bias)
    assert torch.equal(out[:1], plain[:1])
    ref = F.conv2d(x[1:].float(), layer.weight.float() + (up.flatten(1) @ down.flatten(1)).reshape(6, 8, 1, 1).to(device),
                   layer.bias.float())
    torch.testing.assert_close(out[1:].float(), ref, atol=5e-2, rtol=5e-2)
    h.remove()
