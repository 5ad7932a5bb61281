"""One ``nn.Module`` per error-compensation type Z (Eq 1's ``+ X Z`` term, Sec 3.3).

Each module computes ``x ↦ x Z`` for a fixed in × out Z, stores Z in torch's layout and is
built from the math layer's one-layer `ZParams` (paper layout) by `load`, the one place that
layout is converted. Adding a Z type = a math class in `amrc_exp.math.compensate`, a module
here registered in `Z_MODULES`, and a yaml in `conf/z_type/`.

* ``lowrank`` Z = G Yᵀ: ``down = Gᵀ`` (q × in), ``up = Y`` (out × q);
* ``diagonal``: ``diag`` (min(in, out)), ``Z[j, j] = diag[j]``;
* ``sparse_structured`` (k non-zero rows of Z = k input channels): ``rows`` (k,) index buffer,
  ``values`` (k × out) = those rows;
* ``sparse_unstructured``, CSR over Z's rows: ``crow`` (in + 1,), ``cols`` (nnz,), ``values`` (nnz,).

Index buffers are int32, the width an export stores; they count as parameters (Table 1),
matching ``math.compensate.z_param_count``.
"""

from __future__ import annotations

from typing import ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from amrc_exp.math.compensate import ZParams

__all__ = ["Z_MODULES", "ZModule", "LowRankZ", "DiagonalZ", "SparseStructuredZ", "SparseUnstructuredZ", "z_module"]


