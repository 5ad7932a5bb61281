"""The staged run: load → calibrate → decompose → allocate → compensate → apply → fine-tune →
quantize → evaluate → export. `run(cfg)` is a plain function returning the metrics dict that
is also written to `<out_dir>/results.json`.
"""

from __future__ import annotations

import logging
import os
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from amrc_exp import compress
from amrc_exp.config import validate
from amrc_exp.errors import AmrcError, ConfigError, WeightsError
from amrc_exp.io import atomic_write_json, read_json
from amrc_exp.tracking import Tracker, make_tracker

log = logging.getLogger(__name__)
RESULTS = "results.json"


class StageTimer:
    """Wall-clock seconds per stage, in the order the stages ran."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        log.info("stage %s ...", name)
        start = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - start, 3)
        log.info("stage %s done in %.1f s", name, self.seconds[name])


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", name, "auto or cpu (no CUDA device is visible)")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run every stage for one config; return (and write) the results."""
    validate(cfg)  # before any heavy import or I/O: a typo fails in a second
    out_dir = Path(cfg.out_dir)
    _check_writable(out_dir)
    _check_writable(Path(str(cfg.cache_dir)).expanduser(), "cache_dir")
    from amrc_exp.data import build_splits, make_loader
    from amrc_exp.evaluate import top1
    from amrc_exp.export import default_create_kwargs, save_compressed
    from amrc_exp.lowrank import count_params
    from amrc_exp.models import build_model
    from amrc_exp.quantize import model_size_mib, quantize_

    config = OmegaConf.to_container(cfg, resolve=True)
    previous = finished_result(out_dir, config)
    if previous is not None:  # a rerun of a sweep skips its finished jobs
        log.info("%s already holds a finished result for this config; skipping", out_dir)
        print_summary(previous)
        return previous
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    amp = bool(cfg.amp) and device.type == "cuda"
    timer = StageTimer()
    tracker = Tracker()  # the real one starts once data, weights and budget are known good
    res: dict[str, Any] = {"status": "running", "config": config, "device": str(device)}

    try:
        with timer("data"):
            splits = build_splits(cfg)
        with timer("load"):
            model, model_info = build_model(cfg, splits)
            model.to(device).eval()
            _check_finite_weights(model, cfg.model.weights)
        n0 = count_params(model)
        if cfg.compress:  # before any expensive stage: a budget the model cannot meet fails in seconds
            to_remove = compress.params_to_remove(n0, cfg)
            compress.check_budget(compress.layer_specs(compress.find_compressible(model), cfg.z_type),
                                  to_remove, n0, cfg)
        tracker = make_tracker(cfg.logger, str(out_dir), config, name=out_dir.name)
        res["model"] = model_info
        res["data"] = splits.describe()
        res["synthetic"] = bool(splits.synthetic or model_info.get("random_weights"))
        val_loader = make_loader(splits.val, cfg.eval.batch_size, shuffle=False, seed=cfg.seed,
                                 num_workers=cfg.data.num_workers)
        res["params_before"] = n0
        res["size_mib_dense_fp16"] = model_size_mib(model, bits=0)
        with timer("eval_baseline"):
            res["top1_baseline"] = top1(model, val_loader, device, amp, desc="eval baseline")
        tracker.log({"top1/baseline": res["top1_baseline"], "params/before": n0})

        if cfg.compress:
            _compress_and_finetune(model, splits, cfg, device, amp, timer, tracker, to_remove, val_loader, res)
        else:  # compress=false: the dense model as loaded (Table 3's references, Table 4's PTQ-only rows)
            res.update(params_after=n0, ratio_achieved=0.0, layers=[])
        res["size_mib_compressed_fp16"] = model_size_mib(model, bits=0)

        if cfg.ptq.bits:
            with timer("quantize"):
                quantize_(model, cfg.ptq.bits)
                res["size_mib_ptq"] = model_size_mib(model, bits=cfg.ptq.bits)
                res["top1_ptq"] = top1(model, val_loader, device, amp, desc="eval ptq")
            tracker.log({"top1/ptq": res["top1_ptq"]})

        with timer("export"):
            # The model's own kwargs plus any architecture overrides (model.kwargs: depth,
            # embed_dim, ...) that cannot be read back from the module.
            create_kwargs = {**default_create_kwargs(model), **config["model"]["kwargs"]}
            save_compressed(model, out_dir / "model", meta={"config": config},
                            model_name=str(cfg.model.name), create_kwargs=create_kwargs)
        res["top1"] = _final_top1(res)
        res["throughput"] = _throughput_pair(cfg, splits, model, device, amp, build_model)
        res["seconds"] = timer.seconds
        res["status"] = "complete"
        tracker.summary({k: v for k, v in res.items() if isinstance(v, (int, float))})
        atomic_write_json(out_dir / RESULTS, res)
        print_summary(res)
        return res
    except BaseException as err:
        res["status"] = "failed"
        res["error"] = f"{type(err).__name__}: {err}"
        res["seconds"] = timer.seconds
        atomic_write_json(out_dir / "failed.json", res)  # never read as a finished result
        raise
    finally:
        tracker.finish()


