"""The one public call: search a compression for a model, get a savable report, then apply it.

In the spirit of AWQ's ``run_awq`` → results → ``apply_awq`` and torchao's typed configs::

    report = compress_model(model, calib_loader, heldout_loader, AMRCConfig(ratio=0.5))
    compress_(model, report)            # swap the planned nn.Linear layers in place

`search` is the same from precomputed `CalibStats` (the experiment layer caches them).
The stages, in order: decompose (Sec 3.1) → allocate (Sec 3.2, Algorithm 1) → compensate
(Sec 3.3); the model is only read.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from amrc_exp.compress.calibrate import CalibStats, calibrate, find_layers, gd_chunk_size
from amrc_exp.compress.compensate import LayerReport, compensate_layers, residual_summary
from amrc_exp.compress.config import ASVD_SEARCH, DOBI, OUTPUT_AWARE, AMRCConfig
from amrc_exp.compress.dobi import learn_positions
from amrc_exp.compress.kl_predict import KLPrediction, Sample, pps_sample, predict_kl, ratio_estimate
from amrc_exp.compress.probe import Probe, fisher_rows, layer_sensitivity, whole_model_scorer
from amrc_exp.compress.lowrank import LayerPlan, count_params
from amrc_exp.compress.plan import (RECORDED_ALLOCATIONS, allocate_ranks, check_budget, decompose_layers, layer_specs,
                                    layer_weights)
from amrc_exp.math.decompose import METHODS

__all__ = ["CompressionReport", "compress_model", "search", "needs_probe", "needs_gram", "PROBE_SAMPLES"]

PROBE_SAMPLES = 256  # labelled calibration images the output-measuring settings use by default

Stage = Callable[[str], AbstractContextManager]


def _no_stage(name: str) -> AbstractContextManager:
    return nullcontext()


@dataclass
class CompressionReport:
    """What a search found: the plans to apply and one row per compressible layer.

    `state_dict()` is plain tensors, lists and numbers (``torch.save`` it), and
    `from_state_dict` rebuilds the report, so a search can be applied later or elsewhere."""

    plans: dict[str, LayerPlan]
    layers: list[LayerReport]
    params_before: int
    params_target: int
    n_minibatches: int = 1  # GD mini-batches the Z fit used (1: the full-batch gradient)
    energy_curves: dict[str, list[float]] = field(default_factory=dict)  # Fig 1: loss vs rank
    allocation_kl: dict[str, float] = field(default_factory=dict)  # check_uniform / refine_steps: probe KL per allocation

    @property
    def ranks(self) -> dict[str, Optional[int]]:
        return {r.name: r.rank for r in self.layers}

    def summary(self) -> dict[str, float]:
        """Table 1's columns (Z overhead, mean held-out error before/after Z)."""
        return residual_summary(self.layers)

    def state_dict(self) -> dict[str, Any]:
        return {"plans": {n: p.state_dict() for n, p in self.plans.items()},
                "layers": [r.to_dict() for r in self.layers],
                **{f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("plans", "layers")}}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "CompressionReport":
        rest = {k: v for k, v in state.items() if k not in ("plans", "layers")}
        return cls(plans={n: LayerPlan.from_state_dict(p) for n, p in state["plans"].items()},
                   layers=[LayerReport(**r) for r in state["layers"]], **rest)


