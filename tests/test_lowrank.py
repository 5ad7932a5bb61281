"""LowRankLinear / compress_ against dense references built independently in float64."""

from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from amrc_exp.compress.calibrate import find_layers
from amrc_exp.compress.lowrank import FUSE_MIN_ROWS, LayerPlan, LowRankLinear, compress_, count_params
from amrc_exp.math.allocate import LayerSpec
from amrc_exp.math.compensate import ZParams, fit_closed_form, z_dense, z_param_count

Z_KINDS = ["none", "lowrank", "diagonal", "sparse_structured", "sparse_unstructured"]


def random_plan(name: str, n_in: int, n_out: int, r: int, z_type: str, gen: torch.Generator,
                fraction: float = 0.05, bias: bool = True, scale: float = 1.0,
                dtype: torch.dtype = torch.float64) -> tuple[LayerPlan, torch.Tensor]:
    """A plan with random factors and the dense paper-layout Z it stands for (built by hand)."""
    f64 = {"dtype": dtype, "generator": gen}

    def randn(*shape):
        return scale * torch.randn(*shape, **f64)

    U, V = randn(n_in, r), randn(n_out, r)
    Z = torch.zeros(n_in, n_out, dtype=dtype)
    kw: dict = {}
    if z_type == "lowrank":
        q = max(1, math.floor(fraction * n_in * n_out / (n_in + n_out)))
        kw["G"], kw["Y"] = randn(n_in, q), randn(n_out, q)
        Z = kw["G"] @ kw["Y"].T
    elif z_type == "diagonal":
        m = min(n_in, n_out)
        kw["d"] = randn(m)
        for j in range(m):
            Z[j, j] = kw["d"][j]
    elif z_type == "sparse_structured":
        k = max(1, math.floor(fraction * n_in))
        rows = torch.randperm(n_in, generator=gen)[:k]
        kw["rows"], kw["values"] = rows, randn(k, n_out)
        for a, row in enumerate(rows.tolist()):
            Z[row] = kw["values"][a]
    elif z_type == "sparse_unstructured":
        k = math.floor(fraction * n_in * n_out)
        flat = torch.randperm(n_in * n_out, generator=gen)[:k]  # unsorted on purpose
        kw["index"], kw["values"] = flat, randn(k)
        for pos, val in zip(flat.tolist(), kw["values"].tolist()):
            Z[pos // n_out, pos % n_out] = val
    b = randn(n_out) if bias else None
    z = ZParams(z_type, n_in, n_out, kw) if z_type != "none" else None
    return LayerPlan.from_factors(name, U, V, z, bias=b), Z


@pytest.mark.parametrize("z_type", Z_KINDS)
@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_forward_equals_dense(z_type, shape):
    n_in, n_out = shape
    gen = torch.Generator().manual_seed(Z_KINDS.index(z_type) * 10 + n_in)
    plan, Z = random_plan("l", n_in, n_out, 5, z_type, gen)
    layer = LowRankLinear.from_plan(plan, dtype=torch.float64)
    x = torch.randn(3, 7, n_in, dtype=torch.float64, generator=gen)
    expected = x @ (plan.down.T @ plan.up.T + Z) + plan.bias  # O = X (U Vᵀ + Z) + b, Eq 1-2
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer.dense_weight(), plan.up @ plan.down + Z.T)
    # float32 too (the dtype a model really runs in)
    layer32 = LowRankLinear.from_plan(plan, dtype=torch.float32)
    torch.testing.assert_close(layer32(x.float()), expected.float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("z_type", Z_KINDS)
def test_param_count_formula(z_type):
    n_in, n_out, r = 48, 80, 6
    plan, _ = random_plan("l", n_in, n_out, r, z_type, torch.Generator().manual_seed(0))
    layer = LowRankLinear.from_plan(plan)
    f = 0.05
    z = {  # hand formulas, index storage counted (CSR for unstructured: cols + row pointers)
        "none": 0,
        "lowrank": math.floor(f * n_in * n_out / (n_in + n_out)) * (n_in + n_out),
        "diagonal": min(n_in, n_out),
        "sparse_structured": math.floor(f * n_in) * (n_out + 1),
        "sparse_unstructured": 2 * math.floor(f * n_in * n_out) + n_in + 1,
    }[z_type]
    assert layer.param_count() == r * (n_in + n_out) + z + n_out
    assert z == z_param_count(z_type, n_in, n_out, f)
    assert f"rank={r}" in repr(layer)


@pytest.mark.parametrize("z_type", Z_KINDS)
def test_plan_from_compensate_output(z_type):
    """A plan holds math.compensate's ZParams as fitted; the layer reproduces its dense Z."""
    gen = torch.Generator().manual_seed(3)
    n_in, n_out = 20, 12
    R = torch.randn(n_in, n_out, dtype=torch.float64, generator=gen)
    X = torch.randn(50, n_in, dtype=torch.float64, generator=gen)
    zp = fit_closed_form(z_type, R, X.T @ X, dtype=torch.float64)
    U, V = torch.zeros(n_in, 1, dtype=torch.float64), torch.zeros(n_out, 1, dtype=torch.float64)
    layer = LowRankLinear.from_plan(LayerPlan.from_factors("l", U, V, zp.layer(0)))
    torch.testing.assert_close(layer.dense_z().T, z_dense(z_type, zp)[0])
    assert layer.param_count() - 1 * (n_in + n_out) == z_param_count(z_type, n_in, n_out)


def tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                             embed_dim=32, depth=2, num_heads=2, num_classes=10).eval()


