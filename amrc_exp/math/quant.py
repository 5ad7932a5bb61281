"""N-bit round-to-nearest channel-wise weight quantization and storage accounting (paper App. B, Eq 16)."""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
from torch import Tensor

__all__ = ["quantize_rtn", "dequantize", "fake_quantize", "quantized_tensor_bytes", "stored_bytes"]


def quantize_rtn(w: Tensor, bits: int, dim: int = -1) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric N-bit RTN with one scale / zero point per channel (reducing over `dim`; for a
    torch-layout (out, in) weight, dim=-1 gives one pair per output row). Eq 16:

        s = (max - min) / (2^N - 1),  z = round(-min / s),
        q = clamp(round(w / s) + z, 0, 2^N - 1),  w_hat = s (q - z).

    Eq 16 as printed uses s = max / (2^N - 1), z = -min / (2^N - 1), which does not map
    [min, max] onto the code range (z is not even in code units), so we use the standard affine
    form above: min and max land on codes 0 and 2^N - 1, every element is within s/2, and 0 is
    exact when min <= 0 <= max (z is then an integer in [0, 2^N - 1], exact in the fp16 that
    stored_bytes counts it as). Constant rows get a tiny floored range (see code): no NaN, and
    every element is still within s/2.

    Returns (codes uint8, scale, zero), scale and zero float32 with `dim` kept (size 1)."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8 (uint8 codes), got {bits}")
    qmax = 2**bits - 1
    x = w.to(torch.float32)
    lo, hi = x.amin(dim=dim, keepdim=True), x.amax(dim=dim, keepdim=True)
    # Floor the range at 2^-16 of the row's magnitude: a (near-)constant row then needs no
    # division by zero, and |z| <= 2^16 * qmax <= 2^24 stays an exact float32 integer.
    span = torch.maximum(hi - lo, torch.maximum(lo.abs(), hi.abs()) * 2.0**-16)
    scale = torch.where(span > 0, span / qmax, torch.ones_like(span))  # span = 0: all-zero row
    zero = torch.round(-lo / scale)
    codes = torch.clamp(torch.round(x / scale) + zero, 0, qmax)
    return codes.to(torch.uint8), scale, zero


def dequantize(codes: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """w_hat = s (q - z) (Eq 16), float32."""
    return scale * (codes.to(torch.float32) - zero)


def fake_quantize(w: Tensor, bits: int, dim: int = -1) -> Tensor:
    """Quantize then dequantize, in w's dtype (to evaluate a quantized model in float)."""
    return dequantize(*quantize_rtn(w, bits, dim)).to(w.dtype)


def quantized_tensor_bytes(numel: int, n_channels: int, bits: int) -> int:
    """Bytes of one quantized tensor: codes packed at bits/8 bytes each (rounded up to a whole
    byte per tensor) + an fp16 scale and an fp16 zero point (2 bytes each) per channel."""
    return math.ceil(numel * bits / 8) + 4 * n_channels


def stored_bytes(quantized_shapes: Iterable[Sequence[int]], bits: int, fp16_numel: int = 0) -> int:
    """Model storage in bytes: each quantized tensor (given by its shape, channels = all dims but
    the last, as quantize_rtn(dim=-1) does) via quantized_tensor_bytes, plus everything else
    (fp16_numel values: biases, norms, embeddings, unquantized weights) at 2 bytes (fp16)."""
    total = 2 * fp16_numel
    for shape in quantized_shapes:
        numel = math.prod(shape)
        total += quantized_tensor_bytes(numel, numel // shape[-1] if numel else 0, bits)
    return total
