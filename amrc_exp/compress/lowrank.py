"""The compressed linear layer and the one-call module swap (Eq 1, App. A).

Conventions. The paper writes a layer as ``O = X W + b`` with ``W ∈ R^{in×out}`` and
approximates ``W ≈ U Vᵀ + Z`` (Eq 1) with ``U ∈ R^{in×r}``, ``V ∈ R^{out×r}``. torch's
``nn.Linear`` stores ``weight = Wᵀ`` (out × in). `LowRankLinear` stores its factors in torch's
layout so each half is an ordinary ``F.linear``:

* ``down = Uᵀ`` (r × in), ``up = V`` (out × r): ``X U Vᵀ = F.linear(F.linear(X, down), up)``;
* low-rank Z = G Yᵀ: ``z_down = Gᵀ`` (q × in), ``z_up = Y`` (out × q);
* diagonal Z: ``z_diag`` (min(in, out)), ``Z[j, j] = z_diag[j]``;
* structured sparse Z (k non-zero rows of Z, i.e. k input channels): ``z_rows`` (k,) index
  buffer and ``z_values`` (k × out) = those rows of Z;
* unstructured sparse Z, CSR over Z's rows: ``z_crow`` (in + 1,) row pointers, ``z_cols``
  (nnz,) column indices and ``z_values`` (nnz,), row-major.

Index buffers are int32, the width an export stores.

The forward follows App. A's order (Eq 14): ``(X U) Vᵀ + (X G) Yᵀ + b``, never forming
``U Vᵀ`` (Eq 13), so it costs ``n·(in+out)·(r+q)`` multiplications instead of ``n·in·out``.
For low-rank Z on at least `FUSE_MIN_ROWS` rows both paths run as one pair of matmuls,
``(X [U | G]) [V | Y]ᵀ + b``, the factors concatenated on the fly (no second copy is kept).

Parameter accounting (Table 1, Table 2): a sparse Z's index storage is counted as
parameters, one per stored index, matching ``amrc_exp.math.compensate.z_param_count``
(structured: k·out + k; unstructured CSR: 2·nnz + in + 1).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Z_TYPES",
    "LayerPlan",
    "LowRankLinear",
    "compress_",
    "count_params",
]

Z_TYPES: tuple[str, ...] = ("none", "lowrank", "diagonal", "sparse_structured", "sparse_unstructured")
# Low-rank Z: from this many rows (tokens) on, x·[U | G] then ·[V | Y]ᵀ in one pair of matmuls
# wins; below it, concatenating the factors on every call costs more than it saves (measured
# on CPU, one thread, DeiT-S/B layer shapes: break-even between 128 and 384 rows).
FUSE_MIN_ROWS = 384


class LowRankLinear(nn.Module):
    """``y = (x U) Vᵀ + x Z + b`` with ``U Vᵀ`` never materialised (Eq 1, App. A).

    Args:
        in_features, out_features: the replaced ``nn.Linear``'s shape.
        rank: r, the rank of ``U Vᵀ``.
        bias: keep a bias vector (out,).
        z_type: one of `Z_TYPES`.
        z_size: the size of Z: q for ``lowrank``, k (rows) for ``sparse_structured``, nnz for
            ``sparse_unstructured``; ignored for ``diagonal`` (always min(in, out)) and ``none``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        z_type: str = "none",
        z_size: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if z_type not in Z_TYPES:
            raise ValueError(f"unknown z_type {z_type!r}; allowed: {Z_TYPES}")
        if rank < 0 or z_size < 0:
            raise ValueError(f"rank and z_size must be >= 0, got {rank}, {z_size}")
        fk = {"device": device, "dtype": dtype}
        ik = {"device": device, "dtype": torch.int32}  # int32: what an export stores
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.z_type = z_type
        self.down = nn.Parameter(torch.zeros(rank, in_features, **fk))  # Uᵀ
        self.up = nn.Parameter(torch.zeros(out_features, rank, **fk))  # V
        self.bias = nn.Parameter(torch.zeros(out_features, **fk)) if bias else None
        if z_type == "lowrank":
            self.z_size = z_size
            self.z_down = nn.Parameter(torch.zeros(z_size, in_features, **fk))  # Gᵀ
            self.z_up = nn.Parameter(torch.zeros(out_features, z_size, **fk))  # Y
        elif z_type == "diagonal":
            self.z_size = min(in_features, out_features)
            self.z_diag = nn.Parameter(torch.zeros(self.z_size, **fk))
        elif z_type == "sparse_structured":
            self.z_size = z_size
            self.register_buffer("z_rows", torch.zeros(z_size, **ik))
            self.z_values = nn.Parameter(torch.zeros(z_size, out_features, **fk))
        elif z_type == "sparse_unstructured":
            self.z_size = z_size
            self.register_buffer("z_crow", torch.zeros(in_features + 1, **ik))
            self.register_buffer("z_cols", torch.zeros(z_size, **ik))
            self.z_values = nn.Parameter(torch.zeros(z_size, **fk))
        else:
            self.z_size = 0

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_plan(
        cls,
        plan: "LayerPlan",
        bias: Optional[Tensor] = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> "LowRankLinear":
        """Build from paper-layout factors; `bias` is used when the plan carries none."""
        U, V = plan.U, plan.V
        if U.ndim != 2 or V.ndim != 2 or U.shape[1] != V.shape[1]:
            raise ValueError(f"{plan.name}: U {tuple(U.shape)} and V {tuple(V.shape)} must be in×r and out×r")
        n_in, n_out, r = U.shape[0], V.shape[0], U.shape[1]
        b = plan.bias if plan.bias is not None else bias
        dtype = dtype or U.dtype
        z_size = plan.z_size()
        m = cls(n_in, n_out, r, bias=b is not None, z_type=plan.z_type, z_size=z_size,
                device=device, dtype=dtype)
        with torch.no_grad():
            m.down.copy_(U.T)
            m.up.copy_(V)
            if b is not None:
                m.bias.copy_(b)
            if plan.z_type == "lowrank":
                m.z_down.copy_(plan.G.T)
                m.z_up.copy_(plan.Y)
            elif plan.z_type == "diagonal":
                m.z_diag.copy_(plan.d)
            elif plan.z_type == "sparse_structured":
                rows = plan.indices.reshape(-1).long()
                if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= n_in
                                     or rows.unique().numel() != rows.numel()):
                    raise ValueError(f"{plan.name}: structured Z rows must be distinct and in [0, {n_in})")
                m.z_rows.copy_(rows)
                m.z_values.copy_(plan.values)
            elif plan.z_type == "sparse_unstructured":
                crow, cols, values = _csr_from_flat(plan.indices, plan.values, n_in, n_out)
                m.z_crow.copy_(crow)
                m.z_cols.copy_(cols)
                m.z_values.copy_(values)
        return m

    # ------------------------------------------------------------------ compute
    def forward(self, x: Tensor) -> Tensor:
        if self.z_type == "lowrank" and x.numel() >= FUSE_MIN_ROWS * self.in_features:
            # Both low-rank paths in one pair of matmuls: (x [U | G]) [V | Y]ᵀ + b.
            down, up = self.fused_factors()
            return F.linear(F.linear(x, down), up, self.bias)
        # App. A (Eq 14): (x U) then · Vᵀ; the r-wide intermediate is the whole saving.
        y = F.linear(F.linear(x, self.down), self.up, self.bias)
        if self.z_type == "lowrank":  # few rows: two thin paths beat concatenating the factors
            y = y + F.linear(F.linear(x, self.z_down), self.z_up)  # (x G) Yᵀ
        elif self.z_type == "diagonal":
            # x Z with Z = diag(d) padded to in × out touches only the first min(in, out) channels.
            zx = x[..., : self.z_size] * self.z_diag
            y = y + F.pad(zx, (0, self.out_features - self.z_size))
        elif self.z_type == "sparse_structured":
            y = y + x.index_select(-1, self.z_rows.long()) @ self.z_values  # X[:, rows] Z[rows]
        elif self.z_type == "sparse_unstructured":
            y = y + self._sparse_unstructured(x)
        return y

    def fused_factors(self) -> tuple[Tensor, Tensor]:
        """Low-rank Z only: ``[U | G]ᵀ`` ((r+q) × in) and ``[V | Y]`` (out × (r+q)).

        Concatenated on every call (differentiable, so training and fine-tuning see the
        stored parameters): the copy costs (r+q)·(in+out) element moves, against
        n·(r+q)·(in+out) multiply-adds for n tokens. The stored parameters and state-dict
        keys (down, up, z_down, z_up) are unchanged."""
        return torch.cat((self.down, self.z_down), 0), torch.cat((self.up, self.z_up), 1)

    def _sparse_unstructured(self, x: Tensor) -> Tensor:
        """x Z with Z stored as COO; a sparse-dense product, never the dense in × out Z."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        compute = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        # Zᵀ (out × in) @ Xᵀ (in × M) -> (out × M): sparse on the left, as torch.sparse.mm wants.
        zt = torch.sparse_coo_tensor(
            torch.stack([self.z_cols.long(), self._csr_rows()]),
            self.z_values.to(compute),
            (self.out_features, self.in_features),
            check_invariants=False,
        )
        out = torch.sparse.mm(zt, x2.to(compute).T).T
        return out.to(x.dtype).reshape(*lead, self.out_features)

    # ------------------------------------------------------------------ analysis
    def dense_z(self) -> Tensor:
        """Z in torch layout (out × in), materialised. For tests and analysis only."""
        Zt = self.down.new_zeros(self.out_features, self.in_features)
        if self.z_type == "lowrank":
            Zt = self.z_up @ self.z_down
        elif self.z_type == "diagonal":
            idx = torch.arange(self.z_size, device=Zt.device)
            Zt[idx, idx] = self.z_diag
        elif self.z_type == "sparse_structured":
            Zt[:, self.z_rows.long()] = self.z_values.T
        elif self.z_type == "sparse_unstructured":
            Zt.index_put_((self.z_cols.long(), self._csr_rows()), self.z_values, accumulate=True)
        return Zt

    def dense_weight(self) -> Tensor:
        """(U Vᵀ + Z)ᵀ (out × in), materialised. For tests and analysis only."""
        return self.up @ self.down + self.dense_z()

    def _csr_rows(self) -> Tensor:
        """Row index of every stored entry, expanded from the CSR row pointers."""
        counts = (self.z_crow[1:] - self.z_crow[:-1]).long()
        return torch.repeat_interleave(torch.arange(self.in_features, device=counts.device), counts)

    def index_buffers(self) -> list[tuple[str, Tensor, int]]:
        """(name, buffer, bound) of the sparse-Z index buffers; every value is < bound + 1."""
        bounds = {"z_rows": self.in_features - 1, "z_cols": self.out_features - 1, "z_crow": self.z_size}
        return [(n, b, bounds[n]) for n, b in self.named_buffers(recurse=False) if n in bounds]

    def index_count(self) -> int:
        """Stored sparse indices (counted as parameters, like math.compensate.z_param_count)."""
        return sum(b.numel() for _, b, _ in self.index_buffers())

    def param_count(self) -> int:
        """r·(in+out) + Z's parameters (incl. index storage) + bias."""
        return sum(p.numel() for p in self.parameters(recurse=False)) + self.index_count()

    def extra_repr(self) -> str:
        z = "" if self.z_type == "none" else f", z_type={self.z_type}, z_size={self.z_size}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}{z}, bias={self.bias is not None}")

    def spec(self) -> dict:
        """The constructor arguments, for export/reload."""
        return {"in_features": self.in_features, "out_features": self.out_features,
                "rank": self.rank, "bias": self.bias is not None, "z_type": self.z_type,
                "z_size": self.z_size}


