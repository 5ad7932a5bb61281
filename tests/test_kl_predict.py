"""The second-order KL prediction and the ratio estimator (`compress.kl_predict`), against
independent computations: the full Jacobian of the logits and the Fisher of the (coarsened)
class distribution built by hand, the closed form of Eq (3), and the KL itself for a small
truncation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from amrc_exp.compress.config import ScheduleConfig
from amrc_exp.compress.kl_predict import Sample, pps_sample, predict_kl, ratio_estimate
from amrc_exp.compress.probe import Probe, allocation_kl
from amrc_exp.errors import ConfigError
from amrc_exp.math.decompose import asvd_whiten_spectrum


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


class _Net(nn.Module):
    """(B, T, 6) tokens -> Linear -> tanh -> Linear -> mean over tokens -> Linear -> 7 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(6, 5), nn.Linear(5, 6), nn.Linear(6, 7)

    def forward(self, x):
        return self.head(self.b(torch.tanh(self.a(x))).mean(1))


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    net = _Net()
    x = torch.randn(9, 3, 6)
    layers = {"a": net.a, "b": net.b}
    gram = {"a": torch.eye(6), "b": torch.eye(5)}
    spectra = {n: asvd_whiten_spectrum(l.weight.detach().T.clone(), gram[n]) for n, l in layers.items()}
    return net, x, layers, spectra


def _brute_force(net, x, layers, spectra, ranks, classes):
    """Eq (1) per image from the full Jacobian dz/dy of every layer (torch.func), the output
    change of each truncation formed explicitly, and the Fisher of the top-`classes` + rest
    outcomes written out from the softmax."""
    out = []
    for i in range(x.shape[0]):
        xi = x[i: i + 1]
        acts = {}
        hooks = [l.register_forward_hook(lambda m, a, o, n=n: acts.__setitem__(n, (a[0].detach(), o.detach())))
                 for n, l in layers.items()]
        z = net(xi)[0].detach()
        for h in hooks:
            h.remove()
        dz = torch.zeros_like(z)
        for n, r in ranks.items():
            inp, y = acts[n]

            def logits_from(y_new, n=n):
                hook = layers[n].register_forward_hook(lambda m, a, o: y_new)
                try:
                    return net(xi)[0]
                finally:
                    hook.remove()

            jac = torch.autograd.functional.jacobian(logits_from, y)  # (C, 1, T, out)
            dy = inp @ (spectra[n].approx(r) - layers[n].weight.detach().T)
            dz = dz + (jac * dy).flatten(1).sum(1)
        p = F.softmax(z, -1)
        top = p.topk(min(classes, p.numel() - 1)).indices
        rest = torch.ones_like(p, dtype=torch.bool)
        rest[top] = False
        grads, weights = [], []
        for c in top:  # d log p_c / dz = e_c - p
            grads.append(F.one_hot(c, p.numel()).double() - p)
            weights.append(p[c])
        p_rest = p[rest].sum()  # d log p_rest / dz = 1_rest p / p_rest - p
        grads.append(torch.where(rest, p, torch.zeros_like(p)) / p_rest - p)
        weights.append(p_rest)
        out.append(0.5 * sum(w * (g @ dz) ** 2 for w, g in zip(weights, grads)))
    return torch.stack(out)


@pytest.mark.parametrize("classes", [2, 6])
@pytest.mark.parametrize("ranks", [{"a": 2}, {"b": 0}, {"a": 1, "b": 3}, {"a": None, "b": 4}])
def test_prediction_is_the_coarsened_fisher_quadratic_of_the_linearised_output(classes, ranks):
    """classes=6 of 7: the top 6 and the one left is the whole Fisher, i.e. 1/2 dz^T F dz."""
    net, x, layers, spectra = _setup()
    pred = predict_kl(net, layers, spectra, Probe(x, batch_size=4), classes=classes)
    got = pred.allocation(ranks)
    ref = _brute_force(net, x, layers, spectra, {n: r for n, r in ranks.items() if r is not None}, classes)
    assert torch.allclose(got, ref, rtol=1e-6, atol=1e-12)


