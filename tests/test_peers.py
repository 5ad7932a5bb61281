"""The peer baselines (SVD-LLM, SVD-LLM V2, ASVD, FWSVD) and our output-aware allocation, each against an
independent computation: a closed form from the raw token matrix, an eigenvalue tail, an
analytic gradient, a brute-force search."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from amrc_exp.compress.calibrate import collect_stats
from amrc_exp.compress.probe import Probe, allocation_kl, fisher_rows, layer_sensitivity
from amrc_exp.math.allocate import (LayerSpec, allocate_by_cost, allocate_truncation_loss, allocate_uniform,
                                    asvd_search, candidate_ranks, sensitivity_curve, total_params)
from amrc_exp.math.compensate import fit_closed_form, z_dense
from amrc_exp.math.decompose import (asvd_scaled_spectrum, asvd_whiten_spectrum, decompose, fwsvd_spectrum,
                                     svdllm_spectrum, svdllm_v2_spectrum, whiten_fisher_spectrum)



@pytest.fixture(autouse=True)
def _float64():
    """float64 throughout this module (exact comparisons), restored for the other tests."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _tail(m: torch.Tensor, r: int) -> float:
    """Sum of the squared singular values of m beyond the r largest, from eigvalsh of m^T m."""
    ev = torch.linalg.eigvalsh(m.T @ m).flip(0).clamp_min(0)
    return float(ev[r:].sum())


