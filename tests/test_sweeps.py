"""sweeps/: every table's multirun config composes to the documented grid, and a sweep killed
midway resumes without losing or duplicating a finished job (end to end, via subprocess)."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import amrc_exp
import amrc_exp.experiment.config  # noqa: F401  (conftest registers the schema)

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = ROOT / "sweeps"
CONF = amrc_exp.CONF_DIR
TABLE_CONFIGS = sorted(p.stem for p in SWEEPS.glob("table*.yaml"))
FIG_CONFIGS = sorted(p.stem for p in SWEEPS.glob("fig*.yaml"))
PEER_CONFIGS = sorted(p.stem for p in SWEEPS.glob("peers*.yaml"))
FRONTIER_CONFIGS = sorted(p.stem for p in SWEEPS.glob("frontier*.yaml"))
METHOD = {  # conf/method/*.yaml -> (decomp, schedule, z_type, zfit.solver)
    "paper": ("asvd_mean", "exp", "lowrank", "gd"),
    "ours": ("asvd_whiten", "exp", "lowrank", "closed_form"),
    "svd_ft": ("svd", "uniform", "none", "gd"),
    "svd": ("svd", "param_uniform", "none", "gd"),
    "svdllm": ("svdllm", "param_uniform", "none", "gd"),
    "svdllm_v2": ("svdllm_v2", "truncation_loss", "none", "gd"),
    "dobi": ("dobi", "dobi", "none", "gd"),
    "asvd": ("asvd", "asvd_search", "none", "gd"),
    "fwsvd": ("fwsvd", "param_uniform", "none", "gd"),
    "ours_oa": ("asvd_whiten", "output_aware", "none", "gd"),
    "ours_kd": ("asvd_whiten", "output_aware", "none", "gd"),  # ours_oa, fine-tuned by distillation
    "ours_fm": ("asvd_whiten", "output_aware", "none", "gd"),  # ours_kd + feature matching
    "ours_wf": ("whiten_fisher", "output_aware", "none", "gd"),  # two-sided, allocation checked and refined
    "ours_wf_kd": ("whiten_fisher", "output_aware", "none", "gd"),  # the same, fine-tuned by distillation
}
# Tiny embedded jobs for the subprocess sweeps: random weights (no trained model needed), a few
# samples everywhere. Every such run must come out marked synthetic.
TINY = ["model=fmnist_vit_small", "model.weights=random", "calib.num_samples=32", "calib.heldout_samples=16",
        "calib.batch_size=16", "zfit.iters=10", "zfit.batch_size=16", "data.eval_subset=64",
        "data.finetune_subset=64", "finetune.batch_size=32", "eval.batch_size=64",
        "seed=0"]  # one seed: the embedded table sweeps repeat every cell over seeds 0, 1, 2


def compose_sweep(name: str, overrides: list[str] = ()):
    """Compose a sweep config as `python -m amrc_exp --config-dir sweeps --config-name NAME` would."""
    from amrc_exp.experiment.sensitivity import SensitivityRunConfig
    from hydra.core.config_store import ConfigStore

    if name.startswith("fig"):  # the sensitivity entry point's schema (run schema + `sensitivity`)
        ConfigStore.instance().store(name="config_schema", node=SensitivityRunConfig)
    try:
        with initialize_config_dir(config_dir=str(SWEEPS), version_base="1.3"):
            return compose(config_name=name, overrides=[f"hydra.searchpath=[file://{CONF}]", *overrides],
                           return_hydra_config=True)
    finally:
        amrc_exp.experiment.config.register_schema()


def grid(cfg) -> list[list[str]]:
    """The jobs of a sweep config: the cartesian product of hydra.sweeper.params."""
    params = cfg.hydra.sweeper.params
    axes = [[f"{k}={v.strip()}" for v in str(vals).split(",")] for k, vals in params.items()]
    return [list(job) for job in itertools.product(*axes)]


def test_every_table_and_scale_has_a_sweep_config():
    assert TABLE_CONFIGS == [f"table{n}_{s}" for n in (1, 2, 3, 4) for s in ("embedded", "paper")]
    assert FIG_CONFIGS == ["fig2_embedded", "fig2_paper"]
    assert PEER_CONFIGS == ["peers_embedded", "peers_paper", "peers_ratio16_embedded", "peers_ratio32_embedded",
                            "peers_ratio32p128_embedded", "peers_score16_embedded",
                            "peers_score32_embedded", "peers_score64_embedded", "peers_score8_embedded",
                            "peers_seed1_embedded"]
    assert FRONTIER_CONFIGS == ["frontier_dense_embedded", "frontier_embedded", "frontier_fm_embedded",
                                "frontier_full_ft_embedded", "frontier_wf_embedded", "frontier_wf_kd_embedded"]


def test_fine_tune_loss_methods():
    """ours_kd distils; ours_fm distils and matches the compressed layers' outputs; both keep the
    frontier sweep's lr and partial set, so they differ from ours_oa in the loss alone."""
    for method, loss, beta in (("ours_oa", "ce", 0.0), ("ours_kd", "kd", 0.0), ("ours_fm", "kd", 1.0)):
        cfg = compose_sweep("frontier_fm_embedded", [f"method={method}"])
        assert (cfg.finetune.loss, cfg.finetune.feature_weight, cfg.finetune.lr, cfg.finetune.params) == \
            (loss, beta, 1e-3, "partial")
    # ours_wf_kd: ours_wf's compression (checked and refined), distilled; the partial set on all train images
    cfg = compose_sweep("frontier_wf_kd_embedded", ["method=ours_wf_kd"])
    assert (cfg.finetune.loss, cfg.finetune.params, cfg.data.finetune_subset) == ("kd", "partial", None)
    assert (cfg.schedule.check_uniform, cfg.schedule.refine_steps, cfg.decomp.name) == (True, 50, "whiten_fisher")


