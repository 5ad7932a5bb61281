"""Numerics: singular / ill-conditioned H, rank 1, ratios at the largest attainable, float16 and
bfloat16 models. Nothing the pipeline outputs is ever NaN or Inf."""

from __future__ import annotations

import math

import pytest
import torch

from amrc_exp.compress import AMRCConfig, CalibStats, DecompConfig, ScheduleConfig, ZConfig, ZFitConfig, find_layers
from amrc_exp.compress.compensate import compensate_layers
from amrc_exp.compress.plan import allocate_ranks, decompose_layers, layer_specs, layer_weights
from amrc_exp.compress.calibrate import NonFiniteActivationError, collect_stats
from amrc_exp.errors import ConfigError
from amrc_exp.compress.lowrank import LayerPlan, LowRankLinear, compress_
from amrc_exp.math.allocate import LayerSpec, allocate_greedy, allocate_uniform, max_removable
from amrc_exp.math.compensate import Z_TYPES, fit_closed_form, fit_gd, residual, residual_error, z_dense
from amrc_exp.math.decompose import asvd_mean_spectrum, asvd_whiten_spectrum, svd_spectrum
from tests.conftest import compose_cfg
from tests.test_bad_input import RANDOM, TINY, all_finite, tiny_model

N_IN, N_OUT = 24, 16


def _h(kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100, N_IN, generator=g, dtype=torch.float64)
    if kind == "zero":  # every sample skipped (zero output energy)
        return torch.zeros(N_IN, N_IN, dtype=torch.float64)
    if kind == "rank1":
        a = torch.randn(N_IN, 1, generator=g, dtype=torch.float64)
        return a @ a.T
    if kind == "dead_channel":  # an all-zero input channel: a zero row and column
        x[:, 3] = 0
    if kind == "rank_deficient":  # fewer distinct directions than channels
        x[:, 5:] = 0
    if kind == "cond_1e16":
        q, _ = torch.linalg.qr(torch.randn(N_IN, N_IN, generator=g, dtype=torch.float64))
        return q @ torch.diag(torch.logspace(0, -16, N_IN, dtype=torch.float64)) @ q.T
    if kind == "asymmetric_rounding":
        return x.T @ x + 1e-3 * torch.randn(N_IN, N_IN, generator=g, dtype=torch.float64)
    if kind == "tiny_scale":
        return x.T @ x * 1e-150
    return x.T @ x


H_KINDS = ["zero", "rank1", "dead_channel", "rank_deficient", "cond_1e16", "asymmetric_rounding", "tiny_scale"]


def _finite(*tensors: torch.Tensor) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


