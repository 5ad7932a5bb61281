"""Layer-wise error compensation Z (paper Sec 3.3, Eq 10-12, Table 1).

With U, V fixed and R = W - U V^T, Eq 10's loss is the quadratic form
    L(Z) = tr((Z - R)^T H (Z - R)) / N,   H = sum_i X_i^T X_i / ||X_i W||_F^2,
so a gradient step costs O(in^2 q) whatever the number of calibration samples. Everything
here works on a batch of same-shape layers (leading layer dim B) so layers are fitted together.
Shapes: R (B, in, out), H (B, in, in); a 2-D R / H is treated as B = 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from .decompose import asvd_whiten_spectrum, damped
from .error import normalized_error

__all__ = [
    "ZParams",
    "ZType",
    "Z_TYPES",
    "z_param_count",
    "z_dense",
    "residual",
    "residual_error",
    "fit_gd",
    "fit_closed_form",
]


@dataclass
class ZParams:
    """Z for a batch of same-shape layers. `tensors` have a leading layer dim; which keys
    exist depends on `ztype` (lowrank: G, Y; diagonal: d; sparse_unstructured: values, index
    (flat row-major positions); sparse_structured: values, rows; none: values (B, 0))."""

    ztype: str
    n_in: int
    n_out: int
    tensors: dict[str, Tensor]

    @property
    def n_layers(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    @property
    def param_count(self) -> int:
        """Stored parameters per layer, counted from the tensors' sizes."""
        return Z_TYPES[self.ztype].count(self.n_in, self.n_out, Z_TYPES[self.ztype].size_of(self.tensors))

    def layer(self, i: int) -> "ZParams":
        """The i-th layer as a batch of one."""
        return ZParams(self.ztype, self.n_in, self.n_out, {k: v[i : i + 1] for k, v in self.tensors.items()})


def _psd_solve(a: Tensor, b: Tensor) -> Tensor:
    """Solve a x = b for symmetric positive (semi)definite a (batched); pinv if Cholesky fails."""
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info.max()) == 0:
        return torch.cholesky_solve(b, chol)
    return torch.linalg.pinv(a, hermitian=True) @ b


def _sum2(x: Tensor) -> Tensor:
    return x.sum(dim=(-2, -1))


class ZType(Protocol):
    """What every Z type provides (tensors t are batched; r, h, hr = R, H, H R, float64)."""

    trainable: tuple[str, ...]  # keys of t that gradient descent updates; the rest is structure

    def size(self, n_in: int, n_out: int, fraction: float) -> int: ...  # q, k, k_rows, ...
    def size_of(self, t: dict[str, Tensor]) -> int: ...  # the same, read off fitted tensors
    def count(self, n_in: int, n_out: int, size: int) -> int: ...  # stored parameters per layer
    def init(self, r: Tensor, h: Tensor, fraction: float, gen: torch.Generator, damp: float) -> dict[str, Tensor]: ...
    def dense(self, t: dict[str, Tensor], n_in: int, n_out: int) -> Tensor: ...
    def quad(self, t: dict[str, Tensor], h: Tensor, hr: Tensor) -> Tensor: ...  # tr(Z^T H Z) - 2 tr(Z^T H R)
    def closed_form(
        self, r: Tensor, h: Tensor, hr: Tensor, t: dict[str, Tensor], damp: float
    ) -> dict[str, Tensor]: ...


