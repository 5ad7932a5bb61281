"""Low-rank decompositions of one weight and their energy spectra (paper Sec 3.1, Eq 5-7).

Convention (paper's, used in all of `amrc_exp.math`): W is in x out, X is tokens x in and a
layer computes X W. Rank-r factors are U (in x r), V (out x r) with W_hat = U V^T; the singular
values are split as sqrt(sigma) into both sides. Linear algebra runs in float64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

__all__ = [
    "Spectrum",
    "tail_energy",
    "svd_spectrum",
    "asvd_mean_spectrum",
    "asvd_whiten_spectrum",
    "svdllm_spectrum",
    "svdllm_v2_spectrum",
    "dobi_spectrum",
    "asvd_scaled_spectrum",
    "fwsvd_spectrum",
    "fisher_scale",
    "whiten_fisher_spectrum",
    "STATISTICS",
    "whitening_factor",
    "damped",
    "decompose",
    "METHODS",
]


@dataclass(frozen=True)
class Spectrum:
    """A decomposition W_hat(r) = left[:, :r] diag(sigma[:r]) right[:, :r]^T for every rank r.

    `sigma` is descending (float64, length k = `rank_cap`), `left` is in x k, `right` is out x k.
    """

    method: str
    sigma: Tensor
    left: Tensor
    right: Tensor

    @property
    def rank_cap(self) -> int:
        """k: the largest rank this decomposition can express (token count for asvd_mean)."""
        return int(self.sigma.numel())

    @property
    def max_rank(self) -> int:
        """min(in, out): the largest rank of an in x out matrix."""
        return min(self.left.shape[0], self.right.shape[0])

    def energy_curve(self) -> Tensor:
        """Normalized energy loss sum_{j>r} s_j^2 / sum_j s_j^2 for r = 0..max_rank (Alg. 1's
        ComputeEnergyLoss). Ranks above k keep the loss at k. float64, on sigma's device."""
        tail = tail_energy(self.sigma)
        total = tail[0]
        loss = tail / total if total > 0 else torch.zeros_like(tail)  # W = 0 loses nothing
        pad = self.max_rank + 1 - loss.numel()
        return torch.cat([loss, loss[-1:].expand(pad)]) if pad > 0 else loss[: self.max_rank + 1]

    def energy_loss(self, r: int) -> float:
        """Normalized energy loss when keeping the top r singular values (Alg. 1)."""
        if r < 0:
            raise ValueError(f"rank must be >= 0, got {r}")
        curve = self.energy_curve()
        return float(curve[min(r, curve.numel() - 1)])

    def factors(self, r: int, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        """(U, V) of rank exactly r: U = left_r sqrt(sigma_r), V = right_r sqrt(sigma_r).

        For r > rank_cap the extra columns are zero: the decomposition cannot use them (this is
        the rank cap of asvd_mean, whose W_hat lives in the row space of X_rep)."""
        if r < 0:
            raise ValueError(f"rank must be >= 0, got {r}")
        k = min(r, self.rank_cap)
        root = self.sigma[:k].clamp_min(0).sqrt()
        u = self.left[:, :k] * root
        v = self.right[:, :k] * root
        if r > k:
            u = torch.cat([u, u.new_zeros(u.shape[0], r - k)], dim=1)
            v = torch.cat([v, v.new_zeros(v.shape[0], r - k)], dim=1)
        return u.to(dtype), v.to(dtype)

    def approx(self, r: int) -> Tensor:
        """W_hat(r) = U V^T in float64 (in x out)."""
        k = min(r, self.rank_cap)
        return (self.left[:, :k] * self.sigma[:k]) @ self.right[:, :k].mT


def tail_energy(sigma: Tensor) -> Tensor:
    """sum_{j>r} sigma_j^2 for r = 0..k (float64): the energy a rank-r truncation discards.

    A reversed cumsum (not total - cumsum), so it is exactly non-negative and non-increasing,
    with tail[k] = 0."""
    e = sigma.to(torch.float64) ** 2
    return torch.cat([e.flip(0).cumsum(0).flip(0), e.new_zeros(1)])


def _svd(m: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD m = P diag(S) Q^T, returning (P, S, Q)."""
    p, s, qh = torch.linalg.svd(m, full_matrices=False)
    return p, s, qh.mT


def svd_spectrum(W: Tensor) -> Spectrum:
    """Vanilla SVD of the weights (the activation-unaware baseline)."""
    p, s, q = _svd(W.to(torch.float64))
    return Spectrum("svd", s, p, q)


def asvd_mean_spectrum(W: Tensor, x_rep: Tensor, rcond: float = 1e-6) -> Spectrum:
    """The paper's Eq 6-7 with X_rep = mean token matrix, literally.

    SVD(X_rep W) = U* S V*^T; U = pinv(X_rep) U*_r sqrt(S_r), V = V*_r sqrt(S_r). W_hat is only
    constrained on the row space of X_rep, so k <= tokens. `rcond` (relative to the largest
    singular value of X_rep) drops directions of X_rep at the float32 noise level of the
    activations it came from: inverting them would blow up U while X_rep W has ~no energy there.
    Energy is relative to ||X_rep W||_F^2.
    """
    x = x_rep.to(device=W.device, dtype=torch.float64)
    p, s, q = _svd(x @ W.to(torch.float64))
    k = min(x.shape[0], *W.shape)  # X_rep W has rank <= min(tokens, in, out)
    p, s, q = p[:, :k], s[:k], q[:, :k]
    left = torch.linalg.pinv(x, rtol=rcond) @ p
    return Spectrum("asvd_mean", s, left, q)


def _symmetric64(m: Tensor, device: torch.device) -> Tensor:
    """`m` in float64 on `device`, symmetrized: streamed Gram sums can be asymmetric by rounding."""
    m = m.to(device=device, dtype=torch.float64)
    return (m + m.mT) / 2


def damped(h: Tensor, damp: float) -> Tensor:
    """H + damp * mean(diag H) * I in float64, symmetrized; all-zero H becomes I.

    Relative damping makes dead channels and token-starved H positive definite without
    changing the objective's scale."""
    h = _symmetric64(h, h.device)
    n = h.shape[-1]
    mean_diag = torch.diagonal(h, dim1=-2, dim2=-1).mean(-1)
    eye = torch.eye(n, dtype=h.dtype, device=h.device)
    if bool((mean_diag <= 0).any()):
        # No statistics at all (or nonsense): identity, i.e. fall back to plain SVD.
        dead = (mean_diag <= 0)[..., None, None]
        h = torch.where(dead, eye, h)
        mean_diag = torch.where(mean_diag <= 0, torch.ones_like(mean_diag), mean_diag)
    return h + (damp * mean_diag)[..., None, None] * eye


def whitening_factor(h_d: Tensor) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """Return (L^T, solve) with h_d = L L^T and solve(P) = L^{-T} P, for one (n x n) h_d.

    Cholesky first; if it fails (indefinite by rounding, or damp = 0 on a singular H) use the
    symmetric eigendecomposition with eigenvalues clamped, L = Q diag(sqrt(lam)): any square
    root works for the whitened SVD."""
    chol, info = torch.linalg.cholesky_ex(h_d)
    diag = torch.diagonal(chol, dim1=-2, dim2=-1)
    scale = torch.diagonal(h_d, dim1=-2, dim2=-1).abs().max().clamp_min(1e-300)
    if int(info.max()) == 0 and bool(torch.isfinite(chol).all()) and bool((diag**2 > 1e-13 * scale).all()):
        lt = chol.mT
        return lt, lambda p: torch.linalg.solve_triangular(lt, p, upper=True)
    lam, q = torch.linalg.eigh(h_d)
    lam = lam.clamp_min(1e-12 * lam.abs().max().clamp_min(1e-300))
    root = lam.sqrt()
    return root[:, None] * q.mT, lambda p: q @ (p / root[:, None])


def _whitened(w64: Tensor, lt: Tensor, solve: Callable[[Tensor], Tensor], method: str) -> Spectrum:
    """Eckart-Young on L^T W: SVD(L^T W) = P S Q^T, W_hat_r = L^{-T} P_r S_r Q_r^T."""
    p, s, q = _svd(lt @ w64)
    return Spectrum(method, s, solve(p), q)


def asvd_whiten_spectrum(W: Tensor, H: Tensor, damp: float = 1e-4) -> Spectrum:
    """Exact rank-r optimum of Eq 5 (Z = 0): min tr((W_hat - W)^T H (W_hat - W)).

    H_d = L L^T, SVD(L^T W) = P S Q^T, W_hat_r = L^{-T} P_r S_r Q_r^T (Eckart-Young on the
    whitened problem). energy_loss(r) is then the exact normalized Eq 5 error of that optimum,
    relative to tr(W^T H_d W) (the damped H)."""
    w64 = W.to(torch.float64)
    lt, solve = whitening_factor(damped(H.to(w64.device), damp))
    return _whitened(w64, lt, solve, "asvd_whiten")


def svdllm_spectrum(W: Tensor, G: Tensor) -> Spectrum:
    """SVD-LLM's truncation-aware data whitening (Wang et al. 2024, arXiv:2403.07378, Sec 3.1).

    G = sum_i X_i^T X_i is the UNnormalised Gram of the layer inputs (every token weighs the
    same, unlike Eq 5's per-image normalisation); S = Cholesky(G), SVD(S^T W), truncation, and
    W_hat_r = S^{-T} [S^T W]_r, so ||X (W - W_hat)||_F is minimal at every rank. Their rule for
    a G that is not positive definite: shift it by (1e-6 - lambda_min) I before the Cholesky."""
    w64 = W.to(torch.float64)
    g = _symmetric64(G, w64.device)
    eye = torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    chol, info = torch.linalg.cholesky_ex(g)
    if int(info) != 0:
        g = g + (1e-6 - torch.linalg.eigvalsh(g)[0]) * eye
        chol = torch.linalg.cholesky(g)
    lt = chol.mT
    return _whitened(w64, lt, lambda p: torch.linalg.solve_triangular(lt, p, upper=True), "svdllm")


def svdllm_v2_spectrum(W: Tensor, G: Tensor) -> Spectrum:
    """SVD-LLM V2's loss-optimized weight truncation (Wang et al. 2025, arXiv:2503.12340, Sec 3.2).

    Two SVDs instead of a Cholesky: G = U_s diag(lam) U_s^T (the SVD of the symmetric PSD
    unnormalised Gram, i.e. its eigendecomposition), S = U_s diag(sqrt(lam)), then SVD(S^T W)
    and W_hat_r = S^{-T} [S^T W]_r. The same minimum of ||X (W - W_hat)||_F as SVD-LLM's, with
    no Cholesky to fail on an ill-conditioned G; `sigma` holds its singular values, so
    sqrt(sum_{j>r} sigma_j^2) is the theoretical truncation loss L_min that V2's ratio
    allocation (`math.allocate.allocate_truncation_loss`) reads. Eigenvalues are floored at
    1e-12 of the largest so S stays invertible."""
    w64 = W.to(torch.float64)
    lam, q = torch.linalg.eigh(_symmetric64(G, w64.device))
    root = lam.clamp_min(1e-12 * lam.abs().max().clamp_min(1e-300)).sqrt()
    return _whitened(w64, root[:, None] * q.mT, lambda p: q @ (p / root[:, None]), "svdllm_v2")


def dobi_spectrum(W: Tensor, G: Tensor) -> Spectrum:
    """Dobi-SVD's weight update from truncated activations (Qinsi Wang et al. 2025,
    arXiv:2502.02723, Sec 3.3): truncate the layer's OUTPUT activations A = X W, not W.

    With A = P diag(s) Q^T, the rank-r truncation A Q_r Q_r^T = X (W Q_r Q_r^T) is the best
    rank-r activation (Eckart-Young), so W_hat_r = W Q_r Q_r^T. Q and s^2 are the eigenvectors and
    eigenvalues of A^T A = W^T G W (G: the unnormalised input Gram), so no inverse of G is needed:
    a singular G is no problem. Their code gathers Q from each calibration sequence's SVD and
    merges the per-sequence subspaces by incremental PCA because an LLM's activations do not fit
    in memory; ours do, so Q here is the principal subspace of all calibration activations, the
    quantity their Theorem names. The singular values s are those of A, so sum_{j>r} s_j^2 is
    ||X (W - W_hat_r)||_F^2. They are floored at 1e-12 of the largest so `left` = W Q / s stays
    finite; a floored direction carries no activation energy and is truncated first."""
    w64 = W.to(torch.float64)
    lam, q = torch.linalg.eigh(w64.mT @ _symmetric64(G, w64.device) @ w64)  # ascending
    lam, q = lam.flip(0), q.flip(1)
    k = min(w64.shape)  # rank(X W) <= min(in, out): the trailing eigenvectors carry nothing
    s = lam[:k].clamp_min(0).sqrt()
    s = s.clamp_min(1e-12 * s.max().clamp_min(1e-300))
    q = q[:, :k]
    return Spectrum("dobi", s, (w64 @ q) / s, q)


def asvd_scaled_spectrum(W: Tensor, abs_mean: Tensor, alpha: float = 0.5) -> Spectrum:
    """ASVD's activation-aware scaling (Yuan et al. 2023, arXiv:2312.05821, Sec 3.2, "abs_mean").

    S = diag(mean_tokens |x_c|^alpha + 1e-6) over the input channels c; SVD(S W) = P Sig Q^T and
    W_hat_r = S^{-1} P_r Sig_r Q_r^T: channels with large activations are reconstructed first.
    alpha = 0.5 is the paper's default."""
    w64 = W.to(torch.float64)
    s = abs_mean.to(device=w64.device, dtype=torch.float64).clamp_min(0) ** alpha + 1e-6
    p, sig, q = _svd(s[:, None] * w64)
    return Spectrum("asvd", sig, p / s[:, None], q)


def fwsvd_spectrum(W: Tensor, fisher: Tensor) -> Spectrum:
    """Fisher-weighted SVD (Hsu et al. 2022, ICLR, arXiv:2207.00112, Sec 3.2).

    `fisher` holds, per OUTPUT neuron j (a row of torch's out x in weight), the summed empirical
    Fisher information of its weights, sum_i E[(dL/dW_ij)^2]; D = diag(sqrt(fisher)) weighs the
    reconstruction error of each output, SVD(W D) = P Sig Q^T (paper layout: outputs are W's
    columns) and W_hat_r = P_r Sig_r Q_r^T D^{-1}."""
    w64 = W.to(torch.float64)
    d = fisher_scale(fisher, w64.device)
    p, sig, q = _svd(w64 * d[None, :])
    return Spectrum("fwsvd", sig, p, q / d[:, None])


def fisher_scale(fisher: Tensor, device: torch.device) -> Tensor:
    """FWSVD's output weights D = sqrt(fisher) (float64, on `device`), each raised by 1e-6 of the
    largest so that an output with zero gradient keeps a finite weight (D is inverted)."""
    d = fisher.to(device=device, dtype=torch.float64).clamp_min(0).sqrt()
    return d + 1e-6 * d.max().clamp_min(1e-300)


def whiten_fisher_spectrum(W: Tensor, H: Tensor, fisher: Tensor, damp: float = 1e-4) -> Spectrum:
    """Ours, two-sided: the exact rank-r optimum of min ||L^T (W_hat - W) D||_F, i.e. Eq 5's input
    weighting (H_d = L L^T, as `asvd_whiten_spectrum`) and FWSVD's output weighting (D = diag
    sqrt(Fisher), as `fwsvd_spectrum`) at once: the error in the directions the inputs excite, on
    the outputs the loss is sensitive to. SVD(L^T W D) = P S Q^T, W_hat_r = L^{-T} P_r S_r Q_r^T D^{-1}
    (Eckart-Young on the doubly weighted matrix). D = I gives asvd_whiten; L = I gives fwsvd."""
    w64 = W.to(torch.float64)
    lt, solve = whitening_factor(damped(H.to(w64.device), damp))
    d = fisher_scale(fisher, w64.device)
    p, s, q = _svd(lt @ w64 * d[None, :])
    return Spectrum("whiten_fisher", s, solve(p), q / d[:, None])


# The statistics a decomposition can ask for (LayerStats attributes; see calibrate.py).
STATISTICS = ("H", "x_rep", "G", "abs_mean", "fisher")

# name -> (builder(W, **stats, damp, alpha), names of the statistics it needs)
METHODS: dict[str, tuple[Callable[..., Spectrum], tuple[str, ...]]] = {
    "svd": (lambda W, **_: svd_spectrum(W), ()),
    "asvd_mean": (lambda W, x_rep, **_: asvd_mean_spectrum(W, x_rep), ("x_rep",)),
    "asvd_whiten": (lambda W, H, damp, **_: asvd_whiten_spectrum(W, H, damp), ("H",)),
    "svdllm": (lambda W, G, **_: svdllm_spectrum(W, G), ("G",)),
    "svdllm_v2": (lambda W, G, **_: svdllm_v2_spectrum(W, G), ("G",)),
    "dobi": (lambda W, G, **_: dobi_spectrum(W, G), ("G",)),
    "asvd": (lambda W, abs_mean, alpha, **_: asvd_scaled_spectrum(W, abs_mean, alpha), ("abs_mean",)),
    "fwsvd": (lambda W, fisher, **_: fwsvd_spectrum(W, fisher), ("fisher",)),
    "whiten_fisher": (lambda W, H, fisher, damp, **_: whiten_fisher_spectrum(W, H, fisher, damp), ("H", "fisher")),
}


def decompose(method: str, W: Tensor, *, damp: float = 1e-4, alpha: float = 0.5,
              **stats: Tensor | None) -> Spectrum:
    """Spectrum of W (in x out) by `method` (a key of METHODS), from the statistics it needs
    (keyword arguments named as in STATISTICS; the others may be None or absent)."""
    if method not in METHODS:
        raise ValueError(f"unknown decomposition method {method!r}; allowed: {sorted(METHODS)}")
    build, needs = METHODS[method]
    missing = [n for n in needs if stats.get(n) is None]
    if missing:
        hint = ", ".join(f"{n}=..." for n in missing)
        raise ValueError(f"method {method!r} needs statistic(s) {missing} (pass {hint})")
    return build(W, **{n: stats[n] for n in needs}, damp=damp, alpha=alpha)
