"""`amrc-bench --method paper,ours_oa,ours_wf [--preset P]`: what each method's compression costs,
side by side in one process: seconds, forward passes (`profiling.PassCounter`) and peak memory
per stage, each method from a fresh calibration (its own private cache) on a freshly loaded
model with the preset's random weights and synthetic images.

The cost model (BENCHMARKS.md): calibration is one hooked pass over the calibration and held-out
images, so its seconds are linear in their number (`calib_s_per_image`); every other stage reads
only the statistics, the probe and the weights, so it does not depend on that number. A row
measured with fewer calibration images is extrapolated to the preset's by that rate alone
(`extrapolated_*`), and the report says so.
"""

from __future__ import annotations

import gc
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from amrc_exp.errors import ConfigError
from amrc_exp.report import bench_report as report

__all__ = ["known_methods", "bench_methods", "estimate_bytes", "shared_overrides", "own_overrides"]


def known_methods() -> list[str]:
    """The method configs (`conf/method/*.yaml`) a bench row can run (`dense` compresses nothing)."""
    from amrc_exp.experiment.config import METHODS

    return sorted(m for m in METHODS if m != "dense")


def parse_methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    allowed = known_methods()
    for m in methods:
        if m not in allowed:
            raise ConfigError("--method", m, f"one or more of {allowed}, comma-separated")
    if not methods:
        raise ConfigError("--method", text, f"one or more of {allowed}, comma-separated")
    return methods


def shared_overrides(overrides: list[str]) -> list[str]:
    """The overrides every method gets: all but the `METHOD:key=value` ones."""
    return [o for o in overrides if ":" not in o.split("=", 1)[0]]


def own_overrides(overrides: list[str], method: str) -> list[str]:
    """`method`'s own overrides, `METHOD:key=value` given as `key=value`."""
    return [o.split(":", 1)[1] for o in overrides if o.split("=", 1)[0].startswith(f"{method}:")]


def estimate_bytes(cfg: Any, model: torch.nn.Module) -> int:
    """A lower bound of the run's peak memory, from shapes alone: the model, the float64
    calibration and held-out Grams of every compressible layer (H and, for SVD-LLM, G), the
    float64 weight copies, and the probe's cached block inputs (`compress.probe.CACHE_BYTES` at most)."""
    from amrc_exp.compress import find_layers
    from amrc_exp.compress.probe import CACHE_BYTES
    from amrc_exp.compress.search import needs_gram, needs_probe

    amrc = cfg.amrc()
    layers = find_layers(model, amrc.patterns)
    grams = 2 + int(needs_gram(amrc))
    stats = sum(grams * l.in_features ** 2 * 8 + l.in_features * l.out_features * 8 for l in layers.values())
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return params + stats + (CACHE_BYTES if needs_probe(amrc) else 0)


def _available_bytes() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def method_run(cfg: Any, method: str, out_dir: Path, device: torch.device, amp: bool) -> dict[str, Any]:
    """One method's compression, fresh calibration included; its stages, passes and ranks."""
    from amrc_exp.compress import count_params
    from amrc_exp.experiment.env import seed_everything
    from amrc_exp.experiment.inputs import load_model, load_splits
    from amrc_exp.experiment.run import compress_stages
    from amrc_exp.report.profiling import PassCounter, StageMeter

    cache = Path(tempfile.mkdtemp(prefix=f".calib_cache.{method}.", dir=out_dir))
    counter = PassCounter()
    meter = StageMeter(device, passes=counter)
    try:
        cfg = replace(cfg, cache_dir=str(cache))
        seed_everything(cfg.seed)
        with meter("data"):
            splits = load_splits(cfg)
        with meter("load"):
            model, _ = load_model(cfg, splits)
            model.to(device).eval()
        counter.attach(model)
        n0 = count_params(model)
        report_, _ = compress_stages(model, splits, cfg, device, amp, meter)
        stages = meter.take()
        n_images = int(cfg.calib.num_samples) + int(cfg.calib.heldout_samples)
        out = {"method": method, "stages": stages, "end_to_end_s": report.end_to_end(stages),
               "peak_rss_mib": report.peak_rss_mib(stages),
               "image_passes": round(sum(s.get("image_passes", 0.0) for s in stages.values()), 1),
               "blocks": counter.blocks, "calib_images": n_images,
               "calib_s_per_image": stages["calibrate"]["seconds"] / n_images,
               "params_before": n0, "params_after": count_params(model),
               "ranks": [r.rank for r in report_.layers], "allocation_kl": report_.allocation_kl}
        counter.detach()
        del model
        return out
    finally:
        gc.collect()
        shutil.rmtree(cache, ignore_errors=True)


