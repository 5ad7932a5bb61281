"""`python -m amrc_exp.report.bench [--preset deit_b|deit_s|smoke] [overrides ...]`: where a compression
run's time and memory go, GD vs closed-form Z, and compressed vs dense inference throughput.

One invocation composes `conf/` with the preset's overrides (random weights, synthetic data,
no fine-tuning, no PTQ, no logger) and runs, with wall time and peak memory per stage
(`profiling.StageMeter`):

1. data, load, and the floor: the calibration images through the dense model, no statistics;
2. the compression stages of `run.compress_stages` with ``zfit.solver=gd`` (fresh calibration,
   in a private cache directory);
3. compressed vs dense images/s at the preset's batch, interleaved repetitions, median;
4. the same stages with ``zfit.solver=closed_form`` on a freshly loaded model; its calibration
   is the framework's cache hit of step 2 (same key), reported as such;
5. with onnxruntime installed (the ``onnx`` extra): dense and compressed exported to ONNX
   (`experiment.onnx_export`), images/s side by side (interleaved, median) and the resident
   memory each model's session adds in a fresh process (create + one batch, above the bare runtime's).

Writes ``bench.json`` and ``bench.md`` (atomically) to ``--out`` (default
``outputs/bench/<preset>``) and prints the per-stage tables. Results are synthetic: timings
and memory only.
"""

from __future__ import annotations

import argparse
import gc
import logging
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from amrc_exp import CONF_DIR
from amrc_exp.experiment.config import RunConfig
from amrc_exp.report import bench_report as report

COMMON = ("model.weights=random", "data=synthetic", "ratio=0.5", "z_type=lowrank", "finetune.epochs=0",
          "ptq.bits=0", "logger=none", "zfit.iters=2000")


@dataclass(frozen=True)
class Preset:
    """Config overrides (after `COMMON`) and the throughput protocol."""

    overrides: tuple[str, ...]
    batch: int = 64
    repeats: int = 5
    warmup: int = 1


PRESETS: dict[str, Preset] = {
    "deit_b": Preset(("model=deit_b", "calib.num_samples=1024")),
    "deit_s": Preset(("model=deit_s", "calib.num_samples=256")),
    # A 2-block DeiT-Tiny on 32x32 inputs and a handful of images: the test's end-to-end check.
    "smoke": Preset(("model=deit_t", "model.img_size=32", "+model.kwargs.depth=2", "calib.num_samples=32",
                     "calib.heldout_samples=16", "calib.batch_size=16", "data.num_train=48",
                     "data.num_val=16", "zfit.iters=20", "zfit.batch_size=16", "schedule.iters=50"),
                    batch=8, repeats=3, warmup=1),
}


# What a method config (conf/method/) decides: a command-line group choice would override it.
METHOD_KEYS = ("z_type=", "zfit.iters=")


def compose_config(preset: str, overrides: list[str], out_dir: Path, cache_dir: Path,
                   common: tuple[str, ...] = COMMON) -> RunConfig:
    """`conf/config.yaml` with `common`, the preset's and the user's overrides (in that order), typed."""
    from hydra import compose, initialize_config_dir

    from amrc_exp.experiment.config import register_schema, to_run_config

    register_schema()
    base = [*common, *PRESETS[preset].overrides, f"out_dir={out_dir}", f"cache_dir={cache_dir}"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=base + list(overrides))
    return to_run_config(cfg)


@torch.no_grad()
def forward_floor(model: torch.nn.Module, splits: Any, cfg: RunConfig, device: torch.device,
                  amp: bool) -> int:
    """The calibration images (held-out and calibration sets, as calibration reads them) through
    the model with no hooks: the lower bound of the calibrate stage. Returns the image count."""
    from amrc_exp.compress.evaluate import autocast_for
    from amrc_exp.data import loader_options, make_loader

    n = 0
    for dataset in (splits.heldout, splits.calib):
        loader = make_loader(dataset, cfg.calib.batch_size, shuffle=False, seed=cfg.seed,
                             **loader_options(cfg.data, device))
        for images, _ in loader:
            with autocast_for(device, amp):
                model(images.to(device, non_blocking=True))
            n += len(images)
    return n


def compression_run(cfg: RunConfig, splits: Any, meter: Any, device: torch.device,
                    amp: bool) -> tuple[torch.nn.Module, dict[str, Any]]:
    """load + `run.compress_stages` for `cfg`; returns the compressed model and its record."""
    from amrc_exp.compress import count_params, find_layers
    from amrc_exp.compress.plan import check_budget
    from amrc_exp.experiment.env import seed_everything
    from amrc_exp.experiment.run import compress_stages
    from amrc_exp.experiment.inputs import load_model

    seed_everything(cfg.seed)
    with meter("load"):
        model, _ = load_model(cfg, splits)
        model.to(device).eval()
    n0 = count_params(model)
    check_budget(find_layers(model), n0, cfg.amrc())
    report, cached = compress_stages(model, splits, cfg, device, amp, meter)
    return model, {
        "solver": cfg.zfit.solver, "calibration_cached": cached,
        "zfit_minibatches": report.n_minibatches, "params_before": n0, "params_after": count_params(model),
        "ratio_achieved": 1.0 - count_params(model) / n0,
        "ranks": [r.rank for r in report.layers],
        "residual_error": report.summary(),
    }


