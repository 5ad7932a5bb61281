"""End to end: one tiny run through every stage, its results.json, W&B files, cache and export."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from amrc_exp.experiment.run import run

TINY = [
    "model.weights=random", "calib.num_samples=64", "calib.heldout_samples=16",
    "calib.batch_size=32", "zfit.iters=20", "zfit.batch_size=16", "finetune.epochs=1", "data.finetune_subset=128",
    "data.eval_subset=256", "eval.batch_size=128",
]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    from tests.conftest import compose_cfg

    root = tmp_path_factory.mktemp("e2e")
    cfg = compose_cfg(TINY + [f"cache_dir={root / 'cache'}", f"out_dir={root / 'run1'}",
                              "logger=wandb", "ptq.bits=8"])
    return root, cfg, run(cfg)


def test_results_json_has_every_stage(first_run):
    root, cfg, res = first_run
    on_disk = json.loads((root / "run1" / "results.json").read_text())
    assert on_disk["status"] == "complete" and on_disk == json.loads(json.dumps(res))
    # Random weights: the run says so and can never feed a paper table.
    assert res["synthetic"] is True and res["model"]["random_weights"] is True
    for key in ("top1_baseline", "top1_compressed", "top1_finetuned", "top1_ptq", "top1"):
        assert 0.0 <= res[key] <= 100.0
    assert set(res["seconds"]) >= {"calibrate", "decompose", "allocate", "compensate", "apply",
                                   "finetune", "quantize", "eval_ptq", "export"}
    # Budget is the whole model: within one rank step of the largest layer (in + out).
    step = max(r["n_in"] + r["n_out"] for r in res["layers"])
    assert res["params_target"] == round((1 - 0.5) * res["params_before"])
    assert res["params_target"] - step < res["params_after"] <= res["params_target"]
    assert res["zfit_minibatches"] == 4  # 64 calibration samples in GD mini-batches of 16
    fact = [r for r in res["layers"] if r["rank"] is not None]
    assert fact and all(r["err_after"] <= r["err_before"] + 1e-9 for r in fact)
    assert res["size_mib_ptq"] < res["size_mib_compressed_fp16"] < res["size_mib_dense_fp16"]
    # The precision actually in force is recorded: on the CPU exact fp32 whatever `amp` says.
    assert res["precision"] == {"tf32_matmul": False, "tf32_cudnn": False,
                                "autocast": {"calibrate": False, "eval": False, "finetune": False}}


def read_wandb_records(path: Path) -> list:
    """The protobuf records of an offline `.wandb` file, read independently of wandb's own
    reader: a 7-byte header, then 32 KiB blocks of (crc32c:4, length:2, type:1) framed chunks
    (1 full, 2 first, 3 middle, 4 last), the leveldb log format W&B writes."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, payloads, part = 7, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        part = chunk if kind in (1, 2) else part + chunk
        if kind in (1, 4):
            payloads.append(part)
    records = []
    for raw in payloads:
        rec = pb.Record()
        rec.ParseFromString(raw)
        records.append(rec)
    return records


