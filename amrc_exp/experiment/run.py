"""The staged run: load → calibrate → decompose → allocate → compensate → apply → fine-tune →
quantize → evaluate → export. `run(cfg)` converts the composed config once into the typed
`RunConfig`, drives the library (`amrc_exp.compress`) and returns the metrics dict that is
also written to `<out_dir>/results.json`.
"""

from __future__ import annotations

import copy
import errno
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from amrc_exp.compress import (CompressionReport, compress_, count_params, evaluate, model_size_mib,
                               partial_finetune, quantize_, search)
from amrc_exp.compress.calibrate import find_layers
from amrc_exp.compress.evaluate import median, throughput_side_by_side
from amrc_exp.compress.plan import check_budget
from amrc_exp.errors import AmrcError, ConfigError, DiskSpaceError, WeightsError
from amrc_exp.experiment.config import RunConfig, as_plain, to_run_config
from amrc_exp.experiment.env import (StageTimer, apply_precision, apply_thread_env, check_free_space, check_writable,
                                     resolve_device, seed_everything)
from amrc_exp.experiment.results import (RESULTS, RunResult, finished_result, input_identity, write_failed,
                                         write_result)
from amrc_exp.experiment.tracking import Tracker, make_tracker

log = logging.getLogger(__name__)
EXPORT_MARGIN = 4 * 2**20  # bytes beyond the weights: manifest, results.json, logs


