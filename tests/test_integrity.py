"""Bad inputs that used to pass silently or end in a traceback: each gets one line naming the
key or path, the value and what is allowed (issue: nothing stale, nothing silent)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from amrc_exp.errors import ConfigError, WeightsError
from tests.conftest import compose_cfg, run_cli

ROOT = Path(__file__).resolve().parents[1]


def test_empty_cache_dir_env_is_refused(monkeypatch):
    from amrc_exp.experiment.config import validate

    monkeypatch.setenv("AMRC_CACHE_DIR", "")
    with pytest.raises(ConfigError, match=r"cache_dir='': expected a directory path \(AMRC_CACHE_DIR is set but empty"):
        validate(compose_cfg(["out_dir=."]))


def test_weights_path_that_is_a_directory_says_so(tmp_path):
    from amrc_exp.models.weights import read_state_dict

    with pytest.raises(WeightsError, match="is a directory, not a weights file"):
        read_state_dict(tmp_path)
    with pytest.raises(WeightsError, match="weights file not found"):
        read_state_dict(tmp_path / "missing.safetensors")


def test_tables_refuse_an_empty_sweep_and_a_file_as_out(tmp_path, capsys):
    from amrc_exp.report.tables import main

    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2
    assert "no complete results.json" in capsys.readouterr().err
    assert not list((tmp_path / "empty").iterdir())  # nothing written
    (tmp_path / "file.md").write_text("x")
    with pytest.raises(SystemExit) as err:
        main([str(tmp_path / "empty"), "--out", str(tmp_path / "file.md")])
    assert err.value.code == 2 and "is a file" in capsys.readouterr().err


def test_tables_warn_about_failed_and_pending_jobs(tmp_path, capsys):
    from amrc_exp.report.tables import main
    from tests.test_tables import write_run

    write_run(tmp_path, "method=ours,ratio=0.5")
    for name, files in (("method=ours,ratio=0.9", {"failed.json": "{}"}), ("method=ours,ratio=0.6", {})):
        job = tmp_path / name
        (job / ".hydra").mkdir(parents=True)
        for f, text in files.items():
            (job / f).write_text(text)
    assert main([str(tmp_path), "--out", str(tmp_path / "out"), "--table", "2"]) == 0
    err = capsys.readouterr().err
    assert "1 job(s) failed (failed.json) have no row" in err and "ratio=0.9" in err
    assert "1 job(s) pending (no result yet) have no row" in err and "ratio=0.6" in err


@pytest.mark.parametrize("case,key", [("resnet", "model.name"), ("depth0", "model.name"),
                                      ("min_rank", "schedule.min_rank"), ("fraction", "z_type.fraction")])
def test_budget_errors_blame_the_real_cause(case, key):
    """No compressible layer (not a ViT, or depth 0), a min_rank no layer can take, or a Z too
    expensive for any layer: each names its own key (all used to say z_type.fraction)."""
    import timm

    from amrc_exp.compress import AMRCConfig, ScheduleConfig, ZConfig, count_params, find_layers
    from amrc_exp.compress.plan import check_budget

    vit = dict(img_size=32, patch_size=8, embed_dim=32, num_heads=2, num_classes=10)
    model, config = {
        "resnet": (lambda: timm.create_model("resnet18", num_classes=10), AMRCConfig()),
        "depth0": (lambda: timm.create_model("vit_tiny_patch16_224", depth=0, **vit), AMRCConfig()),
        "min_rank": (lambda: timm.create_model("vit_tiny_patch16_224", depth=1, **vit),
                     AMRCConfig(schedule=ScheduleConfig(min_rank=100000))),
        "fraction": (lambda: timm.create_model("vit_tiny_patch16_224", depth=1, **vit),
                     AMRCConfig(z_type=ZConfig("sparse_unstructured", fraction=0.99))),
    }[case]
    model = model()
    with pytest.raises(ConfigError) as err:
        check_budget(find_layers(model), count_params(model), config)
    assert err.value.key == key, str(err.value)


def test_long_job_dir_names_are_shortened_deterministically():
    from amrc_exp.experiment.config import MAX_DIRNAME, job_dirname

    short = "method=ours,ratio=0.5"
    assert job_dirname(short) == short
    long = ",".join(f"+model.kwargs.option_number_{i}=value_{i}" for i in range(12))
    name = job_dirname(long)
    assert len(name.encode()) <= MAX_DIRNAME < 255 and name.startswith("+model.kwargs.option_number_0=value_0")
    assert job_dirname(long) == name and job_dirname(long + "x") != name


def test_cache_entry_with_zeroed_tensor_bytes_is_recomputed(tmp_path, caplog):
    """Size and header intact, data zeroed: the CRC in the manifest catches it."""
    import torch

    from amrc_exp.compress.calibrate import LayerStats
    from amrc_exp.experiment import stats_cache

    H = torch.rand(8, 8, dtype=torch.float64) + 1.0
    stats = {"heldout": {"l": LayerStats(H, torch.rand(3, 8, dtype=torch.float64), 4, 3)}}
    stats_cache.save_stats(str(tmp_path), "k", stats)
    assert torch.equal(stats_cache.load_stats(str(tmp_path), "k")["heldout"]["l"].H, H)
    path = tmp_path / "stats" / "k.safetensors"
    data = bytearray(path.read_bytes())
    start = data.index(H.numpy().tobytes()[:16])  # the H bytes, after the JSON header
    data[start: start + 64] = bytes(64)
    path.write_bytes(bytes(data))
    assert stats_cache.load_stats(str(tmp_path), "k") is None
    assert "checksum mismatch" in caplog.text


def test_a_result_is_tied_to_its_weights_file(tmp_path, caplog, one_thread):
    """Same config, same job dir, new weights file content: the old result is not reused; the
    rerun invalidates it before any work (so a failing rerun leaves no stale result); and the
    tables skip a result whose weights changed after it ran."""
    import timm

    from amrc_exp.experiment.run import run
    from amrc_exp.report.tables import load_results
    from tests.test_bad_input import TINY, save_weights

    def weights(seed: int) -> Path:
        torch.manual_seed(seed)
        model = timm.create_model("fmnist_vit", num_classes=10, depth=2, embed_dim=32, num_heads=2)
        return save_weights(model, tmp_path / "w.safetensors")

    out = tmp_path / "sweep" / "job"
    cfg = lambda: compose_cfg(TINY + [f"model.weights={tmp_path / 'w.safetensors'}", f"out_dir={out}",  # noqa: E731
                                      f"cache_dir={tmp_path / 'cache'}", "logger=none"])
    weights(0)
    first = run(cfg())
    assert first["inputs"]["weights_sha256"] and first["inputs"]["data_sha256"] is None  # synthetic data
    assert run(cfg())["seconds"] == first["seconds"]  # unchanged inputs: skipped
    weights(1)  # new content, same path
    assert len(load_results([tmp_path / "sweep"])) == 0 and "stale" in caplog.text
    second = run(cfg())
    assert second["inputs"] != first["inputs"] and second["status"] == "complete"  # rerun, not the old result
    (tmp_path / "w.safetensors").write_bytes(b"corrupt")  # the next rerun fails ...
    with pytest.raises(WeightsError):
        run(cfg())
    assert not (out / "results.json").exists() and (out / "failed.json").exists()  # ... and leaves no stale result


def test_wrong_wandb_key_without_network_falls_back_offline_within_the_timeout(tmp_path, monkeypatch, caplog,
                                                                                  one_thread):
    """A fake key and an unreachable server (a closed loopback port): the job waits at most
    logger.init_timeout (it used to stall 60 s), then logs offline into its directory."""
    import logging

    from amrc_exp.experiment.run import run
    from tests.test_bad_input import RANDOM, TINY

    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef0123456789abcdef01234567")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    out = tmp_path / "out"
    start = time.monotonic()
    with caplog.at_level(logging.WARNING):
        res = run(compose_cfg(TINY + [RANDOM, "logger=wandb", "logger.mode=online", "logger.init_timeout=2",
                                      f"out_dir={out}", f"cache_dir={tmp_path / 'cache'}"]))
    assert res["status"] == "complete" and time.monotonic() - start < 45
    assert "W&B online init failed within logger.init_timeout=2s" in caplog.text
    assert list((out / "wandb").glob("offline-run-*/run-*.wandb"))


def test_output_dir_that_cannot_be_created_is_refused_up_front(tmp_path):
    """`hydra.run.dir=/proc/x`: root passes os.access, but the directory cannot be made."""
    for flag, key in (([], "hydra.run.dir"), (["-m"], "hydra.sweep.dir")):
        proc = run_cli([*flag, f"{key}=/proc/amrc_test/x", "logger=none"])  # the console script's entry
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert f"invalid config value {key}='/proc/amrc_test/x': expected a writable directory" in proc.stderr


def test_disk_full_fails_before_the_work_and_at_the_export(tmp_path, monkeypatch, one_thread):
    """Too little free space: one error naming the directory and the MiB needed, before the
    long stages; a disk that fills during the export: the same kind of error, no traceback."""
    import errno
    import shutil

    from amrc_exp.errors import DiskSpaceError
    from amrc_exp.experiment import export, run as run_module
    from tests.test_bad_input import RANDOM, TINY

    cfg = lambda name: compose_cfg(TINY + [RANDOM, "logger=none", f"out_dir={tmp_path / name}",  # noqa: E731
                                           f"cache_dir={tmp_path / 'cache'}"])
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=1000))
    with pytest.raises(DiskSpaceError, match=rf"not enough free space for the results in {tmp_path / 'a'}: the export needs about"):
        run_module.run(cfg("a"))
    assert "calibrate" not in __import__("json").loads((tmp_path / "a" / "failed.json").read_text())["seconds"]
    monkeypatch.undo()

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export, "save_compressed", full)
    with pytest.raises(DiskSpaceError, match="no space left writing the export to"):
        run_module.run(cfg("b"))
    assert not (tmp_path / "b" / "results.json").exists()


@pytest.mark.parametrize("env, args, says", [({"NEIGHBOUR": "sometimes"}, ["3"], "NEIGHBOUR=sometimes: expected always, never or alternate"),
                                             ({}, ["0"], "N=0: expected a positive integer")])
def test_stress_suite_refuses_bad_values_before_cloning(tmp_path, env, args, says):
    import os
    import subprocess

    clone = tmp_path / "clone"
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "stress_suite.sh"), *args], capture_output=True, text=True,
                          env={**os.environ, **env, "STRESS_DIR": str(clone)}, timeout=60)
    assert proc.returncode == 2 and says in proc.stderr and not clone.exists()
