"""Compression stages glued to a model: calibrate → decompose → allocate → compensate.

The math lives in `amrc_exp.math` (tensors in, tensors out); this module maps a timm model's
layers onto it (torch Linear.weight is out x in = Wᵀ of the paper's convention) and produces
the `LayerPlan`s that `lowrank.compress_` swaps in, plus one report row per layer.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from amrc_exp import cache
from amrc_exp.calibrate import LayerStats, collect_stats, find_layers
from amrc_exp.errors import ConfigError
from amrc_exp.lowrank import LayerPlan
from amrc_exp.math.allocate import LayerSpec, allocate_greedy, allocate_uniform, max_removable
from amrc_exp.math.compensate import fit_closed_form, fit_gd, residual, residual_error, z_dense, z_param_count
from amrc_exp.math.decompose import Spectrum, decompose

find_compressible = find_layers


def calibration_stats(model: nn.Module, splits, cfg: DictConfig, device: torch.device,
                      amp: bool) -> tuple[dict[str, dict[str, LayerStats]], bool]:
    """Statistics of the calibration set (whole, and per GD mini-batch chunk) and of the
    held-out set, from the cache when it has them. Returns ({"calib", "heldout", "chunks"?}, hit)."""
    from amrc_exp.data import make_loader

    layers = find_layers(model)
    chunk = chunk_size(cfg, layers, len(splits.calib))
    key = cache.stats_key(cfg, chunk)
    sets = cache.load_stats(cfg.cache_dir, key)
    hit = sets is not None
    if not hit:
        sets = {}
        parts = [("heldout", splits.heldout)]
        starts = range(0, len(splits.calib), chunk)
        parts += [(f"calib/{i:04d}", torch.utils.data.Subset(splits.calib, range(a, min(a + chunk, len(splits.calib)))))
                  for i, a in enumerate(starts)]
        for name, dataset in parts:
            loader = make_loader(dataset, cfg.calib.batch_size, shuffle=False, seed=cfg.seed,
                                 num_workers=cfg.data.num_workers)
            sets[name] = collect_stats(model, loader, layers, len(dataset), device, amp, desc=f"calibrate {name}")
        cache.save_stats(cfg.cache_dir, key, sets)
    chunks = [sets[k] for k in sorted(sets) if k.startswith("calib/")]
    out = {"calib": merge_stats(chunks), "heldout": sets["heldout"]}
    if len(chunks) > 1:
        out["chunks"] = chunks
    return {name: {k: s.to(device) for k, s in st.items()} if name != "chunks" else st
            for name, st in out.items()}, hit


def chunk_size(cfg: DictConfig, layers: dict[str, nn.Linear], n_calib: int) -> int:
    """Samples per GD mini-batch Gram; the whole set when mini-batches are off or too large.

    One Gram per chunk costs sum(in^2) float64 per chunk: 16 chunks of DeiT-B are ~17 GiB, so
    above zfit.max_chunk_gib the GD falls back to the full-set gradient (recorded in results)."""
    size = cfg.zfit.batch_size  # independent of zfit.solver, so gd and closed_form share a cache entry
    if size <= 0 or size >= n_calib:
        return n_calib
    n_chunks = -(-n_calib // size)
    gib = n_chunks * sum(l.in_features ** 2 for l in layers.values()) * 8 / 2 ** 30
    return size if gib <= cfg.zfit.max_chunk_gib else n_calib


def merge_stats(parts: list[dict[str, LayerStats]]) -> dict[str, LayerStats]:
    """Statistics of the union of disjoint sample sets: Grams add, X_rep is the weighted mean."""
    merged = {}
    for name in parts[0]:
        ps = [p[name] for p in parts]
        n = sum(p.n_samples for p in ps)
        merged[name] = LayerStats(H=sum(p.H for p in ps), x_rep=sum(p.x_rep * p.n_samples for p in ps) / n,
                                  n_samples=n, n_tokens=ps[0].n_tokens,
                                  n_skipped=sum(p.n_skipped for p in ps))
    return merged


def layer_weights(layers: dict[str, nn.Linear]) -> dict[str, Tensor]:
    """W in the paper's layout (in x out), float64, on the layer's device."""
    return {name: layer.weight.detach().to(torch.float64).T for name, layer in layers.items()}


def decompose_layers(weights: dict[str, Tensor], stats: dict[str, LayerStats],
                     decomp_cfg: DictConfig) -> dict[str, Spectrum]:
    """Full spectrum of every layer, once (Sec 3.1); Algorithm 1 never re-runs an SVD."""
    return {name: decompose(decomp_cfg.name, w, H=stats[name].H, x_rep=stats[name].x_rep,
                            damp=decomp_cfg.get("damp", 1e-4))
            for name, w in weights.items()}


def layer_specs(layers: dict[str, nn.Linear], z_cfg: DictConfig) -> list[LayerSpec]:
    """Shapes and Z overheads; Z's parameters are charged to the budget (Tab 2's params)."""
    return [LayerSpec(name, layer.in_features, layer.out_features,
                      z_param_count(z_cfg.name, layer.in_features, layer.out_features, z_cfg.fraction))
            for name, layer in layers.items()]


def params_to_remove(n0: int, cfg: DictConfig) -> int:
    """The whole model's budget: ratio·N0, or N0 − target_params."""
    if cfg.target_params is not None:
        if cfg.target_params >= n0:
            raise ConfigError("target_params", cfg.target_params, f"fewer than the model's {n0} parameters")
        return n0 - int(cfg.target_params)
    return round(cfg.ratio * n0)


