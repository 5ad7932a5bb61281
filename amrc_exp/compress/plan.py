"""Planning on a model's layers: weights, spectra (Sec 3.1), the budget and the ranks (Sec 3.2).

The math lives in `amrc_exp.math` (paper layout, W: in x out); this module maps a timm
model's ``nn.Linear`` layers onto it. torch's ``Linear.weight`` is out x in = Wᵀ, converted
once in `layer_weights`.
"""

from __future__ import annotations

import math
import re
from typing import Callable, Optional

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from amrc_exp.compress.calibrate import LayerStats
from amrc_exp.compress.config import (ASVD_SEARCH, DOBI, OUTPUT_AWARE, PARAM_UNIFORM, TRUNCATION_LOSS, UNIFORM,
                                      AMRCConfig, DecompConfig, ScheduleConfig, ZConfig)
from amrc_exp.errors import ConfigError
from amrc_exp.math.allocate import (LayerSpec, allocate_by_cost, allocate_greedy, allocate_positions,
                                    allocate_truncation_loss, allocate_uniform, asvd_search, candidate_ranks,
                                    max_removable, ratio_rank, sensitivity_curve)
from amrc_exp.math.compensate import Z_TYPES, z_param_count
from amrc_exp.math.decompose import Spectrum, decompose
from amrc_exp.math.refine import refine_ranks

__all__ = ["layer_weights", "decompose_layers", "layer_specs", "check_budget", "allocate_ranks", "REFINED",
           "RECORDED_ALLOCATIONS"]


def layer_weights(layers: dict[str, nn.Linear]) -> dict[str, Tensor]:
    """W in the paper's layout (in x out), float64, on the layer's device."""
    return {name: layer.weight.detach().to(torch.float64).T for name, layer in layers.items()}


def decompose_layers(weights: dict[str, Tensor], stats: dict[str, LayerStats],
                     decomp: DecompConfig) -> dict[str, Spectrum]:
    """Full spectrum of every layer, once (Sec 3.1); Algorithm 1 never re-runs an SVD."""
    return {name: decompose(decomp.name, w, damp=decomp.damp, alpha=decomp.alpha, **stats[name].tensors())
            for name, w in weights.items()}


def layer_specs(layers: dict[str, nn.Linear], z: ZConfig) -> list[LayerSpec]:
    """Shapes and Z overheads; Z's parameters are charged to the budget (Tab 2's params)."""
    return [LayerSpec(name, layer.in_features, layer.out_features,
                      z_param_count(z.name, layer.in_features, layer.out_features, z.fraction))
            for name, layer in layers.items()]


def check_budget(layers: dict[str, nn.Linear], n0: int, config: AMRCConfig) -> int:
    """The number of parameters to remove, after checking that some allocation can remove it.

    Needs only shapes, so a run calls it before calibration and an unmeetable budget fails in
    seconds. ConfigError names the key to change: ratio or target_params (with the largest
    value that works), or, when no budget at all can be met, what makes every layer too
    expensive to factorize (no compressible layer, z_type.fraction or schedule.min_rank)."""
    to_remove = config.params_to_remove(n0)
    min_rank = config.schedule.min_rank
    specs = layer_specs(layers, config.z_type)
    most = max_removable(specs, min_rank)
    if to_remove <= most:
        return to_remove
    z = config.z_type
    if not specs:
        raise ConfigError("model.name", "(this model)", "a ViT/DeiT/Swin whose block linears match the "
                          f"compressible-layer patterns {list(config.patterns)}: none of its layers matches")
    if most == 0:
        why = (f"no compressible layer gets smaller than dense when factorized at rank "
               f"schedule.min_rank={min_rank}, plus the overhead of z_type={z.name} "
               f"(z_type.fraction={z.fraction})")
        # The Z overhead is the culprit only if rank min_rank alone would have saved something.
        bare = max_removable(layer_specs(layers, ZConfig("none")), min_rank)
        if bare > 0 and z.name in ("lowrank", "sparse_unstructured", "sparse_structured"):
            raise ConfigError("z_type.fraction", z.fraction, f"a smaller value: {why}, so no ratio can be "
                              f"met; use {_budget_fixes(layers, config, most, n0)}")
        raise ConfigError("schedule.min_rank", min_rank, f"a smaller value: {why}, so no ratio can be met")
    why = (f"at most {most} of its {n0} parameters are removable (every compressible layer at rank "
           f"schedule.min_rank={min_rank}, plus the overhead of z_type={z.name} (z_type.fraction={z.fraction}))")
    fix = _budget_fixes(layers, config, most, n0)
    if config.target_params is not None:
        raise ConfigError("target_params", config.target_params,
                          f"an integer >= {n0 - most} for this model: {why}; raise target_params or use {fix}")
    raise ConfigError("ratio", config.ratio, f"a number <= {_ratio_floor(most, n0)} for this model: {why}; "
                                             f"lower ratio or use {fix}")