def test_with_every_class_the_prediction_is_the_kl_of_a_small_truncation():
    """Second order: for a truncation whose output change is small, the prediction and the
    measured KL agree to a few percent (and both are far from 0)."""
    net, x, layers, spectra = _setup(1)
    with torch.no_grad():  # a weight whose last singular value is tiny
        u, s, vh = torch.linalg.svd(net.a.weight, full_matrices=False)
        s[-1] = 1e-2 * s[0]
        net.a.weight.copy_(u @ torch.diag(s) @ vh)
    spectra["a"] = asvd_whiten_spectrum(net.a.weight.detach().T.clone(), torch.eye(6))
    pred = float(predict_kl(net, layers, spectra, Probe(x), classes=6).allocation({"a": 4}).mean())
    dense = F.log_softmax(net(x), -1)
    with torch.no_grad():
        saved = net.a.weight.clone()
        net.a.weight.copy_(spectra["a"].approx(4).T)
        kl = float((dense.exp() * (dense - F.log_softmax(net(x), -1))).sum(-1).mean())
        net.a.weight.copy_(saved)
    assert kl > 1e-9 and pred == pytest.approx(kl, rel=0.05)


def test_a_frozen_model_is_predicted_the_same():
    net, x, layers, spectra = _setup()
    want = predict_kl(net, layers, spectra, Probe(x)).allocation({"a": 1, "b": 2})
    net.requires_grad_(False)
    assert torch.allclose(predict_kl(net, layers, spectra, Probe(x)).allocation({"a": 1, "b": 2}), want)


def test_ratio_estimate_is_eq3():
    q = torch.tensor([1.0, 3.0, 2.0, 6.0])
    assert ratio_estimate(0.5, q, Sample.first(2)) == pytest.approx(0.5 * 3.0 / 2.0)
    assert ratio_estimate(0.5, q, Sample.first(4)) == pytest.approx(0.5)  # all of them: nothing to rescale
    assert ratio_estimate(0.5, torch.tensor([0.0, 0.0, 1.0]), Sample.first(2)) == 0.5  # undefined: the measurement
    # weighted: the sample's mean of q is (1 * 3 + 3 * 6) / 4 over images 1 and 3 with weights 1, 3
    assert ratio_estimate(0.5, q, Sample(torch.tensor([1, 3]), torch.tensor([1.0, 3.0]))) == pytest.approx(
        0.5 * 3.0 / (21.0 / 4.0))


def test_pps_sample_draws_n_distinct_images_with_probability_proportional_to_size():
    """Monte Carlo against the closed form π_i = n · size_i / Σ size (no cap, floor 0), and the
    Horvitz-Thompson mean Σ y_i / π_i / N unbiased for any y."""
    torch.manual_seed(0)
    size = torch.rand(40) + 0.1
    n, draws = 6, 4000
    g = torch.Generator().manual_seed(3)
    hits = torch.zeros(40)
    y = torch.randn(40) ** 2
    ht = []
    for _ in range(draws):
        s = pps_sample(size, n, g, floor=0.0)
        assert len(set(s.index.tolist())) == n
        hits[s.index] += 1
        ht.append(float((y[s.index] * s.weights).sum()) / 40)
    pi = n * size / size.sum()
    assert torch.allclose(hits / draws, pi, atol=0.035)
    assert sum(ht) / draws == pytest.approx(float(y.mean()), rel=0.02)


def test_pps_sample_always_measures_the_largest_and_keeps_the_floor():
    size = torch.ones(20)
    size[7] = 1000.0  # its share is over 1/n: measured every time, at weight 1
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        s = pps_sample(size, 4, g, floor=0.0)
        assert 7 in s.index.tolist() and float(s.weights[s.index.tolist().index(7)]) == pytest.approx(1.0)
    zero = torch.zeros(10)
    zero[0] = 1.0
    s = pps_sample(zero, 3, g, floor=0.1)  # the others' size is 0, the floor still lets them be drawn
    assert len(set(s.index.tolist())) == 3 and float(s.weights.max()) <= 10 / (0.1 * 3) + 1e-9


