"""Rank allocation under a parameter budget (paper Sec 3.2, Algorithm 1, Eq 9).

A rank list holds, per layer, an int rank (factorized: r*(in+out) + Z params) or None (dense:
in*out). Energy-loss curves are indexed by rank, as `Spectrum.energy_curve()` returns them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Sequence

import torch
from torch import Tensor

from amrc_exp.math.decompose import tail_energy

__all__ = [
    "LayerSpec",
    "SCHEDULES",
    "schedule",
    "total_params",
    "max_removable",
    "allocate_greedy",
    "allocate_uniform",
    "allocate_by_cost",
    "asvd_search",
    "allocate_truncation_loss",
    "allocate_positions",
    "UNIFORM_KINDS",
    "sensitivity_curve",
    "candidate_ranks",
    "ratio_rank",
]

Ranks = list[int | None]


@dataclass(frozen=True)
class LayerSpec:
    """Shape and Z overhead of one factorizable layer (paper convention W: n_in x n_out)."""

    name: str
    n_in: int
    n_out: int
    z_params: int = 0  # parameters Z adds when the layer is factorized

    @property
    def dense_params(self) -> int:
        return self.n_in * self.n_out

    @property
    def rank_step(self) -> int:
        """Parameters one rank costs: a column of U plus a column of V."""
        return self.n_in + self.n_out

    def params_at(self, r: int) -> int:
        return r * self.rank_step + self.z_params

    @property
    def break_even_rank(self) -> int:
        """Largest r >= 1 with params_at(r) < dense_params, or 0 (rank >= 1 never pays; rank 0,
        the bias alone, still does when min_rank = 0)."""
        return max(0, (self.dense_params - self.z_params - 1) // self.rank_step)


def _params(spec: LayerSpec, rank: int | None) -> int:
    return spec.dense_params if rank is None else spec.params_at(rank)


def total_params(specs: Sequence[LayerSpec], ranks: Sequence[int | None]) -> int:
    """Parameters of the layers under a rank list (None = dense)."""
    return sum(_params(s, r) for s, r in zip(specs, ranks, strict=True))


def max_removable(specs: Sequence[LayerSpec], min_rank: int = 1) -> int:
    """Most parameters removable: every layer that can be factorized at min_rank."""
    return sum(s.dense_params - s.params_at(min_rank) for s in specs if s.break_even_rank >= min_rank)


# kind -> tau(t; n0, n_target, iters, gamma): the target parameter count after step t.
SCHEDULES: dict[str, Callable[[int, float, float, int, float], float]] = {
    "exp": lambda t, n0, nt, iters, gamma: nt + (n0 - nt) * math.exp(-t / gamma),  # Eq 9
    "linear": lambda t, n0, nt, iters, gamma: n0 - (n0 - nt) * t / iters,
    "oneshot": lambda t, n0, nt, iters, gamma: nt,
}


def schedule(kind: str, n0: float, n_target: float, iters: int, gamma: float = 80.0) -> list[float]:
    """tau(t) for t = 1..iters (Eq 9 for "exp")."""
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule {kind!r}; allowed: {sorted(SCHEDULES)}")
    if iters < 1 or (kind == "exp" and gamma <= 0):
        raise ValueError(f"need iters >= 1 and gamma > 0, got iters={iters}, gamma={gamma}")
    return [SCHEDULES[kind](t, n0, n_target, iters, gamma) for t in range(1, iters + 1)]


def _candidate(spec: LayerSpec, rank: int | None, p: int, min_rank: int) -> int | None:
    """Rank removing >= p parameters from this layer alone (clipped), or None if it cannot shrink."""
    be = spec.break_even_rank
    if rank is None:  # dense: enter factorization at or below the break-even rank
        if be < min_rank:
            return None
        m = min((spec.dense_params - spec.z_params - p) // spec.rank_step, be)
        return max(m, min_rank)
    m = max(rank - math.ceil(p / spec.rank_step), min_rank)
    return m if m < rank else None


def _check_budget(specs: Sequence[LayerSpec], params_to_remove: int, min_rank: int) -> None:
    if min_rank < 0:
        raise ValueError(f"min_rank must be >= 0, got {min_rank}")
    most = max_removable(specs, min_rank)
    if params_to_remove > most:
        raise ValueError(
            f"cannot remove {params_to_remove} parameters: at most {most} are removable "
            f"(every factorizable layer at rank {min_rank})"
        )


def allocate_greedy(
    curves: Sequence[Tensor | Sequence[float]],
    specs: Sequence[LayerSpec],
    params_to_remove: int,
    kind: str = "exp",
    iters: int = 500,
    gamma: float = 80.0,
    min_rank: int = 1,
) -> Ranks:
    """Algorithm 1: greedy mixed-rank allocation following a parameter schedule (Eq 9).

    The schedule is a target trajectory for the layers' current parameter count, from P_start
    (all dense) to P_start - params_to_remove. Each step removes p_t = P_cur - tau(t) (skipped
    if <= 0), so the realized count never drifts from the schedule. Per layer: the rank that
    removes >= p_t from it alone, and its loss curve[rank]; cut the layer of least loss (ties:
    lowest index). After the schedule, step toward the final budget until it is met; the
    overshoot is below one rank step (in+out) of the last cut layer, or its dense->factorized
    entry jump. Returns a rank per layer, None = stays dense.
    """
    if len(curves) != len(specs):
        raise ValueError(f"{len(curves)} curves for {len(specs)} layers")
    _check_budget(specs, params_to_remove, min_rank)
    losses = [c.detach().double().cpu().tolist() if isinstance(c, Tensor) else list(c) for c in curves]
    for spec, loss in zip(specs, losses):
        if len(loss) <= spec.break_even_rank:
            raise ValueError(f"curve of {spec.name} has {len(loss)} entries, needs > {spec.break_even_rank}")
    ranks: Ranks = [None] * len(specs)
    p_start = total_params(specs, ranks)
    final = p_start - params_to_remove
    p_cur = p_start

    def cut(p: int) -> None:
        nonlocal p_cur
        best: tuple[float, int, int] | None = None
        for l, spec in enumerate(specs):
            m = _candidate(spec, ranks[l], p, min_rank)
            if m is not None and (best is None or losses[l][m] < best[0]):
                best = (losses[l][m], l, m)
        if best is None:  # excluded by _check_budget; guard against an endless loop anyway
            raise RuntimeError("no layer can be cut further")
        _, l, m = best
        p_cur += _params(specs[l], m) - _params(specs[l], ranks[l])
        ranks[l] = m

    if params_to_remove <= 0:
        return ranks
    for tau in schedule(kind, p_start, final, iters, gamma):
        if p_cur - tau > 0:
            cut(math.ceil(p_cur - tau))
    while p_cur > final:  # finish exactly on the budget
        cut(p_cur - final)
    return ranks


# kind -> rank of a layer at fraction f: of min(in, out) ("rank": the paper's Vanilla SVD
# baseline) or of the layer's dense parameters ("params": SVD-LLM's and ASVD's uniform ratio,
# r = floor(f * in * out / (in + out)), as in their code).
UNIFORM_KINDS: dict[str, Callable[[LayerSpec, Fraction], int]] = {
    "rank": lambda s, f: f.numerator * min(s.n_in, s.n_out) // f.denominator,
    "params": lambda s, f: f.numerator * s.dense_params // (f.denominator * s.rank_step),
}


def ratio_rank(spec: LayerSpec, ratio: float) -> int:
    """The rank keeping the fraction `ratio` of a layer's parameters, floor(ratio * in * out /
    (in + out)) (SVD-LLM's and ASVD's rank formula); `ratio` read as the nearest simple fraction
    (0.3 is 3/10, not the float just below it)."""
    return UNIFORM_KINDS["params"](spec, Fraction(ratio).limit_denominator(10**6))


def _breakpoints(s: LayerSpec, kind: str) -> set[Fraction]:
    if kind == "rank":
        return {Fraction(k, min(s.n_in, s.n_out)) for k in range(min(s.n_in, s.n_out) + 1)}
    return {Fraction(k * s.rank_step, s.dense_params) for k in range(s.break_even_rank + 2)} | {Fraction(1)}


def _uniform(specs: Sequence[LayerSpec], f: Fraction, min_rank: int, kind: str = "rank") -> Ranks:
    """Rank UNIFORM_KINDS[kind](f) per layer; dense where that does not save parameters."""
    ranks: Ranks = []
    for s in specs:
        r = max(min_rank, UNIFORM_KINDS[kind](s, f))
        ranks.append(r if r <= s.break_even_rank else None)
    return ranks


def allocate_uniform(specs: Sequence[LayerSpec], params_to_remove: int, min_rank: int = 1,
                     kind: str = "rank") -> Ranks:
    """Non-mixed baseline: the same fraction f in every layer (`UNIFORM_KINDS`: of min(in, out)
    or of the layer's parameters).

    f is the largest meeting the budget, found exactly by bisection over the breakpoints where
    some layer's rank changes (removal is a non-increasing step function of f). Moving from the
    next larger breakpoint to f changes each layer by one rank step (or its dense entry); those
    moves are applied layer by layer only until the budget is met, so the overshoot is below
    one step of the last moved layer, as for the greedy allocator.
    """
    if kind not in UNIFORM_KINDS:
        raise ValueError(f"unknown uniform kind {kind!r}; allowed: {sorted(UNIFORM_KINDS)}")
    _check_budget(specs, params_to_remove, min_rank)
    p_start = sum(s.dense_params for s in specs)
    if params_to_remove <= 0:
        return [None] * len(specs)
    fracs = sorted(set().union(*(_breakpoints(s, kind) for s in specs)) | {Fraction(0)})

    def removed(f: Fraction) -> int:
        return p_start - total_params(specs, _uniform(specs, f, min_rank, kind))

    lo, hi = 0, len(fracs) - 1  # removed(fracs[0] = 0) meets the budget, removed(1) = 0 does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if removed(fracs[mid]) >= params_to_remove else (lo, mid)
    low, ranks = _uniform(specs, fracs[lo], min_rank, kind), _uniform(specs, fracs[hi], min_rank, kind)
    for l in range(len(specs)):
        if p_start - total_params(specs, ranks) >= params_to_remove:
            break
        ranks[l] = low[l]
    return ranks


def allocate_by_cost(costs: Sequence[Sequence[float]], specs: Sequence[LayerSpec], params_to_remove: int,
                     min_rank: int = 0) -> Ranks:
    """Ranks minimising sum_l costs[l][r_l] under the budget (dense: cost 0), for any per-layer
    cost of rank (ours: the output sensitivity, `amrc_exp.compress.probe`).

    Lagrangian relaxation: for a price lam per parameter every layer takes its cheapest option
    independently (argmin cost + lam * params, dense included); lam is bisected to the
    smallest price that meets the budget. The parameters that price leaves unspent are then
    given back greedily, one rank at a time, to the layer whose cost drops most per parameter.
    For convex costs of same-shape layers this is the exact optimum; in general it is the
    optimum of the budget it lands on plus a greedy top-up. costs[l] covers ranks
    0..break_even_rank (entries below min_rank are ignored)."""
    _check_budget(specs, params_to_remove, min_rank)
    for spec, c in zip(specs, costs, strict=True):
        if len(c) <= spec.break_even_rank:
            raise ValueError(f"costs of {spec.name} have {len(c)} entries, needs > {spec.break_even_rank}")
    final = sum(s.dense_params for s in specs) - params_to_remove
    if params_to_remove <= 0:
        return [None] * len(specs)
    options = [[(None, 0.0, s.dense_params)] + [(r, float(c[r]), s.params_at(r))
                                                 for r in range(min_rank, s.break_even_rank + 1)]
               for s, c in zip(specs, costs)]

    def pick(lam: float) -> Ranks:
        return [min(opts, key=lambda o: (o[1] + lam * o[2], o[2]))[0] for opts in options]

    lo, hi = 0.0, 1.0
    while total_params(specs, pick(hi)) > final:
        hi *= 4.0
    for _ in range(100):  # float bisection to ~1e-30 relative: far below any cost difference
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if total_params(specs, pick(mid)) <= final else (mid, hi)
    ranks = pick(hi)
    cost_of = [{o[0]: o[1] for o in opts} for opts in options]
    while True:  # top up: the best cost drop per parameter that still fits the budget
        slack = final - total_params(specs, ranks)
        best: tuple[float, int, int | None] | None = None
        for l, s in enumerate(specs):
            r = ranks[l]
            if r is None:
                continue
            up = None if r >= s.break_even_rank else r + 1
            extra = _params(s, up) - _params(s, r)
            gain = cost_of[l][r] - cost_of[l][up]
            if extra <= slack and gain > 0 and (best is None or gain / extra > best[0]):
                best = (gain / extra, l, up)
        if best is None:
            return ranks
        ranks[best[1]] = best[2]


def asvd_search(sensitivity: Sequence[dict[float, float]], specs: Sequence[LayerSpec],
                params_to_remove: int) -> Ranks:
    """ASVD's sensitivity-based truncation-rank search (Yuan et al. 2023, arXiv:2312.05821,
    Sec 3.4; `binary_search_truncation_rank` in its code).

    sensitivity[l] maps a kept-parameter ratio p < 1 of layer l to the calibration loss with
    only that layer truncated to rank floor(p * in * out / (in + out)). The (layer, p) pairs are
    sorted from most to least sensitive; keeping the pairs from position m on, each layer takes
    the smallest p among its kept pairs (dense if none). m is binary-searched to the largest
    position (the least compression) that still meets the budget."""
    pairs = sorted(((l, p, loss) for l, d in enumerate(sensitivity) for p, loss in d.items() if p < 1),
                   key=lambda t: -t[2])

    def ranks_at(m: int) -> Ranks:
        kept: list[float | None] = [None] * len(specs)
        for l, p, _ in pairs[m:]:
            kept[l] = p if kept[l] is None else min(kept[l], p)
        return [None if p is None else ratio_rank(specs[l], p) for l, p in enumerate(kept)]

    final = sum(s.dense_params for s in specs) - params_to_remove
    if total_params(specs, ranks_at(0)) > final:
        raise ValueError(f"cannot remove {params_to_remove} parameters with the candidate ratios "
                         f"{sorted({p for _, p, _ in pairs})}")
    lo, hi = 0, len(pairs)  # ranks_at(lo) meets the budget; ranks_at(len) = all dense does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if total_params(specs, ranks_at(mid)) <= final else (lo, mid)
    return ranks_at(lo)


def _truncation_loss_ranks(sigmas: Sequence[Tensor], specs: Sequence[LayerSpec], groups: Sequence[str],
                           reduce: float, min_rank: int) -> Ranks:
    """SVD-LLM V2's ranks for a base reduction ratio `reduce` (Algorithm 1 of its paper)."""
    base = [ratio_rank(s, 1.0 - reduce) for s in specs]
    # L_min: the theoretical truncation loss of each matrix at the uniform ratio.
    losses = [float(tail_energy(sig)[min(r, sig.numel())].sqrt()) for sig, r in zip(sigmas, base)]
    log_loss = [math.log(loss) if loss > 0 else 0.0 for loss in losses]
    ranks: Ranks = []
    members: dict[str, list[int]] = {}
    for l, g in enumerate(groups):
        members.setdefault(g, []).append(l)
    ratio = [reduce] * len(specs)
    for idx in members.values():
        # reduce_l = |G| R (1 / log L_l) / sum_G (1 / log L_j): a larger loss, less compression.
        # The formula needs every log L > 0 (L > 1); a group where it is not keeps the uniform
        # ratio (the paper gives no rule there; its losses, on LLM-sized Grams, are >> 1).
        if all(log_loss[l] > 0 for l in idx):
            inv = [1.0 / log_loss[l] for l in idx]
            for l, w in zip(idx, inv):
                ratio[l] = len(idx) * reduce * w / sum(inv)
    for s, r in zip(specs, ratio):
        rank = max(min_rank, ratio_rank(s, min(1.0, max(0.0, 1.0 - r))))
        ranks.append(rank if rank <= s.break_even_rank else None)
    return ranks


