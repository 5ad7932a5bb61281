"""amrc_exp.math.compensate against independent references (numpy least squares on the
whitened system, numpy Eckart-Young, per-sample sums, brute-force forward selection)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from amrc_exp.math.compensate import (
    ZParams,
    fit_closed_form,
    fit_gd,
    residual,
    residual_error,
    z_dense,
    z_param_count,
)
from amrc_exp.math.decompose import asvd_whiten_spectrum
from amrc_exp.math.error import normalized_error

N_IN, N_OUT, RANK = 16, 12, 4


pytestmark = pytest.mark.usefixtures("one_thread")


def make_layer(seed=0, n_samples=30, tokens=10, dead=()):
    """W, samples X_i, H = sum X_i^T X_i / ||X_i W||^2 (numpy float64), and the rank-4 whitened
    factors U, V (torch float64) whose residual Z must compensate."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((N_IN, N_OUT))
    scales = np.exp(rng.standard_normal(N_IN))
    scales[list(dead)] = 0.0
    mix = rng.standard_normal((N_IN, N_IN)) * 0.3 + np.eye(N_IN)
    xs = [(rng.standard_normal((tokens, N_IN)) @ mix) * scales for _ in range(n_samples)]
    h = sum(x.T @ x / np.linalg.norm(x @ w) ** 2 for x in xs)
    u, v = asvd_whiten_spectrum(torch.from_numpy(w), torch.from_numpy(h), damp=0.0).factors(RANK, torch.float64)
    return w, xs, h, u, v


def sqrt_psd(h):
    lam, q = np.linalg.eigh(h)
    return q @ np.diag(np.sqrt(np.clip(lam, 0, None))) @ q.T


def masked_lstsq(h, r, mask):
    """argmin over Z supported on `mask` of ||H^{1/2} (Z - R)||_F^2, as one dense least-squares
    problem with one unknown per masked entry (independent of the per-column solver)."""
    root = sqrt_psd(h)
    cols = []
    for i, j in zip(*np.nonzero(mask)):
        e = np.zeros_like(r)
        e[i, j] = 1.0
        cols.append((root @ e).ravel())
    coef = np.linalg.lstsq(np.stack(cols, 1), (root @ r).ravel(), rcond=None)[0]
    z = np.zeros_like(r)
    z[mask] = coef  # np.nonzero and boolean indexing share row-major order
    return z


def numpy_error(h, d, n):
    return float(np.trace(d.T @ h @ d)) / n


@pytest.fixture(scope="module")
def layer():
    return make_layer()


def test_residual_error_is_the_per_sample_mean(layer):
    w, xs, h, u, v = layer
    z = np.random.default_rng(5).standard_normal(w.shape) * 0.05
    w_hat = u.numpy() @ v.numpy().T + z
    direct = np.mean([np.linalg.norm(x @ (w_hat - w)) ** 2 / np.linalg.norm(x @ w) ** 2 for x in xs])
    got = residual_error(torch.from_numpy(w), u, v, torch.from_numpy(z), torch.from_numpy(h), len(xs))
    assert got.shape == () and float(got) == pytest.approx(direct, rel=1e-10)
    assert float(residual_error(torch.from_numpy(w), u, v, None, torch.from_numpy(h), len(xs))) == pytest.approx(
        float(normalized_error(u @ v.T - torch.from_numpy(w), torch.from_numpy(h), len(xs)))
    )


def test_param_counts_by_hand():
    assert z_param_count("lowrank", 768, 768) == 19 * 1536  # floor(0.05 * 768^2 / 1536) = 19
    assert z_param_count("lowrank", 4, 4) == 8  # q >= 1
    assert z_param_count("diagonal", 768, 3072) == 768
    assert z_param_count("sparse_unstructured", 100, 50, 0.1) == 2 * 500 + 101
    assert z_param_count("sparse_structured", 100, 50, 0.05) == 5 * 50 + 5
    assert z_param_count("none", 100, 50) == 0
    with pytest.raises(ValueError, match="allowed.*diagonal.*lowrank.*none"):
        z_param_count("dense", 4, 4)