def _ratio_floor(removable: int, n0: int) -> str:
    """The largest ratio (4 decimals, rounded down) that removing `removable` of `n0` meets."""
    return f"{math.floor(removable / n0 * 1e4) / 1e4:.4f}"


def _budget_fixes(layers: dict[str, nn.Linear], config: AMRCConfig, most: int, n0: int) -> str:
    """The settings that would remove more than `most` parameters from these layer shapes, each
    with the largest ratio it allows: only those that help, worked out, not a fixed list."""
    z, min_rank = config.z_type, config.schedule.min_rank

    def removable(z_config: ZConfig, rank: int) -> int:
        return max_removable(layer_specs(layers, z_config), rank)

    fixes = []
    if z.fraction > 0 and (m := removable(ZConfig(z.name, 0.0), min_rank)) > most:
        fixes.append(f"a lower z_type.fraction (0: ratio <= {_ratio_floor(m, n0)})")
    cheaper = [(name, m) for name in Z_TYPES if name != z.name
               and (m := removable(ZConfig(name, z.fraction), min_rank)) > most]
    if cheaper:
        fixes.append("a cheaper z_type (" + ", ".join(f"{name}: ratio <= {_ratio_floor(m, n0)}"
                                                     for name, m in sorted(cheaper, key=lambda c: -c[1])) + ")")
    if min_rank > 0 and (m := removable(z, 0)) > most:
        fixes.append(f"schedule.min_rank=0 (rank 0 keeps a layer's bias only: ratio <= {_ratio_floor(m, n0)})")
    return " or ".join(fixes) if fixes else "nothing else: no z_type or schedule.min_rank removes more"


# ASVD's candidate kept-parameter ratios: its code uses 0.4..0.9 for weights (LLMs lose little
# there) and 0.1 steps for its KV-cache variant; 0.0..0.9 in 0.1 steps here, so the search can
# reach the 0.8-0.9 whole-model ratios of a small ViT (0.0: the bias alone).
ASVD_RATIOS = tuple(i / 10 for i in range(10))

# metric, {layer: ranks to measure} -> {layer: {rank: value}} (`probe.layer_sensitivity` bound to a model)
Sensitivity = Callable[[str, dict[str, list[int]]], dict[str, dict[int, float]]]
# ({label: {layer: rank}}, base allocation or None) -> {label: whole-model probe KL}
# (`probe.whole_model_scorer`; `base`: the allocation the others are near, see there)
WholeModelKL = Callable[..., dict[str, float]]
REFINED = "refined"  # schedule.refine_steps: the label of the allocation the local search ends on
# The whole-model KLs a run records (results.json `allocation_kl`); the search's neighbours are not.
RECORDED_ALLOCATIONS = (OUTPUT_AWARE, PARAM_UNIFORM, REFINED)


def weight_type(spec: LayerSpec) -> str:
    """SVD-LLM V2's allocation group of a layer: its name without block indices, and its shape
    (`blocks.3.attn.qkv` -> `blocks.attn.qkv 64x192`; Swin's stages differ in width)."""
    kind = re.sub(r"[.]\d+(?=[.])", "", spec.name)
    return f"{kind} {spec.n_in}x{spec.n_out}"


