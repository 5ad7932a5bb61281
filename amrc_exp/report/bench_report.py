"""Pure helpers of `amrc_exp.report.bench`: end-to-end sums, targets met / not met, the Markdown report."""

from __future__ import annotations

from typing import Any

# Stages of one compression run, in order; their sum is the run's end-to-end time.
PIPELINE = ("data", "load", "calibrate", "fisher", "decompose", "allocate", "compensate", "apply")

# (name, what, metric key in `summary`, op, limit, unit) per device type; all set for DeiT-B.
TARGETS: dict[str, list[tuple[str, str, str, str, float, str]]] = {
    "cpu": [
        ("end_to_end", "DeiT-B compression end to end (GD Z fit)", "end_to_end_s", "<=", 900.0, "s"),
        ("peak_rss", "peak RSS of the compression run", "peak_rss_gib", "<=", 6.0, "GiB"),
        ("zfit_gd", "Z fitting, all layers, GD (compensate stage)", "compensate_gd_s", "<=", 60.0, "s"),
        ("throughput_ratio", "compressed / dense images/s at ratio 0.5", "throughput_ratio", ">=", 1.3, "x"),
    ],
    "cuda": [
        ("end_to_end", "DeiT-B compression end to end (GD Z fit)", "end_to_end_s", "<=", 30.0, "s"),
    ],
}
TARGET_PRESETS = ("deit_b",)  # the targets are stated for DeiT-B; elsewhere they are shown, not applied


def end_to_end(stages: dict[str, dict[str, Any]]) -> float:
    """Seconds of the pipeline stages present in `stages`."""
    return round(sum(stages[s]["seconds"] for s in PIPELINE if s in stages), 3)


def peak_rss_mib(stages: dict[str, dict[str, Any]]) -> float:
    """Highest per-stage RSS peak over the pipeline stages."""
    return max(stages[s]["rss_peak_mib"] for s in PIPELINE if s in stages)


def summary(result: dict[str, Any]) -> dict[str, float]:
    """The headline numbers the targets are checked against."""
    gd = result["runs"]["gd"]
    return {
        "end_to_end_s": gd["end_to_end_s"],
        "peak_rss_gib": round(gd["peak_rss_mib"] / 1024, 3),
        "compensate_gd_s": gd["stages"]["compensate"]["seconds"],
        "compensate_closed_form_s": result["runs"]["closed_form"]["stages"]["compensate"]["seconds"],
        "calibrate_s": gd["stages"]["calibrate"]["seconds"],
        "floor_forward_s": result["floor"]["seconds"],
        "throughput_ratio": result["throughput"]["ratio"],
    }


def targets(values: dict[str, float], device_type: str, preset: str) -> list[dict[str, Any]]:
    """One row per target for this device type: value, limit, met, and whether it applies."""
    rows = []
    for name, what, key, op, limit, unit in TARGETS.get(device_type, []):
        value = values[key]
        met = value <= limit if op == "<=" else value >= limit
        rows.append({"name": name, "what": what, "metric": key, "value": value, "op": op, "limit": limit,
                     "unit": unit, "met": bool(met), "applies": preset in TARGET_PRESETS})
    return rows


def stage_table(stages: dict[str, dict[str, Any]], total: float) -> list[str]:
    """Markdown rows: stage | seconds | share of `total` | RSS peak | CUDA peak."""
    lines = ["| stage | seconds | share | RSS peak (MiB) | CUDA peak (MiB) |", "|---|---:|---:|---:|---:|"]
    for name, row in stages.items():
        share = f"{100 * row['seconds'] / total:.1f}%" if total > 0 else "-"
        cuda = "-" if row["cuda_peak_mib"] is None else f"{row['cuda_peak_mib']:.0f}"
        lines.append(f"| {name} | {row['seconds']:.2f} | {share} | {row['rss_peak_mib']:.0f} | {cuda} |")
    return lines


def onnx_section(o: dict | None) -> list[str]:
    """The onnxruntime step's lines (or why it did not run)."""
    if not o:
        return []
    if not o.get("measured"):
        return ["## onnxruntime", "", f"Not measured: {o.get('note')}.", ""]
    ratio = "n/a" if o["rss_ratio"] is None else f"{o['rss_ratio']:.3f}"
    return ["## onnxruntime (CPU; side by side, interleaved; memory: what each session adds, in a fresh process)", "",
            f"batch {o['batch']}, {o['repeats']} timed repetitions each, median:", "",
            "| model | images/s | resident memory of the session (MiB) | weights (MiB, float32) |", "|---|---:|---:|---:|",
            f"| dense | {o['dense_ips']:.2f} | {o['dense_rss_mib']:.1f} | {o['dense_weight_bytes'] / 2**20:.3f} |",
            f"| compressed | {o['compressed_ips']:.2f} | {o['compressed_rss_mib']:.1f} | "
            f"{o['compressed_weight_bytes'] / 2**20:.3f} |",
            f"| **ratio** | **{o['ratio']:.3f}** | **{ratio}** | **{o['weight_bytes_ratio']:.3f}** |", ""]


def markdown(result: dict[str, Any]) -> str:
    """The whole report: setup, per-stage tables, throughput, targets, machine."""
    m, tp = result["machine"], result["throughput"]
    out = [f"# amrc_exp benchmark: preset `{result['preset']}`", "",
           "**SYNTHETIC** (random weights, random images): timings and memory only; no accuracy meaning.", "",
           f"- model `{result['setup']['model']}`, {result['setup']['calib_samples']} calibration + "
           f"{result['setup']['heldout_samples']} held-out images of {result['setup']['image_shape']}, "
           f"ratio {result['setup']['ratio']}, z_type {result['setup']['z_type']}, "
           f"GD {result['setup']['zfit_iters']} iters",
           f"- device `{m['device']}`, CPU {m['cpu_model']} ({m['cpu_count']} cores), "
           f"torch {m['torch']}, threads: {m['torch_threads']}" + (f", GPU {m['gpu']}" if "gpu" in m else ""),
           f"- floor (calibration images through the model, no statistics): "
           f"{result['floor']['seconds']:.2f} s for {result['floor']['images']} images", ""]
    for key, title in (("gd", "Z by gradient descent (the paper's)"), ("closed_form", "Z in closed form (ours)")):
        run = result["runs"][key]
        out += [f"## {title}: {run['end_to_end_s']:.2f} s end to end", ""]
        if run["calibration_cached"]:
            out += [f"Calibration reused from the first run (cache load shown); with a fresh calibration "
                    f"the run would take {run['end_to_end_fresh_calibration_s']:.2f} s.", ""]
        out += stage_table(run["stages"], run["end_to_end_s"]) + [""]
    out += ["## Inference throughput (side by side, interleaved)", "",
            f"batch {tp['batch']}, {tp['warmup']} warm-up + {tp['repeats']} timed repetitions each, median:", "",
            "| model | images/s |", "|---|---:|",
            f"| dense | {tp['dense_ips']:.2f} |", f"| compressed | {tp['compressed_ips']:.2f} |",
            f"| **ratio** | **{tp['ratio']:.3f}** |", "", *onnx_section(result.get("onnxruntime")),
            "## Targets", "", "| target | value | limit | met | applies |", "|---|---:|---:|---|---|"]
    for t in result["targets"]:
        out.append(f"| {t['what']} | {t['value']:.3f} {t['unit']} | {t['op']} {t['limit']:g} {t['unit']} | "
                   f"{'yes' if t['met'] else 'NO'} | {'yes' if t['applies'] else 'no (DeiT-B targets)'} |")
    return "\n".join(out) + "\n"
