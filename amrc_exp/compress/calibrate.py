"""Calibration statistics for activation-aware compression (Sec 3.1, Eq 5-7; Sec 3.3, Eq 10).

For every compressible linear layer we stream, over the proxy dataset D (Sec 4.1 item 1),

* ``H = Σ_i X_iᵀ X_i / ||X_i W||_F²``  (in × in, float64)

  where ``X_i`` is image i's token matrix at the layer input and ``W`` the layer's weight in
  the paper's layout (in × out). With it, Eq 5's objective
  ``Σ_i ||X_i (Ŵ − W)||² / ||X_i W||²`` equals ``tr((Ŵ − W)ᵀ H (Ŵ − W))`` exactly, so the
  whitened SVD, Algorithm 1's energy curves and Eq 10's Z fit all work from H alone, at a
  cost independent of |D|. ``||X_i W||²`` is read from the layer's own output minus its bias
  (no extra matmul).

* ``X_rep = (1/N) Σ_i X_i``  (tokens × in, float64): the representative input of Eq 7 that
  the paper's literal ``asvd_mean`` decomposition uses.

* ``abs_mean``: the mean ``|x_c|`` per input channel over every token (ASVD's scaling), and,
  when asked for (``gram=True``), ``G = Σ_i X_iᵀ X_i`` unnormalised (SVD-LLM's whitening).

Memory is O(Σ_l in_l² + tokens·in_l) whatever the number of samples: each batch's scaled
Gram is formed in float32 on the model's device and added into a float64 accumulator; no
activation is kept beyond the forward that produced it.

Token layouts handled by the hook (all reshaped to ``(B, -1, C)`` with B the batch size of
the current forward):

* ViT/DeiT: ``(B, N, C)``;
* Swin MLP: ``(B, H·W, C)``; Swin attention: windowed ``(B·nW, window², C)``. timm's
  ``window_partition`` views the map as ``(B, H/ws, ws, W/ws, ws, C)`` and keeps B as the
  leading dimension, so one image's windows are contiguous rows and the reshape groups them
  back per image. Shifted blocks only permute tokens (a roll) inside an image, which leaves
  ``X_iᵀX_i`` and ``||X_i W||`` unchanged. When the map is padded to a multiple of the window
  the padded tokens are zeros: they add nothing to H but count in ``n_tokens``.
"""

from __future__ import annotations

import re
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from amrc_exp.compress.config import DEFAULT_PATTERNS
from amrc_exp.compress.evaluate import autocast_for
from amrc_exp.compress.probe import Probe, take_probe
from amrc_exp.errors import AmrcError
from amrc_exp.math.decompose import STATISTICS

__all__ = [
    "CalibStats",
    "LayerStats",
    "NonFiniteActivationError",
    "calibrate",
    "collect_stats",
    "find_layers",
    "merge_stats",
]

class NonFiniteActivationError(AmrcError, FloatingPointError):
    """A layer saw NaN/Inf activations during calibration (bad weights, or fp16 overflow)."""


def find_layers(
    model: nn.Module, patterns: str | Sequence[str] = DEFAULT_PATTERNS
) -> dict[str, nn.Linear]:
    """The compressible ``nn.Linear`` modules of `model`, keyed by qualified name.

    A module is selected when its name matches any regex in `patterns` (``re.search``) and
    it is an ``nn.Linear``. The order is ``model.named_modules()`` order, i.e. the order of
    the forward pass for timm ViT/DeiT/Swin.
    """
    if isinstance(patterns, str):
        patterns = (patterns,)
    compiled = [re.compile(p) for p in patterns]
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and any(c.search(name) for c in compiled)
    }