def run(cfg: DictConfig | RunConfig) -> dict[str, Any]:
    """Run every stage for one config; return (and write) the results."""
    try:
        rc = to_run_config(cfg)  # every value checked, before any heavy import or I/O
    except AmrcError as err:  # a sweep job with a bad value fails like any other: failed.json
        _record_invalid(cfg, err)
        raise
    out_dir = Path(rc.out_dir)
    check_writable(out_dir)
    check_writable(Path(rc.cache_dir).expanduser(), "cache_dir")
    from amrc_exp.data import loader_options, make_loader
    from amrc_exp.experiment.export import default_create_kwargs, save_compressed
    from amrc_exp.experiment.inputs import load_model, load_splits

    config = as_plain(rc)
    inputs = input_identity(rc.model.weights, rc.data.name, rc.data.root, rc.model.name)
    previous = finished_result(out_dir / RESULTS, config, inputs)
    if previous is not None:  # a rerun of a sweep skips its finished jobs
        log.info("%s already holds a finished result for this config; skipping", out_dir)
        print_summary(previous)
        return previous
    # This run replaces whatever result the directory holds: gone now, so a failure or a kill
    # can never leave an older run's numbers looking like this config's.
    (out_dir / RESULTS).unlink(missing_ok=True)
    apply_thread_env()
    seed_everything(rc.seed)
    device = resolve_device(rc.device)
    autocast = rc.autocast(device.type)
    amp = autocast["eval"]  # evaluations and throughput
    timer = StageTimer()
    tracker = Tracker()  # the real one starts once data, weights and budget are known good
    res = RunResult(config=config, device=str(device), inputs=inputs)
    res.precision = {**apply_precision(device, rc.precision.tf32), "autocast": autocast}

    try:
        with timer("data"):
            splits = load_splits(rc)
        with timer("load"):
            model, model_info = load_model(rc, splits)
            model.to(device).eval()
            _check_finite_weights(model, rc.model.weights)
        n0 = count_params(model)
        kept = n0
        if rc.compress:  # before any expensive stage: a budget the model cannot meet fails in seconds
            kept = n0 - check_budget(find_layers(model), n0, rc.amrc())
        bytes_per = next(model.parameters()).element_size()
        check_free_space(out_dir, kept * bytes_per + EXPORT_MARGIN)  # the export, known now: fail before the work
        job_type, label, tags = _tracking_labels(rc)
        tracker = make_tracker(rc.logger, str(out_dir), config, name=f"{label} [{out_dir.name}]",
                               job_type=job_type, tags=tags)
        for i, loss in enumerate(model_info.get("epoch_losses") or []):  # the embedded model's training
            tracker.log({"train/loss": loss, "train/epoch": i + 1})
        res.model, res.data = model_info, splits.describe()
        res.synthetic = bool(splits.synthetic or model_info.get("random_weights"))
        val_loader = make_loader(splits.val, rc.eval.batch_size, shuffle=False, seed=rc.seed,
                                 **loader_options(rc.data, device))
        res.params_before = n0
        res.size_mib_dense_fp16 = model_size_mib(model, bits=0)
        with timer("eval_baseline"):
            dense = evaluate(model, val_loader, device, amp, desc="eval baseline")
            res.top1_baseline = dense.top1

        def measure(stage: str) -> float:
            """Top-1 of the model as it is now, and its fidelity to the dense model."""
            with timer(f"eval_{stage}"):
                ev = evaluate(model, val_loader, device, amp, desc=f"eval {stage}")
            res.fidelity = {**(res.fidelity or {}), stage: ev.fidelity(dense)}
            return ev.top1

        def measure_frontier(stage: str) -> None:
            """ptq.frontier_bits: each width on a copy of the model as it is now (size, top-1, fidelity)."""
            rows = {row["bits"]: row for row in res.ptq_frontier or []}
            with timer(f"frontier_{stage}"):
                for bits in rc.ptq.frontier_bits:
                    quantized = quantize_(copy.deepcopy(model), bits)
                    ev = evaluate(quantized, val_loader, device, amp, desc=f"eval {stage} {bits}-bit")
                    fid = ev.fidelity(dense)
                    rows[bits] = {**rows.get(bits, {"bits": bits}), "size_mib": model_size_mib(quantized, bits=bits),
                                  f"top1_{stage}": ev.top1, f"agree_{stage}": fid["agreement"],
                                  f"kl_{stage}": fid["kl"]}
            res.ptq_frontier = [rows[b] for b in rc.ptq.frontier_bits]

        if rc.compress:
            # kd / ce+kd distil from the dense model: a frozen copy of it, taken before compression
            distil = rc.finetune.objective().needs_teacher and rc.finetune.epochs
            teacher = copy.deepcopy(model) if distil else None
            report, cached = compress_stages(model, splits, rc, device, autocast["calibrate"], timer)
            _record_compression(res, report, cached, count_params(model))
            _log_layers(tracker, report)
            res.top1_compressed = measure("compressed")
            measure_frontier("compressed")
            res.finetune = _finetune(model, splits, rc, device, autocast["finetune"], timer, teacher)
            del teacher
            for i, loss in enumerate(res.finetune["loss_history"]):
                tracker.log({"finetune/loss": loss, "finetune/epoch": i + 1})
            if rc.finetune.epochs:
                res.top1_finetuned = measure("finetuned")
                measure_frontier("finetuned")
        else:  # compress=false: the dense model as loaded (Table 3's references, Table 4's PTQ-only rows)
            res.params_after, res.ratio_achieved, res.layers = n0, 0.0, []
            measure_frontier("dense")
        res.size_mib_compressed_fp16 = model_size_mib(model, bits=0)

        if rc.ptq.bits:
            with timer("quantize"):
                quantize_(model, rc.ptq.bits)
                res.size_mib_ptq = model_size_mib(model, bits=rc.ptq.bits)
            res.top1_ptq = measure("ptq")

        with timer("export"):
            # The model's own kwargs plus any architecture overrides (model.kwargs: depth,
            # embed_dim, ...) that cannot be read back from the module.
            create_kwargs = {**default_create_kwargs(model), **config["model"]["kwargs"]}
            try:
                save_compressed(model, out_dir / "model", meta={"config": config},
                                model_name=rc.model.name, create_kwargs=create_kwargs)
            except OSError as err:
                if err.errno != errno.ENOSPC:
                    raise
                raise DiskSpaceError(f"no space left writing the export to {out_dir / 'model'} (about "
                                     f"{count_params(model) * bytes_per / 2**20:.1f} MiB needed); free some space "
                                     "and rerun (nothing partial is kept)") from None
        res.data["corrupt_images_skipped"] = splits.corrupt_skipped()
        res.top1 = res.final_top1()
        res.throughput = _throughput_pair(rc, splits, model, device, amp)
        res.seconds, res.status = timer.seconds, "complete"
        out = write_result(out_dir, res)
        _log_result(tracker, out, out_dir, label)
        print_summary(out)
        return out
    except BaseException as err:
        res.seconds = timer.seconds
        write_failed(out_dir, res.to_dict(), err)  # never read as a finished result
        raise
    finally:
        tracker.finish()