def bench(preset: str, overrides: list[str], out_dir: Path) -> dict[str, Any]:
    """Run the whole benchmark for `preset`; write and return the result."""
    from amrc_exp.compress.evaluate import median, throughput_side_by_side
    from amrc_exp.experiment.inputs import load_model, load_splits
    from amrc_exp.io import atomic_write_json, atomic_write_text
    from amrc_exp.report.profiling import StageMeter, machine_info, max_rss
    from amrc_exp.experiment.env import apply_precision, resolve_device

    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(tempfile.mkdtemp(prefix=".calib_cache.", dir=out_dir))  # fresh: a real calibration
    try:
        cfg = compose_config(preset, overrides, out_dir, cache_dir)
        device = resolve_device(cfg.device)
        apply_precision(device, cfg.precision.tf32)
        amp = cfg.autocast(device.type)["calibrate"]  # the bench's forwards: calibration and throughput
        meter, p = StageMeter(device), PRESETS[preset]
        gd_cfg = replace(cfg, zfit=replace(cfg.zfit, solver="gd"))
        cf_cfg = replace(cfg, zfit=replace(cfg.zfit, solver="closed_form"))

        with meter("data"):
            splits = load_splits(gd_cfg)
        model, gd = compression_run(gd_cfg, splits, meter, device, amp)
        gd["stages"] = meter.take()
        dense, _ = load_model(gd_cfg, splits)  # the same seeded weights, before compression
        dense.to(device).eval()
        with meter("floor_forward"):  # the calibration forward alone
            images = forward_floor(dense, splits, gd_cfg, device, amp)
        floor = {**meter.take()["floor_forward"], "images": images}

        batch = torch.stack([splits.val[i][0] for i in range(min(p.batch, len(splits.val)))])
        with meter("throughput"):
            times = throughput_side_by_side({"dense": dense, "compressed": model}, batch, device,
                                            repeats=p.repeats, warmup=p.warmup, amp=amp)
        ips = {k: batch.shape[0] / median(v) for k, v in times.items()}
        throughput = {"batch": int(batch.shape[0]), "repeats": p.repeats, "warmup": p.warmup,
                      "dense_ips": ips["dense"], "compressed_ips": ips["compressed"],
                      "ratio": ips["compressed"] / ips["dense"], "dense_s": times["dense"],
                      "compressed_s": times["compressed"], **meter.take()["throughput"]}
        onnx_figures = _onnx_bench({"dense": dense, "compressed": model}, batch, p, out_dir)
        del model, dense
        gc.collect()

        _, cf = compression_run(cf_cfg, splits, meter, device, amp)
        cf["stages"] = meter.take()
        for run in (gd, cf):
            run["end_to_end_s"] = report.end_to_end(run["stages"])
            run["peak_rss_mib"] = report.peak_rss_mib(run["stages"])
        # The closed form's own run reused the calibration: what it costs with a fresh one.
        fresh = {**cf["stages"], "data": gd["stages"]["data"], "calibrate": gd["stages"]["calibrate"]}
        cf["end_to_end_fresh_calibration_s"] = report.end_to_end(fresh)

        result: dict[str, Any] = {
            "schema": "amrc_exp.report.bench/1", "preset": preset, "synthetic": True,
            "note": "random weights and random images: timings and memory only, no accuracy meaning",
            "overrides": [*COMMON, *p.overrides, *overrides],
            "setup": {"model": str(cfg.model.name), "calib_samples": int(cfg.calib.num_samples),
                      "heldout_samples": int(cfg.calib.heldout_samples),
                      "image_shape": [int(cfg.model.in_chans), int(cfg.model.img_size), int(cfg.model.img_size)],
                      "ratio": float(cfg.ratio), "z_type": str(cfg.z_type.name), "zfit_iters": int(cfg.zfit.iters),
                      "same_ranks": gd["ranks"] == cf["ranks"]},
            "machine": machine_info(device), "floor": floor, "runs": {"gd": gd, "closed_form": cf},
            "throughput": throughput, "onnxruntime": onnx_figures,
            "process_peak_rss_mib": round(max_rss() / 2**20, 1),
        }
        result["summary"] = report.summary(result)
        result["targets"] = report.targets(result["summary"], device.type, preset)
        result["total_seconds"] = round(time.perf_counter() - started, 3)
        atomic_write_json(out_dir / "bench.json", result)
        atomic_write_text(out_dir / "bench.md", report.markdown(result))
        return result
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)