def allocate_truncation_loss(sigmas: Sequence[Tensor], specs: Sequence[LayerSpec], groups: Sequence[str],
                             params_to_remove: int, min_rank: int = 0) -> Ranks:
    """SVD-LLM V2's heterogeneous compression-ratio allocation (Wang et al. 2025, arXiv:2503.12340,
    Sec 3.1, Algorithm 1), under a whole-model budget.

    At the uniform reduction ratio R, each matrix's theoretical truncation loss is
    L_min = sqrt(sum of its discarded sigma^2) (`sigmas`: the spectra of its truncation,
    `svdllm_v2_spectrum`'s); within each group of same-type matrices (`groups`, e.g. every
    block's attn.qkv), matrix l gets the reduction ratio |G| R (1/log L_l) / sum_G (1/log L_j)
    and the rank floor((1 - ratio) in out / (in + out)). R starts at the budget's share of the
    layers' parameters and is raised by bisection (to 1e-9) only as far as the rounding and the
    clipping of ratios to [0, 1] need for the allocation to meet the budget."""
    _check_budget(specs, params_to_remove, min_rank)
    if params_to_remove <= 0:
        return [None] * len(specs)
    dense = sum(s.dense_params for s in specs)
    final = dense - params_to_remove

    def ranks_at(r: float) -> Ranks:
        return _truncation_loss_ranks(sigmas, specs, groups, r, min_rank)

    lo = params_to_remove / dense
    if total_params(specs, ranks_at(lo)) <= final:
        return ranks_at(lo)
    hi = 1.0
    if total_params(specs, ranks_at(hi)) > final:  # every layer at min_rank: _check_budget allows it
        return _uniform(specs, Fraction(0), min_rank, "params")
    _, hi = _threshold(lambda r: total_params(specs, ranks_at(r)) <= final, lo, hi)
    return ranks_at(hi)


