"""quantize_ against a hand-written per-row RTN; model_size_mib against a hand count."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn

from amrc_exp.compress.lowrank import LowRankLinear, count_params
from amrc_exp.compress.ptq import model_size_mib, quantize_, quantized_weights, size_breakdown


def rtn_rows(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Asymmetric RTN, one (scale, zero) per row, written out row by row (App. B, Eq 16 in the
    standard affine form: s = (max − min)/(2^N − 1), z = round(−min/s))."""
    qmax = 2**bits - 1
    rows = []
    for row in w.reshape(w.shape[0], -1).float():
        lo, hi = row.min(), row.max()
        s = (hi - lo) / qmax
        z = torch.round(-lo / s)
        q = torch.clamp(torch.round(row / s) + z, 0, qmax)
        rows.append(s * (q - z))
    return torch.stack(rows).view_as(w)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_linear_matches_per_row_rtn(bits):
    torch.manual_seed(bits)
    lin = nn.Linear(37, 11)
    w0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    quantize_(lin, bits)
    torch.testing.assert_close(lin.weight, rtn_rows(w0, bits), rtol=0, atol=1e-6)
    assert torch.equal(lin.bias, b0)  # 1-D: left alone
    for row0, row in zip(w0, lin.weight):  # every element within half a step, ≤ 2^N levels
        step = (row0.max() - row0.min()) / (2**bits - 1)
        assert (row - row0).abs().max() <= step / 2 + 1e-6
        assert row.unique().numel() <= 2**bits


def test_model_tensors_quantized_and_others_untouched():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                              embed_dim=32, depth=1, num_heads=2, num_classes=10)
    lr = LowRankLinear(32, 128, 4, z_type="diagonal")
    with torch.no_grad():
        for p in lr.parameters():
            p.normal_()
    model.blocks[0].mlp.fc1 = lr
    before = copy.deepcopy(model.state_dict())
    names = set(quantized_weights(model))
    assert names == {"patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight",
                     "blocks.0.mlp.fc1.down", "blocks.0.mlp.fc1.up", "blocks.0.mlp.fc1.z.diag",
                     "blocks.0.mlp.fc2.weight", "head.weight"}
    quantize_(model, 4)
    after = model.state_dict()
    for k, v in after.items():
        if k in names:
            if k.endswith("z.diag"):  # 1-D Z weight: one scale/zero for the whole vector
                ref = rtn_rows(before[k][None], 4)[0]
            else:  # conv (768×3×p×p) per output channel, matrices per row
                ref = rtn_rows(before[k], 4)
            torch.testing.assert_close(v, ref, rtol=0, atol=1e-6)
        else:  # biases, norms, cls token, pos embed
            assert torch.equal(v, before[k]), k


def test_model_size_hand_count():
    toy = nn.ModuleDict({
        "conv": nn.Conv2d(3, 4, 2),  # w 48 (4 ch), b 4
        "ln": nn.LayerNorm(4),  # 8
        "lin": nn.Linear(4, 6),  # w 24 (6 ch), b 6
        # down 2×6, up 5×2, bias 5, z.values 3, z.crow 7 + z.cols 3 indices (2 bytes each)
        "lr": LowRankLinear(6, 5, 2, z_type="sparse_unstructured", z_size=3),
    })
    assert count_params(toy) == 48 + 4 + 8 + 24 + 6 + 12 + 10 + 5 + 3 + 10
    assert model_size_mib(toy) * 2**20 == pytest.approx(2 * 120 + 2 * 10)
    # 4-bit: ceil(numel/2) code bytes + 4 bytes (fp16 scale + zero) per channel
    q = (24 + 16) + (12 + 24) + (6 + 8) + (5 + 20) + (2 + 4)
    fp16 = 2 * (4 + 8 + 6 + 5)
    assert model_size_mib(toy, bits=4) * 2**20 == pytest.approx(q + fp16 + 20)
    bd = size_breakdown(toy, bits=4)
    assert (bd.index_bytes, bd.fp16_bytes, bd.n_params) == (20, fp16, count_params(toy))
    # 8-bit: one byte per element
    q8 = (48 + 16) + (24 + 24) + (12 + 8) + (10 + 20) + (3 + 4)
    assert model_size_mib(toy, bits=8) * 2**20 == pytest.approx(q8 + fp16 + 20)


def test_wide_index_counts_four_bytes():
    wide = LowRankLinear(70_000, 2, 1, bias=False, z_type="sparse_structured", z_size=3)
    # down 70000, up 2, z.values 3×2; z.rows can address ≥ 65536 rows → int32
    assert model_size_mib(wide) * 2**20 == pytest.approx(2 * (70_000 + 2 + 6) + 4 * 3)


def test_frontier_rows_match_separate_ptq_runs(tmp_path, one_thread):
    """ptq.frontier_bits measures each width on a copy of the final model: the same size and
    top-1 as a separate run with ptq.bits set (the real PTQ stage), and the exported model untouched."""
    from amrc_exp.experiment.run import run
    from tests.conftest import compose_cfg

    base = ["model=deit_t", "model.weights=random", "data=synthetic", "+model.kwargs.depth=1", "model.img_size=32",
            "model.num_classes=10", "ratio=0.5", "calib.num_samples=32", "calib.heldout_samples=16",
            "calib.batch_size=16", "zfit.iters=5", "schedule.iters=20", "finetune.epochs=1", "data.num_train=64",
            "data.num_val=64", "logger=none", f"cache_dir={tmp_path / 'cache'}"]
    out = run(compose_cfg(base + ["ptq.frontier_bits=[8,3]", f"out_dir={tmp_path / 'frontier'}"]))
    assert [row["bits"] for row in out["ptq_frontier"]] == [8, 3]
    assert "top1_ptq" not in out and out["top1"] == out["top1_finetuned"]  # the model itself stays unquantized
    for row in out["ptq_frontier"]:
        alone = run(compose_cfg(base + [f"ptq.bits={row['bits']}", f"out_dir={tmp_path / str(row['bits'])}"]))
        assert row["size_mib"] == alone["size_mib_ptq"]
        assert row["top1_finetuned"] == alone["top1_ptq"]
        assert row["kl_finetuned"] == pytest.approx(alone["fidelity"]["ptq"]["kl"], rel=1e-12)
        assert set(row) >= {"top1_compressed", "agree_compressed", "kl_compressed"}
    dense = run(compose_cfg(base + ["compress=false", "ptq.frontier_bits=[4]", f"out_dir={tmp_path / 'dense'}"]))
    dense_alone = run(compose_cfg(base + ["compress=false", "ptq.bits=4", f"out_dir={tmp_path / 'dense4'}"]))
    assert dense["ptq_frontier"][0]["top1_dense"] == dense_alone["top1_ptq"]
    assert dense["ptq_frontier"][0]["size_mib"] == dense_alone["size_mib_ptq"]
