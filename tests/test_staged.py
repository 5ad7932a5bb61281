"""`compress.staged`: the chained forward reproduces the model, and the measurements that rerun the
model from a layer's block onward equal whole-model forwards computed here, independently."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

from amrc_exp.compress import find_layers
from amrc_exp.compress.probe import Probe, layer_sensitivity, replaced_weight, whole_model_scorer
from amrc_exp.compress.staged import CachedInputs, chain_of
from amrc_exp.math.decompose import decompose
from amrc_exp.models import ModelConfig, build_model
from amrc_exp.report.profiling import PassCounter


def _vit():
    return timm.create_model("deit_tiny_patch16_224", num_classes=7, img_size=32, patch_size=8, depth=3).eval()


def _swin():
    return timm.create_model("swin_tiny_patch4_window7_224", num_classes=7, img_size=56, window_size=7,
                             embed_dim=24, depths=(2, 2), num_heads=(2, 2)).eval()


def _fmnist():
    model, _ = build_model(ModelConfig("fmnist_vit", weights="random", num_classes=10, img_size=28, in_chans=1))
    return model.eval()


MODELS = {"deit": (_vit, (3, 32, 32)), "swin": (_swin, (3, 56, 56)), "fmnist_vit": (_fmnist, (1, 28, 28))}


@pytest.fixture(params=sorted(MODELS))
def model_and_images(request):
    torch.manual_seed(0)
    build, shape = MODELS[request.param]
    return build(), torch.randn(10, *shape)


@torch.no_grad()
def test_the_chain_reproduces_the_model_bit_for_bit(model_and_images):
    model, x = model_and_images
    chain = chain_of(model, check=x[:2])
    assert len(chain.units) > 3  # stem, blocks, head: not the one-unit fallback
    assert torch.equal(chain.forward(x), model(x))
    layers = find_layers(model)
    units = [chain.unit_of(layer) for layer in layers.values()]
    assert units == sorted(units) and 0 < units[0] and units[-1] < len(chain.units) - 1


def test_swin_patch_merging_is_a_unit_of_its_own():
    model = _swin()
    chain = chain_of(model)
    reduction = model.layers[1].downsample.reduction
    assert chain.units[chain.unit_of(reduction)].modules == (model.layers[1].downsample,)


@torch.no_grad()
def test_an_unknown_model_is_one_unit_and_still_right():
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3)).eval()
    chain = chain_of(model)
    x = torch.randn(6, 4)
    assert len(chain.units) == 1 and torch.equal(chain.forward(x), model(x))


@torch.no_grad()
def test_cached_inputs_with_a_tight_memory_cap_still_rerun_exactly(model_and_images):
    model, x = model_and_images
    chain = chain_of(model)
    full = CachedInputs(chain, [x[:5], x[5:]], max_bytes=2**40)
    tight = CachedInputs(chain, [x[:5], x[5:]], max_bytes=x[:5].numel() * 4 * 4)
    ref = [model(x[:5]), model(x[5:])]
    for cache in (full, tight):
        assert all(torch.equal(a, b) for a, b in zip(cache.refresh(), ref))
    assert tight.stride > 1 == full.stride
    for start in range(len(chain.units)):
        for b in (0, 1):
            assert torch.equal(full.run(b, start), ref[b]) and torch.equal(tight.run(b, start), ref[b])


def _kl_full(model, x, dense_logp):
    """mean KL(dense || model) by whole-model forwards, as a reference."""
    logp = F.log_softmax(model(x).double(), dim=-1)
    return float((dense_logp.exp() * (dense_logp - logp)).sum(-1).mean())


@torch.no_grad()
def test_sensitivities_and_whole_model_kls_equal_whole_model_forwards(model_and_images):
    model, x = model_and_images
    layers = dict(list(find_layers(model).items())[:6])
    spectra = {n: decompose("svd", l.weight.detach().double().T) for n, l in layers.items()}
    dense = F.log_softmax(model(x).double(), dim=-1)
    probe = Probe(x, batch_size=4)
    got = layer_sensitivity(model, layers, spectra, {n: [1, 2] for n in layers}, probe)
    for name, layer in layers.items():
        for r in (1, 2):
            with replaced_weight(layer, spectra[name].approx(r).T.float()):
                assert got[name][r] == pytest.approx(_kl_full(model, x, dense), rel=1e-9, abs=1e-12)

    names = list(layers)
    base = {n: 2 for n in names}
    score = whole_model_scorer(model, layers, spectra, probe)
    near = {"base": base, "last changed": {**base, names[-1]: 1}, "first changed": {**base, names[0]: 1},
            "two changed": {**base, names[1]: 1, names[4]: None}}
    for b in (None, base):
        kl = score(near, base=b)
        for label, ranks in near.items():
            with torch.no_grad():
                saved = {n: layers[n].weight.clone() for n in names}
                for n, r in ranks.items():
                    if r is not None:
                        layers[n].weight.copy_(spectra[n].approx(r).T.float())
                want = _kl_full(model, x, dense)
                for n in names:
                    layers[n].weight.copy_(saved[n])
            assert kl[label] == pytest.approx(want, rel=1e-9, abs=1e-12), (b, label)


def test_a_subclass_with_its_own_forward_is_measured_whole():
    """A VisionTransformer subclass whose forward is not the chain's (here: logits halved): the
    scorer sees the chain's first-batch output differ from the model's and measures whole-model
    passes instead, so the KLs are still the model's own."""
    from timm.models.vision_transformer import VisionTransformer

    class Halved(VisionTransformer):
        def forward(self, x):
            return super().forward(x) / 2

    torch.manual_seed(0)
    model = Halved(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=5).eval()
    x = torch.randn(8, 3, 32, 32)
    assert len(chain_of(model, check=x[:4]).units) == 1
    layers = dict(list(find_layers(model).items())[:3])
    spectra = {n: decompose("svd", l.weight.detach().double().T) for n, l in layers.items()}
    with torch.no_grad():
        dense = F.log_softmax(model(x).double(), dim=-1)
    got = layer_sensitivity(model, layers, spectra, {n: [1] for n in layers}, Probe(x, batch_size=4))
    for name, layer in layers.items():
        with replaced_weight(layer, spectra[name].approx(1).T.float()):
            assert got[name][1] == pytest.approx(_kl_full(model, x, dense), rel=1e-9, abs=1e-12)


