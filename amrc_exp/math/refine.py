"""Local search of a rank allocation against a whole-model measurement (ours: `schedule.refine_steps`).

The allocators of `amrc_exp.math.allocate` add up costs modelled or measured one layer at a
time. Once nearly every layer is cut, the layers' errors interact and that sum stops predicting
the output. `refine_ranks` starts from an allocation that meets the budget and moves single
ranks between factorized layers for as long as a measurement of the whole model (ours: the
probe KL of `compress.probe.allocation_kl`) says the model got closer to dense.

Pure combinatorics over a black-box measurement: no torch, no model.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

from amrc_exp.math.allocate import LayerSpec, Ranks, total_params

__all__ = ["Measure", "refine_ranks"]

# allocations -> their measured losses (lower: closer to dense), one per allocation, in order
Measure = Callable[[Sequence[Ranks]], list[float]]


def refine_ranks(ranks: Ranks, specs: Sequence[LayerSpec], params_to_remove: int, measure: Measure,
                 min_rank: int = 0, steps: int = 50, tol: float = 0.0,
                 on_step: Optional[Callable[[Ranks, float], None]] = None) -> tuple[Ranks, list[float]]:
    """At most `steps` moves of single ranks between factorized layers, each lowering `measure`
    and keeping the budget; returns the ranks and the loss at the start and after each move.

    The one-rank neighbours (each factorized layer one rank up and one rank down, the others as
    they are) are measured at the start, so the layers' interactions at this allocation are in
    the numbers. A move gives one layer a rank and takes one from another (then from the least
    harmed layers, one rank each, until the budget holds again). The moves whose predicted
    change (the sum of their layers' measured one-rank changes) is negative are measured in
    order of that prediction; the first that measures lower is taken. After a move only the
    moved layers' neighbours are measured again (2 per moved layer, not 2 per layer): the
    others' changes are carried over. When no predicted move measures lower on carried-over
    changes, every neighbour is measured afresh and the search goes on; it stops when none does
    on fresh ones, so, as with a full measurement every step, it ends on a move-local optimum
    (for a loss that is a sum of per-layer losses the prediction is exact: the global one for
    convex per-layer losses of same-shape layers). It also stops after a move that gained less
    than `tol` times the loss before it. Dense layers (None) stay dense; ranks stay in
    [min_rank, break_even_rank]. `on_step(ranks, loss)` is called after each move."""
    budget = sum(s.dense_params for s in specs) - params_to_remove
    if total_params(specs, ranks) > budget:
        raise ValueError("refine_ranks starts from an allocation that meets the budget; this one keeps "
                         f"{total_params(specs, ranks)} > {budget} parameters")
    current = list(ranks)
    (loss,) = measure([current])
    history = [loss]
    if steps == 0:
        return current, history
    change = _neighbour_changes(current, range(len(specs)), specs, min_rank, loss, measure)
    fresh = True
    while len(history) <= steps:
        ups = [l for l, s in enumerate(specs) if current[l] is not None and current[l] < s.break_even_rank]
        downs = [l for l, s in enumerate(specs) if current[l] is not None and current[l] > min_rank]
        for move in _predicted_gains(current, ups, downs, change, specs, budget, min_rank):
            (v,) = measure([move])
            if v < loss:
                moved = [l for l, (a, b) in enumerate(zip(current, move)) if a != b]
                gain, current, loss = loss - v, move, v
                history.append(v)
                if on_step is not None:
                    on_step(current, v)
                stale = {k: d for k, d in change.items() if k[0] not in moved}
                change = {**stale, **_neighbour_changes(current, moved, specs, min_rank, loss, measure)}
                fresh = False
                break
        else:  # no move predicted to help measures lower
            if fresh:
                break
            change = _neighbour_changes(current, range(len(specs)), specs, min_rank, loss, measure)
            fresh = True
            continue
        if gain < tol * (loss + gain):
            break
    return current, history


def _neighbour_changes(ranks: Ranks, layers: Sequence[int] | range, specs: Sequence[LayerSpec], min_rank: int,
                       loss: float, measure: Measure) -> dict[tuple[int, int], float]:
    """{(layer, +1 | -1): measured loss change} of `layers`' one-rank neighbours of `ranks`."""
    keys = [(l, d) for d in (1, -1) for l in layers if ranks[l] is not None
            and (ranks[l] < specs[l].break_even_rank if d > 0 else ranks[l] > min_rank)]  # type: ignore[operator]
    measured = measure([_moved(ranks, {l: d}) for l, d in keys]) if keys else []
    return {k: v - loss for k, v in zip(keys, measured)}


def _predicted_gains(ranks: Ranks, ups: Sequence[int], downs: Sequence[int], change: dict[tuple[int, int], float],
                     specs: Sequence[LayerSpec], budget: int, min_rank: int) -> list[Ranks]:
    """Every move (layer j up; if the budget is spent, layer l down, then the least harmed layers
    down until it holds) whose predicted change is negative, most negative first."""
    harm = {l: change[l, -1] / specs[l].rank_step for l in downs}
    by_harm = sorted(downs, key=lambda l: (harm[l], l))
    moves: dict[tuple, float] = {}
    for j in ups:
        if total_params(specs, up := _moved(ranks, {j: 1})) <= budget:  # unspent budget pays for it
            if change[j, 1] < 0:
                moves[tuple(up)] = change[j, 1]
            continue
        for l in by_harm:
            if l == j:
                continue
            move = _paid_for(ranks, j, [l] + [d for d in by_harm if d != l], specs, budget, min_rank)
            if move is None:
                continue
            predicted = change[j, 1] + sum(change[d, -1] for d in downs if move[d] < ranks[d])  # type: ignore[operator]
            if predicted < 0 and tuple(move) not in moves:
                moves[tuple(move)] = predicted
    return [list(m) for m in sorted(moves, key=lambda m: (moves[m], m))]


def _moved(ranks: Ranks, delta: dict[int, int]) -> Ranks:
    return [r if l not in delta else r + delta[l] for l, r in enumerate(ranks)]  # type: ignore[operator]


def _paid_for(ranks: Ranks, j: int, donors: Sequence[int], specs: Sequence[LayerSpec], budget: int,
              min_rank: int) -> Ranks | None:
    """`ranks` with layer j one rank up and the donors, in order, one rank down each until the
    budget holds (None: they cannot pay for it)."""
    move = _moved(ranks, {j: 1})
    for l in donors:
        if total_params(specs, move) <= budget:
            break
        if l != j and move[l] > min_rank:  # type: ignore[operator]
            move[l] -= 1  # type: ignore[operator]
    return move if total_params(specs, move) <= budget else None