@dataclass
class LayerStats:
    """Streamed statistics of one layer's inputs over the proxy dataset.

    Attributes:
        H: ``Σ_i X_iᵀ X_i / ||X_i W||_F²`` (in × in, float64, on the device collected).
            Samples with ``||X_i W|| = 0`` are left out (see `n_skipped`), so
            ``tr(Wᵀ H W) = n_samples − n_skipped``.
        x_rep: ``(1/n_samples) Σ_i X_i`` (tokens × in, float64), Eq 7's ``X_rep``; every
            sample counts here, skipped or not.
        n_samples: images seen.
        n_tokens: tokens per image at this layer's input (Swin: the stage's H·W, plus any
            window padding).
        n_skipped: images whose output energy ``||X_i W||²`` was exactly zero.
        abs_mean: mean ``|x_c|`` per input channel over all tokens and images (in, float64).
        G: ``Σ_i X_iᵀ X_i`` (in × in, float64), only when collected with ``gram=True``.
        fisher: per output neuron, the summed empirical Fisher information of its weights
            (out, float64; `fisher_rows`), only for decompositions that need it.
    """

    H: torch.Tensor
    x_rep: torch.Tensor
    n_samples: int
    n_tokens: int
    n_skipped: int = 0
    abs_mean: Optional[torch.Tensor] = None
    G: Optional[torch.Tensor] = None
    fisher: Optional[torch.Tensor] = None

    @property
    def n_effective(self) -> int:
        """Number of samples that contributed to H (= tr(Wᵀ H W))."""
        return self.n_samples - self.n_skipped

    def to(self, device: torch.device | str) -> "LayerStats":
        def move(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if t is None else t.to(device)

        return LayerStats(self.H.to(device), self.x_rep.to(device), self.n_samples, self.n_tokens,
                          self.n_skipped, move(self.abs_mean), move(self.G), move(self.fisher))

    def tensors(self) -> dict[str, torch.Tensor]:
        """The statistics by name (as `amrc_exp.math.decompose.STATISTICS` names them), present ones only."""
        return {n: t for n in STATISTICS if (t := getattr(self, n)) is not None}


class _Accumulator:
    """Float64 running sums for one layer, fed by a forward hook."""

    def __init__(self, name: str, layer: nn.Linear, gram: bool = False) -> None:
        self.name = name
        self.layer = layer
        self.gram = gram
        self.H: torch.Tensor | None = None
        self.G: torch.Tensor | None = None
        self.abs_sum: torch.Tensor | None = None
        self.x_sum: torch.Tensor | None = None
        self.n_samples = 0
        self.skipped: torch.Tensor | int = 0
        self.bad_input: torch.Tensor | None = None
        self.bad_output: torch.Tensor | None = None
        self.n_tokens: int | None = None
        self.batch_size = 0  # set by collect_stats before every forward

    def __call__(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        x = inputs[0]
        B = self.batch_size
        C = x.shape[-1]
        if x.shape[0] % B:
            raise RuntimeError(
                f"calibration hook on {self.name}: leading dim {x.shape[0]} of input "
                f"{tuple(x.shape)} is not a multiple of the batch size {B}"
            )
        # Autocast off: the Gram must not be recomputed in bf16/fp16 under amp.
        with _no_autocast(x.device):
            x = x.reshape(B, -1, C).float()  # (B, T, C); windows regrouped per image
            y = output.reshape(B, -1, output.shape[-1]).float()
            if module.bias is not None:  # ||X_i W||² wants the output without bias
                y = y - module.bias.float()
            x_sum = x.sum(dim=0)  # (T, C) float32
            energy = _energy(y)  # ||X_i W||_F² per image, (B,) float64
            # A NaN/Inf anywhere reaches these sums. The flags stay on the device and are read
            # once per pass (`check_finite`), not once per layer and batch (a GPU sync each).
            bad_in, bad_out = ~torch.isfinite(x_sum).all(), ~torch.isfinite(energy).all()
            self.bad_input = bad_in if self.bad_input is None else self.bad_input | bad_in
            self.bad_output = bad_out if self.bad_output is None else self.bad_output | bad_out
            keep = energy > 0
            # 1/sqrt(energy) on both factors of the Gram == 1/energy on X_iᵀX_i (Eq 5).
            scale = torch.where(keep, energy.clamp_min(1e-300).rsqrt(), 0.0).float()
            xs = (x * scale[:, None, None]).reshape(-1, C)
            gram = xs.T @ xs  # float32, (C, C)
            abs_sum = x.abs().sum(dim=(0, 1))  # (C,)
            raw = x.reshape(-1, C).T @ x.reshape(-1, C) if self.gram else None
        if self.H is None:
            self.H = torch.zeros(C, C, dtype=torch.float64, device=x.device)
            self.abs_sum = torch.zeros(C, dtype=torch.float64, device=x.device)
            self.G = torch.zeros(C, C, dtype=torch.float64, device=x.device) if self.gram else None
            self.x_sum = torch.zeros(x.shape[1], C, dtype=torch.float64, device=x.device)
            self.n_tokens = x.shape[1]
        elif x.shape[1] != self.n_tokens:
            raise RuntimeError(
                f"calibration hook on {self.name}: {x.shape[1]} tokens per image, expected "
                f"{self.n_tokens} (all calibration images must have the same size)"
            )
        self.H += gram.double()
        self.x_sum += x_sum.double()
        self.abs_sum += abs_sum.double()
        if raw is not None:
            self.G += raw.double()
        self.n_samples += B
        self.skipped = self.skipped + (~keep).sum()  # a device counter: read once, in result()

    def check_finite(self) -> None:
        """NonFiniteActivationError if a NaN/Inf reached this layer's input or output sums."""
        for what, flag in (("input", self.bad_input), ("output", self.bad_output)):
            if flag is not None and bool(flag):
                raise NonFiniteActivationError(
                    f"non-finite activations (NaN/Inf) in the {what} of layer {self.name!r} "
                    f"during calibration; check model.weights (a corrupt or diverged checkpoint), "
                    f"or set amp=false if a bf16/fp16 forward overflows"
                )

    def result(self) -> LayerStats:
        if self.H is None:
            raise RuntimeError(f"layer {self.name!r} was never called during calibration")
        return LayerStats(
            H=self.H,
            x_rep=self.x_sum / self.n_samples,
            n_samples=self.n_samples,
            n_tokens=int(self.n_tokens),
            n_skipped=int(self.skipped),
            abs_mean=self.abs_sum / (self.n_samples * int(self.n_tokens)),
            G=self.G,
        )


def _energy(y: torch.Tensor) -> torch.Tensor:
    """Per-image squared Frobenius norm of (B, T, D) float32 `y`, as float64.

    Squares and sums in float32 (float64 copies of every layer output cost more than the
    Grams; float32's relative rounding is far below what a normalization weight needs); an
    image whose float32 sum overflows, with finite entries, is redone in float64."""
    energy = y.square().sum(dim=(1, 2)).double()
    overflow = torch.isinf(energy)
    if bool(overflow.any()):
        energy[overflow] = y[overflow].double().square().sum(dim=(1, 2))
    return energy


def _no_autocast(device: torch.device):
    if device.type in ("cuda", "cpu"):
        return torch.autocast(device_type=device.type, enabled=False)
    return nullcontext()


def _images_of(batch: Any) -> torch.Tensor:
    """The image tensor of a loader batch: a tensor, or the first item of (images, labels)."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    if isinstance(batch, dict) and isinstance(batch.get("image"), torch.Tensor):
        return batch["image"]
    raise TypeError(f"cannot find an image tensor in a loader batch of type {type(batch).__name__}")


@torch.no_grad()
def collect_stats(
    model: nn.Module,
    loader: Iterable[Any],
    layers: dict[str, nn.Linear],
    num_samples: int,
    device: torch.device | str | None = None,
    amp: bool = False,
    desc: str = "calibrate",
    gram: bool = False,
) -> dict[str, LayerStats]:
    """Stream H and X_rep (see module docstring) for `layers` over `num_samples` images.

    Args:
        model: the network; put in eval mode for the pass and restored afterwards.
        loader: yields image tensors or ``(images, labels, ...)`` batches.
        layers: ``find_layers(model)`` or a subset; modules must belong to `model`.
        num_samples: stop after exactly this many images (the last batch is truncated).
        device: where images are sent; defaults to the model's device. Accumulators live on
            the device of the activations.
        amp: bf16 autocast for the forward on CUDA (the statistics are still accumulated in
            float32/float64).
        desc: tqdm description.
        gram: also accumulate the unnormalised Gram G (SVD-LLM's statistic).

    Returns:
        ``{name: LayerStats}`` in the order of `layers`.

    Raises:
        NonFiniteActivationError: a layer saw NaN/Inf, naming the layer.
        ValueError: `num_samples` < 1 or the loader produced no image.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    accs = {name: _Accumulator(name, layer, gram) for name, layer in layers.items()}
    handles = [layer.register_forward_hook(accs[name]) for name, layer in layers.items()]
    was_training = model.training
    model.eval()
    seen = 0
    try:
        with tqdm(total=num_samples, desc=desc, unit="img", leave=False, dynamic_ncols=True) as bar:
            for batch in loader:
                images = _images_of(batch)[: num_samples - seen]
                B = images.shape[0]
                if B == 0:
                    continue
                for acc in accs.values():
                    acc.batch_size = B
                with autocast_for(device, amp):
                    model(images.to(device, non_blocking=True))
                seen += B
                bar.update(B)
                if seen >= num_samples:
                    break
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    for acc in accs.values():  # forward order: the first layer a NaN/Inf reached is named
        acc.check_finite()
    if seen == 0:
        raise ValueError("calibration loader produced no images")
    if seen < num_samples:
        warnings.warn(f"calibration loader ran out after {seen} of {num_samples} images; "
                      f"statistics use {seen}", stacklevel=2)
    return {name: acc.result() for name, acc in accs.items()}


@dataclass
class CalibStats:
    """Everything the compression stages read from the data (Sec 3.1, 3.3).

    Attributes:
        calib: statistics of the whole calibration set (decomposition, allocation, Z fit).
        heldout: statistics of held-out images (the residual errors of Tab 1 and Fig 3).
        chunks: statistics of consecutive calibration chunks, one per GD mini-batch (Sec 4.1
            item 4); empty when the Z fit uses the full set. ``calib`` is their merge.
        probe: a few labelled calibration images, for the allocations and decompositions that
            measure the model's output (`amrc_exp.compress.probe`); None when none is needed.
    """

    calib: dict[str, LayerStats]
    heldout: dict[str, LayerStats]
    chunks: list[dict[str, LayerStats]] = field(default_factory=list)
    probe: Optional["Probe"] = None

    @property
    def n_minibatches(self) -> int:
        """GD mini-batches available to the Z fit (1: the full-batch gradient)."""
        return max(1, len(self.chunks))

    def to(self, device: torch.device | str) -> "CalibStats":
        """`calib` and `heldout` on `device`; the chunks stay put (they can be large: DeiT-B's
        16 are ~17 GiB) and are moved group by group by the Z fit."""
        return CalibStats({k: s.to(device) for k, s in self.calib.items()},
                          {k: s.to(device) for k, s in self.heldout.items()}, self.chunks, self.probe)

    @classmethod
    def from_chunks(cls, chunks: list[dict[str, LayerStats]], heldout: dict[str, LayerStats],
                    probe: Optional["Probe"] = None) -> "CalibStats":
        """`calib` = the merge of `chunks`; a single chunk is the full set (no mini-batches)."""
        return cls(merge_stats(chunks), heldout, chunks if len(chunks) > 1 else [], probe)


def merge_stats(parts: list[dict[str, LayerStats]]) -> dict[str, LayerStats]:
    """Statistics of the union of disjoint sample sets: Grams add, X_rep is the weighted mean."""
    merged = {}
    for name in parts[0]:
        ps = [p[name] for p in parts]
        n = sum(p.n_samples for p in ps)
        merged[name] = LayerStats(H=sum(p.H for p in ps), x_rep=sum(p.x_rep * p.n_samples for p in ps) / n,
                                  n_samples=n, n_tokens=ps[0].n_tokens,
                                  n_skipped=sum(p.n_skipped for p in ps),
                                  abs_mean=_weighted_mean([p.abs_mean for p in ps], [p.n_samples for p in ps]),
                                  G=None if any(p.G is None for p in ps) else sum(p.G for p in ps))
    return merged


def _weighted_mean(values: list[Optional[torch.Tensor]], weights: list[int]) -> Optional[torch.Tensor]:
    if any(v is None for v in values):
        return None
    return sum(v * w for v, w in zip(values, weights)) / sum(weights)


# Per-mini-batch Grams on the CPU: 2 GiB (DeiT-B's 16 chunks, ~17 GiB, fall back to the full
# batch); on a GPU a quarter of its free memory (an H200 holds DeiT-B's).
CPU_CHUNK_GIB = 2.0


def chunk_budget_gib(max_chunk_gib: float | None, device: torch.device | str | None) -> float:
    """`zfit.max_chunk_gib`, or (null) the device's default."""
    if max_chunk_gib is not None:
        return max_chunk_gib
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] / 4 / 2**30
    return CPU_CHUNK_GIB


def gd_chunk_size(zfit_batch_size: int, max_chunk_gib: float | None, layers: dict[str, nn.Linear], n_calib: int,
                  device: torch.device | str | None = None) -> int:
    """Samples per GD mini-batch Gram; the whole set when mini-batches are off or too large.

    One Gram per chunk costs Σ in² float64 per chunk: 16 chunks of DeiT-B are ~17 GiB, so above
    `chunk_budget_gib` the GD falls back to the full-set gradient (recorded in the report)."""
    if zfit_batch_size <= 0 or zfit_batch_size >= n_calib:
        return n_calib
    n_chunks = -(-n_calib // zfit_batch_size)
    gib = n_chunks * sum(l.in_features ** 2 for l in layers.values()) * 8 / 2 ** 30
    return zfit_batch_size if gib <= chunk_budget_gib(max_chunk_gib, device) else n_calib


class _Rebatch:
    """The images of a loader's batches, handed out `n` at a time (batches split at the edge)."""

    def __init__(self, loader: Iterable[Any]) -> None:
        self._batches = iter(loader)
        self._pending: torch.Tensor | None = None

    def take(self, n: int) -> Iterator[torch.Tensor]:
        while n > 0:
            if self._pending is None or self._pending.shape[0] == 0:
                batch = next(self._batches, None)
                if batch is None:
                    return
                self._pending = _images_of(batch)
            head, self._pending = self._pending[:n], self._pending[n:]
            n -= head.shape[0]
            yield head


def _loader_size(loader: Iterable[Any]) -> int:
    try:
        return len(loader.dataset)  # type: ignore[attr-defined]
    except (AttributeError, TypeError):
        raise ValueError("pass num_samples: the loader has no sized dataset") from None


def calibrate(
    model: nn.Module,
    calib_loader: Iterable[Any],
    heldout_loader: Iterable[Any],
    *,
    num_samples: int | None = None,
    heldout_samples: int | None = None,
    chunk_size: int | None = None,
    layers: dict[str, nn.Linear] | None = None,
    device: torch.device | str | None = None,
    amp: bool = False,
    gram: bool = False,
    probe_samples: int = 0,
) -> CalibStats:
    """Stream the statistics of `layers` (default: `find_layers(model)`) over the first
    `num_samples` calibration images (default: the loader's dataset size) and `heldout_samples`
    held-out images; with `chunk_size`, also per consecutive chunk of that many calibration
    images (the GD mini-batches, see `gd_chunk_size`). Loaders yield images or (images, ...).
    `gram`: also the unnormalised Gram G of the calibration set (SVD-LLM); `probe_samples`: keep
    that many first calibration images (and labels) as the probe."""
    layers = find_layers(model) if layers is None else layers
    n_calib = _loader_size(calib_loader) if num_samples is None else num_samples
    n_held = _loader_size(heldout_loader) if heldout_samples is None else heldout_samples
    chunk = n_calib if not chunk_size or chunk_size >= n_calib else chunk_size
    heldout = collect_stats(model, heldout_loader, layers, n_held, device, amp, desc="calibrate heldout")
    source = _Rebatch(calib_loader)
    chunks = []
    for i, start in enumerate(range(0, n_calib, chunk)):
        size = min(chunk, n_calib - start)
        chunks.append(collect_stats(model, source.take(size), layers, size, device, amp,
                                    desc=f"calibrate calib/{i:04d}", gram=gram))
    probe = take_probe(calib_loader, probe_samples) if probe_samples else None
    return CalibStats.from_chunks(chunks, heldout, probe)