@torch.no_grad()
def test_pass_counter_counts_partial_passes_as_fractions():
    model = _vit()
    counter = PassCounter()
    counter.attach(model)
    x = torch.randn(4, 3, 32, 32)
    model(x)
    assert counter.image_passes() == 4
    chain = chain_of(model)
    cache = CachedInputs(chain, [x], 2**40)
    cache.refresh()  # one more whole pass
    cache.run(0, 3)  # from the third block (unit 3) of three: one block of three
    assert counter.image_passes() == pytest.approx(4 + 4 + 4 / 3)
    counter.detach()
    model(x)
    assert counter.image_passes() == pytest.approx(8 + 4 / 3)


def test_swin_windowed_attention_and_patch_merging_compress_allocate_and_export(tmp_path):
    """A small Swin, every layer kind factorized (window attention qkv/proj, MLP, patch merging),
    ranks by the output-aware allocation (block-onward measurements), exported to ONNX: the
    onnxruntime logits within 1e-4 of torch's, and the file holds every LowRankLinear as factors."""
    pytest.importorskip("onnxruntime")
    from torch.utils.data import DataLoader, TensorDataset

    from amrc_exp.compress import AMRCConfig, DecompConfig, ZFitConfig, compress_, compress_model
    from amrc_exp.compress.config import ScheduleConfig, ZConfig
    from amrc_exp.compress.lowrank import LowRankLinear
    from amrc_exp.experiment.onnx_export import export_onnx, max_logit_diff

    torch.manual_seed(0)
    model = _swin()
    x, y = torch.randn(24, 3, 56, 56), torch.randint(0, 7, (24,))
    config = AMRCConfig(ratio=0.4, decomp=DecompConfig("asvd_whiten"), zfit=ZFitConfig(solver="closed_form"),
                        schedule=ScheduleConfig("output_aware", min_rank=0, candidates=3, check_uniform=True,
                                                refine_steps=2),
                        z_type=ZConfig("none"))
    calib = DataLoader(TensorDataset(x[:16], y[:16]), batch_size=8)
    heldout = DataLoader(TensorDataset(x[16:], y[16:]), batch_size=8)
    report = compress_model(model, calib, heldout, config, probe_samples=8)
    names = [r.name for r in report.layers]
    assert any(n.endswith("downsample.reduction") for n in names) and any(".attn.qkv" in n for n in names)
    assert set(report.allocation_kl) >= {"output_aware", "param_uniform", "refined"}
    compress_(model, report)
    assert any(isinstance(m, LowRankLinear) for m in model.modules())
    path = export_onnx(model, tmp_path / "swin.onnx", (3, 56, 56))
    assert max_logit_diff(model, path, x[:4]) <= 1e-4
