"""Rank sensitivity (the paper's Fig 2): top-1 as the rank of one block's layers, or of one
layer type across all blocks, is reduced while every other layer stays dense.

    python -m amrc_exp.experiment.sensitivity [overrides]       # one run -> <run dir>/sensitivity.json
    python -m amrc_exp.experiment.sensitivity -m --config-dir sweeps --config-name fig2_embedded

Same config as `python -m amrc_exp` (model, data, decomp, calib, ...) plus a `sensitivity`
node: `fractions` (rank kept, as a fraction of each layer's full rank min(in, out)) and
`groups` (`blocks`: one curve per transformer block; `types`: one curve per layer type —
attn.qkv, attn.proj, mlp.fc1, mlp.fc2 — across all blocks). The low-rank weights come from
the run's `decomp` (svd, asvd_mean or asvd_whiten) with no error compensation and no
fine-tuning, so the curves show each group's own sensitivity. Calibration statistics come from
(and go to) the same cache as the compression runs.

A rerun in a directory that already holds a complete sensitivity.json for the same config
skips the work, by the same rule as `amrc_exp.experiment.run.run` for results.json
(`amrc_exp.experiment.results.finished_result`).
"""

from __future__ import annotations

import logging
import re
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import hydra
import torch
from omegaconf import DictConfig
from torch import nn

from amrc_exp.compress.probe import replaced_weight
from amrc_exp.errors import ConfigError
from amrc_exp.experiment.config import RunConfig, as_plain, to_run_config
from amrc_exp.experiment.results import finished_result
from amrc_exp.io import atomic_write_json

log = logging.getLogger(__name__)
OUTPUT = "sensitivity.json"
GROUP_KINDS = ("blocks", "types")
_BLOCK = re.compile(r"^(.*?blocks\.\d+)\.(.+)$")  # timm ViT/DeiT "blocks.3.", Swin "layers.1.blocks.0."


@dataclass
class SensitivityConfig:
    fractions: list[float] = field(default_factory=lambda: [0.75, 0.5, 0.25, 0.1])
    groups: list[str] = field(default_factory=lambda: list(GROUP_KINDS))

    def __post_init__(self) -> None:
        fractions = [float(f) for f in self.fractions]
        if not fractions or not all(0.0 < f <= 1.0 for f in fractions):
            raise ConfigError("sensitivity.fractions", fractions, "a non-empty list of numbers in (0, 1]")
        for kind in self.groups:
            if kind not in GROUP_KINDS:
                raise ConfigError("sensitivity.groups", kind, "blocks and/or types")


@dataclass
class SensitivityRunConfig(RunConfig):
    sensitivity: SensitivityConfig = field(default_factory=SensitivityConfig)


def register_schema() -> None:
    """Make `conf/config.yaml`'s `config_schema` the run schema plus the `sensitivity` node."""
    from amrc_exp.experiment import config

    config.register_schema(SensitivityRunConfig)


def group_layers(names: list[str], kind: str) -> dict[str, list[str]]:
    """Layer names grouped by block ("blocks.3") or by layer type ("attn.qkv"), in model order.

    Layers outside any block (none among timm's compressible linears) are left out."""
    if kind not in GROUP_KINDS:
        raise ConfigError("sensitivity.groups", kind, "blocks and/or types")
    groups: dict[str, list[str]] = {}
    for name in names:
        m = _BLOCK.match(name)
        if m:
            groups.setdefault(m.group(1) if kind == "blocks" else m.group(2), []).append(name)
    return groups


def kept_rank(max_rank: int, fraction: float) -> int:
    """Rank kept for a fraction of the full rank: round(fraction * max_rank), at least 1."""
    return max(1, min(max_rank, round(fraction * max_rank)))


@contextmanager
def reduced_rank(layers: dict[str, nn.Linear], spectra: dict[str, Any], names: list[str],
                 fraction: float) -> Iterator[dict[str, int]]:
    """Temporarily replace each named layer's weight by its rank-reduced approximation
    (`Spectrum.approx`, the decomposition's W_hat) and restore the originals afterwards.
    Yields {layer: rank kept}."""
    ranks = {n: kept_rank(spectra[n].max_rank, fraction) for n in names}
    with ExitStack() as stack:
        for n, r in ranks.items():  # paper layout (in x out) -> torch (out x in)
            stack.enter_context(replaced_weight(layers[n], spectra[n].approx(r).T.to(layers[n].weight)))
        yield ranks


