"""A model as a chain of units — stem, blocks, head — so a measurement that changes one layer
re-runs the model from that layer's unit onward, on inputs cached for the rest.

The output-aware measurements (`compress.probe`) change one or a few layers at a time: a
layer in block b leaves blocks 0..b-1 as they were, so their outputs are cached once and only
blocks b.. and the head run again. Exact: the same modules on the same inputs in the same
batches give the same numbers as a whole-model forward (`chain_of` checks it on the first
batch, tests/test_staged.py on ViT, DeiT, Swin and the embedded model).

Builders are registered per model class, as timm registers models; a model no builder knows is
one unit (a whole-model forward each time: correct, just not cheaper).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

__all__ = ["Unit", "Chain", "chain_of", "whole_chain", "reproduces", "register_chain", "CachedInputs"]


@dataclass(frozen=True)
class Unit:
    """One step of the chain: `run(x)` and the modules whose parameters it reads."""

    run: Callable[[Tensor], Tensor]
    modules: tuple[nn.Module, ...]


@dataclass(frozen=True)
class Chain:
    """`units[-1](...units[0](images))` equals `model(images)`."""

    units: tuple[Unit, ...]

    def forward(self, x: Tensor, start: int = 0) -> Tensor:
        for unit in self.units[start:]:
            x = unit.run(x)
        return x

    def unit_of(self, layer: nn.Module) -> int:
        """Index of the unit that holds `layer` (0, the stem, when no unit claims it: a run from
        0 is always right)."""
        for i, unit in enumerate(self.units):
            if any(layer is m for u in unit.modules for m in u.modules()):
                return i
        return 0

    @property
    def blocks(self) -> tuple[nn.Module, ...]:
        """The modules between stem and head (the transformer blocks, Swin's patch merging)."""
        return tuple(m for u in self.units[1:-1] for m in u.modules)


# Keyed by the class's full name, not the class: importing timm here would load timm.utils and
# with it W&B, which the library must not pull in (tests/test_library.py checks it).
_BUILDERS: dict[str, Callable[[nn.Module], Chain]] = {}


def _name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_chain(cls: str) -> Callable[[Callable[[nn.Module], Chain]], Callable[[nn.Module], Chain]]:
    """Decorator: `builder(model) -> Chain` for instances of the class named `cls` ("module.Class")
    and of its subclasses."""
    def add(builder: Callable[[nn.Module], Chain]) -> Callable[[nn.Module], Chain]:
        _BUILDERS[cls] = builder
        return builder
    return add


def _call(module: nn.Module) -> Unit:
    return Unit(module.__call__, (module,))


@register_chain("timm.models.vision_transformer.VisionTransformer")
def _vit(m: nn.Module) -> Chain:
    # VisionTransformer.forward_features without masks or checkpointing, then forward_head.
    stem = Unit(lambda x: m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x)))),
                (m.patch_embed, m.norm_pre))
    head = Unit(lambda x: m.forward_head(m.norm(x)),
                tuple(c for n, c in m.named_children() if n in ("norm", "fc_norm", "attn_pool", "head")))
    return Chain((stem, *map(_call, m.blocks), head))


@register_chain("timm.models.swin_transformer.SwinTransformer")
def _swin(m: nn.Module) -> Chain:
    # Each stage is downsample (patch merging) then its blocks: both are units.
    inner = [u for stage in m.layers for u in (_call(stage.downsample), *map(_call, stage.blocks))]
    head = Unit(lambda x: m.forward_head(m.norm(x)), (m.norm, m.head))
    return Chain((_call(m.patch_embed), *inner, head))


def _builder(model: nn.Module) -> Optional[Callable[[nn.Module], Chain]]:
    for cls in type(model).__mro__:
        if (build := _BUILDERS.get(_name(cls))) is not None:
            return build
    return None


@torch.no_grad()
def chain_of(model: nn.Module, check: Optional[Tensor] = None) -> Chain:
    """The registered chain of `model`, or the model as one unit. With `check` (a batch of
    inputs), the chain's output is compared with `model(check)`; a chain that does not reproduce
    it (a subclass with its own forward) is dropped for the one-unit chain."""
    build = _builder(model)
    if build is None or getattr(model, "grad_checkpointing", False):
        return whole_chain(model)
    chain = build(model)
    if check is not None and not reproduces(model, check, chain.forward(check)):
        return whole_chain(model)
    return chain


def whole_chain(model: nn.Module) -> Chain:
    """The model as one unit: always right, nothing to start from midway."""
    return Chain((Unit(lambda x: model(x), (model,)),))


@torch.no_grad()
def reproduces(model: nn.Module, x: Tensor, out: Tensor) -> bool:
    """Whether `out` is `model(x)` bit for bit (a chain that is not is never used)."""
    ref = model(x)
    return ref.shape == out.shape and torch.equal(ref, out)


class CachedInputs:
    """The input of every unit (every `stride`-th, when memory is short) for a fixed list of
    batches under the model as it is when `refresh` is called; `run(i, start)` reruns batch i
    from unit `start` onward using the nearest cached input at or before it."""

    def __init__(self, chain: Chain, batches: Sequence[Tensor], max_bytes: int) -> None:
        self.chain, self.batches = chain, list(batches)
        self.stride, self.max_bytes = 1, max_bytes
        self.inputs: list[dict[int, Tensor]] = []
        self.outputs: list[Tensor] = []

    def refresh(self) -> list[Tensor]:
        """Run every batch through the chain, keep the inputs, return the outputs (one pass).
        The first batch sets the stride: the inputs of all batches fit in `max_bytes`."""
        self.inputs, self.outputs = [], []
        for b, x in enumerate(self.batches):
            kept = {}
            for i, unit in enumerate(self.chain.units):
                if i % self.stride == 0:
                    kept[i] = x
                x = unit.run(x)
            if b == 0:
                total = sum(v.numel() * v.element_size() for v in kept.values()) * len(self.batches)
                if total > self.max_bytes:  # keep every stride-th input: a rerun starts a few units earlier
                    self.stride = min(len(self.chain.units), -(-self.stride * total // self.max_bytes))
                    kept = {i: v for i, v in kept.items() if i % self.stride == 0}
            self.inputs.append(kept)
            self.outputs.append(x)
        return self.outputs

    def run(self, batch: int, start: int) -> Tensor:
        begin = start - start % self.stride
        return self.chain.forward(self.inputs[batch][begin], begin)