def test_wandb_offline_run_holds_tables_artifact_and_loss_curve(first_run):
    """Read the real offline run back: the per-layer table, the stage comparison table, the
    model artifact, the fine-tune loss history, job_type (the method) and tags."""
    root, cfg, res = first_run
    runs = list((root / "run1" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0
    records = read_wandb_records(runs[0])
    history = [{i.key or "/".join(i.nested_key): i.value_json for i in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    keys = {k for h in history for k in h}
    # tables, and the bar charts keyed by layer name (W&B stores a chart's data as <key>_table)
    assert {"layers/_type", "stages/_type", "rank_table/_type", "err_after_table/_type"} <= keys
    losses = [float(h["finetune/loss"]) for h in history if "finetune/loss" in h]
    assert losses == pytest.approx(res["finetune"]["loss_history"])
    layers = next(h for h in history if "layers/_type" in h)
    assert json.loads(layers["layers/nrows"]) == len(res["layers"]) and json.loads(layers["layers/ncols"]) == 9
    artifacts = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"]
    assert any(a.type == "model" and a.name.startswith("model-custom") for a in artifacts)
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.job_type == "custom" and "ratio=0.5" in list(run.tags) and "z_type=lowrank" in list(run.tags)


def test_rerun_same_dir_skips_finished_job(first_run):
    root, cfg, res = first_run
    path = root / "run1" / "results.json"
    before = path.stat().st_mtime_ns
    again = run(cfg)
    assert path.stat().st_mtime_ns == before and again["top1"] == res["top1"]


def test_second_config_reuses_calibration(first_run):
    from tests.conftest import compose_cfg

    root, _, res1 = first_run
    cfg2 = compose_cfg(TINY + [f"cache_dir={root / 'cache'}", f"out_dir={root / 'run2'}",
                               "logger=none", "ratio=0.4", "z_type=diagonal", "schedule=linear",
                               "finetune.epochs=0"])
    entries = lambda: {p.name: p.stat().st_mtime_ns for p in (root / "cache" / "stats").iterdir()}  # noqa: E731
    before = entries()
    res2 = run(cfg2)
    assert res1["calibration_cached"] is False and res2["calibration_cached"] is True
    # Read, not recomputed: no statistics were written (a wall-time comparison would flake under load).
    assert entries() == before
    assert "top1_finetuned" not in res2 and res2["top1"] == res2["top1_compressed"]


def test_export_reloads_to_the_evaluated_model(first_run):
    from amrc_exp.compress.evaluate import top1
    from amrc_exp.data import make_loader
    from amrc_exp.experiment.export import load_compressed
    from amrc_exp.experiment.inputs import load_splits

    root, cfg, res = first_run
    model = load_compressed(root / "run1" / "model")
    loader = make_loader(load_splits(cfg).val, 128, shuffle=False, seed=cfg.seed)
    assert top1(model, loader, torch.device("cpu")) == pytest.approx(res["top1"], abs=1e-9)


def test_fidelity_is_agreement_and_kl_against_the_dense_model(first_run):
    """The final stage's agreement and KL, recomputed from the exported model and a freshly
    built dense model (same seeded random weights) with numpy-free plain formulas."""
    from amrc_exp.data import make_loader
    from amrc_exp.experiment.export import load_compressed
    from amrc_exp.experiment.inputs import load_model, load_splits

    root, cfg, res = first_run
    compressed = load_compressed(root / "run1" / "model").eval()
    dense, _ = load_model(cfg)
    dense.eval()
    loader = make_loader(load_splits(cfg).val, 128, shuffle=False, seed=cfg.seed)
    agree = total = 0
    kl = 0.0
    with torch.no_grad():
        for images, _ in loader:
            p, q = dense(images).double().softmax(-1), compressed(images).double().softmax(-1)
            agree += int((p.argmax(-1) == q.argmax(-1)).sum())
            kl += float((p * (p.log() - q.log())).sum())
            total += images.shape[0]
    assert set(res["fidelity"]) == {"compressed", "finetuned", "ptq"}
    assert res["fidelity"]["ptq"]["agreement"] == pytest.approx(100.0 * agree / total, abs=1e-3)
    assert res["fidelity"]["ptq"]["kl"] == pytest.approx(kl / total, rel=1e-4, abs=1e-7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_run_agrees_with_cpu(tmp_path, monkeypatch):
    """The same tiny run on CUDA (fp32: amp off, TF32 off) and on the CPU: identical ranks,
    per-layer errors within float32 reduction-order noise."""
    from tests.conftest import compose_cfg

    res = {}
    for device in ("cpu", "cuda"):
        res[device] = run(compose_cfg(TINY + [f"cache_dir={tmp_path / device}", f"out_dir={tmp_path / device / 'out'}",
                                              "logger=none", f"device={device}", "amp=false", "finetune.epochs=0"]))
    assert res["cuda"]["device"].startswith("cuda")
    assert [r["rank"] for r in res["cuda"]["layers"]] == [r["rank"] for r in res["cpu"]["layers"]]
    for a, b in zip(res["cpu"]["layers"], res["cuda"]["layers"]):
        assert b["err_before"] == pytest.approx(a["err_before"], rel=1e-3, abs=1e-9)
        assert b["err_after"] == pytest.approx(a["err_after"], rel=2e-2, abs=1e-9)


@pytest.mark.parametrize("mode,group", [("MULTIRUN", "my_sweep"), ("RUN", None)])
def test_sweep_jobs_share_a_wandb_group(monkeypatch, tmp_path, mode, group):
    """In a multirun every job logs into the group named after the sweep dir; a single run has none."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    import amrc_exp.experiment.tracking as tracking
    from tests.conftest import CONF_DIR

    seen = {}
    monkeypatch.setattr(tracking, "WandbTracker", lambda **kw: seen.update(kw))
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[f"hydra.mode={mode}", f"hydra.sweep.dir={tmp_path / 'my_sweep'}"],
                      return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    try:
        tracking.make_tracker(cfg.logger, str(tmp_path), {})
    finally:
        HydraConfig.instance().cfg = None
    assert seen["group"] == group


def test_wandb_environment_variables_win_over_the_config(monkeypatch, tmp_path):
    """WANDB_MODE=disabled turns tracking off (the config's `mode: offline` used to be passed
    explicitly and win); WANDB_PROJECT and WANDB_ENTITY name the project and entity."""
    import amrc_exp.experiment.tracking as tracking
    from tests.conftest import compose_cfg

    cfg = compose_cfg(["logger=wandb", "out_dir=."])
    seen = {}
    monkeypatch.setattr(tracking, "WandbTracker", lambda **kw: seen.update(kw) or "wandb")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert type(tracking.make_tracker(cfg.logger, str(tmp_path), {})) is tracking.Tracker and not seen
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_PROJECT", "theirs")
    monkeypatch.setenv("WANDB_ENTITY", "lab")
    assert tracking.make_tracker(cfg.logger, str(tmp_path), {}, job_type="ours", tags=["deit"]) == "wandb"
    assert (seen["project"], seen["entity"], seen["mode"], seen["job_type"], seen["tags"]) == \
        ("theirs", "lab", "offline", "ours", ["deit"])


def test_sensitivity_run_is_logged_to_wandb(tmp_path):
    """Fig 2's runs on W&B: the offline run holds the per-kind line charts and the value table."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    tiny = [o for o in TINY if not o.startswith(("finetune.", "data.finetune_subset"))]
    proc = subprocess.run(
        [sys.executable, "-m", "amrc_exp.experiment.sensitivity", "--config-dir", "sweeps", "--config-name",
         "fig2_embedded", f"hydra.run.dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}", "logger=wandb",
         "logger.mode=offline", "sensitivity.fractions=[0.5,0.1]", *tiny],
        cwd=root, env={**os.environ, "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"},
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    (path,) = (tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")
    records = read_wandb_records(path)
    keys = {i.key or "/".join(i.nested_key) for r in records if r.WhichOneof("record_type") == "history"
            for i in r.history.item}
    assert {"sensitivity/_type", "sensitivity_blocks_table/_type", "sensitivity_types_table/_type"} <= keys, keys
    run_rec = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run_rec.job_type == "sensitivity" and "fig2" in list(run_rec.tags)