# Resident memory a session adds (create + one batch), in a fresh process so the two models
# never share an arena; the bare runtime's own footprint (import) is subtracted.
_ORT_RSS = """
import sys, numpy as np, onnxruntime as ort, psutil
proc = psutil.Process()
base = proc.memory_info().rss
sess = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
sess.run(None, {"images": np.zeros([int(v) for v in sys.argv[2:]], dtype=np.float32)})
print((proc.memory_info().rss - base) / 2**20)
"""


def _onnx_bench(models: dict[str, torch.nn.Module], batch: torch.Tensor, p: Preset, out_dir: Path) -> dict[str, Any]:
    """Step 5: the two models under onnxruntime (CPU), or why it was not measured."""
    import subprocess

    try:
        import onnxruntime as ort
    except ImportError:
        return {"measured": False, "note": "onnxruntime not installed (pip install '.[onnx]')"}
    from amrc_exp.experiment.onnx_export import export_onnx, weight_stats

    folder = Path(tempfile.mkdtemp(prefix=".onnx.", dir=out_dir))
    try:
        paths = {k: export_onnx(m, folder / f"{k}.onnx", tuple(batch.shape[1:])) for k, m in models.items()}
        sessions = {k: ort.InferenceSession(str(v), providers=["CPUExecutionProvider"]) for k, v in paths.items()}
        feed = {"images": batch.float().cpu().numpy()}
        times: dict[str, list[float]] = {k: [] for k in sessions}
        for rep in range(p.warmup + p.repeats):  # interleaved: both models see the same machine state
            for k, sess in sessions.items():
                t0 = time.perf_counter()
                sess.run(None, feed)
                if rep >= p.warmup:
                    times[k].append(time.perf_counter() - t0)
        rss = {k: float(subprocess.run([sys.executable, "-c", _ORT_RSS, str(v), *map(str, batch.shape)],
                                       capture_output=True, text=True, check=True, timeout=300).stdout.split()[-1])
               for k, v in paths.items()}
        ips = {k: batch.shape[0] / statistics.median(v) for k, v in times.items()}
        weights = {k: weight_stats(v)["bytes"] for k, v in paths.items()}
        return {"measured": True, "batch": int(batch.shape[0]), "repeats": p.repeats, "dense_ips": ips["dense"],
                "compressed_ips": ips["compressed"], "ratio": ips["compressed"] / ips["dense"],
                "dense_rss_mib": rss["dense"], "compressed_rss_mib": rss["compressed"],
                "rss_ratio": rss["compressed"] / rss["dense"] if rss["dense"] > 0 else None,
                "dense_weight_bytes": weights["dense"], "compressed_weight_bytes": weights["compressed"],
                "weight_bytes_ratio": weights["compressed"] / weights["dense"]}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m amrc_exp.report.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="deit_b")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default outputs/bench/<preset>)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--method", default=None,
                        help="comma-separated methods (conf/method/) to cost side by side instead of the GD/closed-form "
                             "pipeline benchmark, e.g. paper,ours_oa,ours_wf (writes methods.json / methods.md)")
    parser.add_argument("--extrapolate-to", type=int, default=None, metavar="N",
                        help="with --method: also each end to end with N calibration + held-out images")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. device=cuda; with --method, "
                                                     "METHOD:key=value applies to that method only")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = args.out or Path("outputs/bench") / args.preset
    from amrc_exp.errors import AmrcError

    try:
        if args.method is not None:
            return _methods_main(args, out_dir)
        result = bench(args.preset, args.overrides, out_dir)
    except AmrcError as err:
        print(f"amrc_exp.report.bench: error: {err}", file=sys.stderr)
        return 2
    print(report.markdown(result))
    print(f"written: {out_dir / 'bench.json'}, {out_dir / 'bench.md'}")
    return 0


def _methods_main(args: argparse.Namespace, out_dir: Path) -> int:
    """`--method`: the cost of each named method side by side (`report.bench_methods`)."""
    from amrc_exp.errors import ConfigError
    from amrc_exp.report import bench_methods as bm

    methods = bm.parse_methods(args.method)
    out_dir.mkdir(parents=True, exist_ok=True)
    # The method configs choose z_type and the Z fit; "METHOD:key=value" applies to that method only.
    common = tuple(o for o in COMMON if not o.startswith(METHOD_KEYS))
    shared = bm.shared_overrides(args.overrides)
    for o in args.overrides:
        if ":" in (key := o.split("=", 1)[0]) and key.split(":", 1)[0] not in methods:
            raise ConfigError("--method", key.split(":", 1)[0], f"a method named in --method {methods} (override {o})")
    own = {m: bm.own_overrides(args.overrides, m) for m in methods}

    def compose(method: str) -> RunConfig:
        return compose_config(args.preset, [f"method={method}", *shared, *own[method]], out_dir,
                              out_dir / ".unused_cache", common)

    result = bm.bench_methods(compose(methods[0]), methods, args.preset, [*common, *PRESETS[args.preset].overrides,
                              *args.overrides], out_dir, args.extrapolate_to, compose)
    print(bm.markdown(result))
    print(f"written: {out_dir / 'methods.json'}, {out_dir / 'methods.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
