"""Post-training N-bit RTN weight quantization and stored-size accounting (App. B, Eq 16, Tab 4).

`quantize_(model, bits)` fake-quantizes every weight matrix in place (quantize → dequantize,
so the model still runs in float and its accuracy is the quantized model's). Which tensors
are weight matrices, and how they are grouped into channels, is defined once here
(`quantized_weights`) and used by both `quantize_` and `model_size_mib`, so the size
reported is the size of exactly what was quantized.

Weight matrices (one fp16 scale + one fp16 zero point per channel = per row of the tensor as
stored, i.e. ``quantize_rtn(dim=-1)`` on a 2-D view):

* ``nn.Linear.weight`` (out × in): per output channel — the block linears left dense and the
  classifier head;
* ``nn.Conv*d.weight`` (out × in × k…), viewed as (out, in·k…): per output channel — the
  patch embedding;
* `LowRankLinear`: every parameter but the bias: ``down`` = Uᵀ (r × in, per rank channel,
  the output of ``x U``), ``up`` = V (out × r, per output channel), ``z.down``/``z.up``
  (likewise for G, Y), structured ``z.values`` (k × out, per stored row of Z). The 1-D Z
  weights — ``z.diag`` and unstructured ``z.values`` — have no channel structure and use one
  scale/zero per tensor.

Everything else stays at fp16: biases, LayerNorm weights, cls/dist tokens, position
embeddings, Swin's relative-position bias tables.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from amrc_exp.compress.lowrank import LowRankLinear
from amrc_exp.math.quant import fake_quantize, quantized_tensor_bytes

__all__ = ["SizeBreakdown", "model_size_mib", "quantize_", "quantized_weights", "size_breakdown"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
MIB = 2**20


def quantized_weights(model: nn.Module) -> dict[str, Tensor]:
    """The weight tensors N-bit PTQ quantizes, by qualified parameter name (model order)."""
    out: dict[str, Tensor] = {}
    for mod_name, mod in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        if isinstance(mod, LowRankLinear):
            params = [(n, p) for n, p in mod.named_parameters() if n != "bias"]
        elif isinstance(mod, (nn.Linear, *_CONV)):
            params = [("weight", mod.weight)]
        else:
            continue
        for n, p in params:
            if p.numel():
                out[prefix + n] = p
    return out


def _channels_view(w: Tensor) -> Tensor:
    """2-D (channels, elements-per-channel) view: rows for ≥ 2-D tensors, one row for 1-D."""
    return w.reshape(1, -1) if w.dim() <= 1 else w.reshape(w.shape[0], -1)


@torch.no_grad()
def quantize_(model: nn.Module, bits: int) -> nn.Module:
    """Fake-quantize every weight matrix of `model` in place with N-bit RTN (Eq 16).

    Per channel as listed in the module docstring; ``bits=0`` is a no-op (PTQ off). Tensors
    that are not weight matrices are not modified. Returns `model`.
    """
    if bits == 0:
        return model
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be 0 (off) or in 1..8, got {bits}")
    unique = {id(p): p for p in quantized_weights(model).values()}  # shared weights once
    for p in unique.values():
        p.copy_(fake_quantize(_channels_view(p), bits, dim=-1).view_as(p))
    return model


@dataclass(frozen=True)
class SizeBreakdown:
    """Bytes of a model as stored. ``total_bytes / 2**20`` is `model_size_mib`."""

    weight_bytes: int  # quantized weights: packed codes (bits=N) or fp16 (bits=0)
    scale_zero_bytes: int  # fp16 scale + zero point per channel (bits=N only)
    fp16_bytes: int  # every other parameter at 2 bytes
    index_bytes: int  # sparse-Z index buffers
    n_params: int  # parameters + stored indices (= lowrank.count_params)

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.scale_zero_bytes + self.fp16_bytes + self.index_bytes

    @property
    def mib(self) -> float:
        return self.total_bytes / MIB


def size_breakdown(model: nn.Module, bits: int = 0) -> SizeBreakdown:
    """What storing `model` costs, counted from the tensors actually held.

    * ``bits=0``: every parameter at fp16 (2 bytes).
    * ``bits=N``: each tensor of `quantized_weights` at N bits per element, packed
      (``ceil(numel·N/8)`` bytes per tensor), plus an fp16 scale and an fp16 zero point per
      channel (4 bytes); every other parameter at fp16.
    * Sparse-Z index buffers (either way): 2 bytes per index when every value it can hold is
      < 65536 (row/column indices of layers narrower than 65536, row pointers of a Z with
      fewer than 65536 entries), else 4 bytes (int32, as the layer keeps them).
    * Not counted: buffers that timm recomputes from the architecture (Swin's
      relative-position index and attention masks), which are not part of a checkpoint's
      learned state.

    Shared parameters are counted once.
    """
    quantized = {id(p): p for p in quantized_weights(model).values()} if bits else {}
    weight = scale_zero = fp16 = index = n = 0
    for p in model.parameters():  # model.parameters() yields shared ones once
        n += p.numel()
        if id(p) in quantized:
            rows = _channels_view(p).shape[0]
            b = quantized_tensor_bytes(p.numel(), rows, bits)
            weight += b - 4 * rows
            scale_zero += 4 * rows
        else:
            fp16 += 2 * p.numel()
    for m in model.modules():
        if isinstance(m, LowRankLinear):
            for _, buf, bound in m.index_buffers():
                index += buf.numel() * (2 if bound < 65536 else 4)
                n += buf.numel()
    if not bits:  # report the quantizable weights' fp16 bytes under weight_bytes
        unique = {id(p): p for p in quantized_weights(model).values()}
        qw = sum(2 * p.numel() for p in unique.values())
        weight, fp16 = qw, fp16 - qw
    return SizeBreakdown(weight, scale_zero, fp16, index, n)


def model_size_mib(model: nn.Module, bits: int = 0) -> float:
    """Stored size in MiB (2**20 bytes); see `size_breakdown` for exactly what is counted."""
    return size_breakdown(model, bits).mib