def search(model: nn.Module, stats: CalibStats, config: AMRCConfig, *,
           stage: Stage = _no_stage) -> CompressionReport:
    """Decompose, allocate and compensate `model`'s compressible layers from `stats`.

    `stage(name)` is entered around each stage ("decompose", "allocate", "compensate"), e.g.
    a timer. Raises ConfigError when the budget cannot be met (see `plan.check_budget`)."""
    layers = find_layers(model, config.patterns)
    n0 = count_params(model)
    to_remove = check_budget(layers, n0, config)
    calib = stats.calib
    if "fisher" in _decomp_stats(config) and any(s.fisher is None for s in calib.values()):
        with stage("fisher"):
            fisher = fisher_rows(model, _probe_of(stats, f"decomp.name={config.decomp.name}"), layers)
            calib = {n: replace(s, fisher=fisher[n]) for n, s in calib.items()}
    with stage("decompose"):
        weights = layer_weights(layers)
        spectra = decompose_layers(weights, calib, config.decomp)

    schedule = config.schedule
    # schedule.ratio_samples: the prediction on that many probe images and the score_samples of
    # them drawn by it (`kl_predict.pps_sample`), made once, on first use
    predicted: Optional[tuple[KLPrediction, Sample]] = None

    def scored(what: str) -> Probe:
        """The probe images the output-aware measurements run on (weighted where drawn)."""
        nonlocal predicted
        probe = _probe_of(stats, what)
        if schedule.ratio_samples is None:
            return probe.subset(schedule.score_samples)
        if predicted is None:
            prediction = predict_kl(model, layers, spectra, probe.subset(schedule.ratio_samples))
            predicted = prediction, pps_sample(prediction.size(), schedule.score_samples,
                                               torch.Generator().manual_seed(config.seed))
        sample = predicted[1]
        return probe.take(sample.index, sample.weights)

    def rescaled(kl: dict[str, float], allocations: dict[str, dict[str, Optional[int]]]) -> dict[str, float]:
        """schedule.ratio_samples: each KL measured on the drawn images through Eq (3)."""
        if predicted is None:
            return kl
        prediction, sample = predicted
        return {k: ratio_estimate(v, prediction.allocation(allocations[k]), sample) for k, v in kl.items()}

    def sensitivity(metric: str, ranks: dict[str, list[int]]) -> dict[str, dict[int, float]]:
        out = layer_sensitivity(model, layers, spectra, ranks, scored(f"schedule.name={schedule.name}"), metric)
        if metric != "kl":  # the prediction is of the KL (ASVD's loss is not rescaled)
            return out
        flat = rescaled({f"{n} {r}": v for n, d in out.items() for r, v in d.items()},
                        {f"{n} {r}": {n: r} for n, d in out.items() for r in d})
        return {n: {r: flat[f"{n} {r}"] for r in d} for n, d in out.items()}

    checked: dict[str, float] = {}  # what schedule.check_uniform / refine_steps measured, kept for the report
    scorer = None  # made on the first call: the dense output is measured once per search

    def whole_model_kl(allocations: dict[str, dict[str, Optional[int]]],
                       base: Optional[dict[str, Optional[int]]] = None) -> dict[str, float]:
        nonlocal scorer
        if scorer is None:
            scorer = whole_model_scorer(model, layers, spectra, scored("schedule.check_uniform / schedule.refine_steps"))
        kl = rescaled(scorer(allocations, base), allocations)
        checked.update((k, v) for k, v in kl.items() if k in RECORDED_ALLOCATIONS)
        return kl

    specs = layer_specs(layers, config.z_type)
    with stage("allocate"):
        positions = None
        if config.schedule.name == DOBI:
            positions = learn_positions(model, layers, _probe_of(stats, f"schedule.name={DOBI}"), specs, to_remove,
                                        config.schedule, seed=config.seed)
        ranks = allocate_ranks(spectra, specs, to_remove, schedule, sensitivity, positions, whole_model_kl)
    with stage("compensate"):
        plans, rows = compensate_layers(weights, layers, spectra, ranks, stats, config)
    return CompressionReport(plans, rows, params_before=n0, params_target=n0 - to_remove,
                             n_minibatches=stats.n_minibatches,
                             energy_curves={n: s.energy_curve().tolist() for n, s in spectra.items()},
                             allocation_kl=checked)


def _probe_of(stats: CalibStats, what: str) -> Probe:
    if stats.probe is None:
        raise ValueError(f"{what} measures the model's output on probe images: calibrate with "
                         "probe_samples > 0 (compress_model does so for these settings)")
    return stats.probe


def _decomp_stats(config: AMRCConfig) -> tuple[str, ...]:
    """The statistics the configured decomposition reads (its entry in `math.decompose.METHODS`)."""
    return METHODS[config.decomp.name][1]


def needs_probe(config: AMRCConfig) -> bool:
    """Whether the search measures the model's output (and so needs `CalibStats.probe`): the
    Fisher of a decomposition, an allocation by sensitivities, or Dobi-SVD's trained positions."""
    return "fisher" in _decomp_stats(config) or config.schedule.name in (ASVD_SEARCH, OUTPUT_AWARE, DOBI)


def needs_gram(config: AMRCConfig) -> bool:
    """Whether calibration must also collect the unnormalised Gram G (`calibrate(gram=True)`)."""
    return "G" in _decomp_stats(config)


def compress_model(model: nn.Module, calib_loader: Iterable[Any], heldout_loader: Iterable[Any],
                   config: AMRCConfig | None = None, *, num_samples: int | None = None,
                   heldout_samples: int | None = None, device: torch.device | str | None = None,
                   amp: bool = False, stage: Stage = _no_stage, probe_samples: int = PROBE_SAMPLES) -> CompressionReport:
    """Calibrate on the loaders' images (labels ignored), then `search`. The model is not
    changed: apply the result with ``compress_(model, report)``.

    Calibration is chunked into the GD mini-batches of ``config.zfit`` (Sec 4.1 item 4) so
    the paper's mini-batch Z fit can run; `num_samples` / `heldout_samples` default to the
    loaders' dataset sizes."""
    config = config or AMRCConfig()
    layers = find_layers(model, config.patterns)
    check_budget(layers, count_params(model), config)  # seconds, before the calibration pass
    with stage("calibrate"):
        n_calib = num_samples if num_samples is not None else len(calib_loader.dataset)  # type: ignore[attr-defined]
        chunk = gd_chunk_size(config.zfit.batch_size, config.zfit.max_chunk_gib, layers, n_calib,
                              device or next(model.parameters()).device)
        stats = calibrate(model, calib_loader, heldout_loader, num_samples=n_calib,
                          heldout_samples=heldout_samples, chunk_size=chunk, layers=layers,
                          device=device, amp=amp, gram=needs_gram(config),
                          probe_samples=probe_samples if needs_probe(config) else 0)
    return search(model, stats, config, stage=stage)
