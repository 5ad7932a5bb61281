"""amrc_exp.math.allocate: budget accounting, Algorithm 1 vs brute force, uniform baseline."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from amrc_exp.math.allocate import (
    LayerSpec,
    allocate_greedy,
    allocate_uniform,
    max_removable,
    schedule,
    total_params,
)
from amrc_exp.math.decompose import svd_spectrum


pytestmark = pytest.mark.usefixtures("one_thread")


def tail_curve(energies):
    """Normalized energy loss for r = 0..len: sum_{j >= r} e_j / sum_j e_j (computed by loops)."""
    total = sum(energies)
    return torch.tensor([sum(energies[r:]) / total for r in range(len(energies) + 1)], dtype=torch.float64)


def params(spec, r):
    return spec.n_in * spec.n_out if r is None else r * (spec.n_in + spec.n_out) + spec.z_params


def entry_jump(spec):
    be = spec.break_even_rank
    return spec.n_in * spec.n_out - params(spec, be) if be else 0


@pytest.mark.parametrize(
    "n_in,n_out,z", [(16, 16, 0), (16, 48, 0), (48, 16, 40), (4, 4, 15), (1, 1, 0), (768, 3072, 50000)]
)
def test_break_even_rank_by_brute_force(n_in, n_out, z):
    spec = LayerSpec("l", n_in, n_out, z)
    profitable = [r for r in range(1, min(n_in, n_out) + 1) if r * (n_in + n_out) + z < n_in * n_out]
    assert spec.break_even_rank == (max(profitable) if profitable else 0)
    assert spec.dense_params == n_in * n_out and spec.params_at(3) == 3 * (n_in + n_out) + z


def test_schedules():
    taus = schedule("exp", 1000.0, 400.0, 500, 80.0)
    assert len(taus) == 500
    for step in (1, 80, 500):
        assert taus[step - 1] == pytest.approx(400 + 600 * math.exp(-step / 80))
    lin = schedule("linear", 1000.0, 400.0, 4, 80.0)
    assert lin == pytest.approx([850.0, 700.0, 550.0, 400.0])
    assert schedule("oneshot", 1000.0, 400.0, 3, 80.0) == [400.0] * 3
    with pytest.raises(ValueError, match="allowed.*exp.*linear.*oneshot"):
        schedule("cosine", 1.0, 0.0, 3, 1.0)


def random_problem(seed, n_layers=6):
    rng = random.Random(seed)
    shapes = [(16, 16), (16, 48), (48, 16), (32, 32), (24, 40)]
    specs, curves = [], []
    for i in range(n_layers):
        n_in, n_out = rng.choice(shapes)
        specs.append(LayerSpec(f"l{i}", n_in, n_out, rng.choice([0, 0, 30])))
        decay = rng.uniform(0.5, 1.0)
        curves.append(tail_curve([decay**j for j in range(min(n_in, n_out))]))
    return specs, curves


@pytest.mark.parametrize("kind", ["exp", "linear", "oneshot"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_meets_budget_with_small_overshoot(kind, seed):
    specs, curves = random_problem(seed)
    most = max_removable(specs)
    bound = max(max(s.n_in + s.n_out, entry_jump(s)) for s in specs)
    for frac in (0.05, 0.3, 0.6, 1.0):
        budget = int(frac * most)
        ranks = allocate_greedy(curves, specs, budget, kind=kind, iters=200, gamma=30.0)
        removed = sum(s.dense_params for s in specs) - total_params(specs, ranks)
        assert budget <= removed < budget + bound
        for s, r in zip(specs, ranks):
            assert r is None or 1 <= r <= s.break_even_rank


def test_greedy_overshoot_below_one_rank_step_on_equal_layers():
    specs = [LayerSpec(f"l{i}", 16, 16) for i in range(3)]
    curves = [tail_curve([0.7**j for j in range(16)])] * 3
    for budget in range(100, 600, 37):  # every layer already entered: each cut is whole ranks
        ranks = allocate_greedy(curves, specs, budget)
        removed = 768 - total_params(specs, ranks)
        assert budget <= removed < budget + 32


def toy():
    """Three 16 x 16 layers (break-even rank 7): fast-decaying, flat and medium spectra."""
    specs = [LayerSpec(f"l{i}", 16, 16) for i in range(3)]
    curves = [
        tail_curve([0.5**j for j in range(16)]),
        tail_curve([1.0] * 16),
        tail_curve([0.8**j for j in range(16)]),
    ]
    return specs, curves


def brute_force(specs, curves, budget, combine):
    best = None
    for combo in itertools.product([None, *range(1, 8)], repeat=len(specs)):
        if sum(s.dense_params for s in specs) - total_params(specs, combo) < budget:
            continue
        loss = combine(0.0 if r is None else float(c[r]) for c, r in zip(curves, combo))
        if best is None or loss < best[0] - 1e-12:
            best = (loss, combo)
    return best


def loss_of(curves, ranks, combine):
    return combine(0.0 if r is None else float(c[r]) for c, r in zip(curves, ranks))


@pytest.mark.parametrize("budget,expected", [(100, [4, None, None]), (200, [3, None, 6])])
def test_greedy_finds_brute_force_best_split_on_toy(budget, expected):
    # The fast-decaying layer absorbs the cuts, the flat one stays dense; the split is the
    # brute-force minimum of Eq 8's sum of losses.
    specs, curves = toy()
    best_loss, best = brute_force(specs, curves, budget, sum)
    assert list(best) == expected
    for kind in ("exp", "linear"):
        ranks = allocate_greedy(curves, specs, budget, kind=kind)
        assert ranks == expected
        assert loss_of(curves, ranks, sum) == pytest.approx(best_loss)


def test_oneshot_schedule_is_worse_than_gradual_on_toy():
    # One step of 200 parameters sends the cheapest layer straight to rank 1 (why Eq 9 anneals).
    specs, curves = toy()
    assert allocate_greedy(curves, specs, 200, kind="oneshot") == [1, None, None]
    assert loss_of(curves, [1, None, None], sum) > brute_force(specs, curves, 200, sum)[0] + 0.1


def test_greedy_minimizes_the_worst_layer_loss_on_toy():
    # Algorithm 1 cuts the layer whose loss *after* the cut is smallest: on convex curves of
    # equal-shape layers that is exactly the min-max allocation (it balances the losses; it is
    # not always the min-sum of Eq 8, e.g. budget 300 here).
    specs, curves = toy()
    for budget in range(1, max_removable(specs) + 1, 9):
        ranks = allocate_greedy(curves, specs, budget)
        assert loss_of(curves, ranks, max) == pytest.approx(brute_force(specs, curves, budget, max)[0])


def test_layers_that_cannot_pay_off_stay_dense():
    specs = [
        LayerSpec("z_too_big", 4, 4, z_params=15),  # 1 * 8 + 15 >= 16: break-even 0
        LayerSpec("tiny", 1, 1),
        LayerSpec("ok", 16, 16),
        LayerSpec("min_rank_above_be", 6, 6),  # break-even 2 < min_rank 3
    ]
    assert [s.break_even_rank for s in specs] == [0, 0, 7, 2]
    zero = tail_curve([1e-9] + [0.0] * 15)  # the most attractive curve possible
    curves = [zero[:5], zero[:2], tail_curve([1.0] * 16), zero[:7]]
    ranks = allocate_greedy(curves, specs, 100, min_rank=3)
    assert ranks[0] is None and ranks[1] is None and ranks[3] is None and ranks[2] is not None
    assert allocate_uniform(specs, 100, min_rank=3)[:2] == [None, None]


def test_unreachable_budget_raises_with_the_largest_removable_count():
    specs, curves = toy()
    most = 3 * (256 - 32)
    assert max_removable(specs) == most
    assert allocate_greedy(curves, specs, most) == [1, 1, 1]
    with pytest.raises(ValueError, match=str(most)):
        allocate_greedy(curves, specs, most + 1)
    with pytest.raises(ValueError, match=str(most)):
        allocate_uniform(specs, most + 1)


def test_greedy_is_deterministic_and_ties_go_to_the_lowest_index():
    specs, curves = random_problem(7)
    assert allocate_greedy(curves, specs, 2000) == allocate_greedy(curves, specs, 2000)
    same = [LayerSpec("a", 16, 16), LayerSpec("b", 16, 16)]
    flat = tail_curve([1.0] * 16)
    assert allocate_greedy([flat, flat], same, 32) == [7, None]
    assert allocate_greedy([flat, flat], same, 0) == [None, None]


def test_greedy_with_real_spectra():
    gen = torch.Generator().manual_seed(0)
    ws = [torch.randn(24, 40, generator=gen) @ torch.diag(torch.linspace(2, 0.01, 40) ** p) for p in (0.5, 3)]
    sps = [svd_spectrum(w) for w in ws]
    specs = [LayerSpec(f"l{i}", 24, 40) for i in range(2)]
    ranks = allocate_greedy([sp.energy_curve() for sp in sps], specs, 700)
    assert ranks[1] < ranks[0]  # the faster-decaying spectrum is cut deeper


def test_uniform_uses_equal_fractions_and_meets_budget():
    specs = [LayerSpec("a", 32, 32), LayerSpec("b", 16, 48), LayerSpec("c", 64, 32), LayerSpec("d", 32, 32)]
    most = max_removable(specs)
    for frac in (0.1, 0.4, 0.8, 1.0):
        budget = int(frac * most)
        ranks = allocate_uniform(specs, budget)
        assert ranks == allocate_uniform(specs, budget)
        removed = sum(s.dense_params for s in specs) - total_params(specs, ranks)
        bound = max(max(s.n_in + s.n_out, entry_jump(s)) for s in specs)
        assert budget <= removed < budget + bound
        fracs = [r / min(s.n_in, s.n_out) for s, r in zip(specs, ranks) if r is not None and r > 1]
        # one common fraction f: every rank is floor(f d) or one step above it (d >= 16 here)
        assert not fracs or max(fracs) - min(fracs) < 2 / 16
    equal = [LayerSpec(f"l{i}", 32, 32) for i in range(4)]
    ranks = allocate_uniform(equal, 4 * (1024 - 10 * 64))
    assert ranks == [10, 10, 10, 10]