def _threshold(passes: Callable[[float], bool], lo: float, hi: float, tol: float = 1e-9) -> tuple[float, float]:
    """[lo, hi] bisected to width `tol` around where `passes` turns true (false at lo, true at hi,
    monotone in between): the allocators' one search for a budget-meeting scalar."""
    while hi - lo > tol:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if passes(mid) else (mid, hi)
    return lo, hi


def _position_ranks(positions: Sequence[float], specs: Sequence[LayerSpec], shift: float, min_rank: int) -> Ranks:
    ranks: Ranks = []
    for p, s in zip(positions, specs, strict=True):
        r = min(max(math.ceil(p + shift - 1e-9), min_rank), min(s.n_in, s.n_out))
        ranks.append(r if r <= s.break_even_rank else None)
    return ranks


def allocate_positions(positions: Sequence[float], specs: Sequence[LayerSpec], params_to_remove: int,
                       min_rank: int = 0) -> Ranks:
    """Ranks from learned truncation positions (Dobi-SVD, Qinsi Wang et al. 2025, arXiv:2502.02723,
    Sec 3.2), under a whole-model budget that they meet only approximately (a penalty).

    Their rank is ceil(position); a layer whose rank saves nothing stays dense. Here every position
    is moved by one shared shift, the largest (found by bisection to 1e-9 ranks) whose ranks meet
    the budget, so the allocation keeps the learned differences between layers and removes no
    more than the rounding needs."""
    _check_budget(specs, params_to_remove, min_rank)
    if params_to_remove <= 0:
        return [None] * len(specs)
    final = sum(s.dense_params for s in specs) - params_to_remove

    def misses(shift: float) -> bool:
        return total_params(specs, _position_ranks(positions, specs, shift, min_rank)) > final

    # At -span every layer sits at min_rank, which meets the budget (_check_budget); at +span
    # every rank is capped at min(in, out), past break-even, so every layer is dense: it misses.
    span = max(min(s.n_in, s.n_out) for s in specs) + max(abs(p) for p in positions) + 1
    lo, _ = _threshold(misses, -span, span)
    return _position_ranks(positions, specs, lo, min_rank)