class ZModule(nn.Module):
    """``x Z`` for one layer's Z. `size` is q, k rows, nnz or min(in, out), as the type defines."""

    kind: ClassVar[str]

    def __init__(self, in_features: int, out_features: int, size: int,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if size < 0:
            raise ValueError(f"Z size must be >= 0, got {size}")
        self.in_features, self.out_features, self.size = in_features, out_features, size
        self._fk = {"device": device, "dtype": dtype}
        self._ik = {"device": device, "dtype": torch.int32}

    @staticmethod
    def size_of(params: ZParams) -> int:
        """The `size` argument that holds `params`."""
        raise NotImplementedError

    def load(self, params: ZParams) -> None:
        """Copy a one-layer ZParams (paper layout, with or without the leading layer dim)."""
        raise NotImplementedError

    def dense(self) -> Tensor:
        """Z in torch layout (out × in), materialised. For tests and analysis only."""
        raise NotImplementedError

    def index_buffers(self) -> list[tuple[str, Tensor, int]]:
        """(name, buffer, bound) of index buffers; every stored value is <= bound."""
        return []

    def fused(self, down: Tensor, up: Tensor) -> Optional[tuple[Tensor, Tensor]]:
        """``(x·down_f)·up_f`` factors computing ``x U Vᵀ + x Z`` in one pair of matmuls, if Z
        has that form (low-rank); None otherwise."""
        return None

    def extra_repr(self) -> str:
        return f"size={self.size}"


def _one(params: ZParams, key: str, dims: int) -> Tensor:
    """`params.tensors[key]` without the leading layer dim of a one-layer batch."""
    t = params.tensors[key]
    if t.dim() == dims + 1:
        if t.shape[0] != 1:
            raise ValueError(f"Z tensor {key} holds {t.shape[0]} layers; pass zp.layer(i)")
        t = t[0]
    return t


class LowRankZ(ZModule):
    kind = "lowrank"

    def __init__(self, in_features: int, out_features: int, size: int, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, size, device, dtype)
        self.down = nn.Parameter(torch.zeros(size, in_features, **self._fk))  # Gᵀ
        self.up = nn.Parameter(torch.zeros(out_features, size, **self._fk))  # Y

    @staticmethod
    def size_of(params: ZParams) -> int:
        return int(params.tensors["G"].shape[-1])

    def load(self, params: ZParams) -> None:
        with torch.no_grad():
            self.down.copy_(_one(params, "G", 2).T)
            self.up.copy_(_one(params, "Y", 2))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(F.linear(x, self.down), self.up)  # (x G) Yᵀ

    def dense(self) -> Tensor:
        return self.up @ self.down

    def fused(self, down: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
        # Concatenated on every call (differentiable, so fine-tuning sees the stored
        # parameters): (r+q)·(in+out) element moves against n·(r+q)·(in+out) multiply-adds.
        return torch.cat((down, self.down), 0), torch.cat((up, self.up), 1)


class DiagonalZ(ZModule):
    kind = "diagonal"

    def __init__(self, in_features: int, out_features: int, size: int = 0, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, min(in_features, out_features), device, dtype)
        self.diag = nn.Parameter(torch.zeros(self.size, **self._fk))

    @staticmethod
    def size_of(params: ZParams) -> int:
        return int(params.tensors["d"].shape[-1])

    def load(self, params: ZParams) -> None:
        with torch.no_grad():
            self.diag.copy_(_one(params, "d", 1))

    def forward(self, x: Tensor) -> Tensor:
        # x Z with Z = diag(d) padded to in × out touches only the first min(in, out) channels.
        return F.pad(x[..., : self.size] * self.diag, (0, self.out_features - self.size))

    def dense(self) -> Tensor:
        z = self.diag.new_zeros(self.out_features, self.in_features)
        idx = torch.arange(self.size, device=z.device)
        z[idx, idx] = self.diag
        return z


class SparseStructuredZ(ZModule):
    kind = "sparse_structured"

    def __init__(self, in_features: int, out_features: int, size: int, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, size, device, dtype)
        self.register_buffer("rows", torch.zeros(size, **self._ik))
        self.values = nn.Parameter(torch.zeros(size, out_features, **self._fk))

    @staticmethod
    def size_of(params: ZParams) -> int:
        return int(params.tensors["rows"].shape[-1])

    def load(self, params: ZParams) -> None:
        rows = _one(params, "rows", 1).reshape(-1).long()
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= self.in_features
                             or rows.unique().numel() != rows.numel()):
            raise ValueError(f"structured Z rows must be distinct and in [0, {self.in_features})")
        with torch.no_grad():
            self.rows.copy_(rows)
            self.values.copy_(_one(params, "values", 2))

    def forward(self, x: Tensor) -> Tensor:
        return x.index_select(-1, self.rows.long()) @ self.values  # X[:, rows] Z[rows]

    def dense(self) -> Tensor:
        z = self.values.new_zeros(self.out_features, self.in_features)
        z[:, self.rows.long()] = self.values.T
        return z

    def index_buffers(self) -> list[tuple[str, Tensor, int]]:
        return [("rows", self.rows, self.in_features - 1)]


class SparseUnstructuredZ(ZModule):
    kind = "sparse_unstructured"

    def __init__(self, in_features: int, out_features: int, size: int, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, size, device, dtype)
        self.register_buffer("crow", torch.zeros(in_features + 1, **self._ik))
        self.register_buffer("cols", torch.zeros(size, **self._ik))
        self.values = nn.Parameter(torch.zeros(size, **self._fk))

    @staticmethod
    def size_of(params: ZParams) -> int:
        return int(params.tensors["index"].shape[-1])

    def load(self, params: ZParams) -> None:
        crow, cols, values = _csr_from_flat(_one(params, "index", 1), _one(params, "values", 1),
                                            self.in_features, self.out_features)
        with torch.no_grad():
            self.crow.copy_(crow)
            self.cols.copy_(cols)
            self.values.copy_(values)

    def forward(self, x: Tensor) -> Tensor:
        """x Z with Z stored as COO; a sparse-dense product, never the dense in × out Z."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        compute = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        indices, order = self._coo()
        # Zᵀ (out × in) @ Xᵀ (in × M) -> (out × M): sparse on the left, as torch.sparse.mm wants.
        zt = torch.sparse_coo_tensor(indices, self.values[order].to(compute), (self.out_features, self.in_features),
                                     is_coalesced=True, check_invariants=False)
        out = torch.sparse.mm(zt, x2.to(compute).T).T
        return out.to(x.dtype).reshape(*lead, self.out_features)

    def _coo(self) -> tuple[Tensor, Tensor]:
        """Zᵀ's COO indices, sorted (coalesced), and the order that sorts `values` into them.

        Built once per index state, not per forward (the CSR expansion is a host sync and the
        sort a coalesce); rebuilt only when the index buffers change (load, load_state_dict, .to)."""
        key = (self.crow.data_ptr(), self.cols.data_ptr(), self.crow._version, self.cols._version, self.crow.device)
        if getattr(self, "_coo_key", None) != key:
            rows, cols = self._rows(), self.cols.long()
            order = torch.argsort(cols * self.in_features + rows)  # row-major in Zᵀ (out × in)
            self._coo_cache = (torch.stack([cols[order], rows[order]]), order)
            self._coo_key = key
        return self._coo_cache

    def dense(self) -> Tensor:
        z = self.values.new_zeros(self.out_features, self.in_features)
        z.index_put_((self.cols.long(), self._rows()), self.values, accumulate=True)
        return z

    def _rows(self) -> Tensor:
        """Row index of every stored entry, expanded from the CSR row pointers."""
        counts = (self.crow[1:] - self.crow[:-1]).long()
        return torch.repeat_interleave(torch.arange(self.in_features, device=counts.device), counts)

    def index_buffers(self) -> list[tuple[str, Tensor, int]]:
        return [("crow", self.crow, self.size), ("cols", self.cols, self.out_features - 1)]


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


Z_MODULES: dict[str, type[ZModule]] = {m.kind: m for m in (LowRankZ, DiagonalZ, SparseStructuredZ, SparseUnstructuredZ)}


def z_module(z_type: str, in_features: int, out_features: int, size: int,
             device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Optional[ZModule]:
    """The empty Z module of `z_type` ("none": no module)."""
    if z_type == "none":
        return None
    if z_type not in Z_MODULES:
        raise ValueError(f"unknown z_type {z_type!r}; allowed: {('none', *Z_MODULES)}")
    return Z_MODULES[z_type](in_features, out_features, size, device=device, dtype=dtype)