def test_lowrank_closed_form_is_the_whitened_eckart_young_optimum(layer):
    w, xs, h, u, v = layer
    n = len(xs)
    r = residual(torch.from_numpy(w), u, v)
    zp = fit_closed_form("lowrank", r, torch.from_numpy(h), fraction=0.2, damp=0.0)
    q = zp.tensors["G"].shape[-1]
    assert q == int(0.2 * N_IN * N_OUT / (N_IN + N_OUT)) and zp.param_count == q * (N_IN + N_OUT)
    s = np.linalg.svd(sqrt_psd(h) @ r.numpy(), compute_uv=False)
    err = residual_error(torch.from_numpy(w), u, v, z_dense("lowrank", zp)[0], torch.from_numpy(h), n)
    assert float(err) == pytest.approx((s[q:] ** 2).sum() / n, rel=1e-5)
    # U V^T is itself the whitened optimum, so U V^T + G Y^T is the rank (4 + q) optimum of W.
    sw = np.linalg.svd(sqrt_psd(h) @ w, compute_uv=False)
    assert float(err) == pytest.approx((sw[RANK + q :] ** 2).sum() / n, rel=1e-5)


@pytest.mark.parametrize("ztype", ["diagonal", "sparse_unstructured", "sparse_structured"])
def test_masked_closed_forms_match_dense_least_squares(layer, ztype):
    w, xs, h, u, v = layer
    r = residual(torch.from_numpy(w), u, v)
    zp = fit_closed_form(ztype, r, torch.from_numpy(h), fraction=0.2, damp=0.0)
    z = z_dense(ztype, zp)[0].double().numpy()
    mask = np.zeros((N_IN, N_OUT), dtype=bool)
    if ztype == "diagonal":
        mask[np.arange(N_OUT), np.arange(N_OUT)] = True
    elif ztype == "sparse_unstructured":
        score = np.abs(r.numpy()) * np.sqrt(np.diag(h))[:, None]
        k = int(0.2 * N_IN * N_OUT)
        mask.ravel()[np.argsort(-score.ravel(), kind="stable")[:k]] = True
    else:
        mask[zp.tensors["rows"][0].numpy()] = True
    assert not np.any(z[~mask])
    np.testing.assert_allclose(z, masked_lstsq(h, r.numpy(), mask), atol=1e-5)
    assert zp.param_count == z_param_count(ztype, N_IN, N_OUT, 0.2)


def test_structured_rows_are_greedy_forward_selection(layer):
    w, xs, h, u, v = layer
    r = residual(torch.from_numpy(w), u, v).numpy()
    zp = fit_closed_form("sparse_structured", torch.from_numpy(r), torch.from_numpy(h), fraction=0.25, damp=0.0)
    chosen: list[int] = []
    for _ in range(4):  # brute force: add the row whose refit lowers the loss the most
        def loss_with(i):
            mask = np.zeros_like(r, dtype=bool)
            mask[chosen + [i]] = True
            return numpy_error(h, masked_lstsq(h, r, mask) - r, 1)

        chosen.append(min((i for i in range(N_IN) if i not in chosen), key=loss_with))
    gains = np.linalg.norm(h @ r, axis=1) ** 2 / np.diag(h)
    assert chosen[0] == int(np.argmax(gains))  # first pick: ||(H R)_i||^2 / H_ii
    assert sorted(chosen) == zp.tensors["rows"][0].tolist()


@pytest.mark.parametrize("ztype", ["lowrank", "diagonal", "sparse_unstructured", "sparse_structured"])
def test_gd_approaches_the_closed_form(layer, ztype):
    w, xs, h, u, v = layer
    n = len(xs)
    wt, ht = torch.from_numpy(w), torch.from_numpy(h)
    r = residual(wt, u, v)
    zp, hist = fit_gd(ztype, r, ht, n, fraction=0.2, lr=2e-2, iters=1500, dtype=torch.float64)
    cf = fit_closed_form(ztype, r, ht, fraction=0.2, damp=0.0)
    best = float(residual_error(wt, u, v, z_dense(ztype, cf)[0], ht, n))
    got = float(residual_error(wt, u, v, z_dense(ztype, zp)[0], ht, n))
    start = float(residual_error(wt, u, v, None, ht, n))
    assert list(hist)[0] == 0 and list(hist)[-1] == 1500 and len(hist) == 11
    assert float(hist[0][0]) == pytest.approx(start) and float(hist[1500][0]) == pytest.approx(got)
    assert best - 1e-9 <= got <= 1.03 * best and best < start
    losses = [float(v[0]) for v in hist.values()]
    assert all(b <= a * 1.01 for a, b in zip(losses, losses[1:]))  # (near-)monotone decrease


