"""The library boundary: `amrc_exp.compress` runs without Hydra/W&B, the README's library
block runs verbatim, and it agrees with the CLI's code path for the same settings."""

from __future__ import annotations

import ast
import copy
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import amrc_exp

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = [Path(amrc_exp.__file__).parent / d for d in ("compress", "math")]
FORBIDDEN = ("omegaconf", "hydra", "wandb")


def _readme_library_block(which: int = 0) -> str:
    """The `which`-th python block of the README's "Use as a library" section."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Use as a library", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)[which]


def test_library_source_imports_no_experiment_package():
    """Static: no module of the library imports omegaconf/hydra/wandb or the layers above it."""
    for path in (p for d in LIBRARY for p in d.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert name.split(".")[0] not in FORBIDDEN, f"{path.name} imports {name}"
                assert not name.startswith(("amrc_exp.experiment", "amrc_exp.report", "amrc_exp.models",
                                            "amrc_exp.data", "amrc_exp.io")), f"{path.name} imports {name}"


def test_importing_the_library_loads_no_hydra_omegaconf_or_wandb():
    """Dynamic: what actually gets loaded, transitive imports included."""
    code = ("import sys, amrc_exp.compress, amrc_exp.math; "
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_readme_library_block_matches_the_cli_code_path(tmp_path, one_thread):
    """Run the README block verbatim; then the same model (the CLI's seeded random init), the
    same images and the same settings through the experiment layer (composed Hydra config →
    RunConfig → stats cache → search): identical ranks and per-layer errors."""
    from amrc_exp.data import Splits
    from amrc_exp.experiment.config import to_run_config
    from amrc_exp.experiment.env import StageTimer
    from amrc_exp.experiment.run import compress_stages
    from amrc_exp.experiment.inputs import load_model
    from tests.conftest import compose_cfg

    ns: dict = {}
    exec(compile(_readme_library_block(), "README.md", "exec"), ns)  # noqa: S102 - the README's own code
    report, images = ns["report"], ns["images"]
    assert any(r.rank is not None for r in report.layers)
    assert sum(type(m).__name__ == "LowRankLinear" for m in ns["model"].modules()) == len(report.plans)

    rc = to_run_config(compose_cfg([
        "model=deit_t", "model.img_size=32", "+model.kwargs.depth=2", "model.num_classes=10",
        "model.weights=random", "data=synthetic", "decomp=asvd_whiten", "zfit.solver=closed_form",
        "ratio=0.5", "calib.num_samples=64", "calib.heldout_samples=32", "calib.batch_size=32",
        "logger=none", f"cache_dir={tmp_path / 'cache'}", f"out_dir={tmp_path / 'out'}"]))
    model, _ = load_model(rc)
    calib, held = torch.utils.data.TensorDataset(images[:64]), torch.utils.data.TensorDataset(images[64:])
    splits = Splits(train=calib, val=held, calib=calib, heldout=held, synthetic=True, num_classes=10)
    for attempt in ("fresh", "cached"):  # the second run reads the stats cache
        cli_report, cached = compress_stages(copy.deepcopy(model), splits, rc, torch.device("cpu"), False, StageTimer())
        assert cached == (attempt == "cached")
        assert [r.rank for r in cli_report.layers] == [r.rank for r in report.layers]
        for ours, cli in zip(report.layers, cli_report.layers):
            assert ours.name == cli.name
            for key in ("energy_loss", "err_before", "err_after", "err_calib_before", "err_calib_after"):
                assert getattr(cli, key) == pytest.approx(getattr(ours, key), rel=1e-12, abs=1e-15), (ours.name, key)


def test_report_state_dict_round_trip_applies_identically(one_thread):
    """A saved search (torch.save of state_dict) applied to a fresh copy gives the same logits
    as the report it came from."""
    import io

    import timm

    from amrc_exp.compress import AMRCConfig, CompressionReport, ZFitConfig, compress_, compress_model

    torch.manual_seed(1)
    model = timm.create_model("deit_tiny_patch16_224", num_classes=10, img_size=32, depth=1).eval()
    x = torch.randn(40, 3, 32, 32)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:32]), batch_size=16)
    held = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[32:]), batch_size=8)
    report = compress_model(model, loader, held, AMRCConfig(ratio=0.4, zfit=ZFitConfig(iters=20, batch_size=16)))
    assert report.n_minibatches == 2  # the paper's mini-batch GD: 32 samples in chunks of 16
    buf = io.BytesIO()
    torch.save(report.state_dict(), buf)
    buf.seek(0)
    loaded = CompressionReport.from_state_dict(torch.load(buf, weights_only=False))
    a, b = compress_(copy.deepcopy(model), report), compress_(copy.deepcopy(model), loaded)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    assert loaded.ranks == report.ranks and loaded.summary() == report.summary()


def test_thread_env_is_honoured_after_torch_was_imported():
    """The schema imports the library (so torch) before Hydra's `hydra.job.env_set` sets
    OMP_NUM_THREADS for a sweep job: the run must still use that many threads (a different
    count changes float32 sums, and so results, in the last digits)."""
    code = ("import os, torch; import amrc_exp.experiment.config; n = torch.get_num_threads(); "
            "os.environ['OMP_NUM_THREADS'] = str(n + 1); "
            "from amrc_exp.experiment.env import apply_thread_env; apply_thread_env(); "
            "print(n, torch.get_num_threads())")
    env = {k: v for k, v in __import__("os").environ.items() if k != "OMP_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env, check=True)
    before, after = map(int, out.stdout.split())
    assert after == before + 1


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz").exists(),
                    reason="Fashion-MNIST not installed (bash scripts/setup.sh installs it)")
def test_readme_embedded_block_needs_no_hydra_and_draws_the_cli_splits(tmp_path):
    """The README's second library block (the shipped embedded model, its data, a compression)
    in a fresh interpreter: it loads neither hydra nor omegaconf (wandb it may: timm's own
    `timm.utils.summary` imports it when installed; that our code never does is checked
    statically in test_import_graph), loads the shipped
    checkpoint, and its calibration images are the ones the CLI path (composed config ->
    experiment.inputs) draws for the same settings."""
    import json

    from amrc_exp.experiment.inputs import load_splits
    from amrc_exp.models.shipped import sidecar
    from tests.conftest import compose_cfg

    code = _readme_library_block(1) + (
        "\nimport json, sys\n"
        "json.dump({'loaded': sorted(m for m in sys.modules if m.split('.')[0] in ('hydra', 'omegaconf')), "
        "'sha': info['weights_sha256'], 'calib': splits.calib.indices, 'heldout': splits.heldout.indices, "
        f"'top1': top1(model, val, 'cpu')}}, open({str(tmp_path / 'out.json')!r}, 'w'))\n")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}  # one thread: a pytest worker beside it
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["loaded"] == [] and out["sha"] == sidecar("fmnist_vit")["sha256"]
    cli = load_splits(compose_cfg(["calib.num_samples=128", "calib.heldout_samples=32", "seed=0"]))
    assert out["calib"] == cli.calib.indices and out["heldout"] == cli.heldout.indices
    assert 80.0 < out["top1"] <= 100.0  # -60% with ours_oa loses well under a point on this model
