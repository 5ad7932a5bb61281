"""The compressed linear layer and the one-call module swap (Eq 1, App. A).

Conventions. The paper writes a layer as ``O = X W + b`` with ``W ∈ R^{in×out}`` and
approximates ``W ≈ U Vᵀ + Z`` (Eq 1) with ``U ∈ R^{in×r}``, ``V ∈ R^{out×r}``. torch's
``nn.Linear`` stores ``weight = Wᵀ`` (out × in). `LowRankLinear` and `LayerPlan` store the
factors in torch's layout, so each half is an ordinary ``F.linear``: ``down = Uᵀ`` (r × in),
``up = V`` (out × r), ``X U Vᵀ = F.linear(F.linear(X, down), up)``. `LayerPlan.from_factors`
is the one place the paper's U, V are converted; Z is a module of its own
(`amrc_exp.compress.zmodules`), loaded from the math layer's `ZParams`.

The forward follows App. A's order (Eq 14): ``(X U) Vᵀ + X Z + b``, never forming ``U Vᵀ``
(Eq 13), so it costs ``n·(in+out)·(r+q)`` multiplications instead of ``n·in·out``. For
low-rank Z on at least `FUSE_MIN_ROWS` rows both paths run as one pair of matmuls,
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

from amrc_exp.compress.zmodules import Z_MODULES, ZModule, z_module
from amrc_exp.math.compensate import ZParams

__all__ = [
    "Z_TYPES",
    "LayerPlan",
    "LowRankLinear",
    "compress_",
    "count_params",
]

Z_TYPES: tuple[str, ...] = ("none", *Z_MODULES)
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
        z_type: one of `Z_TYPES`; the Z module is ``self.z`` (None for ``none``).
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
        if rank < 0 or z_size < 0:
            raise ValueError(f"rank and z_size must be >= 0, got {rank}, {z_size}")
        fk = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Parameter(torch.zeros(rank, in_features, **fk))  # Uᵀ
        self.up = nn.Parameter(torch.zeros(out_features, rank, **fk))  # V
        self.bias = nn.Parameter(torch.zeros(out_features, **fk)) if bias else None
        self.z: Optional[ZModule] = z_module(z_type, in_features, out_features, z_size, **fk)

    @property
    def z_type(self) -> str:
        return "none" if self.z is None else self.z.kind

    @property
    def z_size(self) -> int:
        return 0 if self.z is None else self.z.size

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_plan(
        cls,
        plan: "LayerPlan",
        bias: Optional[Tensor] = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> "LowRankLinear":
        """Build from a plan; `bias` is used when the plan carries none."""
        down, up = plan.down, plan.up
        if down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1]:
            raise ValueError(f"{plan.name}: down {tuple(down.shape)} and up {tuple(up.shape)} must be r×in and out×r")
        n_in, n_out, r = down.shape[1], up.shape[0], down.shape[0]
        b = plan.bias if plan.bias is not None else bias
        z_size = Z_MODULES[plan.z_type].size_of(plan.z) if plan.z is not None else 0
        m = cls(n_in, n_out, r, bias=b is not None, z_type=plan.z_type, z_size=z_size,
                device=device, dtype=dtype or down.dtype)
        with torch.no_grad():
            m.down.copy_(down)
            m.up.copy_(up)
            if b is not None:
                m.bias.copy_(b)
        if m.z is not None:
            m.z.load(plan.z)
        return m

    # ------------------------------------------------------------------ compute
    def forward(self, x: Tensor) -> Tensor:
        if self.z is not None and x.numel() >= FUSE_MIN_ROWS * self.in_features:
            fused = self.z.fused(self.down, self.up)  # low-rank Z: (x [U | G]) [V | Y]ᵀ + b
            if fused is not None:
                return F.linear(F.linear(x, fused[0]), fused[1], self.bias)
        # App. A (Eq 14): (x U) then · Vᵀ; the r-wide intermediate is the whole saving.
        y = F.linear(F.linear(x, self.down), self.up, self.bias)
        return y if self.z is None else y + self.z(x)

    # ------------------------------------------------------------------ analysis
    def dense_z(self) -> Tensor:
        """Z in torch layout (out × in), materialised. For tests and analysis only."""
        return self.down.new_zeros(self.out_features, self.in_features) if self.z is None else self.z.dense()

    def dense_weight(self) -> Tensor:
        """(U Vᵀ + Z)ᵀ (out × in), materialised. For tests and analysis only."""
        return self.up @ self.down + self.dense_z()

    def index_buffers(self) -> list[tuple[str, Tensor, int]]:
        """(name, buffer, bound) of the sparse-Z index buffers; every value is <= bound."""
        return [] if self.z is None else [(f"z.{n}", b, bound) for n, b, bound in self.z.index_buffers()]

    def index_count(self) -> int:
        """Stored sparse indices (counted as parameters, like math.compensate.z_param_count)."""
        return sum(b.numel() for _, b, _ in self.index_buffers())

    def param_count(self) -> int:
        """r·(in+out) + Z's parameters (incl. index storage) + bias."""
        return sum(p.numel() for p in self.parameters()) + self.index_count()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, bias={self.bias is not None}")

    def constructor_args(self) -> dict:
        """The constructor arguments, for export/reload."""
        return {"in_features": self.in_features, "out_features": self.out_features,
                "rank": self.rank, "bias": self.bias is not None, "z_type": self.z_type,
                "z_size": self.z_size}


@dataclass
class LayerPlan:
    """One layer's compressed form, in torch's layout (W ≈ U Vᵀ + Z).

    Attributes:
        name: qualified module name in the model (``blocks.3.mlp.fc1``).
        down: Uᵀ (r × in).  up: V (out × r).
        z: the layer's Z as the math layer fitted it (a one-layer ``ZParams``); None: no Z.
        bias: (out,); None keeps the replaced layer's own bias.
    """

    name: str
    down: Tensor
    up: Tensor
    z: Optional[ZParams] = None
    bias: Optional[Tensor] = None

    @classmethod
    def from_factors(cls, name: str, U: Tensor, V: Tensor, z: Optional[ZParams] = None,
                     bias: Optional[Tensor] = None) -> "LayerPlan":
        """From the paper's U (in × r), V (out × r): the one layout conversion."""
        if U.ndim != 2 or V.ndim != 2 or U.shape[1] != V.shape[1]:
            raise ValueError(f"{name}: U {tuple(U.shape)} and V {tuple(V.shape)} must be in×r and out×r")
        if z is not None and z.ztype == "none":
            z = None
        if z is not None and z.ztype not in Z_MODULES:
            raise ValueError(f"{name}: unknown z_type {z.ztype!r}; allowed: {Z_TYPES}")
        return cls(name, U.T.contiguous(), V, z, bias)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def z_type(self) -> str:
        return "none" if self.z is None else self.z.ztype

    def state_dict(self) -> dict[str, Any]:
        """The fields as plain tensors, numbers and strings (``torch.save``-able)."""
        state = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.z is not None:
            state["z"] = {"ztype": self.z.ztype, "n_in": self.z.n_in, "n_out": self.z.n_out, "tensors": self.z.tensors}
        return state

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "LayerPlan":
        z = state.get("z")
        return cls(**{**state, "z": ZParams(**z) if z is not None else None})


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
        if (plan.down.shape[1], plan.up.shape[0]) != (old.in_features, old.out_features):
            raise ValueError(f"compress_: plan for {name!r} is {plan.down.shape[1]}→{plan.up.shape[0]}, "
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