def test_every_method_config_is_checked():
    from amrc_exp.experiment.config import METHODS

    files = {p.stem for p in (SWEEPS.parent / "conf" / "method").glob("*.yaml")}
    assert set(METHOD) | {"dense"} == files
    assert set(METHODS) == files  # the `method` key accepts exactly the method configs (a job fails fast otherwise)


@pytest.mark.parametrize("name", TABLE_CONFIGS + FIG_CONFIGS + PEER_CONFIGS + FRONTIER_CONFIGS)
def test_sweep_config_jobs_compose(name):
    import timm

    import amrc_exp.models  # noqa: F401  (registers the embedded models in timm)

    base = compose_sweep(name)
    # fixed sweep dir per config and one sub-directory per override set: reruns map to the same dirs
    from omegaconf import OmegaConf

    sweep = OmegaConf.to_container(base.hydra.sweep, resolve=False)
    assert sweep == {"dir": "outputs/sweeps/${hydra.job.config_name}", "subdir": "${amrc.dirname:${hydra.job.override_dirname}}"}
    assert base.hydra.job.config_name == name
    assert {"model.weights", "data.root", "cache_dir"} <= set(base.hydra.job.config.override_dirname.exclude_keys)
    jobs = grid(base)
    expected = {"table1_embedded": 30, "table1_paper": 10, "table2_embedded": 36, "table2_paper": 36,
                "table3_embedded": 9, "table3_paper": 9, "table4_embedded": 18, "table4_paper": 6,
                "fig2_embedded": 3, "fig2_paper": 3, "peers_embedded": 162, "peers_paper": 54, "peers_seed1_embedded": 81,
                "peers_score8_embedded": 18, "peers_score16_embedded": 18, "peers_ratio16_embedded": 18, "peers_ratio32_embedded": 18,
                "peers_ratio32p128_embedded": 18,
                "peers_score32_embedded": 18, "peers_score64_embedded": 18, "frontier_full_ft_embedded": 3,
                "frontier_embedded": 36, "frontier_dense_embedded": 3, "frontier_fm_embedded": 27, "frontier_wf_embedded": 18,
                "frontier_wf_kd_embedded": 9}[name]
    assert len(jobs) == expected
    dirs = set()
    for job in jobs:
        seed = dict(o.split("=", 1) for o in job).get("seed")
        if seed not in (None, "0"):  # a seed only changes the seed: its directory from the seed-0 job's
            continue
        cfg = compose_sweep(name, job)
        assert cfg.seed == 0
        dirs.add(cfg.hydra.job.override_dirname)
        if seed is not None:
            assert "seed=0" in cfg.hydra.job.override_dirname
            dirs |= {cfg.hydra.job.override_dirname.replace("seed=0", f"seed={s}")
                     for s in {dict(o.split("=", 1) for o in j).get("seed") for j in jobs}}
        assert timm.is_model(cfg.model.name)
        method = dict(o.split("=", 1) for o in job).get("method")
        if method in METHOD and "z_type" not in dict(o.split("=", 1) for o in job):
            assert (cfg.decomp.name, cfg.schedule.name, cfg.z_type.name, cfg.zfit.solver) == METHOD[method]
        if method == "dense" or "dense" in str(cfg.get("t3", "")):
            assert cfg.compress is False and cfg.target_params is None and cfg.finetune.epochs == 0
        if name.endswith("_embedded"):
            assert cfg.model.name.startswith("fmnist_vit") and cfg.data.name == "fashion_mnist"
            assert cfg.device == "cpu" and cfg.logger.name == "wandb" and cfg.logger.mode == "offline"
        else:
            assert cfg.data.name == "imagenet" and cfg.logger.name == "wandb" and cfg.logger.mode == "offline"
            assert (cfg.calib.num_samples, cfg.zfit.iters) == (1024, 2000)  # the paper's Sec 4.1
            if not name.startswith(("table1", "fig")) and cfg.compress:
                assert cfg.finetune.epochs == 20
        if name.startswith("table1"):
            assert cfg.finetune.epochs == 0 and cfg.ratio == 0.5
    assert len(dirs) == len(jobs)  # one directory per job
    if name.startswith(("table", "peers", "frontier")) and name.endswith("_embedded"):  # every cell over 3 seeds
        assert {dict(o.split("=", 1) for o in job).get("seed") for job in jobs} == {"0", "1", "2"}


