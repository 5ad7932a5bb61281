"""Bad input never costs a sweep more than a clear message.

Every case ends in one message naming the key, the bad value and what is allowed (or the
override to set), a non-zero exit, no traceback and nothing half-written (no results.json, no
cache entry, no temp files). The "recoverable" inputs (an all-zero input channel, online
logging without credentials, a corrupt cache entry) instead run to completion.

The CLI cases run the console script's own entry (`amrc_exp.__main__.cli`: preflight,
`@hydra.main`, the one-line error handling, the exit code) in this process (`run_cli`), on a tiny
random-weight ViT and synthetic data, one thread; three of them (a compose-time, a validation and
a run-time error) also through a real `python -m amrc_exp` interpreter.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from amrc_exp.errors import ConfigError, DataError, WeightsError
from tests.conftest import CliResult, compose_cfg, run_cli

ROOT = Path(__file__).resolve().parents[1]
ARCH = {"depth": 2, "embed_dim": 32, "num_heads": 2}  # a ~28k-parameter fmnist_vit
TINY = [
    *(f"+model.kwargs.{k}={v}" for k, v in ARCH.items()),
    "data=synthetic", "data.num_train=96", "data.num_val=32", "model.num_classes=10",
    "calib.num_samples=32", "calib.heldout_samples=16", "calib.batch_size=16",
    "zfit.iters=5", "zfit.batch_size=16", "schedule.iters=20", "finetune.epochs=0",
    "eval.batch_size=32", "logger=none",
]
RANDOM = "model.weights=random"


# ----------------------------------------------------------------------------- helpers


def tiny_model(**overrides) -> torch.nn.Module:
    import timm

    import amrc_exp.models  # noqa: F401  (registers fmnist_vit)

    torch.manual_seed(0)
    kwargs = dict(ARCH, num_classes=10, img_size=28, in_chans=1)
    kwargs.update(overrides)
    return timm.create_model("fmnist_vit", **kwargs).eval()


def attainable_ratio() -> str:
    """The largest ratio the tiny model allows, counted here from its block linears: each at
    rank 1 plus its 5% low-rank Z (q = floor(0.05·in·out/(in+out)), at least 1), rounded down
    to 4 decimals (a printed bound must itself be attainable)."""
    model = tiny_model()
    removable = 0
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name.startswith("blocks."):
            n_in, n_out = m.in_features, m.out_features
            q = max(1, (5 * n_in * n_out) // (100 * (n_in + n_out)))
            removable += n_in * n_out - (1 + q) * (n_in + n_out)
    return f"{math.floor(1e4 * removable / sum(p.numel() for p in model.parameters())) / 1e4:.4f}"


def save_weights(model_or_sd, path: Path) -> Path:
    from safetensors.torch import save_file

    sd = model_or_sd.state_dict() if isinstance(model_or_sd, torch.nn.Module) else model_or_sd
    save_file({k: v.detach().contiguous() for k, v in sd.items()}, str(path))
    return path


def cli(tmp_path: Path, *args: str, subprocess_: bool = False) -> CliResult | subprocess.CompletedProcess:
    """`python -m amrc_exp TINY... args` with run and cache dirs under tmp_path: in this process
    through the console script's entry (`run_cli`), or in a real interpreter (`subprocess_`)."""
    args = [*TINY, f"hydra.run.dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}", *args]
    if not subprocess_:
        return run_cli(args)
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update(OMP_NUM_THREADS="1", AMRC_OFFLINE="1", HF_HUB_OFFLINE="1", WANDB_SILENT="true")
    return subprocess.run([sys.executable, "-m", "amrc_exp", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=180)


def assert_clean_failure(proc: subprocess.CompletedProcess, tmp_path: Path, *needles: str) -> str:
    """Non-zero exit, every needle in stderr, no traceback, nothing half-written."""
    err = proc.stderr
    assert proc.returncode != 0, proc.stdout[-2000:] + err[-2000:]
    assert "Traceback" not in err, err[-3000:]
    for needle in needles:
        assert needle in err, f"{needle!r} not in stderr:\n{err[-3000:]}"
    assert not list(tmp_path.rglob("results.json"))
    assert not list(tmp_path.rglob("*.tmp")), "temp files left behind"
    assert not list((tmp_path / "cache").glob("stats/*.json")), "a cache entry was written"
    assert not list(tmp_path.rglob("wandb")), "a W&B run was started"
    return err


def all_finite(obj) -> bool:
    """Every float in a (nested) results dict is finite."""
    if isinstance(obj, float):
        return math.isfinite(obj)
    if isinstance(obj, dict):
        return all(all_finite(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(all_finite(v) for v in obj)
    return True


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory) -> Path:
    """Weights files: good, corrupt, another architecture, another class count, NaN, huge."""
    d = tmp_path_factory.mktemp("weights")
    good = tiny_model()
    save_weights(good, d / "good.safetensors")
    (d / "corrupt.safetensors").write_bytes((d / "good.safetensors").read_bytes()[:500])
    (d / "corrupt.pth").write_bytes(b"PK\x03\x04 this is not a checkpoint")
    save_weights(tiny_model(depth=3, embed_dim=48, num_heads=3), d / "other_arch.safetensors")
    save_weights(tiny_model(num_classes=7), d / "seven_classes.safetensors")
    sd = {k: v.clone() for k, v in good.state_dict().items()}
    sd["blocks.1.mlp.fc1.weight"][3, 5] = float("nan")
    save_weights(sd, d / "nan.safetensors")
    sd = {k: v.clone() for k, v in good.state_dict().items()}
    sd["blocks.0.mlp.fc1.weight"] *= 1e37  # finite weights, infinite activations
    save_weights(sd, d / "overflow.safetensors")
    return d


# ----------------------------------------------------------------------------- CLI cases

CLI_CASES = {
    # id: (overrides, needles in stderr)
    "unknown_model_group_option": (["model=resnet50"], ["model/resnet50", "Available options in 'model'", "fmnist_vit"]),
    "unknown_z_type_group_option": ([RANDOM, "z_type=sparse"], ["z_type/sparse", "sparse_unstructured"]),
    "unknown_timm_model_name": ([RANDOM, "model.name=vit_nonexistent_xyz"],
                                ["model.name='vit_nonexistent_xyz'", "expected a timm model name"]),
    "ratio_zero": ([RANDOM, "ratio=0"], ["ratio=0.0", "strictly between 0 and 1"]),
    "ratio_one": ([RANDOM, "ratio=1"], ["ratio=1.0", "strictly between 0 and 1"]),
    "ratio_not_a_number": ([RANDOM, "ratio=abc"], ["ratio=abc", "could not be converted to Float"]),
    "budget_z_overhead_exceeds_budget": (
        [RANDOM, "z_type=sparse_unstructured", "z_type.fraction=0.9", "ratio=0.9"],
        ["z_type.fraction=0.9", "no ratio can be met", "cheaper z_type"]),
    "budget_ratio_above_attainable": ([RANDOM, "ratio=0.95"], ["ratio=0.95", f"a number <= {attainable_ratio()}",
                                                                 "for this model"]),
    "non_finite_learning_rate": ([RANDOM, "finetune.lr=inf"], ["finetune.lr=inf", "a finite number > 0"]),
    "zero_iterations": ([RANDOM, "zfit.iters=0"], ["zfit.iters=0", "an integer >= 1"]),
    "negative_iterations": ([RANDOM, "schedule.iters=-5"], ["schedule.iters=-5", "an integer >= 1"]),
    "missing_data_root": ([RANDOM, "data=fashion_mnist", "data.root=/nonexistent/fashion-mnist"],
                          ["data.root='/nonexistent/fashion-mnist'", "set data.root="]),
    "calibration_larger_than_dataset": ([RANDOM, "calib.num_samples=500"],
                                        ["calib.num_samples=500", "at most 80", "96-image train split"]),
    "weights_corrupt": (["model.weights={w}/corrupt.safetensors"],
                        ["cannot read weights file", "corrupt.safetensors", "is it corrupt?"]),
    "weights_other_architecture": (["model.weights={w}/other_arch.safetensors"],
                                   ["does not match the model's architecture", "shape mismatches",
                                    "is model.name the architecture"]),
    "weights_other_class_count": (["model.weights={w}/seven_classes.safetensors"],
                                  ["head.weight file (7, 32) vs model (10, 32)", "set model.num_classes=7"]),
    "weights_nan": (["model.weights={w}/nan.safetensors"],
                    ["non-finite values (NaN/Inf) in blocks.1.mlp.fc1.weight", "nan.safetensors"]),
    "activations_inf": (["model.weights={w}/overflow.safetensors"],
                        ["non-finite activations (NaN/Inf)", "of layer 'blocks.", "check model.weights"]),
    "unwritable_run_dir": (["hydra.run.dir={t}/a_file/run"], ["hydra.run.dir=", "a_file is not a directory",
                                                              "expected a writable directory"]),
    "unwritable_cache_dir": ([RANDOM, "cache_dir={t}/a_file/cache"], ["cache_dir=", "a_file is not a directory",
                                                                       "expected a writable directory"]),
}


# Through a real interpreter too: a compose-time error (Hydra's own reporting), a validation
# error and a run-time error (the library's), so the in-process entry stands for the console script.
SUBPROCESS_CASES = ("unknown_model_group_option", "ratio_zero", "weights_nan")


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_bad_input(case, tmp_path, weights_dir):
    overrides, needles = CLI_CASES[case]
    (tmp_path / "a_file").write_text("a file where a directory is expected\n")
    args = [o.format(w=weights_dir, t=tmp_path) for o in overrides]
    proc = cli(tmp_path, *args, subprocess_=case in SUBPROCESS_CASES)
    err = assert_clean_failure(proc, tmp_path, *needles)
    if case == "weights_other_architecture":  # width differs; classes and channels match
        assert "embedding width is 48" in err and "set model.num_classes" not in err
        assert "set model.in_chans" not in err
    assert len([l for l in err.splitlines() if "error" in l.lower()]) <= 2  # one message, not a cascade
    if case.startswith("budget"):  # the budget fails right after the model is built
        assert "stage calibrate" not in proc.stdout + err and "stage eval_baseline" not in proc.stdout + err


# ----------------------------------------------------------------------------- in-process cases


def _cfg(tmp_path: Path, *overrides: str):
    return compose_cfg(TINY + [f"out_dir={tmp_path / 'out'}", f"cache_dir={tmp_path / 'cache'}", *overrides])


def _run_fails(tmp_path: Path, exc_type, *overrides: str) -> str:
    from amrc_exp.experiment.run import run

    with pytest.raises(exc_type) as err:
        run(_cfg(tmp_path, *overrides))
    assert not (tmp_path / "out" / "results.json").exists()
    assert not list(tmp_path.rglob("*.tmp"))
    failed = json.loads((tmp_path / "out" / "failed.json").read_text()) if (tmp_path / "out" / "failed.json").exists() else None
    assert failed is None or failed["status"] == "failed"  # never read as a finished result
    return str(err.value)


@pytest.mark.parametrize("overrides,exc_type,needles", [
    ([RANDOM, "target_params=100"], ConfigError, ["target_params=100", "an integer >= "]),
    ([RANDOM, "target_params=10000000"], ConfigError, ["target_params=10000000", "fewer than the model's"]),
    ([RANDOM, "data=imagenet"], DataError, ["data=imagenet", "set data.root=/path/to/imagenet"]),
    (["model.weights={w}/corrupt.pth"], WeightsError, ["corrupt.pth", "is it corrupt?"]),
    (["model.weights={w}/missing.safetensors"], WeightsError, ["weights file not found", "missing.safetensors"]),
    ([RANDOM, "out_dir={t}/a_file/out"], ConfigError, ["out_dir=", "a_file is not a directory"]),
    ([RANDOM, "finetune.epochs=2", "data.finetune_subset=64", "finetune.batch_size=16", "finetune.lr=1e12"],
     ConfigError, ["finetune.lr=1000000000000.0", "a smaller learning rate", "loss became nan"]),
], ids=["target_params_unreachable", "target_params_above_model", "imagenet_without_root",
        "weights_corrupt_pth", "weights_missing", "unwritable_out_dir", "finetune_diverges"])
def test_in_process_bad_input(overrides, exc_type, needles, tmp_path, weights_dir, one_thread):
    (tmp_path / "a_file").write_text("")
    msg = _run_fails(tmp_path, exc_type, *[o.format(w=weights_dir, t=tmp_path) for o in overrides])
    for needle in needles:
        assert needle in msg, msg


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda(tmp_path, one_thread):
    msg = _run_fails(tmp_path, ConfigError, RANDOM, "device=cuda")
    assert "device='cuda'" in msg and "auto or cpu" in msg


# ----------------------------------------------------------------------------- recoverable inputs


def test_all_zero_input_channels_run_to_finite_results(tmp_path, weights_dir, monkeypatch, one_thread):
    """Dead channels make H singular (a zero row and column): every stage stays finite.

    qkv of block 0 gets an all-zero input channel (norm1's weight and bias zero there), fc2 of
    block 1 another (fc1's unit 7 dead), and every image has an all-zero pixel channel."""
    from amrc_exp import data
    from amrc_exp.experiment.export import load_compressed
    from amrc_exp.experiment.run import run

    model = tiny_model(in_chans=3)
    with torch.no_grad():
        model.blocks[0].norm1.weight[4] = 0
        model.blocks[0].norm1.bias[4] = 0
        model.blocks[1].mlp.fc1.weight[7] = 0
        model.blocks[1].mlp.fc1.bias[7] = 0
    path = save_weights(model, tmp_path / "dead.safetensors")
    getitem = data.SyntheticDataset.__getitem__

    def zero_first_channel(self, index):
        x, y = getitem(self, index)
        x = x.clone()
        x[0] = 0
        return x, y

    monkeypatch.setattr(data.SyntheticDataset, "__getitem__", zero_first_channel)
    for i, extra in enumerate([["decomp=asvd_whiten", "zfit.solver=closed_form", "z_type=sparse_structured"],
                               ["decomp=asvd_mean", "z_type=sparse_unstructured", "decomp.damp=0"]]):
        out = tmp_path / f"out{i}"
        res = run(compose_cfg(TINY + [f"model.weights={path}", "model.in_chans=3", f"out_dir={out}",
                                      f"cache_dir={tmp_path / 'cache'}", "ratio=0.5", *extra]))
        assert res["status"] == "complete" and all_finite(res)
        assert any(r["rank"] is not None for r in res["layers"])
        x = torch.stack([data.SyntheticDataset(8, (3, 28, 28), 10, seed=1)[j][0] for j in range(8)])
        assert torch.isfinite(load_compressed(out / "model")(x)).all()


def test_logger_online_without_credentials_falls_back_offline(tmp_path, monkeypatch, caplog, one_thread):
    from amrc_exp.experiment.run import run

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc, no wandb login
    with caplog.at_level(logging.WARNING):
        res = run(_cfg(tmp_path, RANDOM, "logger=wandb", "logger.mode=online"))
    assert "logger.mode=online but no W&B credentials" in caplog.text
    assert res["status"] == "complete" and (tmp_path / "out" / "results.json").exists()
    runs = list((tmp_path / "out" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0


def test_corrupted_cache_entry_is_detected_and_recomputed(tmp_path, caplog, one_thread):
    from amrc_exp.experiment.run import run

    first = run(_cfg(tmp_path, RANDOM, "out_dir=" + str(tmp_path / "a")))
    entries = list((tmp_path / "cache" / "stats").glob("*.safetensors"))
    assert first["calibration_cached"] is False and len(entries) == 1
    blob = entries[0].read_bytes()
    entries[0].write_bytes(blob[: len(blob) // 2])  # torn file, e.g. copied from a full disk
    with caplog.at_level(logging.WARNING):
        second = run(_cfg(tmp_path, RANDOM, "out_dir=" + str(tmp_path / "b")))
    assert "is corrupt" in caplog.text and second["calibration_cached"] is False
    assert second["layers"] == first["layers"]  # recomputed, identical
    third = run(_cfg(tmp_path, RANDOM, "out_dir=" + str(tmp_path / "c")))
    assert third["calibration_cached"] is True and third["layers"] == first["layers"]


# ----------------------------------------------------------------------------- what the budget error suggests


def test_budget_error_suggests_only_what_helps_with_the_ratio_it_allows():
    """Two bias-free linears of known shapes: each suggested fix comes with the largest ratio it
    allows, worked out here from the shapes (rank r costs r*(in+out)), and a fix that would not
    help (the current z_type, a fraction that does not count) is never suggested."""
    from amrc_exp.compress.config import AMRCConfig, ScheduleConfig, ZConfig
    from amrc_exp.compress.plan import check_budget

    shapes = [(64, 64), (32, 128)]
    layers = {f"l{i}": torch.nn.Linear(i_, o_, bias=False) for i, (i_, o_) in enumerate(shapes)}
    n0 = sum(i * o for i, o in shapes) + 1000  # + parameters outside the compressible layers

    def floor4(removable: int) -> str:
        return f"{math.floor(removable / n0 * 1e4) / 1e4:.4f}"

    at_rank1 = sum(i * o - (i + o) for i, o in shapes)  # no Z, rank 1
    at_rank0 = sum(i * o for i, o in shapes)  # no Z, rank 0: the layers vanish
    with pytest.raises(ConfigError) as err:  # z_type=none already: only min_rank can help
        check_budget(layers, n0, AMRCConfig(ratio=0.99, z_type=ZConfig("none"), schedule=ScheduleConfig(min_rank=1)))
    msg = str(err.value)
    assert f"a number <= {floor4(at_rank1)}" in msg
    assert f"schedule.min_rank=0 (rank 0 keeps a layer's bias only: ratio <= {floor4(at_rank0)})" in msg
    assert "cheaper z_type" not in msg and "a lower z_type.fraction" not in msg

    for fraction, lower_helps in ((0.3, True), (0.05, False)):  # at 0.05 Z is already rank 1 here
        with pytest.raises(ConfigError) as err:  # lowrank Z: none is cheaper
            check_budget(layers, n0, AMRCConfig(ratio=0.99, z_type=ZConfig("lowrank", fraction),
                                                schedule=ScheduleConfig(min_rank=1)))
        msg = str(err.value)
        assert f"none: ratio <= {floor4(at_rank1)}" in msg and "lowrank:" not in msg
        assert ("a lower z_type.fraction (0: ratio <=" in msg) is lower_helps, msg