def candidate_ranks(spec: LayerSpec, n: int, min_rank: int = 0) -> list[int]:
    """`n` ranks in [min_rank, break_even_rank] where a sensitivity is measured: geometric
    towards rank 0, where the loss grows fastest (e.g. be/2, be/4, ... and min_rank)."""
    be = spec.break_even_rank
    if be < min_rank:
        return []
    ranks = {min_rank} | {max(min_rank, round(be * 2.0 ** -k)) for k in range(1, n)}
    return sorted(ranks)[:n]


def sensitivity_curve(energy: Sequence[float], measured: dict[int, float], length: int) -> list[float]:
    """A cost for every rank 0..length-1 from a few measured ones, through the exact spectrum.

    The measured sensitivities (made non-increasing in rank) are interpolated piecewise-linearly
    in the layer's energy loss e(r) (the exact Eq 5 error of the rank-r optimum for asvd_whiten),
    with e = 0 -> 0: an output loss that is, to first order, proportional to the weight error
    (KL ~ a quadratic form in the output change). Exact at the measured ranks; monotone."""
    pts = sorted(measured.items())  # by rank, ascending
    vals = [v for _, v in pts]
    for i in range(len(vals) - 2, -1, -1):  # lower rank never costs less than a higher one
        vals[i] = max(vals[i], vals[i + 1])
    es = [float(energy[min(r, len(energy) - 1)]) for r, _ in pts]
    knots = sorted({(0.0, 0.0)} | set(zip(es, vals)))  # ascending e (descending rank)
    out = []
    for r in range(length):
        e = float(energy[min(r, len(energy) - 1)])
        if e >= knots[-1][0]:
            # Beyond the lowest measured rank (only below it): the lowest rank's cost scaled by e.
            e0, v0 = knots[-1]
            out.append(v0 * (e / e0 if e0 > 0 else 1.0))
            continue
        for (e0, v0), (e1, v1) in zip(knots, knots[1:]):
            if e0 <= e <= e1:
                out.append(v0 + (v1 - v0) * ((e - e0) / (e1 - e0) if e1 > e0 else 0.0))
                break
    return out