class _LowRank:
    """Z = G Y^T, G (in x q), Y (out x q), q(in + out) ~ fraction * in * out (paper's 5%)."""

    trainable = ("G", "Y")

    @staticmethod
    def size(n_in: int, n_out: int, fraction: float) -> int:
        return max(1, math.floor(fraction * n_in * n_out / (n_in + n_out)))

    @staticmethod
    def size_of(t: dict[str, Tensor]) -> int:
        return t["G"].shape[-1]

    @staticmethod
    def count(n_in: int, n_out: int, q: int) -> int:
        return q * (n_in + n_out)

    def init(self, r: Tensor, h: Tensor, fraction: float, gen: torch.Generator, damp: float) -> dict[str, Tensor]:
        # Eq 11-12 with G = Y = 0 is a saddle (both gradients vanish): start G small and random,
        # Y = 0, so G Y^T is still exactly 0. The same draw for every layer (scaled by the
        # layer's residual size) keeps a batched fit identical to fitting layers one by one.
        # G Y^T ~ R needs factors of size ~sqrt(rms R); a tenth of that is a gentle start.
        b, n_in, n_out = r.shape
        q = self.size(n_in, n_out, fraction)
        g0 = torch.randn(n_in, q, generator=gen, dtype=torch.float64).to(r.device)
        rms = r.pow(2).mean(dim=(-2, -1)).sqrt()
        return {"G": 0.1 * rms.sqrt()[:, None, None] * g0, "Y": r.new_zeros(b, n_out, q)}

    @staticmethod
    def dense(t: dict[str, Tensor], n_in: int, n_out: int) -> Tensor:
        return t["G"] @ t["Y"].mT

    @staticmethod
    def quad(t: dict[str, Tensor], h: Tensor, hr: Tensor) -> Tensor:
        g, y = t["G"], t["Y"]  # never forms the in x out Z: O(in^2 q + in out q)
        return _sum2((g.mT @ (h @ g)) * (y.mT @ y)) - 2 * _sum2(g * (hr @ y))

    @staticmethod
    def grad(t: dict[str, Tensor], h: Tensor, hr: Tensor) -> dict[str, Tensor]:
        """Gradient of `quad` (H symmetric): d/dG = 2(H G YᵀY - HR Y), d/dY = 2(Y GᵀHG - (HR)ᵀG).
        H G is formed once and shared: one in²q product per step where autograd needs two."""
        g, y = t["G"], t["Y"]
        hg = h @ g
        return {"G": 2 * (hg @ (y.mT @ y) - hr @ y), "Y": 2 * (y @ (g.mT @ hg) - hr.mT @ g)}

    def closed_form(self, r: Tensor, h: Tensor, hr: Tensor, t: dict[str, Tensor], damp: float) -> dict[str, Tensor]:
        # Whitened SVD of R: the exact rank-q optimum (Eckart-Young in the H metric).
        q = t["G"].shape[-1]
        fs = [asvd_whiten_spectrum(r[i], h[i], damp).factors(q, torch.float64) for i in range(r.shape[0])]
        return {"G": torch.stack([f[0] for f in fs]), "Y": torch.stack([f[1] for f in fs])}


class _Diagonal:
    """Z nonzero only at (i, i), i < min(in, out)."""

    trainable = ("d",)

    @staticmethod
    def size(n_in: int, n_out: int, fraction: float) -> int:
        return min(n_in, n_out)

    @staticmethod
    def size_of(t: dict[str, Tensor]) -> int:
        return t["d"].shape[-1]

    @staticmethod
    def count(n_in: int, n_out: int, m: int) -> int:
        return m

    def init(self, r: Tensor, h: Tensor, fraction: float, gen: torch.Generator, damp: float) -> dict[str, Tensor]:
        return {"d": r.new_zeros(r.shape[0], min(r.shape[1:]))}

    @staticmethod
    def dense(t: dict[str, Tensor], n_in: int, n_out: int) -> Tensor:
        m = t["d"].shape[-1]
        return torch.nn.functional.pad(torch.diag_embed(t["d"]), (0, n_out - m, 0, n_in - m))

    @staticmethod
    def quad(t: dict[str, Tensor], h: Tensor, hr: Tensor) -> Tensor:
        d = t["d"]
        m = d.shape[-1]
        hd = torch.diagonal(h, dim1=-2, dim2=-1)[..., :m]
        return (d**2 * hd).sum(-1) - 2 * (d * torch.diagonal(hr, dim1=-2, dim2=-1)).sum(-1)

    def closed_form(self, r: Tensor, h: Tensor, hr: Tensor, t: dict[str, Tensor], damp: float) -> dict[str, Tensor]:
        # Each column c holds one unknown: d_c = (H r_c)_c / (H_cc + damp * mean diag H).
        m = t["d"].shape[-1]
        den = torch.diagonal(damped(h, damp), dim1=-2, dim2=-1)[..., :m]
        num = torch.diagonal(hr, dim1=-2, dim2=-1)
        return {"d": torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num))}