def check_budget(specs: list[LayerSpec], to_remove: int, n0: int, cfg: DictConfig) -> None:
    """ConfigError (naming ratio or target_params, and the largest value that works) when no
    allocation can remove `to_remove` parameters. Needs only shapes: run it before calibration."""
    min_rank = int(cfg.schedule.min_rank)
    most = max_removable(specs, min_rank)
    if to_remove <= most:
        return
    z = f"z_type={cfg.z_type.name} (z_type.fraction={cfg.z_type.fraction})"
    if most == 0:
        why = (f"no compressible layer gets smaller than dense when factorized at rank "
               f"schedule.min_rank={min_rank} with the overhead of {z}")
    else:
        why = (f"at most {most} of the model's {n0} parameters are removable (every compressible layer "
               f"at rank schedule.min_rank={min_rank}, plus the overhead of {z})")
    fix = "lower z_type.fraction, a cheaper z_type (lowrank, diagonal, none) or a lower schedule.min_rank"
    if cfg.target_params is not None:
        raise ConfigError("target_params", cfg.target_params,
                          f"an integer >= {n0 - most} for this model: {why}; raise target_params or use {fix}")
    if most == 0:  # no ratio works: the Z overhead (or min_rank) is the value to change
        key = "z_type.fraction" if cfg.z_type.name in ("lowrank", "sparse_unstructured",
                                                       "sparse_structured") else "schedule.min_rank"
        raise ConfigError(key, OmegaConf.select(cfg, key), f"a smaller value: {why}, so no ratio "
                          f"can be met; use {fix}")
    largest = math.floor(most / n0 * 1e4) / 1e4
    raise ConfigError("ratio", cfg.ratio, f"a number <= {largest:.4f} for this model: {why}; "
                                          f"lower ratio or use {fix}")


def allocate_ranks(spectra: dict[str, Spectrum], specs: list[LayerSpec], to_remove: int,
                   schedule_cfg: DictConfig) -> dict[str, int | None]:
    """Rank per layer (None = stays dense) meeting the budget (Sec 3.2, Algorithm 1)."""
    most = max_removable(specs, schedule_cfg.min_rank)
    if to_remove > most:
        raise ConfigError("ratio", f"{to_remove} parameters to remove",
                          f"at most {most} removable from the compressible layers with this z_type "
                          "(lower ratio, raise target_params, or use a cheaper z_type)")
    if schedule_cfg.name == "uniform":
        ranks = allocate_uniform(specs, to_remove, schedule_cfg.min_rank)
    else:
        curves = [spectra[s.name].energy_curve() for s in specs]
        ranks = allocate_greedy(curves, specs, to_remove, schedule_cfg.name, schedule_cfg.iters,
                                schedule_cfg.get("gamma", 80.0), schedule_cfg.min_rank)
    return {s.name: r for s, r in zip(specs, ranks)}


# Same-shape layers are fitted together, at most this many float64 H bytes per batch: the fit
# holds ~2.5 such copies (stacked, symmetrized, float32), so DeiT-B's 3072-wide fc2 Grams go 3
# at a time instead of 12 (measured peak RSS of the GD run: 6.8 GiB with whole groups).
GROUP_H_BYTES = 256 * 2**20


