"""Rank allocation under a parameter budget (paper Sec 3.2, Algorithm 1, Eq 9).

A rank list holds, per layer, an int rank (factorized: r*(in+out) + Z params) or None (dense:
in*out). Energy-loss curves are indexed by rank, as `Spectrum.energy_curve()` returns them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Sequence

from torch import Tensor

__all__ = [
    "LayerSpec",
    "SCHEDULES",
    "schedule",
    "total_params",
    "max_removable",
    "allocate_greedy",
    "allocate_uniform",
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
        """Largest r >= 1 with params_at(r) < dense_params, or 0 (never worth factorizing)."""
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
    if min_rank < 1:
        raise ValueError(f"min_rank must be >= 1, got {min_rank}")
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


def _uniform(specs: Sequence[LayerSpec], f: Fraction, min_rank: int) -> Ranks:
    """Rank floor(f * min(in, out)) per layer; dense where that does not save parameters."""
    ranks: Ranks = []
    for s in specs:
        r = max(min_rank, f.numerator * min(s.n_in, s.n_out) // f.denominator)
        ranks.append(r if r <= s.break_even_rank else None)
    return ranks


def allocate_uniform(specs: Sequence[LayerSpec], params_to_remove: int, min_rank: int = 1) -> Ranks:
    """Non-mixed baseline: the same rank fraction f of min(in, out) in every layer.

    f is the largest meeting the budget, found exactly by bisection over the breakpoints
    k/min(in, out) (removal is a non-increasing step function of f). Moving from the next
    larger breakpoint to f changes each layer by one rank step (or its dense entry); those
    moves are applied layer by layer only until the budget is met, so the overshoot is below
    one step of the last moved layer, as for the greedy allocator.
    """
    _check_budget(specs, params_to_remove, min_rank)
    p_start = sum(s.dense_params for s in specs)
    if params_to_remove <= 0:
        return [None] * len(specs)
    fracs = sorted({Fraction(k, d) for d in {min(s.n_in, s.n_out) for s in specs} for k in range(d + 1)})

    def removed(f: Fraction) -> int:
        return p_start - total_params(specs, _uniform(specs, f, min_rank))

    lo, hi = 0, len(fracs) - 1  # removed(fracs[0] = 0) meets the budget, removed(1) = 0 does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if removed(fracs[mid]) >= params_to_remove else (lo, mid)
    low, ranks = _uniform(specs, fracs[lo], min_rank), _uniform(specs, fracs[hi], min_rank)
    for l in range(len(specs)):
        if p_start - total_params(specs, ranks) >= params_to_remove:
            break
        ranks[l] = low[l]
    return ranks