def extrapolate(run: dict[str, Any], images: int) -> float:
    """`run`'s end to end with its calibration at `images` calibration + held-out images (linear)."""
    return round(run["end_to_end_s"] + (images - run["calib_images"]) * run["calib_s_per_image"], 1)


def bench_methods(cfg: Any, methods: list[str], preset: str, overrides: list[str], out_dir: Path,
                  extrapolate_to: int | None, compose: Any) -> dict[str, Any]:
    """Every method of `methods` on `cfg` (composed per method by `compose(method)`), side by side."""
    from amrc_exp.experiment.env import apply_precision, resolve_device
    from amrc_exp.experiment.inputs import load_model
    from amrc_exp.io import atomic_write_json, atomic_write_text
    from amrc_exp.report.profiling import machine_info

    started = time.perf_counter()
    device = resolve_device(cfg.device)
    apply_precision(device, cfg.precision.tf32)
    amp = cfg.autocast(device.type)["calibrate"]
    configs = {m: compose(m) for m in methods}
    probe_model, _ = load_model(cfg)
    need = max(estimate_bytes(c, probe_model) for c in configs.values())
    del probe_model
    if device.type == "cpu" and need > (have := _available_bytes()):
        raise ConfigError("model", str(cfg.model.name), f"a smaller model or fewer methods: this bench needs at least "
                          f"{need / 2**30:.1f} GiB (model, calibration Grams, probe cache) and "
                          f"{have / 2**30:.1f} GiB are available")
    runs = {m: method_run(c, m, out_dir, device, amp) for m, c in configs.items()}
    result: dict[str, Any] = {
        "schema": "amrc_exp.report.bench_methods/1", "preset": preset, "synthetic": True,
        "note": "random weights and random images: timings, passes and memory only, no accuracy meaning",
        "overrides": overrides, "model": str(cfg.model.name), "machine": machine_info(device),
        "calib_images": int(cfg.calib.num_samples) + int(cfg.calib.heldout_samples), "runs": runs,
    }
    if extrapolate_to:
        result["extrapolated_calib_images"] = extrapolate_to
        result["extrapolated_end_to_end_s"] = {m: extrapolate(r, extrapolate_to) for m, r in runs.items()}
    base = result.get("extrapolated_end_to_end_s") or {m: r["end_to_end_s"] for m, r in runs.items()}
    if "paper" in base:
        result["vs_paper"] = {m: round(v / base["paper"], 3) for m, v in base.items()}
    result["total_seconds"] = round(time.perf_counter() - started, 1)
    atomic_write_json(out_dir / "methods.json", result)
    atomic_write_text(out_dir / "methods.md", markdown(result))
    return result


def markdown(result: dict[str, Any]) -> str:
    """Per method: end to end, passes, peak RSS and the seconds of the stages that differ."""
    runs = result["runs"]
    stages = [s for s in report.PIPELINE if any(s in r["stages"] for r in runs.values())]
    head = ["method", "end to end s", *[f"{s} s" for s in stages], "forward passes (images)", "peak RSS MiB"]
    lines = [f"# Cost per method: {result['model']} ({result['preset']}), {result['calib_images']} "
             f"calibration + held-out images", "", f"_{result['note']}._", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m, r in runs.items():
        cells = [m, f"{r['end_to_end_s']:.1f}", *[f"{r['stages'][s]['seconds']:.1f}" if s in r["stages"] else "—"
                                                   for s in stages], f"{r['image_passes']:.0f}", f"{r['peak_rss_mib']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    if "extrapolated_end_to_end_s" in result:
        lines += ["", f"Extrapolated to {result['extrapolated_calib_images']} calibration + held-out images "
                      "(calibration linear in images at each run's measured rate; the other stages do not "
                      "depend on it): " + ", ".join(f"{m} {v:.0f} s" for m, v in result["extrapolated_end_to_end_s"].items())]
    if "vs_paper" in result:
        lines += ["", "End to end / paper's: " + ", ".join(f"{m} {v:.2f}x" for m, v in result["vs_paper"].items())]
    return "\n".join(lines) + "\n"
