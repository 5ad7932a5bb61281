"""Deployment: a compressed embedded model exported to ONNX runs in onnxruntime with the torch
model's logits (max abs difference <= 1e-4 on real test images), its weights are exactly the
parameters the run reported (count and bytes), and the CLI writes the file."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("onnxruntime", reason="the dev extras (onnx, onnxruntime) are not installed")


@pytest.fixture(scope="module")
def compressed_run(tmp_path_factory):
    """The shipped fmnist_vit compressed by -60% (low-rank Z, the paper's defaults), small calibration."""
    from amrc_exp.experiment.run import run
    from tests.conftest import compose_cfg

    root = tmp_path_factory.mktemp("onnx")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = run(compose_cfg(["ratio=0.6", "calib.num_samples=64", "calib.heldout_samples=16", "zfit.iters=20",
                               "finetune.epochs=0", "data.eval_subset=256", "logger=none",
                               f"cache_dir={root / 'cache'}", f"out_dir={root / 'run'}"]))
    finally:
        torch.set_num_threads(n)
    return root / "run", out


def test_onnx_logits_and_weight_bytes(compressed_run, tmp_path):
    from amrc_exp.experiment.export import load_compressed
    from amrc_exp.experiment.onnx_export import export_onnx, input_shape, max_logit_diff, weight_stats
    from tests.conftest import compose_cfg

    run_dir, out = compressed_run
    model = load_compressed(run_dir / "model")
    assert any(type(m).__name__ == "LowRankLinear" for m in model.modules())
    path = export_onnx(model, tmp_path / "m.onnx", input_shape(run_dir / "model"))
    from amrc_exp.experiment.inputs import load_splits

    val = load_splits(compose_cfg(["data.eval_subset=64"])).val
    images = torch.stack([val[i][0] for i in range(64)])
    assert max_logit_diff(model, path, images) <= 1e-4
    stats = weight_stats(path)
    # The exporter folds the stem's eval-mode BatchNorm into the bias-free conv before it: its
    # weight and bias (2 x 32) become one conv bias (32). Every other parameter is stored as is.
    folded = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert folded == 32 and out["params_after"] == sum(p.numel() for p in model.parameters())
    assert stats["elements"] == out["params_after"] - folded
    assert stats["bytes"] == 4 * stats["elements"]  # float32 in the file
    # the reported fp16 MiB is the file's float32 weights at 2 bytes each (+ the folded 32)
    assert (stats["bytes"] / 2 + 2 * folded) / 2**20 == pytest.approx(out["size_mib_compressed_fp16"], rel=1e-12)


def test_cli_writes_the_onnx_file(compressed_run, capsys):
    from amrc_exp.experiment.onnx_export import main

    run_dir, _ = compressed_run
    assert main([str(run_dir)]) == 0
    assert (run_dir / "model" / "model.onnx").stat().st_size > 100_000
    assert "max |onnxruntime - torch| logit difference" in capsys.readouterr().out