def test_gd_default_float32_and_none_type(layer):
    w, xs, h, u, v = layer
    r = residual(torch.from_numpy(w), u, v)
    zp, hist = fit_gd("lowrank", r, torch.from_numpy(h), len(xs), iters=50)
    assert zp.tensors["G"].dtype == torch.float32 and zp.n_layers == 1
    assert float(hist[50][0]) < float(hist[0][0])
    zp, hist = fit_gd("none", r, torch.from_numpy(h), len(xs), iters=50)
    assert zp.param_count == 0 and z_dense("none", zp).shape == (1, N_IN, N_OUT)
    assert torch.all(z_dense("none", zp) == 0)
    assert float(hist[0][0]) == float(hist[50][0])
    with pytest.raises(ValueError):
        z_dense("lowrank", zp)


@pytest.mark.parametrize("ztype", ["lowrank", "diagonal", "sparse_unstructured", "sparse_structured", "none"])
def test_batched_fit_equals_one_by_one(ztype):
    layers = [make_layer(seed) for seed in (1, 2, 3)]
    rs = torch.stack([residual(torch.from_numpy(w), u, v) for w, _, _, u, v in layers])
    hs = torch.stack([torch.from_numpy(h) for _, _, h, _, _ in layers])
    kw = dict(fraction=0.2, lr=1e-2, iters=200, seed=3, dtype=torch.float64)
    batched, hist = fit_gd(ztype, rs, hs, 30, **kw)
    closed = fit_closed_form(ztype, rs, hs, fraction=0.2)
    assert batched.n_layers == 3 and hist[200].shape == (3,)
    for i in range(3):
        single, single_hist = fit_gd(ztype, rs[i], hs[i], 30, **kw)
        torch.testing.assert_close(z_dense(ztype, batched.layer(i)), z_dense(ztype, single), rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(hist[200][i], single_hist[200][0])
        one = fit_closed_form(ztype, rs[i], hs[i], fraction=0.2)
        torch.testing.assert_close(z_dense(ztype, closed)[i : i + 1], z_dense(ztype, one), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("ztype", ["lowrank", "diagonal", "sparse_unstructured", "sparse_structured"])
def test_singular_h_gives_finite_z(ztype):
    # Dead channel 0 (H_00 = 0, so a diagonal Z's first entry has nothing to fit) and
    # 2 x 5 = 10 tokens < 16 features.
    w, xs, h, u, v = make_layer(seed=4, n_samples=2, tokens=5, dead=(0,))
    r = residual(torch.from_numpy(w), u, v)
    for damp in (1e-4, 0.0):
        zp = fit_closed_form(ztype, r, torch.from_numpy(h), fraction=0.2, damp=damp)
        assert all(torch.isfinite(t).all() for t in zp.tensors.values() if t.is_floating_point())
    zp, hist = fit_gd(ztype, r, torch.from_numpy(h), 2, fraction=0.2, iters=100)
    assert torch.isfinite(z_dense(ztype, zp)).all() and torch.isfinite(hist[100]).all()


def test_zparams_layer_and_dense_shapes():
    t = {"G": torch.ones(2, 3, 1), "Y": torch.ones(2, 4, 1)}
    zp = ZParams("lowrank", 3, 4, t)
    assert zp.n_layers == 2 and zp.layer(1).n_layers == 1 and zp.param_count == 7
    assert z_dense("lowrank", zp).shape == (2, 3, 4)
    d = ZParams("diagonal", 5, 3, {"d": torch.tensor([[1.0, 2.0, 3.0]])})
    np.testing.assert_array_equal(z_dense("diagonal", d)[0].numpy(), np.eye(5, 3) * [1, 2, 3])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("ztype", ["lowrank", "diagonal", "sparse_unstructured", "sparse_structured", "none"])
def test_cuda_matches_cpu(layer, ztype):
    w, xs, h, u, v = layer
    r, ht = residual(torch.from_numpy(w), u, v), torch.from_numpy(h)
    cpu = fit_closed_form(ztype, r, ht, fraction=0.2)
    gpu = fit_closed_form(ztype, r.cuda(), ht.cuda(), fraction=0.2)
    torch.testing.assert_close(z_dense(ztype, gpu).cpu(), z_dense(ztype, cpu), rtol=1e-4, atol=1e-6)
    zp, hist = fit_gd(ztype, r.cuda(), ht.cuda(), len(xs), fraction=0.2, iters=20)
    assert z_dense(ztype, zp).is_cuda and torch.isfinite(hist[20]).all()


def test_minibatch_gd_one_chunk_equals_full_batch(layer):
    """One chunk holding every sample is full-batch GD: identical trajectories."""
    w, xs, h, u, v = layer
    r = residual(torch.from_numpy(w), u, v)
    ht = torch.from_numpy(h)
    kw = dict(fraction=0.2, lr=1e-2, iters=200, dtype=torch.float64)
    full, _ = fit_gd("lowrank", r, ht, len(xs), **kw)
    mini, _ = fit_gd("lowrank", r, ht, len(xs), h_batches=ht[None, None], n_batches=torch.tensor([[len(xs)]]), **kw)
    for key in ("G", "Y"):
        torch.testing.assert_close(mini.tensors[key], full.tensors[key])


def test_minibatch_gd_on_sample_chunks_approaches_closed_form(layer):
    """Chunks of 5 samples, each Gram built independently from its own X_i: stochastic steps
    still reach (near) the exact optimum of the full Eq 10 loss."""
    w, xs, h, u, v = layer
    n = len(xs)
    wt, ht = torch.from_numpy(w), torch.from_numpy(h)
    r = residual(wt, u, v)
    chunks = [xs[i:i + 5] for i in range(0, n, 5)]
    hb = torch.from_numpy(np.stack([sum(x.T @ x / np.linalg.norm(x @ w) ** 2 for x in c) for c in chunks]))
    nb = torch.tensor([[float(len(c)) for c in chunks]])
    zp, hist = fit_gd("lowrank", r, ht, n, fraction=0.2, lr=2e-2, iters=1500, dtype=torch.float64,
                      h_batches=hb[None], n_batches=nb)
    best = float(residual_error(wt, u, v, z_dense("lowrank", fit_closed_form("lowrank", r, ht, fraction=0.2, damp=0.0))[0], ht, n))
    got = float(residual_error(wt, u, v, z_dense("lowrank", zp)[0], ht, n))
    start = float(residual_error(wt, u, v, None, ht, n))
    assert best < got <= best + 0.1 * (start - best)  # recovers >= 90% of the attainable gain
    assert float(hist[1500][0]) == pytest.approx(got)  # history is the full-calibration loss


def test_lowrank_analytic_gradient_matches_autograd():
    """The GD step's hand-written low-rank gradient against autograd of the quadratic form."""
    from amrc_exp.math.compensate import _LowRank

    torch.manual_seed(0)
    L, n_in, n_out, q = 3, 7, 5, 2
    a = torch.randn(L, n_in, 2 * n_in, dtype=torch.float64)
    h = a @ a.mT  # symmetric PSD
    hr = h @ torch.randn(L, n_in, n_out, dtype=torch.float64)
    t = {"G": torch.randn(L, n_in, q, dtype=torch.float64, requires_grad=True),
         "Y": torch.randn(L, n_out, q, dtype=torch.float64, requires_grad=True)}
    _LowRank.quad(t, h, hr).sum().backward()
    got = _LowRank.grad({k: v.detach() for k, v in t.items()}, h, hr)
    for k in ("G", "Y"):
        torch.testing.assert_close(got[k], t[k].grad, rtol=1e-10, atol=1e-10)


def test_same_shape_groups_split_by_h_bytes():
    """compensate.split_group: consecutive parts, all names once, each part's stacked float64 H
    within GROUP_H_BYTES (a part of one layer when a single H is larger)."""
    from amrc_exp.compress import compensate as compress

    names = [f"l{i}" for i in range(7)]
    for n_in, chunks in ((64, 0), (3072, 0), (8192, 0), (1536, 4)):
        weights = {n: torch.empty(n_in, 5) for n in names}  # math convention: in x out
        parts = compress.split_group(names, weights, chunks)
        assert [n for p in parts for n in p] == names
        per_h = 8 * n_in * n_in * (1 + chunks)
        assert all(len(p) == 1 or len(p) * per_h <= compress.GROUP_H_BYTES for p in parts)
        assert len(parts) == -(-len(names) // max(1, compress.GROUP_H_BYTES // per_h))