class _SparseUnstructured:
    """Fixed mask of k = floor(fraction * in * out) entries, the top-k of |R_ij| sqrt(H_ii)
    (activation-aware magnitude). Stored as CSR: k values + k column indices + (in + 1) row
    pointers, all counted as parameter-equivalents."""

    trainable = ("values",)

    @staticmethod
    def size(n_in: int, n_out: int, fraction: float) -> int:
        return math.floor(fraction * n_in * n_out)

    @staticmethod
    def size_of(t: dict[str, Tensor]) -> int:
        return t["values"].shape[-1]

    @staticmethod
    def count(n_in: int, n_out: int, k: int) -> int:
        return 2 * k + n_in + 1

    def init(self, r: Tensor, h: Tensor, fraction: float, gen: torch.Generator, damp: float) -> dict[str, Tensor]:
        b, n_in, n_out = r.shape
        k = self.size(n_in, n_out, fraction)
        score = r.abs() * torch.diagonal(h, dim1=-2, dim2=-1).clamp_min(0).sqrt()[..., None]
        index = score.reshape(b, -1).topk(k, dim=-1).indices.sort(dim=-1).values
        return {"values": r.new_zeros(b, k), "index": index}

    @staticmethod
    def dense(t: dict[str, Tensor], n_in: int, n_out: int) -> Tensor:
        v = t["values"]
        flat = v.new_zeros(v.shape[0], n_in * n_out).scatter(1, t["index"], v)
        return flat.view(v.shape[0], n_in, n_out)

    def quad(self, t: dict[str, Tensor], h: Tensor, hr: Tensor) -> Tensor:
        z = self.dense(t, h.shape[-1], hr.shape[-1])  # O(in^2 out): the mask couples any rows
        return _sum2(z * (h @ z)) - 2 * _sum2(z * hr)

    def closed_form(self, r: Tensor, h: Tensor, hr: Tensor, t: dict[str, Tensor], damp: float) -> dict[str, Tensor]:
        # Columns decouple: z_{S_c, c} = (H_d)_{S_c S_c}^{-1} (H R)_{S_c, c}. The (layer, column)
        # systems are sorted by support size and solved in padded chunks (identity rows pad the
        # short supports), so the cost is ~sum |S_c|^3, not out * max |S_c|^3.
        b, n, out = r.shape
        mask = self.dense({"values": torch.ones_like(t["values"]), "index": t["index"]}, n, out) > 0
        hd = damped(h, damp)
        order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)  # support rows first
        order = order.permute(0, 2, 1).reshape(b * out, n)  # system p = (layer p // out, column p % out)
        rhs = hr.permute(0, 2, 1).reshape(b * out, n).gather(1, order)
        layer = torch.arange(b, device=r.device).repeat_interleave(out)
        counts = mask.sum(1).reshape(-1)
        by_size = torch.argsort(counts, stable=True)
        sizes = counts[by_size].tolist()
        sol = torch.zeros_like(rhs)
        lo = next((p for p, c in enumerate(sizes) if c > 0), len(sizes))
        while lo < len(sizes):
            hi = lo + 1  # grow the chunk while its padded systems stay under ~2^22 numbers
            while hi < len(sizes) and (hi + 1 - lo) * sizes[hi] ** 2 <= 2**22:
                hi += 1
            idx, s = by_size[lo:hi], sizes[hi - 1]
            rows = order[idx, :s]
            valid = torch.arange(s, device=r.device) < counts[idx][:, None]
            a = hd[layer[idx][:, None, None], rows[:, :, None], rows[:, None, :]]
            a = torch.where(valid[:, :, None] & valid[:, None, :], a, torch.eye(s, dtype=a.dtype, device=a.device))
            x = _psd_solve(a, torch.where(valid, rhs[idx, :s], 0.0)[..., None])[..., 0]
            sol[idx, :s] = torch.where(valid, x, 0.0)
            lo = hi
        z = torch.zeros_like(sol).scatter_(1, order, sol).view(b, out, n).mT
        return {"values": z.reshape(b, -1).gather(1, t["index"]), "index": t["index"]}


