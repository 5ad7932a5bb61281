"""calibrate.py against brute force: store every activation, build H and X_rep densely."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from amrc_exp.compress.calibrate import (
    LayerStats,
    NonFiniteActivationError,
    collect_stats,
    find_layers,
)
from amrc_exp.math.error import normalized_error


def tiny_vit(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                             embed_dim=32, depth=2, num_heads=2, num_classes=10).eval()


def tiny_swin(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=64,
                             window_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 4),
                             num_classes=5).eval()


def batches(images: torch.Tensor, bs: int):
    labels = torch.zeros(images.shape[0], dtype=torch.long)
    return [(images[i:i + bs], labels[i:i + bs]) for i in range(0, images.shape[0], bs)]


def brute_force(model: nn.Module, images: torch.Tensor, names: list[str]):
    """One image per forward, every input/output kept; H and X_rep built in float64."""
    store: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {n: [] for n in names}
    mods = dict(model.named_modules())
    hooks = [mods[n].register_forward_hook(
        lambda m, i, o, n=n: store[n].append((i[0].detach().clone(), o.detach().clone())))
        for n in names]
    with torch.no_grad():
        for img in images:
            model(img[None])  # batch of one: no question of which rows belong to which image
    for h in hooks:
        h.remove()
    out = {}
    for n in names:
        lin = mods[n]
        W = lin.weight.detach().double().T  # paper layout, in × out
        H = torch.zeros(W.shape[0], W.shape[0], dtype=torch.float64)
        xs = []
        for x, _ in store[n]:
            X = x.double().reshape(-1, x.shape[-1])  # all tokens of this one image
            H += X.T @ X / (X @ W).square().sum()  # Eq 5 normalisation, from W directly
            xs.append(X)
        out[n] = (H, torch.stack(xs).mean(0))
    return out


def test_find_layers_vit_and_swin():
    vit = tiny_vit()
    assert list(find_layers(vit)) == [f"blocks.{b}.{s}" for b in range(2)
                                      for s in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    swin = tiny_swin()
    names = list(find_layers(swin))
    # Stage 1 opens with its patch merging (stage 0's downsample is an Identity).
    expected = [n for s in range(2) for n in (["layers.1.downsample.reduction"] if s else [])
                + [f"layers.{s}.blocks.{b}.{l}" for b in range(2) for l in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]]
    assert names == expected
    assert not any("head" in n for n in names)
    deit = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=32, depth=2)
    assert len(find_layers(deit)) == 8
    assert "head" not in find_layers(deit)


def test_vit_stats_match_brute_force():
    model = tiny_vit()
    torch.manual_seed(1)
    images = torch.randn(11, 3, 32, 32)
    layers = find_layers(model)
    stats = collect_stats(model, batches(images, 4), layers, num_samples=10, device="cpu")
    ref = brute_force(model, images[:10], list(layers))
    for name, st in stats.items():
        assert isinstance(st, LayerStats)
        assert st.n_samples == 10 and st.n_tokens == 17 and st.n_skipped == 0  # 16 patches + cls
        H_ref, x_ref = ref[name]
        assert st.H.dtype == torch.float64 and st.x_rep.dtype == torch.float64
        torch.testing.assert_close(st.H, H_ref, rtol=1e-4, atol=1e-7 * H_ref.abs().max().item())
        torch.testing.assert_close(st.x_rep, x_ref, rtol=1e-5, atol=1e-6)
        # Closed form: tr(Wᵀ H W) = Σ_i ||X_i W||² / ||X_i W||² = N.
        W = layers[name].weight.detach().double().T
        assert torch.trace(W.T @ st.H @ W).item() == pytest.approx(10, rel=1e-4)
        # Eq 5 at Ŵ = 0 is exactly 1 per sample.
        assert float(normalized_error(-W, st.H, st.n_effective)) == pytest.approx(1.0, rel=1e-4)


def test_swin_windowed_tokens_grouped_per_image():
    model = tiny_swin()
    torch.manual_seed(2)
    images = torch.randn(6, 3, 64, 64)
    layers = find_layers(model)
    stats = collect_stats(model, batches(images, 3), layers, num_samples=6, device="cpu")
    assert list(stats) == list(layers)
    ref = brute_force(model, images, list(layers))
    # patch 4 on 64 px: stage 0 is 16×16 tokens, stage 1 (after merging) 8×8.
    for name, st in stats.items():
        stage_hw = 16 * 16 if name.startswith("layers.0") else 8 * 8
        assert st.n_tokens == stage_hw, name
        H_ref, _ = ref[name]
        torch.testing.assert_close(st.H, H_ref, rtol=1e-4, atol=1e-7 * H_ref.abs().max().item())
        W = layers[name].weight.detach().double().T
        assert torch.trace(W.T @ st.H @ W).item() == pytest.approx(6, rel=1e-4)


def test_zero_norm_sample_is_skipped_and_counted():
    lin = nn.Linear(4, 3)
    model = nn.Sequential(nn.Identity(), lin)
    find = {"1": lin}
    x = torch.randn(5, 7, 4)
    x[2] = 0.0  # X_i W = 0 → this sample cannot be normalised
    stats = collect_stats(model, [x], find, num_samples=5, device="cpu")["1"]
    assert stats.n_samples == 5 and stats.n_skipped == 1 and stats.n_effective == 4
    assert torch.isfinite(stats.H).all()
    keep = [0, 1, 3, 4]
    W = lin.weight.detach().double().T
    H_ref = sum(x[i].double().T @ x[i].double() / (x[i].double() @ W).square().sum() for i in keep)
    torch.testing.assert_close(stats.H, H_ref, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(stats.x_rep, x.double().mean(0), rtol=1e-6, atol=1e-7)


def test_non_finite_activation_names_layer():
    model = tiny_vit()
    with torch.no_grad():
        model.blocks[1].attn.qkv.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteActivationError, match=r"output of layer 'blocks\.1\.attn\.qkv'"):
        collect_stats(model, [torch.randn(2, 3, 32, 32)], find_layers(model), num_samples=2)


def test_stops_after_num_samples_and_restores_mode():
    model = tiny_vit().train()
    calls = []
    model.register_forward_pre_hook(lambda m, i: calls.append(i[0].shape[0]))
    stats = collect_stats(model, batches(torch.randn(20, 3, 32, 32), 8), find_layers(model),
                          num_samples=10)
    assert calls == [8, 2] and model.training
    assert all(s.n_samples == 10 for s in stats.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_amp_close_to_cpu_fp32():
    model = tiny_vit()
    images = torch.randn(8, 3, 32, 32)
    layers = find_layers(model)
    ref = collect_stats(model, batches(images, 4), layers, num_samples=8, device="cpu")
    model.cuda()
    got = collect_stats(model, batches(images, 4), find_layers(model), num_samples=8, amp=True)
    for name, st in got.items():
        assert st.H.device.type == "cuda" and st.H.dtype == torch.float64
        rel = (st.H.cpu() - ref[name].H).norm() / ref[name].H.norm()
        assert rel < 5e-2, name  # bf16 forward, fp32 Gram


def test_huge_finite_outputs_keep_an_exact_energy():
    """Entries near 1e20 square past float32's range: those images' ||X_i W||² must still be
    the float64 value (the normal path sums in float32), and H stays finite."""
    from amrc_exp.compress.calibrate import _energy

    torch.manual_seed(0)
    y = torch.randn(3, 5, 4)
    y[1] *= 1e20  # finite in float32, square overflows
    expected = y.double().square().sum(dim=(1, 2))
    got = _energy(y)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)


def test_non_finite_input_is_caught_even_if_the_output_is_finite():
    lin = nn.Linear(4, 3)
    with torch.no_grad():
        lin.weight.zero_()  # the output stays finite (zero) whatever the input
    model = nn.Sequential(lin)
    x = torch.randn(2, 5, 4)
    x[1, 2, 3] = float("inf")
    with pytest.raises(NonFiniteActivationError, match="input of layer"):
        collect_stats(model, [x], {"0": lin}, num_samples=2)