def test_compress_swaps_planned_layers_and_accounts():
    model = tiny_vit()
    reference = copy.deepcopy(model)
    n0 = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(1)
    chosen = {"blocks.0.attn.qkv": ("lowrank", 4), "blocks.0.mlp.fc1": ("diagonal", 6),
              "blocks.1.attn.proj": ("none", 3), "blocks.1.mlp.fc1": ("sparse_unstructured", 5),
              "blocks.1.mlp.fc2": ("sparse_structured", 7)}
    layers = find_layers(model)
    plans, removed = {}, 0
    for name, (zt, r) in chosen.items():
        lin = layers[name]
        plan, Z = random_plan(name, lin.in_features, lin.out_features, r, zt, gen, bias=False,
                              scale=0.1, dtype=torch.float32)
        plans[name] = plan
        with torch.no_grad():  # the dense stand-in: Linear.weight = (U Vᵀ + Z)ᵀ
            reference.get_submodule(name).weight.copy_(plan.up @ plan.down + Z.T)
        spec = LayerSpec(name, lin.in_features, lin.out_features, z_param_count(zt, lin.in_features, lin.out_features))
        removed += spec.dense_params - spec.params_at(r)

    out = compress_(model, plans)
    assert out is model
    swapped = [n for n, m in model.named_modules() if isinstance(m, LowRankLinear)]
    assert swapped == list(chosen)
    still_dense = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    assert set(still_dense) == {"blocks.0.attn.proj", "blocks.0.mlp.fc2", "blocks.1.attn.qkv", "head"}
    for name in chosen:  # bias kept from the replaced layer (the plan had none)
        torch.testing.assert_close(model.get_submodule(name).bias, reference.get_submodule(name).bias)
    assert count_params(model) == n0 - removed
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-4, atol=1e-5)