class _SparseStructured:
    """Whole rows of Z (input channels): k_rows = max(1, floor(fraction * in)), stored as
    k_rows * out values + k_rows row indices.

    Rows are chosen by greedy forward selection: the first pick maximizes the stand-alone gain
    ||(H R)_i||^2 / H_ii (the exact loss drop of fitting row i alone); each later pick maximizes
    the same gain conditioned on the rows already chosen (Schur-complement updates of H and
    H R), so correlated channels are not picked twice for the same error."""

    trainable = ("values",)

    @staticmethod
    def size(n_in: int, n_out: int, fraction: float) -> int:
        return max(1, math.floor(fraction * n_in))

    @staticmethod
    def size_of(t: dict[str, Tensor]) -> int:
        return t["rows"].shape[-1]

    @staticmethod
    def count(n_in: int, n_out: int, k: int) -> int:
        return k * n_out + k

    def init(self, r: Tensor, h: Tensor, fraction: float, gen: torch.Generator, damp: float) -> dict[str, Tensor]:
        b, n, out = r.shape
        k = min(n, self.size(n, out, fraction))
        hc, gc = damped(h, damp), h @ r  # conditional H and H R given the chosen rows
        chosen = torch.zeros(b, n, dtype=torch.bool, device=r.device)
        bi = torch.arange(b, device=r.device)
        for _ in range(k):
            piv = torch.diagonal(hc, dim1=-2, dim2=-1)
            gain = torch.where(piv > 0, gc.pow(2).sum(-1) / piv.clamp_min(1e-300), 0.0)
            j = gain.masked_fill(chosen, -math.inf).argmax(-1)  # ties: lowest index
            chosen[bi, j] = True
            col, pj = hc[bi, :, j], piv[bi, j].clamp_min(1e-300)  # (B, n), (B,)
            gc = gc - col[:, :, None] * gc[bi, j][:, None, :] / pj[:, None, None]
            hc = hc - col[:, :, None] * col[:, None, :] / pj[:, None, None]
        rows = chosen.nonzero()[:, 1].view(b, k)  # ascending per layer
        return {"values": r.new_zeros(b, k, out), "rows": rows}

    @staticmethod
    def _rows(t: dict[str, Tensor], width: int) -> Tensor:
        return t["rows"][..., None].expand(-1, -1, width)

    def dense(self, t: dict[str, Tensor], n_in: int, n_out: int) -> Tensor:
        v = t["values"]
        return v.new_zeros(v.shape[0], n_in, n_out).scatter(1, self._rows(t, n_out), v)

    def quad(self, t: dict[str, Tensor], h: Tensor, hr: Tensor) -> Tensor:
        v, rows = t["values"], self._rows(t, h.shape[-1])
        h_ss = h.gather(1, rows).gather(2, self._rows(t, v.shape[1]).mT)  # O(k^2 out)
        return _sum2(v * (h_ss @ v)) - 2 * _sum2(v * hr.gather(1, self._rows(t, hr.shape[-1])))

    def closed_form(self, r: Tensor, h: Tensor, hr: Tensor, t: dict[str, Tensor], damp: float) -> dict[str, Tensor]:
        # Z_S = (H_d)_SS^{-1} (H R)_S: one k x k system per layer, all output columns at once.
        k = t["rows"].shape[-1]
        h_ss = damped(h, damp).gather(1, self._rows(t, h.shape[-1])).gather(2, self._rows(t, k).mT)
        return {"values": _psd_solve(h_ss, hr.gather(1, self._rows(t, hr.shape[-1]))), "rows": t["rows"]}


class _NoZ:
    """No compensation: Z = 0, no parameters."""

    trainable: tuple[str, ...] = ()

    @staticmethod
    def size(n_in: int, n_out: int, fraction: float) -> int:
        return 0

    @staticmethod
    def size_of(t: dict[str, Tensor]) -> int:
        return 0

    @staticmethod
    def count(n_in: int, n_out: int, k: int) -> int:
        return 0

    def init(self, r: Tensor, h: Tensor, fraction: float, gen: torch.Generator, damp: float) -> dict[str, Tensor]:
        return {"values": r.new_zeros(r.shape[0], 0)}  # carries batch size, device and dtype

    @staticmethod
    def dense(t: dict[str, Tensor], n_in: int, n_out: int) -> Tensor:
        return t["values"].new_zeros(t["values"].shape[0], n_in, n_out)

    @staticmethod
    def quad(t: dict[str, Tensor], h: Tensor, hr: Tensor) -> Tensor:
        return h.new_zeros(h.shape[0])

    def closed_form(self, r: Tensor, h: Tensor, hr: Tensor, t: dict[str, Tensor], damp: float) -> dict[str, Tensor]:
        return dict(t)