def allocate_ranks(spectra: dict[str, Spectrum], specs: list[LayerSpec], to_remove: int,
                   schedule: ScheduleConfig, sensitivity: Optional[Sensitivity] = None,
                   positions: Optional[dict[str, float]] = None,
                   whole_model_kl: Optional[WholeModelKL] = None) -> dict[str, int | None]:
    """Rank per layer (None = stays dense) meeting the budget (Sec 3.2); the budget was checked
    by `check_budget`. `asvd_search` and `output_aware` measure the model through `sensitivity`
    (and `output_aware` with `check_uniform` or `refine_steps` through `whole_model_kl`); `dobi`
    reads the truncation positions `compress.dobi.learn_positions` trained."""
    name, min_rank = schedule.name, schedule.min_rank
    if name in (ASVD_SEARCH, OUTPUT_AWARE) and sensitivity is None:
        raise ValueError(f"schedule.name={name} measures the model: pass `sensitivity` (search() does)")
    if name == OUTPUT_AWARE and (schedule.check_uniform or schedule.refine_steps) and whole_model_kl is None:
        raise ValueError("schedule.check_uniform and schedule.refine_steps measure the whole model: "
                         "pass `whole_model_kl` (search() does)")
    if name == DOBI and positions is None:
        raise ValueError(f"schedule.name={name} reads learned truncation positions: pass `positions` (search() does)")
    if name == UNIFORM:
        ranks = allocate_uniform(specs, to_remove, min_rank)
    elif name == PARAM_UNIFORM:
        ranks = allocate_uniform(specs, to_remove, min_rank, kind="params")
    elif name == TRUNCATION_LOSS:
        ranks = allocate_truncation_loss([spectra[s.name].sigma for s in specs], specs,
                                         [weight_type(s) for s in specs], to_remove, min_rank)
    elif name == DOBI:
        ranks = allocate_positions([positions[s.name] for s in specs], specs, to_remove, min_rank)
    elif name == ASVD_SEARCH:
        asked = {s.name: {p: ratio_rank(s, p) for p in ASVD_RATIOS} for s in specs}
        loss = sensitivity("loss", {n: sorted(set(d.values())) for n, d in asked.items()})
        ranks = asvd_search([{p: loss[s.name][r] for p, r in asked[s.name].items()} for s in specs], specs, to_remove)
    elif name == OUTPUT_AWARE:
        kl = sensitivity("kl", {s.name: candidate_ranks(s, schedule.candidates, min_rank) for s in specs})
        costs = [sensitivity_curve(spectra[s.name].energy_curve().tolist(), kl[s.name], s.break_even_rank + 1)
                 for s in specs]
        ranks = allocate_by_cost(costs, specs, to_remove, min_rank)
        if schedule.check_uniform:
            ranks = _checked(specs, ranks, allocate_uniform(specs, to_remove, min_rank, kind="params"), whole_model_kl)
        if schedule.refine_steps:
            ranks = _refined(specs, ranks, to_remove, schedule, whole_model_kl)
    else:
        curves = [spectra[s.name].energy_curve() for s in specs]
        ranks = allocate_greedy(curves, specs, to_remove, schedule.name, schedule.iters,
                                schedule.gamma, min_rank)
    return {s.name: r for s, r in zip(specs, ranks)}


def _checked(specs: list[LayerSpec], ranks: list[int | None], uniform: list[int | None],
             whole_model_kl: WholeModelKL) -> list[int | None]:
    """`ranks` (output_aware's) unless the param_uniform ranks give the whole model a lower probe
    KL (ties keep `ranks`): both meet the budget, so the measured output decides."""
    options = {OUTPUT_AWARE: {s.name: r for s, r in zip(specs, ranks)},
               PARAM_UNIFORM: {s.name: r for s, r in zip(specs, uniform)}}
    kl = whole_model_kl(options)
    return uniform if kl[PARAM_UNIFORM] < kl[OUTPUT_AWARE] else ranks


def _refined(specs: list[LayerSpec], ranks: list[int | None], to_remove: int, schedule: ScheduleConfig,
             whole_model_kl: WholeModelKL) -> list[int | None]:
    """`math.refine.refine_ranks` from `ranks` with the whole model's probe KL as the measurement;
    the end point is measured once more under the label REFINED, so a run records it. The
    search's allocations are measured as neighbours of its current one (`base`), so each reruns
    the model from its first changed block only."""
    base = {s.name: r for s, r in zip(specs, ranks)}

    def measure(allocations: list[list[int | None]]) -> list[float]:
        kl = whole_model_kl({f"neighbour {i}": {s.name: r for s, r in zip(specs, a)} for i, a in enumerate(allocations)},
                            base=base)
        return [kl[f"neighbour {i}"] for i in range(len(allocations))]

    with tqdm(total=schedule.refine_steps, desc="refine (whole-model kl)", leave=False, dynamic_ncols=True) as bar:
        def step(now: list[int | None], kl: float) -> None:
            base.update((s.name, r) for s, r in zip(specs, now))
            bar.update()
            bar.set_postfix(kl=f"{kl:.4g}")

        ranks, _ = refine_ranks(ranks, specs, to_remove, measure, schedule.min_rank, schedule.refine_steps,
                                schedule.refine_tol, step)
    whole_model_kl({REFINED: {s.name: r for s, r in zip(specs, ranks)}}, base=base)
    return ranks