def test_compress_preserves_dtype_and_rejects_unknown():
    model = tiny_vit().double()
    plan, _ = random_plan("blocks.0.mlp.fc2", 128, 32, 4, "lowrank", torch.Generator().manual_seed(2))
    compress_(model, [plan])
    new = model.get_submodule("blocks.0.mlp.fc2")
    assert isinstance(new, LowRankLinear) and new.down.dtype == torch.float64 and new.z.up.dtype == torch.float64
    with pytest.raises(KeyError):
        compress_(model, [LayerPlan("blocks.9.mlp.fc2", plan.down, plan.up)])
    with pytest.raises(ValueError):
        compress_(model, [LayerPlan("blocks.1.mlp.fc1", plan.down, plan.up)])  # 128→32 plan on a 32→128 layer


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("z_type", Z_KINDS)
def test_cuda_forward_matches_cpu(z_type):
    plan, Z = random_plan("l", 40, 24, 5, z_type, torch.Generator().manual_seed(5), dtype=torch.float32)
    layer = LowRankLinear.from_plan(plan)
    x = torch.randn(2, 9, 40)
    ref = layer(x)
    torch.testing.assert_close(layer.cuda()(x.cuda()).cpu(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("rows", [FUSE_MIN_ROWS, FUSE_MIN_ROWS + 13, 5])  # fused path, and the few-rows path
def test_lowrank_forward_matches_unfused_reference(train, rows):
    """x·[U | G] then ·[V | Y]ᵀ + b equals the two separate low-rank paths, values and gradients."""
    gen = torch.Generator().manual_seed(rows + train)
    plan, _ = random_plan("l", 24, 40, 5, "lowrank", gen)
    layer = LowRankLinear.from_plan(plan, dtype=torch.float64).train(train)
    x = torch.randn(rows, 24, dtype=torch.float64, generator=gen)
    names = ("down", "up", "z.down", "z.up", "bias")
    ref_params = {n: layer.get_parameter(n).detach().clone().requires_grad_(True) for n in names}

    def reference(p):  # written out here, independent of LowRankLinear.forward
        return F.linear(F.linear(x, p["down"]), p["up"], p["bias"]) + F.linear(F.linear(x, p["z.down"]), p["z.up"])

    y, expected = layer(x), reference(ref_params)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    upstream = torch.randn(rows, 40, dtype=torch.float64, generator=gen)
    (y * upstream).sum().backward()
    (expected * upstream).sum().backward()
    for n in names:
        grad = layer.get_parameter(n).grad
        assert grad is not None and grad.abs().sum() > 0, n
        torch.testing.assert_close(grad, ref_params[n].grad, rtol=1e-12, atol=1e-12)
    assert set(layer.state_dict()) == {"down", "up", "z.down", "z.up", "bias"}  # no fused copy stored


def test_lowrank_fused_sees_in_place_updates():
    """No stale copy: an optimizer step or a load_state_dict shows in the next forward."""
    gen = torch.Generator().manual_seed(3)
    plan, _ = random_plan("l", 24, 40, 5, "lowrank", gen)
    layer = LowRankLinear.from_plan(plan, dtype=torch.float64).eval()
    x = torch.randn(2, FUSE_MIN_ROWS, 24, dtype=torch.float64, generator=gen)
    with torch.no_grad():
        before = layer(x)
        layer.z.up.add_(1.0)
        torch.testing.assert_close(layer(x) - before, F.linear(F.linear(x, layer.z.down), torch.ones_like(layer.z.up)))
        layer.load_state_dict({k: v * 0 for k, v in layer.state_dict().items()})
        assert layer(x).abs().max() == 0


def test_every_math_z_type_has_one_module():
    """A Z type is a math class (fit, counts) plus one module (forward, storage): the two
    registries name the same types, and each module's size and parameter count agree with
    the math layer's for a fitted Z."""
    from amrc_exp.compress.zmodules import Z_MODULES
    from amrc_exp.math.compensate import Z_TYPES as MATH_Z_TYPES

    assert set(Z_MODULES) | {"none"} == set(MATH_Z_TYPES)
    gen = torch.Generator().manual_seed(4)
    R = torch.randn(30, 18, dtype=torch.float64, generator=gen)
    X = torch.randn(40, 30, dtype=torch.float64, generator=gen)
    for kind, module in Z_MODULES.items():
        zp = fit_closed_form(kind, R, X.T @ X, dtype=torch.float64)
        z = module(30, 18, module.size_of(zp), dtype=torch.float64)
        z.load(zp)
        assert sum(p.numel() for p in z.parameters()) + sum(b.numel() for _, b, _ in z.index_buffers()) == zp.param_count
        torch.testing.assert_close(z.dense().T, z_dense(kind, zp)[0])
        torch.testing.assert_close(z(X), X @ z_dense(kind, zp)[0])


def test_sparse_unstructured_index_cache_follows_every_change():
    """The COO indices are built once, not per forward; values updated in place (fine-tuning)
    and a load_state_dict with other indices (a reload) must both show in the next forward."""
    gen = torch.Generator().manual_seed(7)
    plan, Z = random_plan("l", 20, 12, 3, "sparse_unstructured", gen)
    layer = LowRankLinear.from_plan(plan, dtype=torch.float64)
    other, Z2 = random_plan("l", 20, 12, 3, "sparse_unstructured", gen)
    x = torch.randn(5, 20, dtype=torch.float64, generator=gen)
    with torch.no_grad():
        base = F.linear(F.linear(x, layer.down), layer.up, layer.bias)
        torch.testing.assert_close(layer(x) - base, x @ Z)
        first = layer.z._coo()[0]
        assert layer.z._coo()[0] is first  # cached
        layer.z.values.mul_(2)
        torch.testing.assert_close(layer(x) - base, x @ (2 * Z))
        layer.load_state_dict(LowRankLinear.from_plan(other, dtype=torch.float64).state_dict())
        base = F.linear(F.linear(x, layer.down), layer.up, layer.bias)
        torch.testing.assert_close(layer(x) - base, x @ Z2)