@dataclass
class LayerPlan:
    """One layer's compressed form in the paper's layout (W ≈ U Vᵀ + Z, W ∈ R^{in×out}).

    Attributes:
        name: qualified module name in the model (``blocks.3.mlp.fc1``).
        U: in × r.  V: out × r.
        z_type: one of `Z_TYPES`.
        G, Y: low-rank Z = G Yᵀ, in × q and out × q.
        d: diagonal Z, length min(in, out).
        indices, values: sparse Z. ``sparse_structured``: indices (k,) = non-zero rows of Z
            (input channels), values (k × out). ``sparse_unstructured``: indices (nnz,) = flat
            row-major positions ``row·out + col`` in Z, values (nnz,) (the layout of
            ``math.compensate``'s ``ZParams``).
        bias: (out,); None keeps the replaced layer's own bias.
    """

    name: str
    U: Tensor
    V: Tensor
    z_type: str = "none"
    G: Optional[Tensor] = None
    Y: Optional[Tensor] = None
    d: Optional[Tensor] = None
    indices: Optional[Tensor] = None
    values: Optional[Tensor] = None
    bias: Optional[Tensor] = None

    @property
    def rank(self) -> int:
        return int(self.U.shape[1])

    def state_dict(self) -> dict[str, Any]:
        """The fields as plain tensors and strings (``torch.save``-able); see `from_state_dict`."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "LayerPlan":
        return cls(**state)

    @classmethod
    def from_z(
        cls,
        name: str,
        U: Tensor,
        V: Tensor,
        z_type: str = "none",
        z: Optional[dict[str, Tensor] | Any] = None,
        bias: Optional[Tensor] = None,
    ) -> "LayerPlan":
        """Build from ``math.compensate`` output: `z` is a one-layer ``ZParams`` (e.g.
        ``zp.layer(i)``) or its ``tensors`` dict, with or without the leading layer dim of 1
        (keys: lowrank G, Y; diagonal d; sparse_structured rows, values;
        sparse_unstructured index, values)."""
        tensors = getattr(z, "tensors", z) or {}
        if getattr(z, "ztype", z_type) != z_type:
            raise ValueError(f"{name}: Z params are {z.ztype!r}, plan says {z_type!r}")
        expect = {"G": 2, "Y": 2, "d": 1, "rows": 1, "index": 1,
                  "values": 2 if z_type == "sparse_structured" else 1}
        t = {}
        for k, v in tensors.items():
            if k in expect and v.dim() == expect[k] + 1:
                if v.shape[0] != 1:
                    raise ValueError(f"{name}: Z tensor {k} holds {v.shape[0]} layers; pass zp.layer(i)")
                v = v[0]
            t[k] = v
        if z_type == "lowrank":
            return cls(name, U, V, z_type, G=t["G"], Y=t["Y"], bias=bias)
        if z_type == "diagonal":
            return cls(name, U, V, z_type, d=t["d"], bias=bias)
        if z_type == "sparse_structured":
            return cls(name, U, V, z_type, indices=t["rows"], values=t["values"], bias=bias)
        if z_type == "sparse_unstructured":
            return cls(name, U, V, z_type, indices=t["index"], values=t["values"], bias=bias)
        if z_type != "none":
            raise ValueError(f"{name}: unknown z_type {z_type!r}; allowed: {Z_TYPES}")
        return cls(name, U, V, "none", bias=bias)

    def z_size(self) -> int:
        if self.z_type == "lowrank":
            assert self.G is not None and self.Y is not None, f"{self.name}: lowrank Z needs G and Y"
            return int(self.G.shape[1])
        if self.z_type == "diagonal":
            assert self.d is not None, f"{self.name}: diagonal Z needs d"
            return int(self.d.numel())
        if self.z_type in ("sparse_structured", "sparse_unstructured"):
            assert self.indices is not None and self.values is not None, f"{self.name}: sparse Z needs indices, values"
            return int(self.indices.shape[-1])
        if self.z_type != "none":
            raise ValueError(f"{self.name}: unknown z_type {self.z_type!r}; allowed: {Z_TYPES}")
        return 0


def _csr_from_flat(index: Tensor, values: Tensor, n_in: int, n_out: int) -> tuple[Tensor, Tensor, Tensor]:
    """CSR (row pointers, column indices, values) of Z (in × out) from flat row-major positions."""
    index = index.reshape(-1).long().cpu()
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= n_in * n_out):
        raise ValueError(f"sparse Z index out of range for a {n_in}×{n_out} matrix")
    order = torch.argsort(index, stable=True)  # row-major: CSR wants rows ascending
    index = index[order]
    if index.numel() > 1 and bool((index[1:] == index[:-1]).any()):
        raise ValueError("sparse Z index has duplicate positions")
    rows, cols = index // n_out, index % n_out
    crow = torch.zeros(n_in + 1, dtype=torch.long)
    crow[1:] = torch.bincount(rows, minlength=n_in).cumsum(0)
    return crow, cols, values.reshape(-1)[order.to(values.device)]


def compress_(model: nn.Module, plans: Any) -> nn.Module:
    """Swap every planned ``nn.Linear`` of `model` for a `LowRankLinear`, in place.

    One call, like torchao's ``quantize_``: `plans` is a `CompressionReport` (its ``plans``),
    a {name: LayerPlan} dict or a list of plans. Each new module takes the replaced layer's
    dtype and device, and its bias unless the plan carries one. Layers not in `plans` are
    left untouched. Returns `model`.
    """
    plans = getattr(plans, "plans", plans)  # a CompressionReport
    if isinstance(plans, (list, tuple)):
        plans = {p.name: p for p in plans}
    modules = dict(model.named_modules())
    for name, plan in plans.items():
        old = modules.get(name)
        if not isinstance(old, nn.Linear):
            raise KeyError(f"compress_: {name!r} is not an nn.Linear of the model "
                           f"(got {type(old).__name__ if old is not None else 'nothing'})")
        if (plan.U.shape[0], plan.V.shape[0]) != (old.in_features, old.out_features):
            raise ValueError(f"compress_: plan for {name!r} is {plan.U.shape[0]}→{plan.V.shape[0]}, "
                             f"layer is {old.in_features}→{old.out_features}")
        new = LowRankLinear.from_plan(plan, bias=old.bias.detach() if old.bias is not None else None,
                                      device=old.weight.device, dtype=old.weight.dtype)
        new.train(old.training)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
    return model


def count_params(model: nn.Module) -> int:
    """Σ parameter numel (shared ones once) + the sparse-Z index storage of `LowRankLinear`s."""
    n = sum(p.numel() for p in model.parameters())
    return n + sum(m.index_count() for m in model.modules() if isinstance(m, LowRankLinear))
