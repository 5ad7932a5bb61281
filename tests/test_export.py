"""save_compressed / load_compressed: exact logits after a round trip, strict shapes, safe files."""

from __future__ import annotations

import json

import pytest
import timm
import torch

from amrc_exp.compress.calibrate import find_layers
from amrc_exp.errors import WeightsError
from amrc_exp.experiment.export import load_compressed, save_compressed
from amrc_exp.compress.lowrank import LayerPlan, LowRankLinear, compress_, count_params
from amrc_exp.compress.ptq import quantize_
from amrc_exp.math.compensate import ZParams

Z_CYCLE = ["lowrank", "diagonal", "sparse_structured", "sparse_unstructured", "none"]


def plans_for(model, gen: torch.Generator, every: int = 1) -> dict[str, LayerPlan]:
    """Random plans for every `every`-th block linear, cycling through all Z types."""
    plans = {}
    for i, (name, lin) in enumerate(list(find_layers(model).items())[::every]):
        n_in, n_out, zt = lin.in_features, lin.out_features, Z_CYCLE[i % len(Z_CYCLE)]
        r = max(1, min(n_in, n_out) // 4)
        U = 0.1 * torch.randn(n_in, r, generator=gen)
        V = 0.1 * torch.randn(n_out, r, generator=gen)
        kw: dict = {}
        if zt == "lowrank":
            kw = {"G": 0.1 * torch.randn(n_in, 2, generator=gen), "Y": 0.1 * torch.randn(n_out, 2, generator=gen)}
        elif zt == "diagonal":
            kw = {"d": torch.randn(min(n_in, n_out), generator=gen)}
        elif zt == "sparse_structured":
            kw = {"rows": torch.randperm(n_in, generator=gen)[:3], "values": torch.randn(3, n_out, generator=gen)}
        elif zt == "sparse_unstructured":
            k = n_in * n_out // 20
            kw = {"index": torch.randperm(n_in * n_out, generator=gen)[:k], "values": torch.randn(k, generator=gen)}
        plans[name] = LayerPlan.from_factors(name, U, V, ZParams(zt, n_in, n_out, kw) if kw else None)
    return plans


def test_roundtrip_vit_extra_kwargs(tmp_path):
    torch.manual_seed(0)
    kwargs = dict(num_classes=10, img_size=32, in_chans=3, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs).eval()
    plans = plans_for(model, torch.Generator().manual_seed(1))
    compress_(model, plans)
    quantize_(model, 8)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        logits = model(x)
    save_compressed(model, tmp_path / "exp", {"ratio": 0.5, "top1": 12.5}, create_kwargs=kwargs)
    assert sorted(p.name for p in (tmp_path / "exp").iterdir()) == ["model.json", "model.safetensors"]

    manifest = json.loads((tmp_path / "exp" / "model.json").read_text())
    assert manifest["model_name"] == "vit_tiny_patch16_224"
    assert manifest["create_kwargs"] == kwargs and manifest["meta"] == {"ratio": 0.5, "top1": 12.5}
    assert manifest["layers"][0] == {"name": "blocks.0.attn.qkv", "in_features": 32, "out_features": 96,
                                     "rank": 8, "bias": True, "z_type": "lowrank", "z_size": 2}
    assert manifest["layers"][3]["z_type"] == "sparse_unstructured"
    assert manifest["n_params"] == count_params(model)

    loaded = load_compressed(tmp_path / "exp")
    assert not loaded.training
    assert [n for n, m in loaded.named_modules() if isinstance(m, LowRankLinear)] == [
        e["name"] for e in manifest["layers"]] == list(plans)
    with torch.no_grad():
        assert torch.equal(loaded(x), logits)
    assert count_params(loaded) == count_params(model)


def test_roundtrip_deit_default_kwargs(tmp_path):
    """Without create_kwargs: name from pretrained_cfg, num_classes/img_size/in_chans read back."""
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=48, num_classes=7).eval()
    compress_(model, plans_for(model, torch.Generator().manual_seed(2), every=5))
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        logits = model(x)
    save_compressed(model, tmp_path)
    manifest = json.loads((tmp_path / "model.json").read_text())
    assert manifest["create_kwargs"] == {"num_classes": 7, "img_size": 48, "in_chans": 3}
    with torch.no_grad():
        assert torch.equal(load_compressed(tmp_path)(x), logits)


def test_save_refuses_unrebuildable_model(tmp_path):
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                              embed_dim=32, depth=2, num_heads=2)
    with pytest.raises(ValueError, match="create_kwargs"):
        save_compressed(model, tmp_path)  # embed_dim/depth are not recoverable from the model
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_mismatched_or_missing_files(tmp_path):
    kwargs = dict(num_classes=4, img_size=32, in_chans=3, patch_size=8, embed_dim=32, depth=1, num_heads=2)
    a = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs)
    save_compressed(a, tmp_path / "a", create_kwargs=kwargs)
    save_compressed(compress_(a, plans_for(a, torch.Generator().manual_seed(3))), tmp_path / "b",
                    create_kwargs=kwargs)
    (tmp_path / "b" / "model.safetensors").replace(tmp_path / "a" / "model.safetensors")
    with pytest.raises(WeightsError, match="SHA-256"):
        load_compressed(tmp_path / "a")
    with pytest.raises(WeightsError, match="missing"):
        load_compressed(tmp_path / "b")
