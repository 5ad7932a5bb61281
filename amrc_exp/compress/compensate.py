"""Error compensation on a model's layers (Sec 3.3, Eq 10-12): Z for every factorized layer,
same-shape layers fitted together, and one report row per layer (Fig 3, Tab 1)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn

from amrc_exp.compress.calibrate import CalibStats, LayerStats
from amrc_exp.compress.config import AMRCConfig
from amrc_exp.compress.lowrank import LayerPlan
from amrc_exp.math.compensate import ZParams, fit_closed_form, fit_gd, residual, residual_error, z_dense
from amrc_exp.math.decompose import Spectrum

__all__ = ["GROUP_H_BYTES", "LayerReport", "compensate_layers", "group_h_bytes", "residual_summary", "split_group"]

# Same-shape layers are fitted together, at most this many float64 H bytes per batch on the CPU:
# the fit holds ~2.5 such copies (stacked, symmetrized, float32), so DeiT-B's 3072-wide fc2
# Grams go 3 at a time instead of 12 (measured peak RSS of the GD run: 6.8 GiB with whole groups).
GROUP_H_BYTES = 256 * 2**20


def group_h_bytes(device: torch.device) -> int:
    """H bytes per batched fit: `GROUP_H_BYTES` on the CPU (RAM is shared with everything else);
    on a GPU a tenth of its free memory (the fit's ~2.5 copies then stay under a quarter), so
    same-shape layers are fitted in one launch-bound loop instead of several."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(GROUP_H_BYTES, free // 10)
    return GROUP_H_BYTES


@dataclass
class LayerReport:
    """One layer's outcome: shape, rank (None = left dense), and the Eq 5 normalized errors
    before and after Z on the held-out and the calibration statistics."""

    name: str
    n_in: int
    n_out: int
    rank: Optional[int]
    rank_cap: int
    energy_loss: float = 0.0
    err_before: float = 0.0
    err_after: float = 0.0
    err_calib_before: float = 0.0
    err_calib_after: float = 0.0
    z_params: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def split_group(names: list[str], weights: dict[str, Tensor], n_chunks: int = 0,
                budget: int = GROUP_H_BYTES) -> list[list[str]]:
    """`names` (one shape) in consecutive parts whose stacked H (the full one plus `n_chunks`
    mini-batch Grams per layer) stays within `budget` bytes. Layers fit independently (batched
    fits equal one-by-one fits), so the split changes no result."""
    n_in = weights[names[0]].shape[0]  # paper layout: W is in x out
    per = max(1, budget // (8 * n_in * n_in * (1 + n_chunks)))
    return [names[i: i + per] for i in range(0, len(names), per)]


def _fit_group(names: list[str], weights: dict[str, Tensor], factors: dict[str, tuple[Tensor, Tensor]],
               stats: CalibStats, config: AMRCConfig) -> ZParams:
    calib, z, zfit = stats.calib, config.z_type, config.zfit
    r = torch.stack([residual(weights[n], *factors[n]) for n in names])
    h = torch.stack([calib[n].H for n in names]).to(r)
    if zfit.solver == "closed_form":
        return fit_closed_form(z.name, r, h, fraction=z.fraction, damp=config.decomp.damp)
    n_eff = torch.tensor([float(calib[n].n_effective) for n in names], dtype=torch.float64)
    hb = nb = None
    if stats.chunks:  # the paper's mini-batches: one Gram per chunk of samples
        hb = torch.stack([torch.stack([c[n].H for c in stats.chunks]) for n in names]).to(r)
        nb = torch.tensor([[float(max(c[n].n_effective, 1)) for c in stats.chunks] for n in names])
    zp, _ = fit_gd(z.name, r, h, n_eff, fraction=z.fraction, lr=zfit.lr, iters=zfit.iters,
                   seed=config.seed, h_batches=hb, n_batches=nb)
    return zp


def compensate_layers(weights: dict[str, Tensor], layers: dict[str, nn.Linear],
                      spectra: dict[str, Spectrum], ranks: dict[str, int | None],
                      stats: CalibStats, config: AMRCConfig) -> tuple[dict[str, LayerPlan], list[LayerReport]]:
    """Fit Z for every factorized layer, same-shape layers batched together; return the plans
    and one `LayerReport` per layer (every layer of `layers`, factorized or not)."""
    factors = {n: spectra[n].factors(r, torch.float64) for n, r in ranks.items() if r is not None}
    groups: dict[tuple[int, int], list[str]] = defaultdict(list)
    for name in factors:
        groups[tuple(weights[name].shape)].append(name)
    zfits: dict[str, ZParams] = {}
    budget = group_h_bytes(next(iter(weights.values())).device) if weights else GROUP_H_BYTES
    for names in groups.values():
        for part in split_group(names, weights, len(stats.chunks), budget):
            zp = _fit_group(part, weights, factors, stats, config)
            zfits.update({name: zp.layer(i) for i, name in enumerate(part)})

    plans, rows = {}, []
    for name, layer in layers.items():
        row = LayerReport(name, layer.in_features, layer.out_features, ranks[name], spectra[name].rank_cap)
        if ranks[name] is not None:
            u, v = factors[name]
            zp = zfits[name]
            zd = z_dense(config.z_type.name, zp)[0].to(u)
            w = weights[name]
            row.energy_loss = spectra[name].energy_loss(ranks[name])
            row.err_before, row.err_after = _err(w, u, v, None, stats.heldout[name]), _err(w, u, v, zd, stats.heldout[name])
            row.err_calib_before = _err(w, u, v, None, stats.calib[name])
            row.err_calib_after = _err(w, u, v, zd, stats.calib[name])
            row.z_params = zp.param_count
            bias = layer.bias.detach() if layer.bias is not None else None
            plans[name] = LayerPlan.from_factors(name, u.float(), v.float(), zp, bias=bias)
        rows.append(row)
    return plans, rows


def _err(w: Tensor, u: Tensor, v: Tensor, z: Tensor | None, s: LayerStats) -> float:
    return float(residual_error(w, u, v, z, s.H.to(w), max(s.n_effective, 1)))


def residual_summary(rows: list[LayerReport]) -> dict[str, float]:
    """Table 1's columns: Z's parameter overhead and the average normalized residual error."""
    fact = [r for r in rows if r.rank is not None]
    if not fact:
        return {"z_overhead": 0.0, "err_before": 0.0, "err_after": 0.0, "n_factorized": 0}
    dense = sum(r.n_in * r.n_out for r in fact)
    return {
        "z_overhead": sum(r.z_params for r in fact) / dense,  # share of the layers' dense params
        "err_before": sum(r.err_before for r in fact) / len(fact),
        "err_after": sum(r.err_after for r in fact) / len(fact),
        "n_factorized": len(fact),
    }