def _split_group(names: list[str], weights: dict[str, Tensor], n_chunks: int = 0) -> list[list[str]]:
    """`names` (one shape) in consecutive parts whose stacked H (the full one plus `n_chunks`
    mini-batch Grams per layer) stays within GROUP_H_BYTES. Layers fit independently (batched
    fits equal one-by-one fits), so the split changes no result."""
    n_in = weights[names[0]].shape[0]  # math convention: W is in x out
    per = max(1, GROUP_H_BYTES // (8 * n_in * n_in * (1 + n_chunks)))
    return [names[i: i + per] for i in range(0, len(names), per)]


def compensate_layers(weights: dict[str, Tensor], layers: dict[str, nn.Linear],
                      spectra: dict[str, Spectrum], ranks: dict[str, int | None],
                      stats: dict[str, dict[str, LayerStats]], cfg: DictConfig
                      ) -> tuple[dict[str, LayerPlan], list[dict[str, Any]]]:
    """Fit Z for every factorized layer (Sec 3.3), same-shape layers batched together.

    Returns the plans and one report row per layer with the held-out normalized error
    before and after Z (Fig 3, Tab 1)."""
    calib, held = stats["calib"], stats["heldout"]
    factors = {n: spectra[n].factors(r, torch.float64) for n, r in ranks.items() if r is not None}
    groups: dict[tuple[int, int], list[str]] = defaultdict(list)
    for name in factors:
        groups[tuple(weights[name].shape)].append(name)

    zfits = {}
    n_chunks = len(stats.get("chunks", []))
    for names in (part for names in groups.values() for part in _split_group(names, weights, n_chunks)):
        r = torch.stack([residual(weights[n], *factors[n]) for n in names])
        h = torch.stack([calib[n].H for n in names]).to(r)
        if cfg.zfit.solver == "closed_form":
            z = fit_closed_form(cfg.z_type.name, r, h, fraction=cfg.z_type.fraction,
                                damp=cfg.decomp.get("damp", 1e-4))
        else:
            n_eff = torch.tensor([float(calib[n].n_effective) for n in names], dtype=torch.float64)
            hb = nb = None
            if "chunks" in stats:  # the paper's mini-batches: one Gram per chunk of samples
                hb = torch.stack([torch.stack([c[n].H for c in stats["chunks"]]) for n in names]).to(r)
                nb = torch.tensor([[float(max(c[n].n_effective, 1)) for c in stats["chunks"]] for n in names])
            z, _ = fit_gd(cfg.z_type.name, r, h, n_eff, fraction=cfg.z_type.fraction, lr=cfg.zfit.lr,
                          iters=cfg.zfit.iters, seed=cfg.seed, h_batches=hb, n_batches=nb)
        for i, name in enumerate(names):
            zfits[name] = z.layer(i)

    plans, rows = {}, []
    for name, layer in layers.items():
        row: dict[str, Any] = {"name": name, "n_in": layer.in_features, "n_out": layer.out_features,
                               "rank": ranks[name], "rank_cap": spectra[name].rank_cap,
                               "energy_loss": 0.0, "err_before": 0.0, "err_after": 0.0,
                               "err_calib_before": 0.0, "err_calib_after": 0.0, "z_params": 0}
        if ranks[name] is not None:
            u, v = factors[name]
            zp = zfits[name]
            zd = z_dense(cfg.z_type.name, zp)[0].to(u)
            w = weights[name]
            row.update(
                energy_loss=spectra[name].energy_loss(ranks[name]),
                err_before=_err(w, u, v, None, held[name]), err_after=_err(w, u, v, zd, held[name]),
                err_calib_before=_err(w, u, v, None, calib[name]),
                err_calib_after=_err(w, u, v, zd, calib[name]),
                z_params=zp.param_count,
            )
            bias = layer.bias.detach() if layer.bias is not None else None
            plans[name] = LayerPlan.from_z(name, u.float(), v.float(), cfg.z_type.name, zp, bias=bias)
        rows.append(row)
    return plans, rows


def _err(w: Tensor, u: Tensor, v: Tensor, z: Tensor | None, s: LayerStats) -> float:
    return float(residual_error(w, u, v, z, s.H.to(w), max(s.n_effective, 1)))


def residual_summary(rows: list[dict[str, Any]], specs: list[LayerSpec]) -> dict[str, float]:
    """Table 1's columns: Z's parameter overhead and the average normalized residual error."""
    fact = [r for r in rows if r["rank"] is not None]
    if not fact:
        return {"z_overhead": 0.0, "err_before": 0.0, "err_after": 0.0, "n_factorized": 0}
    dense = sum(r["n_in"] * r["n_out"] for r in fact)
    return {
        "z_overhead": sum(r["z_params"] for r in fact) / dense,  # share of the layers' dense params
        "err_before": sum(r["err_before"] for r in fact) / len(fact),
        "err_after": sum(r["err_after"] for r in fact) / len(fact),
        "n_factorized": len(fact),
    }