def rank_sensitivity(layers: dict[str, nn.Linear], spectra: dict[str, Any], evaluate: Callable[[], float],
                     fractions: list[float], kinds: list[str]) -> dict[str, Any]:
    """Top-1 (from `evaluate()`) for every group of every kind at every fraction.

    Returns {"fractions", "ranks": {kind: {group: {layer: [rank per fraction]}}},
    kind: {group: [top-1 per fraction]}} — Fig 2's curves."""
    out: dict[str, Any] = {"fractions": list(fractions), "ranks": {}}
    for kind in kinds:
        out[kind], out["ranks"][kind] = {}, {}
        for group, names in group_layers(list(layers), kind).items():
            accs, ranks = [], {n: [] for n in names}
            for f in fractions:
                with reduced_rank(layers, spectra, names, f) as kept:
                    accs.append(evaluate())
                for n, r in kept.items():
                    ranks[n].append(r)
            out[kind][group] = accs
            out["ranks"][kind][group] = ranks
            log.info("sensitivity %s %s: %s", kind, group, ", ".join(f"{a:.2f}" for a in accs))
    return out


def run_sensitivity(cfg: DictConfig | SensitivityRunConfig) -> dict[str, Any]:
    """One sensitivity run for `cfg`; writes and returns `<out_dir>/sensitivity.json`."""
    rc = to_run_config(cfg)
    fractions, kinds = [float(f) for f in rc.sensitivity.fractions], list(rc.sensitivity.groups)
    from amrc_exp.compress import find_layers, top1
    from amrc_exp.compress.plan import decompose_layers, layer_weights
    from amrc_exp.data import loader_options, make_loader
    from amrc_exp.experiment.env import apply_precision, apply_thread_env, resolve_device, seed_everything
    from amrc_exp.experiment.stats_cache import calibration_stats
    from amrc_exp.experiment.inputs import load_model, load_splits

    out_dir = Path(rc.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = as_plain(rc)
    previous = finished_result(out_dir / OUTPUT, config)
    if previous is not None:
        log.info("%s already holds a finished sensitivity run for this config; skipping", out_dir)
        return previous
    apply_thread_env()
    seed_everything(rc.seed)
    device = resolve_device(rc.device)
    apply_precision(device, rc.precision.tf32)
    autocast = rc.autocast(device.type)
    amp = autocast["eval"]
    start = time.perf_counter()
    splits = load_splits(rc)
    model, model_info = load_model(rc, splits)
    model.to(device).eval()
    val_loader = make_loader(splits.val, rc.eval.batch_size, shuffle=False, seed=rc.seed,
                             **loader_options(rc.data, device))

    def evaluate() -> float:
        return top1(model, val_loader, device, amp, desc="eval")

    baseline = evaluate()
    stats, cached = calibration_stats(model, splits, rc, device, autocast["calibrate"])
    layers = find_layers(model)
    spectra = decompose_layers(layer_weights(layers), stats.calib, rc.decomp)
    res: dict[str, Any] = {
        "status": "running", "config": config, "model": model_info, "data": splits.describe(),
        "synthetic": bool(splits.synthetic or model_info.get("random_weights")),
        "decomp": rc.decomp.name, "top1_baseline": baseline, "calibration_cached": cached,
        "layers": {n: {"n_in": l.in_features, "n_out": l.out_features, "rank_cap": spectra[n].rank_cap}
                   for n, l in layers.items()},
    }
    res.update(rank_sensitivity(layers, spectra, evaluate, fractions, kinds))
    res["seconds"] = round(time.perf_counter() - start, 3)
    res["status"] = "complete"
    atomic_write_json(out_dir / OUTPUT, res)
    log.info("wrote %s (%.0f s)", out_dir / OUTPUT, res["seconds"])
    _log_sensitivity(rc, res, out_dir)
    return res


def _log_sensitivity(rc: SensitivityRunConfig, res: dict[str, Any], out_dir: Path) -> None:
    """Fig 2 on W&B: one line chart per group kind (top-1 vs rank fraction kept, one line per
    block or layer type) and every value in one table."""
    from amrc_exp.experiment.tracking import make_tracker

    tracker = make_tracker(rc.logger, str(out_dir), res["config"],
                           name=f"sensitivity {rc.model.name} {rc.decomp.name} [{out_dir.name}]",
                           job_type="sensitivity", tags=[rc.model.name, f"decomp={rc.decomp.name}", "fig2"])
    try:
        xs = [1.0, *res["fractions"]]
        rows = []
        for kind in rc.sensitivity.groups:
            groups = res[kind]
            tracker.lines(f"sensitivity_{kind}", xs, [[res["top1_baseline"], *accs] for accs in groups.values()],
                          list(groups), f"Fig 2: top-1 vs rank kept, one {kind[:-1]} reduced", "rank fraction kept")
            rows += [[kind, g, f, a] for g, accs in groups.items() for f, a in zip(res["fractions"], accs)]
        tracker.table("sensitivity", ["kind", "group", "fraction", "top1"], rows)
        tracker.summary({"top1_baseline": res["top1_baseline"], "synthetic": res["synthetic"]})
    finally:
        tracker.finish()


@hydra.main(version_base="1.3", config_path="pkg://amrc_exp.conf", config_name="config")
def main(cfg: DictConfig) -> float:
    """Hydra entry: one sensitivity run; returns the baseline top-1."""
    return run_sensitivity(cfg)["top1_baseline"]


if __name__ == "__main__":
    register_schema()
    main()
