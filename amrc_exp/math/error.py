"""The normalized output error of Eq 5, the one formula every stage reports.

With H = Σ_i X_iᵀ X_i / ||X_i W||_F² (see `amrc_exp.compress.calibrate`), a weight error
δ = Ŵ − W (paper layout, in x out) costs
    (1/N) Σ_i ||X_i δ||_F² / ||X_i W||_F²  =  tr(δᵀ H δ) / N.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["normalized_error"]


def normalized_error(delta: Tensor, H: Tensor, n_samples: float | Tensor) -> Tensor:
    """tr(δᵀ H δ) / N in float64, per layer for batched (B, in, out) / (B, in, in) inputs
    (0-dim for one layer). Use a held-out H for Table 1 and Fig 3."""
    d = delta.to(torch.float64)
    return (d * (H.to(d) @ d)).sum(dim=(-2, -1)) / n_samples