@pytest.mark.parametrize("damp", [1e-4, 0.0])
@pytest.mark.parametrize("kind", H_KINDS)
def test_singular_and_ill_conditioned_h_stay_finite(kind, damp):
    W = torch.randn(N_IN, N_OUT, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    H = _h(kind)
    for spectrum in (asvd_whiten_spectrum(W, H, damp), svd_spectrum(W)):
        curve = spectrum.energy_curve()
        assert _finite(spectrum.sigma, spectrum.left, spectrum.right, curve)
        assert bool((curve >= 0).all() and (curve <= 1 + 1e-12).all() and (curve[1:] <= curve[:-1] + 1e-12).all())
        for r in (1, 6):
            u, v = spectrum.factors(r, torch.float64)
            R = residual(W, u, v)
            for ztype in Z_TYPES:
                zc = z_dense(ztype, fit_closed_form(ztype, R, H, fraction=0.1, damp=damp))
                zg = z_dense(ztype, fit_gd(ztype, R, H, 1.0, fraction=0.1, iters=15, damp=damp)[0])
                assert _finite(zc, zg), (ztype, r)
                assert _finite(residual_error(W, u, v, zc[0], H, 1.0), residual_error(W, u, v, zg[0], H, 1.0))


@pytest.mark.parametrize("x_kind", ["rank1", "zero", "wide_dynamic_range"])
def test_asvd_mean_on_degenerate_x_rep_stays_finite(x_kind):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(N_IN, N_OUT, generator=g, dtype=torch.float64)
    if x_kind == "rank1":
        x = torch.randn(50, 1, generator=g, dtype=torch.float64) @ torch.randn(1, N_IN, generator=g, dtype=torch.float64)
    elif x_kind == "zero":
        x = torch.zeros(50, N_IN, dtype=torch.float64)
    else:
        q1, _ = torch.linalg.qr(torch.randn(50, N_IN, generator=g, dtype=torch.float64))
        q2, _ = torch.linalg.qr(torch.randn(N_IN, N_IN, generator=g, dtype=torch.float64))
        x = q1 @ torch.diag(torch.logspace(2, -6, N_IN, dtype=torch.float64)) @ q2
    spectrum = asvd_mean_spectrum(W, x)
    assert _finite(spectrum.sigma, spectrum.left, spectrum.right, spectrum.energy_curve())
    for r in (1, N_OUT):
        assert _finite(*spectrum.factors(r, torch.float64))


def test_rank_one_everywhere_at_the_largest_removable_budget():
    specs = [LayerSpec(f"l{i}", n_in, n_out, z) for i, (n_in, n_out, z) in
             enumerate([(32, 96, 0), (32, 32, 0), (32, 128, 30), (128, 32, 30), (2, 2, 0)])]
    most = max_removable(specs, 1)
    curves = [torch.linspace(1, 0, min(s.n_in, s.n_out) + 1, dtype=torch.float64) for s in specs]
    for ranks in (allocate_greedy(curves, specs, most, "exp", 50, 80.0, 1), allocate_uniform(specs, most, 1)):
        assert ranks == [1, 1, 1, 1, None]  # 2x2 can never shrink below dense
    with pytest.raises(ValueError, match="at most"):
        allocate_greedy(curves, specs, most + 1, "exp", 50, 80.0, 1)
    u, v = svd_spectrum(torch.randn(32, 96, dtype=torch.float64)).factors(1)
    layer = LowRankLinear.from_plan(LayerPlan.from_factors("l0", u, v))
    assert layer.rank == 1 and _finite(layer(torch.randn(4, 7, 32)))


def _largest_ratio(cfg) -> float:
    from amrc_exp.compress.lowrank import count_params
    from amrc_exp.experiment.inputs import load_model

    model, _ = load_model(cfg)
    n0 = count_params(model)
    most = max_removable(layer_specs(find_layers(model), cfg.z_type), cfg.schedule.min_rank)
    return math.floor(most / n0 * 1e4) / 1e4


@pytest.mark.parametrize("extra", [["decomp=asvd_mean"], ["decomp=asvd_whiten", "zfit.solver=closed_form",
                                                          "z_type=diagonal", "schedule=uniform"]])
def test_run_at_the_largest_attainable_ratio_is_finite_and_just_above_fails_early(tmp_path, extra, one_thread):
    from amrc_exp.experiment.run import run

    base = TINY + [RANDOM, f"cache_dir={tmp_path / 'cache'}", *extra]
    top = _largest_ratio(compose_cfg(base + [f"out_dir={tmp_path}"]))
    res = run(compose_cfg(base + [f"out_dir={tmp_path / 'top'}", f"ratio={top}"]))
    assert res["status"] == "complete" and all_finite(res)
    ranks = [r["rank"] for r in res["layers"]]
    assert all(r is not None for r in ranks) and min(ranks) == 1  # rank 1 where the budget bites
    assert res["ratio_achieved"] >= top - 1e-4
    with pytest.raises(ConfigError, match=r"ratio=.*a number <= "):
        run(compose_cfg(base + [f"out_dir={tmp_path / 'over'}", f"ratio={round(top + 0.002, 4)}"]))
    assert not (tmp_path / "over" / "results.json").exists()


def _pipeline_cfg(decomp: str, ztype: str, solver: str) -> AMRCConfig:
    return AMRCConfig(decomp=DecompConfig(decomp), z_type=ZConfig(ztype),
                      zfit=ZFitConfig(solver=solver, iters=10, batch_size=0), schedule=ScheduleConfig(iters=50))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_low_precision_model_through_the_pipeline_never_nan(dtype, one_thread):
    """Calibrate, decompose, allocate (rank 1 at the largest budget, and ratio 0.5), compensate
    and swap in LowRankLinear on a model cast to `dtype`; every output and report stays finite."""
    x = torch.randn(48, 1, 28, 28, generator=torch.Generator().manual_seed(0)).to(dtype)
    combos = [("asvd_mean", "lowrank", "gd"), ("asvd_whiten", "sparse_unstructured", "closed_form"),
              ("svd", "sparse_structured", "gd"), ("asvd_whiten", "diagonal", "gd"), ("asvd_mean", "none", "closed_form")]
    for (decomp, ztype, solver), share in zip(combos, (1.0, 0.5, 1.0, 0.5, 1.0)):
        model = tiny_model().to(dtype)
        layers = find_layers(model)
        stats = CalibStats(collect_stats(model, [x[:32]], layers, 32), collect_stats(model, [x[32:]], layers, 16))
        cfg = _pipeline_cfg(decomp, ztype, solver)
        weights = layer_weights(layers)
        spectra = decompose_layers(weights, stats.calib, cfg.decomp)
        specs = layer_specs(layers, cfg.z_type)
        ranks = allocate_ranks(spectra, specs, int(share * max_removable(specs, 1)), cfg.schedule)
        plans, rows = compensate_layers(weights, layers, spectra, ranks, stats, cfg)
        compress_(model, plans)
        assert all(m.down.dtype == dtype for m in model.modules() if isinstance(m, LowRankLinear))
        with torch.no_grad():
            y = model(x)
        assert y.dtype == dtype and _finite(y), (decomp, ztype, solver)
        assert all_finite([r.to_dict() for r in rows]) and all_finite([s.energy_curve().tolist() for s in spectra.values()])
        if share == 1.0:
            assert set(ranks.values()) == {1}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("ztype", list(Z_TYPES))
def test_low_precision_lowrank_linear_with_ill_conditioned_factors(dtype, ztype):
    """asvd_mean's pinv(X_rep) can make U large and V small: the low-precision layer stays finite."""
    g = torch.Generator().manual_seed(0)
    q1, _ = torch.linalg.qr(torch.randn(50, 50, generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(64, 64, generator=g, dtype=torch.float64))
    x = q1 @ torch.diag(30 * torch.logspace(0, -5.6, 50, dtype=torch.float64)) @ q2[:50]
    W = 0.02 * torch.randn(64, 64, generator=g, dtype=torch.float64)
    W += 100 * torch.outer(q2[49], torch.randn(64, generator=g, dtype=torch.float64))  # energy where X_rep is tiny
    u, v = asvd_mean_spectrum(W, x).factors(50, torch.float64)
    H = x.T @ x
    z = fit_closed_form(ztype, residual(W, u, v), H, fraction=0.05)
    layer = LowRankLinear.from_plan(LayerPlan.from_factors("l", u.float(), v.float(), z.layer(0)), dtype=dtype)
    with torch.no_grad():
        assert _finite(layer(x.to(dtype)))


def test_float16_overflow_in_activations_is_named_not_propagated():
    model = tiny_model().to(torch.float16)
    with torch.no_grad():
        model.blocks[0].norm2.bias.fill_(100.0)  # finite fp16 weights: 32 * 30 * 100 > 65504
        model.blocks[0].mlp.fc1.weight.fill_(30.0)
    x = torch.randn(4, 1, 28, 28).to(torch.float16)
    with pytest.raises(NonFiniteActivationError, match=r"output of layer 'blocks\.0\.mlp\.fc1'"):
        collect_stats(model, [x], find_layers(model), 4)
