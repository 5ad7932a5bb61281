"""amrc_exp.math.decompose against independent references (numpy SVD / eigh / pinv, brute force)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from amrc_exp.math.error import normalized_error
from amrc_exp.math.decompose import (
    Spectrum,
    asvd_mean_spectrum,
    asvd_whiten_spectrum,
    decompose,
    svd_spectrum,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def make_problem(n_in=8, n_out=6, n_samples=20, tokens=5, seed=0, dead=()):
    """W (in x out), samples X_i (tokens x in) with uneven channel scales, and
    H = sum_i X_i^T X_i / ||X_i W||^2, all numpy float64."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n_in, n_out))
    scales = np.exp(rng.standard_normal(n_in))
    scales[list(dead)] = 0.0
    mix = rng.standard_normal((n_in, n_in)) * 0.3 + np.eye(n_in)  # correlated channels
    xs = [(rng.standard_normal((tokens, n_in)) @ mix) * scales for _ in range(n_samples)]
    h = sum(x.T @ x / np.linalg.norm(x @ w) ** 2 for x in xs)
    return w, xs, h


def whitened_optimum(w, h):
    """Eckart-Young on the whitened problem with the symmetric square root of H (numpy only):
    returns (singular values of H^{1/2} W, function r -> optimal W_hat_r)."""
    lam, q = np.linalg.eigh(h)
    root = q @ np.diag(np.sqrt(lam)) @ q.T
    inv_root = q @ np.diag(1 / np.sqrt(lam)) @ q.T
    p, s, qt = np.linalg.svd(root @ w, full_matrices=False)
    return s, lambda r: inv_root @ (p[:, :r] * s[:r]) @ qt[:r]


def err(w, w_hat, h, n):
    d = w_hat - w
    return float(np.trace(d.T @ h @ d)) / n


def t(a):
    return torch.from_numpy(np.asarray(a))


def test_trace_identity_and_normalized_error_is_sample_mean():
    w, xs, h = make_problem()
    assert np.isclose(np.trace(w.T @ h @ w), len(xs))
    w_hat = w + 0.1 * np.random.default_rng(1).standard_normal(w.shape)
    direct = np.mean([np.linalg.norm(x @ (w_hat - w)) ** 2 / np.linalg.norm(x @ w) ** 2 for x in xs])
    assert float(normalized_error(t(w_hat) - t(w), t(h), len(xs))) == pytest.approx(direct, rel=1e-10)


def test_whiten_equals_brute_force_optimum():
    w, xs, h = make_problem()
    n = len(xs)
    s, w_opt = whitened_optimum(w, h)
    sp = asvd_whiten_spectrum(t(w).float(), t(h), damp=0.0)
    assert sp.rank_cap == 6 and sp.method == "asvd_whiten"
    for r in range(7):
        u, v = sp.factors(r)
        assert u.shape == (8, r) and v.shape == (6, r) and u.dtype == torch.float32
        opt = float((s[r:] ** 2).sum()) / n
        assert err(w, (u @ v.T).double().numpy(), h, n) == pytest.approx(opt, rel=1e-5, abs=1e-6)
        np.testing.assert_allclose(sp.approx(r).numpy(), w_opt(r), atol=1e-5)
        # tr(W^T H W) = N, so the normalized loss is the error itself (W passed as float32)
        assert sp.energy_loss(r) == pytest.approx(opt, rel=1e-6, abs=1e-9)


def als_candidate(w, h, r, rng, iters=60):
    """A random rank-r start refined by alternating least squares on tr(D^T H D)."""
    v = rng.standard_normal((w.shape[1], r))
    for _ in range(iters):
        u = w @ v @ np.linalg.inv(v.T @ v)  # H-weighted LS in U: H cancels for invertible H
        v = np.linalg.solve(u.T @ h @ u, u.T @ h @ w).T
    return u @ v.T