def test_table2_grid_is_models_methods_ratios():
    cfg = compose_sweep("table2_paper")
    params = {k: set(str(v).split(",")) for k, v in cfg.hydra.sweeper.params.items()}
    assert params == {"model": {"deit_b", "deit_s", "vit_b", "swin_b"}, "method": {"paper", "ours", "svd_ft"},
                      "ratio": {"0.4", "0.5", "0.6"}}


def test_table3_targets():
    """Embedded: fmnist_vit to fmnist_vit_small's exact size; paper: the printed compressed sizes."""
    import timm

    import amrc_exp.models  # noqa: F401

    small = timm.create_model("fmnist_vit_small", img_size=28, in_chans=1, num_classes=10)
    n_small = sum(p.numel() for p in small.parameters())
    cfg = compose_sweep("table3_embedded", ["t3=fmnist_vit_ours"])
    assert cfg.model.name == "fmnist_vit" and cfg.target_params == n_small
    for job, model, target in (("vit_l_paper", "vit_large_patch16_224", 86_000_000),
                               ("deit_b_ours", "deit_base_patch16_224", 21_700_000),
                               ("deit_s_paper", "deit_small_patch16_224", 5_000_000)):
        cfg = compose_sweep("table3_paper", [f"t3={job}"])
        assert (cfg.model.name, cfg.target_params) == (model, target)


def test_paths_stay_out_of_job_dir_names():
    cfg = compose_sweep("table2_paper", ["model=deit_b", "method=ours", "ratio=0.5", "data.root=/data/imagenet",
                                         "model.weights=/ckpt/x.safetensors", "cache_dir=/tmp/c", "device=cuda"])
    assert cfg.hydra.job.override_dirname == "method=ours,model=deit_b,ratio=0.5"


# --------------------------------------------------------------------------- end to end (subprocess)


def _env() -> dict[str, str]:
    env = dict(os.environ, AMRC_OFFLINE="1", HF_HUB_OFFLINE="1", WANDB_SILENT="true", OMP_NUM_THREADS="1",
               HYDRA_FULL_ERROR="0")
    env.pop("AMRC_CACHE_DIR", None)
    return env