Z_TYPES: dict[str, ZType] = {
    "lowrank": _LowRank(),
    "diagonal": _Diagonal(),
    "sparse_unstructured": _SparseUnstructured(),
    "sparse_structured": _SparseStructured(),
    "none": _NoZ(),
}


def _ztype(name: str) -> ZType:
    if name not in Z_TYPES:
        raise ValueError(f"unknown Z type {name!r}; allowed: {sorted(Z_TYPES)}")
    return Z_TYPES[name]


def z_param_count(ztype: str, n_in: int, n_out: int, fraction: float = 0.05) -> int:
    """Parameters Z adds to one in x out layer (index storage included for sparse types);
    known before fitting, for LayerSpec.z_params."""
    zt = _ztype(ztype)
    return zt.count(n_in, n_out, zt.size(n_in, n_out, fraction))


def z_dense(ztype: str, params: ZParams) -> Tensor:
    """Z as dense (B, in, out) matrices."""
    if params.ztype != ztype:
        raise ValueError(f"params are of Z type {params.ztype!r}, not {ztype!r}")
    return _ztype(ztype).dense(params.tensors, params.n_in, params.n_out)


def residual(W: Tensor, U: Tensor, V: Tensor) -> Tensor:
    """R = W - U V^T in float64 (batched or not)."""
    return W.to(torch.float64) - U.to(torch.float64) @ V.to(torch.float64).mT


def residual_error(W: Tensor, U: Tensor, V: Tensor, Z: Tensor | None, H: Tensor, n_samples: float | Tensor) -> Tensor:
    """Normalized Eq 5 error of U V^T + Z: tr((UV^T + Z - W)^T H (UV^T + Z - W)) / N, per layer
    (float64 tensor with the batch shape; 0-dim for one layer). Use a held-out H for Table 1."""
    d = -residual(W, U, V)
    if Z is not None:
        d = d + Z.to(d)
    return normalized_error(d, H, n_samples)


