"""DeiT-B parameter and size accounting against the paper's Table 2 (params) and Table 4 (MiB).

Params and MiB do not depend on the weights' values, so DeiT-B is built with random init and
no data: per-layer energy curves are synthetic (a power-law spectrum per layer, different
per layer so the allocation is genuinely mixed), the factors random. What is checked is the
whole chain the real run uses: find_layers → LayerSpec with the 5% low-rank Z (Sec 4.1 item 2)
→ Algorithm 1 on the WHOLE model's budget → compress_ → count_params / model_size_mib.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch

from amrc_exp.compress.calibrate import find_layers
from amrc_exp.compress.lowrank import LayerPlan, LowRankLinear, compress_, count_params
from amrc_exp.math.allocate import LayerSpec, allocate_greedy
from amrc_exp.math.compensate import Z_TYPES, ZParams, z_param_count
from amrc_exp.compress.ptq import model_size_mib, quantize_

DEIT_B_PARAMS = 86_567_656  # timm deit_base_patch16_224, 1000 classes


@pytest.fixture(scope="module")
def deit_b():
    torch.manual_seed(0)
    model = timm.create_model("deit_base_patch16_224", pretrained=False).eval()
    layers = find_layers(model)
    specs = [LayerSpec(n, l.in_features, l.out_features, z_param_count("lowrank", l.in_features, l.out_features, 0.05))
             for n, l in layers.items()]
    curves = []
    for i, s in enumerate(specs):  # σ_j ∝ j^-α, α varying with layer type and depth
        alpha = 0.3 + 0.05 * (i % 4) + 0.02 * (i // 4)
        e = torch.arange(1, min(s.n_in, s.n_out) + 1, dtype=torch.float64) ** (-2 * alpha)
        tail = torch.cat([e.flip(0).cumsum(0).flip(0), e.new_zeros(1)])
        curves.append(tail / tail[0])
    return model, specs, curves


def compressed(deit_b, ratio: float, random_factors: bool = False):
    model, specs, curves = deit_b
    n_total = count_params(model)
    ranks = allocate_greedy(curves, specs, round(ratio * n_total), "exp", iters=500, gamma=80.0)
    make = torch.randn if random_factors else torch.zeros
    plans, removed = {}, 0
    for s, r in zip(specs, ranks):
        if r is None:  # above break-even: stays dense
            continue
        q = Z_TYPES["lowrank"].size(s.n_in, s.n_out, 0.05)
        z = ZParams("lowrank", s.n_in, s.n_out, {"G": make(s.n_in, q), "Y": make(s.n_out, q)})
        plans[s.name] = LayerPlan.from_factors(s.name, make(s.n_in, r), make(s.n_out, r), z)
        removed += s.dense_params - s.params_at(r)
    out = compress_(copy.deepcopy(model), plans)
    return out, plans, removed, n_total


def test_deit_b_dense_reference(deit_b):
    model, specs, _ = deit_b
    assert count_params(model) == DEIT_B_PARAMS
    assert len(specs) == 48  # 12 blocks × (qkv, proj, fc1, fc2)
    assert model_size_mib(model) == pytest.approx(165.2, abs=0.2)  # Table 4, DeiT-B FP16


@pytest.mark.parametrize("ratio, paper_m", [(0.4, 52.0), (0.5, 43.3), (0.6, 34.6)])
def test_table2_params(deit_b, ratio, paper_m):
    model, plans, removed, n_total = compressed(deit_b, ratio)
    n = count_params(model)
    assert n == n_total - removed  # the module tree holds exactly what the allocation promised
    assert removed >= round(ratio * n_total)  # budget met …
    assert removed - round(ratio * n_total) < 768 + 3072 + max(  # … overshooting less than one rank step
        s.dense_params - s.params_at(s.break_even_rank) for s in deit_b[1])
    assert sum(isinstance(m, LowRankLinear) for m in model.modules()) == len(plans)
    assert n / 1e6 == pytest.approx(paper_m, abs=0.2)  # Table 2 params column


def test_table4_sizes(deit_b):
    dense = deit_b[0]
    assert model_size_mib(dense, bits=4) == pytest.approx(42.2, abs=1.5)  # DeiT-B 4-bit baseline
    model, _, _, _ = compressed(deit_b, 0.5, random_factors=True)
    quantize_(model, 8)
    assert model_size_mib(model, bits=8) == pytest.approx(41.7, abs=1.5)  # ours, 50% + 8-bit
