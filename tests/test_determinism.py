"""Determinism on CPU: the same config and seed give identical ranks, parameters, metrics,
per-layer errors and exported weights, whether the calibration cache is cold or warm."""

from __future__ import annotations

import hashlib

import pytest

from tests.conftest import compose_cfg
from tests.test_bad_input import RANDOM, TINY

# Every stochastic stage on: seeded data subsets, mini-batch GD for Z, a fine-tuning epoch.
CONFIG = TINY + [RANDOM, "data.num_train=160", "data.num_val=64", "calib.num_samples=64",
                 "zfit.iters=30", "zfit.batch_size=16", "finetune.epochs=1", "data.finetune_subset=64",
                 "finetune.batch_size=32", "schedule.iters=50"]
VOLATILE = {"seconds", "throughput", "config", "calibration_cached"}  # timings, paths, cache state


def _run(tmp_path, name: str, cache: str, *extra: str) -> dict:
    from amrc_exp.experiment.run import run

    res = run(compose_cfg(CONFIG + [f"out_dir={tmp_path / name}", f"cache_dir={tmp_path / cache}", *extra]))
    res = dict(res)
    res["weights_sha256"] = hashlib.sha256((tmp_path / name / "model" / "model.safetensors").read_bytes()).hexdigest()
    return res


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("determinism")
    try:
        yield {"a": _run(tmp, "a", "cache_a"), "b": _run(tmp, "b", "cache_b"),  # two cold caches
               "warm": _run(tmp, "warm", "cache_a"),  # statistics read back from a's cache
               "seed1": _run(tmp, "seed1", "cache_c", "seed=1")}
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("other", ["b", "warm"])
def test_same_config_and_seed_give_identical_results(runs, other):
    a, b = runs["a"], runs[other]
    assert [r["rank"] for r in a["layers"]] == [r["rank"] for r in b["layers"]]
    assert (a["params_before"], a["params_after"]) == (b["params_before"], b["params_after"])
    for key in ("top1_baseline", "top1_compressed", "top1_finetuned", "top1"):
        assert a[key] == b[key], key
    assert a["layers"] == b["layers"]  # per-layer errors before/after Z, bit for bit
    assert a["finetune"] == b["finetune"] and a["energy_curves"] == b["energy_curves"]
    assert a["weights_sha256"] == b["weights_sha256"]
    assert {k: v for k, v in a.items() if k not in VOLATILE} == {k: v for k, v in b.items() if k not in VOLATILE}
    assert runs["warm"]["calibration_cached"] is True and a["calibration_cached"] is False


def test_another_seed_changes_the_numbers(runs):
    """Guards the test above against comparing constants."""
    a, c = runs["a"], runs["seed1"]
    assert [r["err_before"] for r in a["layers"]] != [r["err_before"] for r in c["layers"]]
    assert a["weights_sha256"] != c["weights_sha256"]


def test_a_fresh_process_gives_the_same_results(runs, tmp_path):
    """Another interpreter (other hash seed, fresh RNG state, the real CLI) agrees bit for bit."""
    import json
    import os
    import subprocess
    import sys

    from tests.test_bad_input import ROOT

    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "PYTHONHASHSEED")}
    env.update(OMP_NUM_THREADS="1", AMRC_OFFLINE="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "amrc_exp", *CONFIG, f"hydra.run.dir={tmp_path / 'cli'}",
                           f"cache_dir={tmp_path / 'cache'}"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cli = json.loads((tmp_path / "cli" / "results.json").read_text())
    cli["weights_sha256"] = hashlib.sha256((tmp_path / "cli" / "model" / "model.safetensors").read_bytes()).hexdigest()
    a = json.loads(json.dumps(runs["a"]))  # as results.json stores it
    assert {k: v for k, v in a.items() if k not in VOLATILE} == {k: v for k, v in cli.items() if k not in VOLATILE}


def test_cached_statistics_come_back_in_aligned_memory(tmp_path):
    """A cache read must hand the solvers the same memory layout as a fresh calibration:
    safetensors returns tensors at the file's 8-byte offsets, and MKL sums in another order on
    unaligned data (a 1-ulp difference on AMD EPYC). Torch's own allocations are 64-byte aligned."""
    import torch

    from amrc_exp.compress.calibrate import LayerStats
    from amrc_exp.experiment.stats_cache import load_stats, save_stats

    def stats(n: int) -> LayerStats:  # odd sizes, so the file offsets are not all multiples of 64
        h = torch.randn(n, n, dtype=torch.float64)
        return LayerStats(H=h @ h.T, x_rep=torch.randn(3, n, dtype=torch.float64), n_samples=4, n_tokens=3,
                          abs_mean=torch.rand(n, dtype=torch.float64))

    sets = {"heldout": {f"l{n}": stats(n) for n in (5, 7, 9)}, "calib/0000": {f"l{n}": stats(n) for n in (5, 7, 9)}}
    save_stats(str(tmp_path), "k", sets)
    back = load_stats(str(tmp_path), "k")
    for name, layers in sets.items():
        for layer, s in layers.items():
            for stat, t in back[name][layer].tensors().items():
                assert torch.equal(t, getattr(s, stat)), (name, layer, stat)
                assert t.data_ptr() % 64 == 0, (name, layer, stat, t.data_ptr() % 64)