def test_a_weighted_probe_measures_the_weighted_mean_of_each_image():
    """allocation_kl on Probe.take(index, weights): Σ w_i KL_i / Σ w with KL_i measured one image at a time."""
    net, x, layers, spectra = _setup()
    ranks = {"a": 1, "b": 2}
    index, w = torch.tensor([5, 0, 3]), torch.tensor([2.0, 1.0, 0.5])
    got = allocation_kl(net, layers, spectra, {"x": ranks}, Probe(x, batch_size=2).take(index, w))["x"]
    each = [allocation_kl(net, layers, spectra, {"x": ranks}, Probe(x[i: i + 1]))["x"] for i in index.tolist()]
    assert got == pytest.approx(sum(wi * k for wi, k in zip(w.tolist(), each)) / float(w.sum()), rel=1e-9)


@pytest.mark.parametrize("kwargs, key", [
    (dict(name="output_aware", ratio_samples=64), "schedule.ratio_samples"),  # no score_samples
    (dict(name="output_aware", score_samples=64, ratio_samples=64), "schedule.ratio_samples"),
    (dict(name="asvd_search", score_samples=8, ratio_samples=64), "schedule.ratio_samples"),
    (dict(name="output_aware", score_samples=8, ratio_samples=0), "schedule.ratio_samples"),
])
def test_bad_ratio_samples_name_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        ScheduleConfig(**kwargs)
    ScheduleConfig(name="output_aware", score_samples=8, ratio_samples=64)  # the good one


def test_search_rescales_every_measured_kl_by_the_prediction():
    """The whole-model KL a search records for the uniform check with ratio_samples is its plain
    measurement on the first score_samples images times Eq (3), the prediction recomputed here."""
    from tests.conftest import tiny_timm_loaders

    from amrc_exp.compress import AMRCConfig, DecompConfig, ZConfig, compress_model
    from amrc_exp.compress.calibrate import calibrate, find_layers
    from amrc_exp.compress.lowrank import count_params
    from amrc_exp.compress.plan import check_budget, decompose_layers, layer_specs, layer_weights
    from amrc_exp.math.allocate import allocate_uniform

    model, calib, heldout = tiny_timm_loaders()

    def config(**schedule) -> AMRCConfig:
        return AMRCConfig(ratio=0.6, decomp=DecompConfig("asvd_whiten"), z_type=ZConfig("none"),
                          schedule=ScheduleConfig("output_aware", min_rank=0, check_uniform=True, **schedule))

    plain = compress_model(model, calib, heldout, config(score_samples=8), probe_samples=24)
    rescaled = compress_model(model, calib, heldout, config(score_samples=8, ratio_samples=24), probe_samples=24)
    layers = find_layers(model)
    stats = calibrate(model, calib, heldout, num_samples=32, layers=layers, probe_samples=24)
    spectra = decompose_layers(layer_weights(layers), stats.calib, DecompConfig("asvd_whiten"))
    specs = layer_specs(layers, ZConfig("none"))
    to_remove = check_budget(layers, count_params(model), config())
    uniform = {s.name: r for s, r in zip(specs, allocate_uniform(specs, to_remove, 0, kind="params"))}
    prediction = predict_kl(model, layers, spectra, stats.probe)
    sample = pps_sample(prediction.size(), 8, torch.Generator().manual_seed(0))  # config().seed
    measured = allocation_kl(model, layers, spectra, {"u": uniform}, stats.probe.take(sample.index, sample.weights))
    want = ratio_estimate(measured["u"], prediction.allocation(uniform), sample)
    assert rescaled.allocation_kl["param_uniform"] == pytest.approx(want, rel=1e-4)
    assert abs(want / plain.allocation_kl["param_uniform"] - 1) > 1e-3  # the rescaling did something