def _batch(r: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
    r = r.to(torch.float64)
    r = r[None] if r.dim() == 2 else r
    h = h.to(device=r.device, dtype=torch.float64)
    h = h[None] if h.dim() == 2 else h
    if h.shape[0] != r.shape[0] or h.shape[-1] != r.shape[1]:
        raise ValueError(f"H {tuple(h.shape)} does not match R {tuple(r.shape)}")
    return r, (h + h.mT) / 2


def _out(ztype: str, r: Tensor, t: dict[str, Tensor], dtype: torch.dtype) -> ZParams:
    cast = {k: (v.detach().to(dtype) if v.is_floating_point() else v) for k, v in t.items()}
    return ZParams(ztype, r.shape[1], r.shape[2], cast)


def fit_closed_form(
    ztype: str, R: Tensor, H: Tensor, *, fraction: float = 0.05, damp: float = 1e-4, dtype: torch.dtype = torch.float32
) -> ZParams:
    """Exact minimizer of Eq 10 for the given Z type (with relative damping damp * mean diag H):
    lowrank - whitened SVD of R; diagonal - one division per column; sparse (fixed mask) -
    small linear solves per column (unstructured) or per row set (structured)."""
    zt = _ztype(ztype)
    r, h = _batch(R, H)
    hr = h @ r
    t = zt.init(r, h, fraction, torch.Generator().manual_seed(0), damp)
    return _out(ztype, r, zt.closed_form(r, h, hr, t, damp), dtype)


def fit_gd(
    ztype: str,
    R: Tensor,
    H: Tensor,
    n_samples: float | Tensor,
    *,
    fraction: float = 0.05,
    lr: float = 1e-3,
    iters: int = 2000,
    seed: int = 0,
    damp: float = 1e-4,
    dtype: torch.dtype = torch.float32,
    n_checkpoints: int = 10,
    h_batches: Tensor | None = None,
    n_batches: Tensor | None = None,
) -> tuple[ZParams, dict[int, Tensor]]:
    """The paper's gradient-descent fit of Eq 10 (Adam, lr 1e-3, 2000 iterations), on the
    quadratic form with H R precomputed once. Sparse masks are fixed before fitting (`damp` is
    only used to pick structured rows). Returns Z and the loss history {step: loss per layer
    (float64, CPU)} at n_checkpoints + 1 evenly spaced steps, step 0 = no compensation; the
    history is always the full-calibration loss.

    Mini-batches (Sec 4.1 item 4, batch of 64 samples): pass the Grams of fixed sample chunks,
    `h_batches` (B, C, in, in) with their sample counts `n_batches` (B, C); each step then
    descends the Eq 10 loss of one seeded-random chunk. Without them every step uses the full
    Gram H (the exact expected gradient)."""
    zt = _ztype(ztype)
    r, h = _batch(R, H)
    hr = h @ r
    const = _sum2(r * hr)  # tr(R^T H R): the loss of Z = 0
    t = zt.init(r, h, fraction, torch.Generator().manual_seed(seed), damp)
    t = {k: (v.to(dtype).requires_grad_(k in zt.trainable) if v.is_floating_point() else v) for k, v in t.items()}
    h_, hr_ = h.to(dtype), hr.to(dtype)
    n = torch.as_tensor(n_samples, dtype=torch.float64, device=r.device)

    def loss(hc: Tensor, hrc: Tensor, cc: Tensor, nc: Tensor) -> Tensor:  # Eq 10 per layer
        return (zt.quad(t, hc, hrc).to(torch.float64) + cc) / nc

    full = (h_, hr_, const, n)
    pick = (lambda: full) if h_batches is None else _chunk_picker(r, h_batches, n_batches, dtype, seed)
    grad = getattr(zt, "grad", None)  # analytic gradient where the Z type has one (low-rank)
    marks = {round(i * iters / max(1, n_checkpoints)) for i in range(n_checkpoints + 1)}
    history: dict[int, Tensor] = {}
    # One fused kernel per step on CUDA (the loop is launch-bound there); foreach on the CPU.
    opt = torch.optim.Adam([t[k] for k in zt.trainable], lr=lr, fused=r.is_cuda or None) if zt.trainable else None
    for step in range(iters if opt is not None else 0):
        if step in marks:
            with torch.no_grad():
                history[step] = loss(*full).cpu()
        hc, hrc, cc, nc = pick()
        if grad is not None:
            with torch.no_grad():
                scale = (1.0 / nc).to(dtype)  # per layer: the loss is (quad + const) / n
                for k, gk in grad(t, hc, hrc).items():
                    t[k].grad = gk * scale.reshape(-1, *([1] * (gk.dim() - 1)))
        else:
            opt.zero_grad(set_to_none=True)
            # layers are independent: the sum's gradient is per layer
            loss(hc, hrc, cc, nc).sum().backward()
        opt.step()
    with torch.no_grad():
        history[iters] = loss(*full).cpu()
    history.setdefault(0, history[iters])  # no trainable values: Z never moved
    return _out(ztype, r, t, dtype), dict(sorted(history.items()))


def _chunk_picker(r: Tensor, h_batches: Tensor, n_batches: Tensor, dtype: torch.dtype, seed: int):
    """(H_c, H_c R, tr(Rᵀ H_c R), n_c) of one seeded-random chunk of samples per call
    (mini-batch GD): Eq 10's loss on that chunk is (quad(H_c, H_c R) + tr(Rᵀ H_c R)) / n_c."""
    hb = h_batches.to(device=r.device, dtype=torch.float64)
    hb = hb[None] if hb.dim() == 3 else hb
    if hb.shape[0] != r.shape[0] or hb.shape[-1] != r.shape[1]:
        raise ValueError(f"h_batches {tuple(hb.shape)} does not match R {tuple(r.shape)}")
    hb = (hb + hb.mT) / 2
    hrb = hb @ r[:, None]  # (B, C, in, out), once
    constb = _sum2(r[:, None] * hrb)  # tr(R^T H_c R) per layer and chunk
    nb = torch.as_tensor(n_batches, dtype=torch.float64, device=r.device).reshape(constb.shape)
    hb_, hrb_ = hb.to(dtype), hrb.to(dtype)
    picker = torch.Generator().manual_seed(seed + 1)

    def pick() -> tuple[Tensor, Tensor, Tensor, Tensor]:
        c = int(torch.randint(hb.shape[1], (1,), generator=picker))
        return hb_[:, c], hrb_[:, c], constb[:, c], nb[:, c]

    return pick