def _record_invalid(cfg: Any, err: AmrcError) -> None:
    """failed.json for a config that did not validate, when its out_dir is known and writable."""
    try:
        out_dir = Path(str(cfg.out_dir))
        out_dir.mkdir(parents=True, exist_ok=True)
        write_failed(out_dir, {"config": as_plain(cfg)}, err)
    except Exception:  # noqa: BLE001 - the validation error is what the user must see
        log.debug("could not write failed.json for an invalid config", exc_info=True)


def compress_stages(model: torch.nn.Module, splits: Any, rc: RunConfig, device: torch.device,
                    amp: bool, timer: StageTimer) -> tuple[CompressionReport, bool]:
    """calibrate (through the stats cache) → the library's `search` → apply, in place on
    `model`, each stage timed. Returns the report and whether the statistics were cached."""
    from amrc_exp.experiment.stats_cache import calibration_stats

    with timer("calibrate"):
        stats, cached = calibration_stats(model, splits, rc, device, amp)
    report = search(model, stats, rc.amrc(), stage=timer)
    with timer("apply"):
        compress_(model, report)
    return report, cached


def _record_compression(res: RunResult, report: CompressionReport, cached: bool, params_after: int) -> None:
    res.calibration_cached, res.zfit_minibatches = cached, report.n_minibatches
    res.params_after, res.params_target = params_after, report.params_target
    res.ratio_achieved = 1.0 - params_after / report.params_before
    res.layers = [r.to_dict() for r in report.layers]
    res.table1, res.energy_curves = report.summary(), report.energy_curves
    res.allocation_kl = report.allocation_kl or None


def _finetune(model, splits, rc: RunConfig, device, amp, timer, teacher=None) -> dict[str, Any]:
    """Partial fine-tune (Sec 4.1 item 5) with `finetune.loss`; a diverged loss names finetune.lr."""
    from amrc_exp.data import loader_options, make_loader

    with timer("finetune"):
        ft_loader = make_loader(splits.train, rc.finetune.batch_size, shuffle=True,
                                seed=rc.seed, **loader_options(rc.data, device))
        try:
            return partial_finetune(model, ft_loader, epochs=rc.finetune.epochs, lr=rc.finetune.lr,
                                    weight_decay=rc.finetune.weight_decay, device=device, amp=amp, seed=rc.seed,
                                    loss=rc.finetune.objective(), teacher=teacher,
                                    scope=str(rc.finetune.params))
        except FloatingPointError as err:  # a diverged loss: the learning rate is the fix
            if isinstance(err, AmrcError):
                raise
            raise ConfigError("finetune.lr", rc.finetune.lr, f"a smaller learning rate ({err})") from err


def _throughput_pair(rc: RunConfig, splits, model, device, amp) -> dict[str, float]:
    """Compressed vs dense images/s on one eval batch, measured side by side (interleaved)."""
    from amrc_exp.models import build_model

    batch = torch.stack([splits.val[i][0] for i in range(min(64, len(splits.val)))])
    dense, _ = build_model(replace(rc.model, weights="random"), seed=rc.seed)
    dense.to(device).eval()
    times = throughput_side_by_side({"compressed": model, "dense": dense}, batch, device, amp=amp)
    compressed_ips, dense_ips = (batch.shape[0] / median(times[k]) for k in ("compressed", "dense"))
    return {"batch": int(batch.shape[0]), "compressed_ips": compressed_ips, "dense_ips": dense_ips,
            "speedup": compressed_ips / dense_ips}