def _compress_and_finetune(model, splits, cfg, device, amp, timer, tracker, to_remove, val_loader,
                           res: dict[str, Any]) -> None:
    """calibrate → … → apply, evaluate, partial fine-tune (and evaluate): fills `res` in place."""
    from amrc_exp.data import make_loader
    from amrc_exp.evaluate import top1
    from amrc_exp.finetune import partial_finetune
    from amrc_exp.lowrank import count_params

    n0 = res["params_before"]
    done = compress_stages(model, splits, cfg, device, amp, timer, to_remove)
    res["calibration_cached"] = done.calibration_cached
    res["zfit_minibatches"] = done.zfit_minibatches
    layer_rows, specs, spectra = done.layer_rows, done.specs, done.spectra
    res["params_after"] = count_params(model)
    res["params_target"] = n0 - to_remove
    res["ratio_achieved"] = 1.0 - res["params_after"] / n0
    res["layers"] = layer_rows
    res["table1"] = compress.residual_summary(layer_rows, specs)
    res["energy_curves"] = {n: s.energy_curve().tolist() for n, s in spectra.items()}
    _log_layers(tracker, layer_rows, spectra)

    with timer("eval_compressed"):
        res["top1_compressed"] = top1(model, val_loader, device, amp, desc="eval compressed")
    tracker.log({"top1/compressed": res["top1_compressed"], "params/after": res["params_after"]})

    with timer("finetune"):
        ft_loader = make_loader(splits.train, cfg.finetune.batch_size, shuffle=True,
                                seed=cfg.seed, num_workers=cfg.data.num_workers)
        try:
            res["finetune"] = partial_finetune(model, ft_loader, epochs=cfg.finetune.epochs,
                                               lr=cfg.finetune.lr, weight_decay=cfg.finetune.weight_decay,
                                               device=device, amp=amp, seed=cfg.seed)
        except FloatingPointError as err:  # a diverged loss: the learning rate is the fix
            if isinstance(err, AmrcError):
                raise
            raise ConfigError("finetune.lr", cfg.finetune.lr, f"a smaller learning rate ({err})") from err
    if cfg.finetune.epochs:
        with timer("eval_finetuned"):
            res["top1_finetuned"] = top1(model, val_loader, device, amp, desc="eval finetuned")
        tracker.log({"top1/finetuned": res["top1_finetuned"]})


@dataclass
class Compressed:
    """What `compress_stages` leaves behind once the model holds its `LowRankLinear`s."""

    calibration_cached: bool
    zfit_minibatches: int  # 1: full-batch gradient
    spectra: dict[str, Any]
    specs: list[Any]
    layer_rows: list[dict[str, Any]]


def compress_stages(model: torch.nn.Module, splits: Any, cfg: DictConfig, device: torch.device,
                    amp: bool, timer: StageTimer, to_remove: int) -> Compressed:
    """calibrate → decompose → allocate → compensate → apply, in place on `model`, each stage
    timed by `timer` (any callable returning a context manager per stage name). The statistics
    and plans are dropped on return."""
    from amrc_exp.lowrank import compress_

    with timer("calibrate"):
        stats, cached = compress.calibration_stats(model, splits, cfg, device, amp)
    with timer("decompose"):
        layers = compress.find_compressible(model)
        weights = compress.layer_weights(layers)
        spectra = compress.decompose_layers(weights, stats["calib"], cfg.decomp)
    with timer("allocate"):
        specs = compress.layer_specs(layers, cfg.z_type)
        ranks = compress.allocate_ranks(spectra, specs, to_remove, cfg.schedule)
    with timer("compensate"):
        plans, layer_rows = compress.compensate_layers(weights, layers, spectra, ranks, stats, cfg)
    with timer("apply"):
        compress_(model, plans)
    return Compressed(cached, len(stats.get("chunks", [])) or 1, spectra, specs, layer_rows)


def finished_result(out_dir: Path, config: dict[str, Any]) -> dict[str, Any] | None:
    """The complete results.json of an earlier run of the same config in `out_dir`, if any.

    Unreadable or partial files never count (they are rerun); paths that do not change the
    computation (out_dir, cache_dir) are ignored in the comparison."""
    path = out_dir / RESULTS
    if not path.exists():
        return None
    try:
        previous = read_json(path)
    except (OSError, ValueError):
        log.warning("%s is unreadable; rerunning", path)
        return None
    same = _comparable(previous.get("config", {})) == _comparable(config)
    return previous if previous.get("status") == "complete" and same else None


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in ("out_dir", "cache_dir")}