def test_svdllm_is_the_rank_r_optimum_of_the_token_error():
    """SVD-LLM's W_hat_r minimises ||X (W - W_hat)||_F; independently, X^+ [X W]_r (truncated
    SVD of X W, pulled back by the pseudo-inverse of the full-column-rank X) is that optimum."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(40, 6, generator=g), torch.randn(6, 5, generator=g)
    sp = svdllm_spectrum(w, x.T @ x)
    p, s, qh = torch.linalg.svd(x @ w, full_matrices=False)
    for r in (1, 2, 4):
        ref = torch.linalg.pinv(x) @ (p[:, :r] * s[:r]) @ qh[:r]
        assert torch.allclose(sp.approx(r), ref, atol=1e-9)
        u, v = sp.factors(r, torch.float64)
        assert torch.allclose(u @ v.T, ref, atol=1e-9)


def test_svdllm_shifts_a_singular_gram_as_its_code_does():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 6, generator=g)  # 3 tokens, 6 channels: G has rank 3
    w = torch.randn(6, 4, generator=g)
    gram = x.T @ x
    sp = svdllm_spectrum(w, gram)
    shifted = gram + (1e-6 - torch.linalg.eigvalsh(gram)[0]) * torch.eye(6)
    lt = torch.linalg.cholesky(shifted).T
    ref = torch.linalg.svdvals(lt @ w)
    assert torch.isfinite(sp.left).all() and torch.allclose(sp.sigma, ref, rtol=1e-8)


def test_svdllm_v2_truncation_is_the_token_optimum_and_its_loss_the_sigma_tail():
    """SVD-LLM V2's two-SVD truncation reaches the same optimum as X^+ [X W]_r (independent: the
    truncated SVD of the token outputs), and its theoretical truncation loss
    sqrt(sum_{j>r} sigma_j^2) equals the measured ||X (W - W_hat_r)||_F (their Theorem)."""
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(50, 7, generator=g) * torch.linspace(0.01, 4, 7), torch.randn(7, 6, generator=g)
    sp = svdllm_v2_spectrum(w, x.T @ x)
    p, s, qh = torch.linalg.svd(x @ w, full_matrices=False)
    for r in (1, 3, 5):
        ref = torch.linalg.pinv(x) @ (p[:, :r] * s[:r]) @ qh[:r]
        assert torch.allclose(sp.approx(r), ref, atol=1e-8)
        measured = float(torch.linalg.matrix_norm(x @ (w - sp.approx(r))))
        assert float(sp.sigma[r:].square().sum().sqrt()) == pytest.approx(measured, rel=1e-8)


def test_truncation_loss_allocation_follows_the_v2_formula():
    """Two groups of same-shape layers with known spectra: each layer's ratio is
    |G| R (1/log L) / sum_G (1/log L) (computed here by hand), its rank floor((1 - ratio) in out /
    (in + out)); the budget is met; the layer with the larger truncation loss keeps more."""
    specs = [LayerSpec(f"blocks.{i}.{t}", 20, 30) for t in ("a", "b") for i in range(2)]
    groups = ["a", "a", "b", "b"]
    sig = [torch.full((20,), 40.0), torch.full((20,), 5.0), torch.linspace(30, 3, 20), torch.linspace(90, 9, 20)]
    dense = sum(s.dense_params for s in specs)
    to_remove = dense // 2  # R = 0.5 exactly
    ranks = allocate_truncation_loss(sig, specs, groups, to_remove, min_rank=0)
    base = 6  # floor(0.5 * 600 / 50)
    log_l = [float(torch.log(sg[base:].square().sum().sqrt())) for sg in sig]
    for group in ((0, 1), (2, 3)):
        inv = [1 / log_l[l] for l in group]
        for l, w in zip(group, inv):
            ratio = 2 * 0.5 * w / sum(inv)
            assert ranks[l] == math.floor((1 - ratio) * 600 / 50 + 1e-9)
    assert ranks[0] > ranks[1] and ranks[3] > ranks[2]  # larger loss, less compression
    assert dense - total_params(specs, ranks) >= to_remove


def test_truncation_loss_allocation_meets_a_budget_its_rounding_misses():
    """Budgets the formula's rounding alone may miss: R is raised until the budget is met, and
    the allocation overshoots it by less than one rank step per layer."""
    g = torch.Generator().manual_seed(6)
    specs = [LayerSpec(f"blocks.{i}.fc", 16, 24) for i in range(4)]
    sig = [torch.rand(16, generator=g).sort(descending=True).values * 100 + 2 for _ in specs]
    dense = sum(s.dense_params for s in specs)
    for to_remove in (101, 517, 1003):
        ranks = allocate_truncation_loss(sig, specs, ["fc"] * 4, to_remove, min_rank=0)
        removed = dense - total_params(specs, ranks)
        assert to_remove <= removed < to_remove + 4 * 40


def test_asvd_scaling_minimises_the_scaled_error():
    """||S (W - W_hat_r)||_F^2 equals the eigenvalue tail of (S W)^T (S W), S = diag(|x|^alpha)."""
    g = torch.Generator().manual_seed(2)
    w, absmean = torch.randn(7, 5, generator=g), torch.rand(7, generator=g) * 3
    for alpha in (0.5, 1.0):
        sp = asvd_scaled_spectrum(w, absmean, alpha)
        s = absmean ** alpha + 1e-6
        for r in (1, 3):
            err = float(((s[:, None] * (w - sp.approx(r))) ** 2).sum())
            assert err == pytest.approx(_tail(s[:, None] * w, r), rel=1e-9, abs=1e-12)
            assert torch.linalg.matrix_rank(sp.approx(r)) == r


def test_fwsvd_minimises_the_fisher_weighted_output_error():
    g = torch.Generator().manual_seed(3)
    w, fisher = torch.randn(6, 8, generator=g), torch.rand(8, generator=g)
    sp = fwsvd_spectrum(w, fisher)
    d = fisher.sqrt() + 1e-6 * fisher.sqrt().max()
    for r in (1, 4):
        err = float((((w - sp.approx(r)) * d[None, :]) ** 2).sum())
        assert err == pytest.approx(_tail(w * d[None, :], r), rel=1e-9)


def test_whiten_fisher_is_the_rank_r_optimum_of_the_two_sided_error():
    """||L^T (W - W_hat) D||_F^2 = tr(D E^T H E D) at the optimum is the eigenvalue tail of the
    doubly weighted matrix (independent: eigvalsh, never the code's SVD), and no other rank-r
    matrix does better: asvd_whiten's and fwsvd's optima, and random rank-r perturbations."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(60, 7, generator=g) * torch.linspace(0.2, 3, 7)
    h, w, fisher = x.T @ x / 60, torch.randn(7, 9, generator=g), torch.rand(9, generator=g) + 0.05
    d = fisher.sqrt() + 1e-6 * fisher.sqrt().max()
    sp = whiten_fisher_spectrum(w, h, fisher, damp=0.0)

    def err(w_hat: torch.Tensor) -> float:
        e = (w - w_hat) * d[None, :]
        return float(torch.trace(e.T @ h @ e))

    root = torch.linalg.cholesky(h).T  # any square root of H gives the same tail
    for r in (1, 3, 5):
        best = err(sp.approx(r))
        assert best == pytest.approx(_tail(root @ w * d[None, :], r), rel=1e-8)
        assert torch.linalg.matrix_rank(sp.approx(r)) == r
        assert best <= err(asvd_whiten_spectrum(w, h, damp=0.0).approx(r)) * (1 + 1e-12)
        assert best <= err(fwsvd_spectrum(w, fisher).approx(r)) * (1 + 1e-12)
        u, v = sp.factors(r, torch.float64)
        for _ in range(5):
            du, dv = 1e-2 * torch.randn(u.shape, generator=g), 1e-2 * torch.randn(v.shape, generator=g)
            assert err((u + du) @ (v + dv).T) > best


def test_whiten_fisher_reduces_to_each_one_sided_weighting():
    """Uniform Fisher weights give asvd_whiten's optimum; H = I gives fwsvd's (a scalar weight
    on either side does not move the optimum)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(50, 6, generator=g) * torch.linspace(0.3, 2, 6)
    h, w, fisher = x.T @ x / 50, torch.randn(6, 8, generator=g), torch.rand(8, generator=g) + 0.1
    for r in (1, 3):
        assert torch.allclose(whiten_fisher_spectrum(w, h, torch.full((8,), 2.5), damp=0.0).approx(r),
                              asvd_whiten_spectrum(w, h, damp=0.0).approx(r), atol=1e-10)
        assert torch.allclose(whiten_fisher_spectrum(w, 3.0 * torch.eye(6), fisher, damp=0.0).approx(r),
                              fwsvd_spectrum(w, fisher).approx(r), atol=1e-10)


def test_decompose_dispatches_the_peers_and_names_missing_statistics():
    w = torch.randn(4, 3)
    with pytest.raises(ValueError, match="G"):
        decompose("svdllm", w, H=torch.eye(4))
    assert decompose("asvd", w, abs_mean=torch.ones(4)).method == "asvd"
    with pytest.raises(ValueError, match="fisher"):
        decompose("whiten_fisher", w, H=torch.eye(4))


class _Tokens(nn.Module):
    """(B, T, C) images through one Linear named like a block's fc1."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Module()])
        self.blocks[0].mlp = nn.Module()
        self.blocks[0].mlp.fc1 = nn.Linear(5, 3)

    def forward(self, x):
        return self.blocks[0].mlp.fc1(x)


def test_calibration_collects_abs_mean_and_the_unnormalised_gram():
    torch.manual_seed(0)
    model = _Tokens().float()
    images = torch.randn(12, 4, 5).float()
    layers = {"blocks.0.mlp.fc1": model.blocks[0].mlp.fc1}
    stats = collect_stats(model, [images[:7], images[7:]], layers, 12, gram=True)["blocks.0.mlp.fc1"]
    x = images.double().reshape(-1, 5)
    assert torch.allclose(stats.abs_mean, x.abs().mean(0), rtol=1e-6)
    assert torch.allclose(stats.G, x.T @ x, rtol=1e-5)
    assert collect_stats(model, [images], layers, 12)["blocks.0.mlp.fc1"].G is None


def test_fisher_rows_match_the_analytic_per_image_gradient():
    """For logits = W x + b and cross-entropy, dL/dW = (softmax - onehot) x^T per image."""
    torch.manual_seed(0)
    lin = nn.Linear(6, 4).double()
    x, y = torch.randn(10, 6), torch.randint(0, 4, (10,))
    got = fisher_rows(lin, Probe(x, y), {"fc": lin})["fc"]
    err = F.softmax(lin(x), -1).detach() - F.one_hot(y, 4)
    ref = sum((err[i][:, None] * x[i][None, :]) ** 2 for i in range(10)).sum(1) / 10
    assert torch.allclose(got, ref, rtol=1e-9)


def test_layer_sensitivity_is_the_kl_of_the_truncated_model_and_restores_it():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 4)).double()
    x = torch.randn(20, 6)
    w = model[0].weight.detach().T.clone()
    spectra = {"0": asvd_whiten_spectrum(w, torch.eye(6))}
    got = layer_sensitivity(model, {"0": model[0]}, spectra, {"0": [1, 3]}, Probe(x, batch_size=7))
    dense = F.log_softmax(model(x), -1)
    for r in (1, 3):
        twin = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 4)).double()
        twin.load_state_dict(model.state_dict())
        with torch.no_grad():
            twin[0].weight.copy_((spectra["0"].approx(r)).T)
        kl = (dense.exp() * (dense - F.log_softmax(twin(x), -1))).sum(-1).mean()
        assert got["0"][r] == pytest.approx(float(kl.detach()), rel=1e-9)
    assert torch.equal(model[0].weight.detach().T, w)