def test_whiten_beats_svd_and_refined_random_candidates():
    w, xs, h = make_problem(seed=3)
    n = len(xs)
    sp = asvd_whiten_spectrum(t(w), t(h), damp=0.0)
    p, s, qt = np.linalg.svd(w, full_matrices=False)
    rng = np.random.default_rng(0)
    for r in (1, 2, 3, 4):
        best = err(w, sp.approx(r).numpy(), h, n)
        assert best < err(w, (p[:, :r] * s[:r]) @ qt[:r], h, n)
        for _ in range(3):
            assert best <= err(w, als_candidate(w, h, r, rng), h, n) + 1e-9


def test_energy_loss_is_normalized_error_under_damped_h():
    w, xs, h = make_problem(seed=4)
    damp = 0.05
    h_d = h + damp * np.mean(np.diag(h)) * np.eye(8)
    sp = asvd_whiten_spectrum(t(w), t(h), damp=damp)
    total = np.trace(w.T @ h_d @ w)
    for r in range(7):
        d = sp.approx(r).numpy() - w
        assert sp.energy_loss(r) == pytest.approx(np.trace(d.T @ h_d @ d) / total, rel=1e-9, abs=1e-12)
    curve = sp.energy_curve()
    assert curve.shape == (7,) and curve[0] == 1.0 and curve[-1] == 0.0
    assert torch.all(curve[1:] <= curve[:-1])


def test_svd_spectrum_matches_numpy_and_decompose_dispatch():
    w, _, _ = make_problem(n_in=7, n_out=9)
    s = np.linalg.svd(w, compute_uv=False)
    sp = decompose("svd", t(w))
    np.testing.assert_allclose(sp.sigma.numpy(), s, rtol=1e-12)
    assert sp.energy_loss(2) == pytest.approx((s[2:] ** 2).sum() / (s**2).sum())
    u, v = sp.factors(3)
    p, _, qt = np.linalg.svd(w)
    np.testing.assert_allclose((u @ v.T).double().numpy(), (p[:, :3] * s[:3]) @ qt[:3], atol=1e-5)


def test_decompose_errors():
    w = torch.randn(4, 3)
    with pytest.raises(ValueError, match="allowed.*asvd_mean.*asvd_whiten.*svd"):
        decompose("nope", w)
    with pytest.raises(ValueError, match="H"):
        decompose("asvd_whiten", w)
    with pytest.raises(ValueError, match="x_rep"):
        decompose("asvd_mean", w, H=torch.eye(4))


def test_asvd_mean_hand_example():
    # X_rep W = diag(3, 2): sigma = (3, 2), U* = V* = I, pinv(X_rep) = [[1, 0], [0, 1/2], [0, 0]].
    x_rep = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    w = torch.tensor([[3.0, 0.0], [0.0, 1.0], [5.0, 7.0]])
    sp = decompose("asvd_mean", w, x_rep=x_rep)
    assert sp.rank_cap == 2
    np.testing.assert_allclose(sp.sigma.numpy(), [3.0, 2.0], rtol=1e-12)
    u, v = sp.factors(1)
    np.testing.assert_allclose(u.abs().numpy(), [[3**0.5], [0], [0]], atol=1e-6)
    np.testing.assert_allclose(v.abs().numpy(), [[3**0.5], [0]], atol=1e-6)
    np.testing.assert_allclose((u @ v.T).numpy(), [[3, 0], [0, 0], [0, 0]], atol=1e-6)
    u, v = sp.factors(2)
    # Row 3 of W (5, 7) is outside the row space of X_rep: Eq 7 drops it.
    np.testing.assert_allclose((u @ v.T).numpy(), [[3, 0], [0, 1], [0, 0]], atol=1e-6)
    assert sp.energy_loss(1) == pytest.approx(4 / 13)
    u, v = sp.factors(4)  # beyond the rank cap: zero columns
    assert u.shape == (3, 4) and v.shape == (2, 4)
    assert torch.all(u[:, 2:] == 0) and torch.all(v[:, 2:] == 0)
    assert sp.energy_curve().tolist() == pytest.approx([1.0, 4 / 13, 0.0])