def _final_top1(res: dict[str, Any]) -> float:
    for key in ("top1_ptq", "top1_finetuned", "top1_compressed", "top1_baseline"):
        if key in res:
            return res[key]
    raise KeyError("no top-1 measured")


def _throughput_pair(cfg, splits, model, device, amp, build_model) -> dict[str, float]:
    """Compressed vs dense images/s on one eval batch, measured side by side (interleaved)."""
    from amrc_exp.evaluate import median, throughput_side_by_side

    batch = torch.stack([splits.val[i][0] for i in range(min(64, len(splits.val)))])
    dense, _ = build_model(OmegaConf.merge(cfg, {"model": {"weights": "random"}}), None)
    dense.to(device).eval()
    times = throughput_side_by_side({"compressed": model, "dense": dense}, batch, device, amp=amp)
    compressed_ips, dense_ips = (batch.shape[0] / median(times[k]) for k in ("compressed", "dense"))
    return {"batch": int(batch.shape[0]), "compressed_ips": compressed_ips, "dense_ips": dense_ips,
            "speedup": compressed_ips / dense_ips}


def _check_writable(path: Path, key: str = "out_dir") -> None:
    """Create `path` and prove a file can be written there, before any work is done."""
    fix = {"out_dir": "set hydra.run.dir= (or hydra.sweep.dir= for -m) to a writable path",
           "cache_dir": "set cache_dir= (or AMRC_CACHE_DIR) to a writable path"}[key]
    probe = path / f".write_probe.{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        blocker = path.absolute()
        while not blocker.exists() and blocker.parent != blocker:
            blocker = blocker.parent
        why = f"{blocker} is not a directory" if not blocker.is_dir() else f"{err.strerror or err}: {blocker}"
        raise ConfigError(key, str(path), f"a writable directory ({why}); {fix}") from None


def _check_finite_weights(model: torch.nn.Module, source: Any) -> None:
    """NaN/Inf in the loaded weights would poison every later stage: name the tensor now."""
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise WeightsError(f"model.weights={str(source)!r} holds non-finite values (NaN/Inf) in "
                               f"{name} ({bad} of {tensor.numel()} entries): the file is corrupt or its "
                               "training diverged; use another checkpoint")


def _log_layers(tracker: Tracker, rows: list[dict], spectra) -> None:
    names = [r["name"] for r in rows]
    tracker.bar("rank", names, [r["rank"] or 0 for r in rows], "Rank per layer (0 = dense)")
    tracker.lines("layer_error", list(range(len(rows))),
                  [[r["err_before"] for r in rows], [r["err_after"] for r in rows]],
                  ["before Z", "after Z"], "Held-out normalized error per layer (Fig 3)", "layer")
    curves = [s.energy_curve().tolist() for s in spectra.values()]
    width = max(len(c) for c in curves)
    tracker.lines("energy_loss", list(range(width)),
                  [c + [c[-1]] * (width - len(c)) for c in curves], list(spectra),
                  "Normalized energy loss vs rank (Fig 1)", "rank")


def print_summary(res: dict[str, Any]) -> None:
    """A short table: params, top-1 at each stage, seconds per stage."""
    def pct(key):
        return f"{res[key]:.2f}" if key in res else "-"

    synthetic = "  (SYNTHETIC data/weights: not a paper number)" if res.get("synthetic") else ""
    lines = [
        f"amrc_exp results{synthetic}",
        f"  params        {res['params_before'] / 1e6:8.3f} M -> {res['params_after'] / 1e6:8.3f} M"
        f"  (removed {100 * res['ratio_achieved']:.2f}%)",
        f"  size fp16     {res['size_mib_dense_fp16']:8.2f} MiB -> {res['size_mib_compressed_fp16']:.2f} MiB"
        + (f" -> {res['size_mib_ptq']:.2f} MiB ({res['config']['ptq']['bits']}-bit)" if "size_mib_ptq" in res else ""),
        f"  top-1 (%)     baseline {pct('top1_baseline')} | compressed {pct('top1_compressed')} |"
        f" finetuned {pct('top1_finetuned')} | ptq {pct('top1_ptq')}",
        f"  throughput    {res['throughput']['speedup']:.2f}x dense (batch {res['throughput']['batch']})",
        "  seconds       " + " | ".join(f"{k} {v:.1f}" for k, v in res["seconds"].items()),
    ]
    print("\n".join(lines), flush=True)