def test_allocation_kl_truncates_every_layer_at_once_and_restores_them():
    """The whole-model KL of an allocation against a twin model whose layers hold the rank-r
    weights by hand; a None rank stays dense; the model's weights come back unchanged."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 4)).double()
    x = torch.randn(20, 6)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    layers = {"0": model[0], "2": model[2]}
    spectra = {n: asvd_whiten_spectrum(l.weight.detach().T.clone(), torch.eye(l.in_features)) for n, l in layers.items()}
    allocations = {"both": {"0": 1, "2": 2}, "first": {"0": 2, "2": None}}
    got = allocation_kl(model, layers, spectra, allocations, Probe(x, batch_size=7))
    dense = F.log_softmax(model(x), -1)
    for label, ranks in allocations.items():
        twin = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 4)).double()
        twin.load_state_dict(saved)
        with torch.no_grad():
            for n, r in ranks.items():
                if r is not None:
                    twin[int(n)].weight.copy_(spectra[n].approx(r).T)
        kl = (dense.exp() * (dense - F.log_softmax(twin(x), -1))).sum(-1).mean()
        assert got[label] == pytest.approx(float(kl.detach()), rel=1e-9)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())


@pytest.mark.parametrize("uniform_better", [False, True])
def test_checked_allocation_keeps_the_one_with_the_lower_whole_model_kl(uniform_better):
    """`schedule.check_uniform`: the allocation returned is output_aware's or param_uniform's
    (each computed independently here), whichever the whole-model measurement ranks lower."""
    from amrc_exp.compress.config import ScheduleConfig
    from amrc_exp.compress.plan import allocate_ranks

    specs = [LayerSpec(f"l{i}", 16, 16) for i in range(3)]
    spectra = {s.name: asvd_whiten_spectrum(torch.randn(16, 16, generator=torch.Generator().manual_seed(i)),
                                             torch.eye(16)) for i, s in enumerate(specs)}
    # one layer is far more sensitive, so output_aware's ranks differ from the uniform ones
    scale = {"l0": 100.0, "l1": 1.0, "l2": 1.0}

    def sensitivity(metric, ranks):
        return {n: {r: scale[n] * spectra[n].energy_loss(r) for r in rs} for n, rs in ranks.items()}

    seen = {}

    def whole_model_kl(options, base=None):
        seen.update(options)
        return {"output_aware": 2.0, "param_uniform": 1.0 if uniform_better else 3.0}

    to_remove = 300
    schedule = ScheduleConfig("output_aware", min_rank=0, check_uniform=True)
    got = allocate_ranks(spectra, specs, to_remove, schedule, sensitivity, whole_model_kl=whole_model_kl)
    uniform = dict(zip([s.name for s in specs], allocate_uniform(specs, to_remove, 0, kind="params")))
    unchecked = allocate_ranks(spectra, specs, to_remove, ScheduleConfig("output_aware", min_rank=0), sensitivity)
    assert seen == {"output_aware": unchecked, "param_uniform": uniform} and unchecked != uniform
    assert got == (uniform if uniform_better else unchecked)
    with pytest.raises(ValueError, match="whole_model_kl"):
        allocate_ranks(spectra, specs, to_remove, schedule, sensitivity)


def test_refined_allocation_is_the_brute_force_optimum_of_a_separable_whole_model_measure():
    """`schedule.refine_steps`: from output_aware's ranks, the search moves ranks while the whole-
    model measurement drops. With a measurement that is a sum of convex per-layer terms (here
    unrelated to the sensitivities, so output_aware's start is off), it must end on the brute-force
    optimum over every allocation meeting the budget, and the end point is measured as `refined`."""
    from amrc_exp.compress.config import ScheduleConfig
    from amrc_exp.compress.plan import REFINED, allocate_ranks

    specs = [LayerSpec(f"l{i}", 8, 8) for i in range(3)]  # break-even rank 3
    spectra = {s.name: asvd_whiten_spectrum(torch.randn(8, 8, generator=torch.Generator().manual_seed(i)),
                                             torch.eye(8)) for i, s in enumerate(specs)}
    weight = {"l0": 1.0, "l1": 5.0, "l2": 0.2}

    def sensitivity(metric, ranks):  # says l0 matters most: the measurement below disagrees
        return {n: {r: (100.0 if n == "l0" else 1.0) * spectra[n].energy_loss(r) for r in rs} for n, rs in ranks.items()}

    def truth(ranks):
        return sum(weight[n] * 2.0 ** -r for n, r in ranks.items())

    seen = {}

    def whole_model_kl(options, base=None):
        seen.update(options)
        return {label: truth(ranks) for label, ranks in options.items()}

    to_remove = 3 * 64 - 48  # 48 parameters kept: three ranks in all, no layer can stay dense (64)
    start = allocate_ranks(spectra, specs, to_remove, ScheduleConfig("output_aware", min_rank=0), sensitivity)
    got = allocate_ranks(spectra, specs, to_remove, ScheduleConfig("output_aware", min_rank=0, refine_steps=20),
                         sensitivity, whole_model_kl=whole_model_kl)
    feasible = [dict(zip(("l0", "l1", "l2"), r)) for r in itertools.product(range(4), repeat=3)
                if total_params(specs, list(r)) <= 48]
    best = min(feasible, key=truth)
    assert got == best and seen[REFINED] == best and truth(start) > truth(best)
    with pytest.raises(ValueError, match="whole_model_kl"):
        allocate_ranks(spectra, specs, to_remove, ScheduleConfig("output_aware", min_rank=0, refine_steps=1), sensitivity)


def test_param_uniform_keeps_the_same_parameter_fraction_and_is_the_largest_that_fits():
    specs = [LayerSpec("a", 16, 48), LayerSpec("b", 16, 16), LayerSpec("c", 16, 64)]
    to_remove = 1400
    ranks = allocate_uniform(specs, to_remove, min_rank=0, kind="params")
    dense = sum(s.dense_params for s in specs)
    assert dense - total_params(specs, ranks) >= to_remove
    # Brute force: every fraction f = k/1000; the best (largest) f whose floor ranks meet the budget.
    best = max(Fraction(k, 1000) for k in range(1001)
               if dense - total_params(specs, [min(s.break_even_rank, int(Fraction(k, 1000) * s.dense_params
                                                                           // s.rank_step)) for s in specs]) >= to_remove)
    ref = [int(best * s.dense_params // s.rank_step) for s in specs]
    # allocate_uniform only lowers a prefix of layers from the next breakpoint: never below the reference
    assert all(r >= q for r, q in zip(ranks, ref))


def test_cost_allocation_is_optimal_for_convex_costs_of_same_shape_layers():
    g = torch.Generator().manual_seed(4)
    specs = [LayerSpec(f"l{i}", 8, 8) for i in range(3)]  # break-even rank 3
    for trial in range(20):
        costs = []
        for _ in specs:
            steps = torch.rand(4, generator=g).sort(descending=True).values  # convex decreasing
            c = steps.flip(0).cumsum(0).flip(0).tolist()  # cost[r] = sum of steps r..3 -> cost[3] = last step
            costs.append(c + [0.0])
        to_remove = int(torch.randint(10, 150, (1,), generator=g))
        ranks = allocate_by_cost([c[:4] for c in costs], specs, to_remove, min_rank=0)
        final = 3 * 64 - to_remove

        def cost(rs):
            return sum(0.0 if r is None else costs[l][r] for l, r in enumerate(rs))

        options = [None, 0, 1, 2, 3]
        feasible = [rs for rs in itertools.product(options, repeat=3) if total_params(specs, rs) <= final]
        assert total_params(specs, ranks) <= final
        assert cost(ranks) == pytest.approx(min(cost(rs) for rs in feasible), abs=1e-12), trial


def test_asvd_search_takes_the_least_compression_that_meets_the_budget():
    specs = [LayerSpec("a", 10, 10), LayerSpec("b", 10, 30), LayerSpec("c", 20, 10)]
    g = torch.Generator().manual_seed(5)
    sens = [{p: float(torch.rand(1, generator=g)) * (1 - p) for p in (0.0, 0.2, 0.5, 0.8)} for _ in specs]
    to_remove = 350
    ranks = asvd_search(sens, specs, to_remove)
    pairs = sorted(((l, p, v) for l, d in enumerate(sens) for p, v in d.items()), key=lambda t: -t[2])
    dense = sum(s.dense_params for s in specs)

    def at(m):  # linear scan, written out
        kept = {}
        for l, p, _ in pairs[m:]:
            kept[l] = min(kept.get(l, 1.0), p)
        return [int(kept[l] * s.dense_params) // s.rank_step if l in kept else None for l, s in enumerate(specs)]

    ok = [m for m in range(len(pairs) + 1) if dense - total_params(specs, at(m)) >= to_remove]
    assert ranks == at(max(ok))


def test_sensitivity_curve_is_exact_at_measured_ranks_and_monotone():
    energy = [1.0, 0.5, 0.3, 0.2, 0.1, 0.05, 0.0]
    measured = {0: 4.0, 2: 1.0, 4: 0.5}
    curve = sensitivity_curve(energy, measured, 7)
    assert curve[0] == 4.0 and curve[2] == 1.0 and curve[4] == 0.5 and curve[6] == 0.0
    assert curve[5] == pytest.approx(0.25)  # between e=0.1 (0.5) and e=0 (0): linear in e
    assert all(a >= b for a, b in zip(curve, curve[1:]))
    assert candidate_ranks(LayerSpec("x", 64, 64), 6) == [0, 1, 2, 4, 8, 16]


def test_lowrank_z_on_the_whitened_optimum_is_worth_exactly_its_parameters_as_rank():
    """Why `ours_oa` spends no budget on Z: the closed-form low-rank Z of rank q on the residual
    of the whitened rank-r optimum gives the error of the whitened rank r + q optimum."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(200, 16, generator=g) * torch.linspace(0.1, 3, 16)
    h, w = x.T @ x / 200, torch.randn(16, 12, generator=g)
    sp = asvd_whiten_spectrum(w, h, damp=0.0)
    fraction, r = 0.2, 3
    zp = fit_closed_form("lowrank", w - sp.approx(r), h, fraction=fraction, damp=0.0, dtype=torch.float64)
    z = z_dense("lowrank", zp)[0]
    with_z = w - sp.approx(r) - z
    q = int(torch.linalg.matrix_rank(z))
    more = w - sp.approx(r + q)
    err = float(torch.trace(with_z.T @ h @ with_z))
    assert q >= 1 and err == pytest.approx(float(torch.trace(more.T @ h @ more)), rel=1e-6)


@pytest.mark.parametrize("decomp,schedule", [("svdllm", "param_uniform"), ("svdllm_v2", "truncation_loss"),
                                             ("dobi", "dobi"), ("asvd", "asvd_search"),
                                             ("fwsvd", "param_uniform"), ("asvd_whiten", "output_aware"),
                                             ("whiten_fisher", "output_aware")])
def test_every_peer_and_ours_compresses_a_timm_model_through_the_library(decomp, schedule):
    """compress_model with labelled loaders, z_type none, rank 0 allowed: the budget is met
    (within one rank step), the model still runs, and a ratio needing rank-0 layers is reachable."""
    from tests.conftest import tiny_timm_loaders

    from amrc_exp.compress import AMRCConfig, DecompConfig, ScheduleConfig, ZConfig, compress_, compress_model
    from amrc_exp.compress.lowrank import count_params

    model, calib, heldout = tiny_timm_loaders()
    n0 = count_params(model)
    checked = decomp == "whiten_fisher"  # ours_wf: the allocation checked and refined on the whole model
    config = AMRCConfig(ratio=0.6, decomp=DecompConfig(decomp), z_type=ZConfig("none"),
                        schedule=ScheduleConfig(schedule, min_rank=0, check_uniform=checked, refine_steps=3 * checked))
    report = compress_model(model, calib, heldout, config, probe_samples=16)
    assert sorted(report.allocation_kl) == (["output_aware", "param_uniform", "refined"] if checked else [])
    if checked:  # the search only takes moves that lower the whole-model KL
        kl = report.allocation_kl
        assert kl["refined"] <= min(kl["output_aware"], kl["param_uniform"])
    compress_(model, report)
    step = max(r.n_in + r.n_out for r in report.layers)
    assert n0 * 0.4 - 10 * step <= count_params(model) <= round(n0 * 0.4)  # budget met, no big overshoot
    assert torch.isfinite(model(next(iter(heldout))[0][:4])).all()