def _tracking_labels(rc: RunConfig) -> tuple[str, str, list[str]]:
    """W&B job_type (the method), a readable run name and tags (model, ratio, decomp, Z)."""
    job_type = rc.method or ("dense" if not rc.compress else "custom")
    budget = "dense" if not rc.compress else (f"params={rc.target_params}" if rc.target_params else f"ratio={rc.ratio}")
    label = f"{job_type} {rc.model.name} {budget}" + (f" ptq{rc.ptq.bits}" if rc.ptq.bits else "")
    tags = [rc.model.name, budget, f"decomp={rc.decomp.name}", f"z_type={rc.z_type.name}",
            f"solver={rc.zfit.solver}", f"data={rc.data.name}"]
    return job_type, label, tags


STAGES = (("baseline", "top1_baseline", "params_before", "size_mib_dense_fp16"),
          ("compressed", "top1_compressed", "params_after", "size_mib_compressed_fp16"),
          ("finetuned", "top1_finetuned", "params_after", "size_mib_compressed_fp16"),
          ("ptq", "top1_ptq", "params_after", "size_mib_ptq"))


def _log_result(tracker: Tracker, res: dict[str, Any], out_dir: Path, label: str) -> None:
    """The numbers as summary values, the stages side by side in one table, and the export +
    results.json as a versioned model artifact (one name per config, so reruns add versions)."""
    tracker.summary({k: v for k, v in res.items() if isinstance(v, (int, float))})
    fid = res.get("fidelity") or {}
    tracker.table("stages", ["stage", "top1", "agreement", "kl", "params", "size_mib"],
                  [[stage, res[top], fid.get(stage, {}).get("agreement", 100.0 if stage == "baseline" else None),
                    fid.get(stage, {}).get("kl", 0.0 if stage == "baseline" else None), res.get(params), res.get(size)]
                   for stage, top, params, size in STAGES if res.get(top) is not None])
    tracker.summary({f"{stage}/{k}": v for stage, d in fid.items() for k, v in d.items()})
    name = "".join(c if c.isalnum() or c in "-_." else "-" for c in label)
    tracker.artifact(f"model-{name}", "model", [out_dir / "model"], [out_dir / RESULTS],
                     {"top1": res.get("top1"), "params": res.get("params_after"), "synthetic": res.get("synthetic")})


LAYER_COLUMNS = ("name", "n_in", "n_out", "rank", "rank_cap", "energy_loss", "err_before", "err_after", "z_params")


def _log_layers(tracker: Tracker, report: CompressionReport) -> None:
    rows = report.layers
    names = [r.name for r in rows]
    tracker.table("layers", LAYER_COLUMNS, [[getattr(r, c) for c in LAYER_COLUMNS] for r in rows])
    tracker.bar("rank", names, [r.rank or 0 for r in rows], "Rank per layer (0 = dense)")
    tracker.bar("err_before", names, [r.err_before for r in rows], "Held-out normalized error per layer, before Z (Fig 3)")
    tracker.bar("err_after", names, [r.err_after for r in rows], "Held-out normalized error per layer, after Z (Fig 3)")
    curves = list(report.energy_curves.values())
    width = max(len(c) for c in curves)
    tracker.lines("energy_loss", list(range(width)),
                  [c + [c[-1]] * (width - len(c)) for c in curves], list(report.energy_curves),
                  "Normalized energy loss vs rank (Fig 1)", "rank")


def _check_finite_weights(model: torch.nn.Module, source: Any) -> None:
    """NaN/Inf in the loaded weights would poison every later stage: name the tensor now."""
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise WeightsError(f"model.weights={str(source)!r} holds non-finite values (NaN/Inf) in "
                               f"{name} ({bad} of {tensor.numel()} entries): the file is corrupt or its "
                               "training diverged; use another checkpoint")


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
        *([f"  vs dense      " + " | ".join(f"{st} agree {d['agreement']:.2f}% KL {d['kl']:.4f}"
                                         for st, d in res["fidelity"].items())] if res.get("fidelity") else []),
        f"  throughput    {res['throughput']['speedup']:.2f}x dense (batch {res['throughput']['batch']})",
        "  seconds       " + " | ".join(f"{k} {v:.1f}" for k, v in res["seconds"].items()),
    ]
    print("\n".join(lines), flush=True)