def _sweep_cmd(sweep: Path, cache: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "amrc_exp", "-m", "--config-dir", "sweeps", "--config-name", "table2_embedded",
            f"hydra.sweep.dir={sweep}", f"cache_dir={cache}", *TINY, *overrides]


def _job_files(sweep: Path, name: str) -> dict[str, Path]:
    return {p.parent.name: p for p in sweep.glob(f"*/{name}")}


def test_killed_sweep_resumes_without_loss_or_duplicates(tmp_path):
    """3 jobs (the first fails by design); kill -9 after the first success, rerun: the finished
    job is not recomputed, the failed and the killed ones are rerun, nothing is duplicated; then
    the tables of that sweep (the CI's reduced end-to-end grid)."""
    from amrc_exp.experiment.sweep import list_jobs

    sweep, cache = tmp_path / "sweep", tmp_path / "cache"
    # ratio=0.99 cannot be met by rank-1 layers: that job fails (failed.json) and the sweep goes on
    overrides = ("method=svd_ft", "ratio=0.99,0.4,0.5")
    cmd = _sweep_cmd(sweep, cache, *overrides)
    # `python -m amrc_exp.experiment.sweep` lists the jobs, directories and states without running
    listed = [f"hydra.sweep.dir={sweep}", f"cache_dir={cache}", *TINY, *overrides]

    def states() -> dict[str, str]:
        return {j.dir.name: j.state for j in list_jobs(SWEEPS, "table2_embedded", listed)}

    before = list_jobs(SWEEPS, "table2_embedded", listed)
    assert [j.state for j in before] == ["pending"] * 3 and len({j.dir for j in before}) == 3
    log1 = open(tmp_path / "run1.log", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=log1, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 150
    try:
        while not _job_files(sweep, "results.json"):
            assert proc.poll() is None, (tmp_path / "run1.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no job finished in time"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # kill -9 the whole sweep, mid-job
        proc.wait()
    first = _job_files(sweep, "results.json")
    assert len(first) == 1, first
    (done_name, done_path), = first.items()
    assert "ratio=0.4" in done_name
    done_mtime = done_path.stat().st_mtime_ns
    failed = _job_files(sweep, "failed.json")
    assert len(failed) == 1 and "ratio=0.99" in next(iter(failed))
    failed_mtime = next(iter(failed.values())).stat().st_mtime_ns
    killed = states()  # the killed job has a directory but no result: pending
    assert sorted(killed.values()) == ["done", "failed", "pending"] and killed[done_name] == "done"

    rerun = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=150)
    out = rerun.stdout + rerun.stderr
    assert rerun.returncode != 0, out  # the impossible job still fails, and says so ...
    assert "job FAILED in" in out and "ratio=0.99" in out
    results = _job_files(sweep, "results.json")
    assert sorted(n.split("ratio=")[1].split(",")[0] for n in results) == ["0.4", "0.5"]  # ... after the others ran
    job_dirs = [d for d in sweep.iterdir() if d.is_dir()]
    assert len(job_dirs) == 3
    for d in job_dirs:
        assert len(list(d.rglob("results.json"))) <= 1
    assert results[done_name].stat().st_mtime_ns == done_mtime  # finished job not recomputed
    assert "already holds a finished result" in out
    assert next(iter(_job_files(sweep, "failed.json").values())).stat().st_mtime_ns != failed_mtime  # retried
    # the listing's directories are those Hydra made, in the states they hold
    assert states() == {d.name: ("done" if (d / "results.json").exists() else "failed") for d in job_dirs}
    full = compose_sweep("table2_paper", ["data.root=/x"])
    assert len(list_jobs(SWEEPS, "table2_paper", ["data.root=/x"])) == len(grid(full)) == 36
    for p in results.values():
        res = json.loads(p.read_text())
        assert res["status"] == "complete" and res["synthetic"] is True  # random weights: marked

    # the tables of this sweep: params from the results, accuracy never filled (synthetic)
    from amrc_exp.report.tables import main

    assert main([str(sweep), "--out", str(tmp_path / "tables")]) == 0
    import pandas as pd

    csv = pd.read_csv(tmp_path / "tables" / "table2.csv")
    rows = csv[csv["method"] == "Vanilla SVD + FT"].sort_values("ratio")
    expected = [json.loads(results[n].read_text())["params_after"] / 1e6 for n in sorted(results)]
    assert list(rows["params_m"]) == pytest.approx(expected)
    assert csv["top1"].isna().all()
    assert "| —" in (tmp_path / "tables" / "table2.md").read_text()


@pytest.mark.parametrize("launcher", ["joblib", "submitit_local"])
def test_failed_jobs_make_the_sweep_fail_under_every_launcher(tmp_path, launcher):
    """A job that fails validation (ratio=1.2) or the budget check (ratio=0.99) writes failed.json
    in its own directory; the sweep lists both and exits 2, also when the jobs ran in other
    processes (joblib workers, submitit jobs), where no in-process state reaches the launcher.
    The job that completes sits in the directory the basic launcher would give it."""
    sweep = tmp_path / "sweep"
    extra = ["hydra.launcher.n_jobs=2"] if launcher == "joblib" else []
    cmd = _sweep_cmd(sweep, tmp_path / "cache", f"hydra/launcher={launcher}", *extra, "method=svd_ft",
                     "ratio=0.5,1.2,0.99", "finetune.epochs=0")
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert "2 job(s) of the sweep failed" in out and "ratio=1.2" in out and "ratio=0.99" in out
    failed = _job_files(sweep, "failed.json")
    assert sorted(n.split("ratio=")[1].split(",")[0] for n in failed) == ["0.99", "1.2"]
    assert "ratio=1.2" in json.loads(next(p for n, p in failed.items() if "ratio=1.2" in n).read_text())["error"]
    (name, path), = _job_files(sweep, "results.json").items()
    assert json.loads(path.read_text())["status"] == "complete"
    excluded = set(compose_sweep("table2_embedded").hydra.job.config.override_dirname.exclude_keys)
    named = [o for o in TINY if o.split("=")[0] not in excluded]  # weights, batch sizes: not in names
    from amrc_exp.experiment.config import job_dirname

    assert name == job_dirname(",".join(sorted(["method=svd_ft", "ratio=0.5", "finetune.epochs=0", *named])))
    if launcher == "submitit_local":  # `hydra/launcher=submitit_local`: the SLURM launcher's local twin
        assert (sweep / ".submitit").is_dir()


def test_peers_paper_runs_with_local_files(tmp_path):
    """The paper-scale peers sweep, shrunk: a local ImageFolder and a local weights file (both
    made here), two of its methods, one ratio; every job completes and is not marked synthetic."""
    import numpy as np
    import timm
    from PIL import Image
    from safetensors.torch import save_file

    rng = np.random.default_rng(0)
    data = tmp_path / "imagenet"
    for split, n in (("train", 12), ("val", 4)):
        for cls in ("n01440764", "n01443537"):
            (data / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(data / split / cls / f"{i}.png")
    kwargs = {"num_classes": 1000, "img_size": 32, "depth": 2}  # data=imagenet: a 1000-class head
    model = timm.create_model("deit_tiny_patch16_224", patch_size=8, **kwargs)
    weights = tmp_path / "deit.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "amrc_exp", "-m", "--config-dir", "sweeps", "--config-name", "peers_paper",
           f"hydra.sweep.dir={sweep}", f"cache_dir={tmp_path / 'cache'}", f"data.root={data}",
           f"model.weights={weights}", "model.name=deit_tiny_patch16_224", "model.img_size=32",
           "+model.kwargs.depth=2", "+model.kwargs.patch_size=8", "method=asvd,ours_oa", "ratio=0.5",
           "calib.num_samples=16", "calib.heldout_samples=4", "calib.probe_samples=8", "calib.batch_size=8",
           "finetune.epochs=1", "finetune.batch_size=8", "eval.batch_size=8", "logger=none", "device=cpu",
           "data.num_workers=0"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    results = [json.loads(p.read_text()) for p in sweep.glob("*/results.json")]
    assert sorted(r["config"]["method"] for r in results) == ["asvd", "ours_oa"]
    assert all(r["status"] == "complete" and not r["synthetic"] and r["inputs"]["weights_sha256"] for r in results)
    assert all(set(r["fidelity"]) == {"compressed", "finetuned"} for r in results)