def test_asvd_mean_random_matches_numpy_eq7_and_caps_at_tokens():
    w, xs, _ = make_problem(n_in=10, n_out=9, tokens=4)
    x_rep = np.mean(xs, axis=0)  # 4 tokens < 9 = min(in, out)
    p, s, qt = np.linalg.svd(x_rep @ w, full_matrices=False)
    sp = asvd_mean_spectrum(t(w), t(x_rep))
    assert sp.rank_cap == 4
    for r in (1, 3, 4):
        u_ref = np.linalg.pinv(x_rep) @ p[:, :r] @ np.diag(np.sqrt(s[:r]))
        v_ref = qt[:r].T @ np.diag(np.sqrt(s[:r]))
        u, v = sp.factors(r)
        np.testing.assert_allclose((u @ v.T).double().numpy(), u_ref @ v_ref.T, rtol=1e-4, atol=1e-5)
    curve = sp.energy_curve()
    assert curve.shape == (10,) and torch.all(curve[4:] == 0)
    assert sp.energy_loss(8) == 0.0


@pytest.mark.parametrize("damp", [1e-4, 0.0])
def test_singular_h_never_nan(damp):
    # A dead input channel and fewer tokens (2 x 3 = 6) than features (8): H has rank <= 6.
    w, xs, h = make_problem(n_in=8, n_out=6, n_samples=3, tokens=2, dead=(2,))
    assert np.linalg.matrix_rank(h) < 8
    sp = asvd_whiten_spectrum(t(w), t(h), damp=damp)
    for r in range(7):
        u, v = sp.factors(r)
        assert torch.isfinite(u).all() and torch.isfinite(v).all()
        assert 0.0 <= sp.energy_loss(r) <= 1.0
    # The error that matters (on the data's span) is still driven to ~0 well below full rank.
    assert float(normalized_error(sp.approx(5) - t(w), t(h), len(xs))) < 1e-3
    assert float(normalized_error(sp.approx(6) - t(w), t(h), len(xs))) < 1e-6


def test_all_zero_h_falls_back_to_svd_and_indefinite_h_is_handled():
    w, _, h = make_problem()
    sp = asvd_whiten_spectrum(t(w), torch.zeros(8, 8), damp=1e-4)
    ref = svd_spectrum(t(w))
    for r in (1, 3):
        np.testing.assert_allclose(sp.approx(r).numpy(), ref.approx(r).numpy(), atol=1e-9)
        assert sp.energy_loss(r) == pytest.approx(ref.energy_loss(r))
    sp = asvd_mean_spectrum(t(w), torch.zeros(3, 8))  # X_rep = 0: no energy at all
    assert torch.isfinite(sp.factors(2)[0]).all() and sp.energy_loss(1) == 0.0
    lam, q = np.linalg.eigh(h)
    lam[0] = -1e-3 * lam[-1]  # indefinite by "rounding": Cholesky fails, eigh fallback clamps
    sp = asvd_whiten_spectrum(t(w), t(q @ np.diag(lam) @ q.T), damp=0.0)
    assert torch.isfinite(sp.left).all() and torch.isfinite(sp.sigma).all()


def test_spectrum_rejects_negative_rank():
    f64 = dict(dtype=torch.float64)
    sp = Spectrum("svd", torch.ones(2, **f64), torch.eye(3, 2, **f64), torch.eye(2, **f64))
    with pytest.raises(ValueError):
        sp.factors(-1)
    with pytest.raises(ValueError):
        sp.energy_loss(-1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    w, _, h = make_problem()
    cpu = asvd_whiten_spectrum(t(w), t(h))
    gpu = asvd_whiten_spectrum(t(w).cuda(), t(h).cuda())
    assert gpu.left.is_cuda
    np.testing.assert_allclose(gpu.approx(3).cpu().numpy(), cpu.approx(3).numpy(), atol=1e-8)
    xr = t(np.ones((3, 8)))
    assert decompose("asvd_mean", t(w).cuda(), x_rep=xr.cuda()).factors(2)[0].is_cuda
