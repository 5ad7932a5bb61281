"""Measurements that need the model's output, on a small labelled "probe" set of calibration
images: the Fisher information of FWSVD, and the per-layer sensitivities that ASVD's rank
search and our output-aware allocation read (Sec 3.2's allocation, made to see the output).

Each sensitivity truncates ONE layer (its weight temporarily replaced by the rank-r
reconstruction, every other layer dense) and measures the model on the probe:

* ``loss``: the cross-entropy of the probe's labels (ASVD: the calibration perplexity);
* ``kl``: mean KL(dense ‖ truncated) of the class distributions (ours: label-free, and it
  separates layers where top-1 is saturated).

`allocation_kl` measures the same KL with every layer truncated at once, to check a whole
allocation (``schedule.check_uniform``) or search around it (``schedule.refine_steps``).
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from amrc_exp.compress.evaluate import kl_rows
from amrc_exp.math.decompose import Spectrum

__all__ = ["Probe", "take_probe", "fisher_rows", "eval_mode", "replaced_weight", "layer_sensitivity", "allocation_kl",
           "whole_model_scorer", "METRICS"]


@dataclass
class Probe:
    """A few calibration images (and their labels, where the loader has them), kept in memory."""

    images: Tensor
    labels: Optional[Tensor] = None
    batch_size: int = 64

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def batches(self) -> Iterator[tuple[Tensor, Optional[Tensor]]]:
        for i in range(0, len(self), self.batch_size):
            labels = None if self.labels is None else self.labels[i: i + self.batch_size]
            yield self.images[i: i + self.batch_size], labels

    def require_labels(self, what: str) -> Tensor:
        if self.labels is None:
            raise ValueError(f"{what} needs labelled calibration images: the calibration loader "
                             "yields images only; give it (images, labels) batches")
        return self.labels


def take_probe(loader: Iterable[Any], n: int, batch_size: int = 64) -> Probe:
    """The first `n` images (and labels) of `loader`, whose batches are tensors or (images, labels)."""
    images, labels = [], []
    seen = 0
    for batch in loader:
        x, y = (batch, None) if isinstance(batch, Tensor) else (batch[0], batch[1] if len(batch) > 1 else None)
        take = min(n - seen, x.shape[0])
        images.append(x[:take])
        if y is not None:
            labels.append(torch.as_tensor(y)[:take])
        seen += take
        if seen >= n:
            break
    if not images:
        raise ValueError("the calibration loader produced no images for the probe")
    return Probe(torch.cat(images), torch.cat(labels) if len(labels) == len(images) else None, batch_size)


def fisher_rows(model: nn.Module, probe: Probe, layers: dict[str, nn.Linear],
                device: torch.device | str | None = None) -> dict[str, Tensor]:
    """FWSVD's row importance (Hsu et al. 2022, Eq 4 and Sec 3.2): per output neuron j of each
    layer, sum_i (1/N) sum_n (dL_n/dW_ji)^2 over the probe's N images, one gradient per image
    (the empirical Fisher of its paper), L the cross-entropy of the image's label. float64, (out,)."""
    labels = probe.require_labels("decomp=fwsvd (Fisher information)")
    device = torch.device(device or next(model.parameters()).device)
    weights = [layer.weight for layer in layers.values()]
    sums = [torch.zeros(w.shape[0], dtype=torch.float64, device=device) for w in weights]
    with eval_mode(model), torch.enable_grad():
        for i in tqdm(range(len(probe)), desc="fisher", leave=False, dynamic_ncols=True):
            x = probe.images[i: i + 1].to(device)
            loss = F.cross_entropy(model(x), labels[i: i + 1].to(device))
            for acc, g in zip(sums, torch.autograd.grad(loss, weights)):
                acc += g.double().square().sum(dim=1)
    return {name: acc / len(probe) for name, acc in zip(layers, sums)}


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """`model` in eval mode inside the block (dropout off), then in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextmanager
def replaced_weight(layer: nn.Linear, weight: Tensor) -> Iterator[None]:
    """`layer.weight` holds `weight` (torch layout, out x in) inside the block, then its own again."""
    saved = layer.weight.detach().clone()
    with torch.no_grad():
        layer.weight.copy_(weight)
    try:
        yield
    finally:
        with torch.no_grad():
            layer.weight.copy_(saved)


def _kl(logits: Tensor, dense_logp: Tensor, labels: Optional[Tensor]) -> Tensor:
    return kl_rows(dense_logp, F.log_softmax(logits.double(), dim=-1)).sum()


def _loss(logits: Tensor, dense_logp: Tensor, labels: Optional[Tensor]) -> Tensor:
    return F.cross_entropy(logits.double(), labels, reduction="sum")


METRICS: dict[str, Callable[[Tensor, Tensor, Optional[Tensor]], Tensor]] = {"kl": _kl, "loss": _loss}


def _scorer(model: nn.Module, probe: Probe, metric: str, device: torch.device) -> Callable[[], float]:
    """`metric` of the model as it is at each call, on the probe, against the dense model's
    output now (computed once, here); the model must be in eval mode."""
    score = METRICS[metric]
    batches = [(x.to(device), None if y is None else y.to(device)) for x, y in probe.batches()]
    dense = [F.log_softmax(model(x).double(), dim=-1) for x, _ in batches]

    def measure() -> float:
        return sum(float(score(model(x), d, y)) for (x, y), d in zip(batches, dense)) / len(probe)

    return measure


@torch.no_grad()
def layer_sensitivity(model: nn.Module, layers: dict[str, nn.Linear], spectra: dict[str, Spectrum],
                      ranks: dict[str, Sequence[int]], probe: Probe, metric: str = "kl",
                      device: torch.device | str | None = None) -> dict[str, dict[int, float]]:
    """{layer: {rank: metric on the probe with only that layer at that rank}} (see module doc).

    The rank-r weight is the spectrum's reconstruction (U Vᵀ); biases stay. Costs
    sum_l len(ranks[l]) forwards of the probe."""
    device = torch.device(device or next(model.parameters()).device)
    if metric == "loss":
        probe.require_labels("schedule=asvd_search (calibration loss)")
    out: dict[str, dict[int, float]] = {}
    with eval_mode(model), tqdm(total=sum(len(r) for r in ranks.values()), desc=f"sensitivity ({metric})",
                                leave=False, dynamic_ncols=True) as bar:
        measure = _scorer(model, probe, metric, device)
        for name, rs in ranks.items():
            layer = layers[name]
            out[name] = {}
            for r in rs:
                with replaced_weight(layer, _reconstruction(spectra[name], r, layer)):
                    out[name][r] = measure()
                bar.update()
    return out


def whole_model_scorer(model: nn.Module, layers: dict[str, nn.Linear], spectra: dict[str, Spectrum],
                       probe: Probe, device: torch.device | str | None = None
                       ) -> Callable[[dict[str, dict[str, Optional[int]]]], dict[str, float]]:
    """`allocation_kl` bound to a model whose dense output is measured once, here: each call
    costs one probe pass per allocation, and rank-r weights are reconstructed once per layer."""
    device = torch.device(device or next(model.parameters()).device)
    with eval_mode(model), torch.no_grad():
        measure = _scorer(model, probe, "kl", device)
    weights: dict[tuple[str, int], Tensor] = {}  # allocations that differ in a few layers share the rest

    def weight(name: str, r: int) -> Tensor:
        if (name, r) not in weights:
            weights[name, r] = _reconstruction(spectra[name], r, layers[name])
        return weights[name, r]

    @torch.no_grad()
    def score(allocations: dict[str, dict[str, Optional[int]]]) -> dict[str, float]:
        out = {}
        with eval_mode(model):
            for label, ranks in allocations.items():
                with ExitStack() as stack:
                    for name, r in ranks.items():
                        if r is not None:
                            stack.enter_context(replaced_weight(layers[name], weight(name, r)))
                    out[label] = measure()
        return out

    return score


def allocation_kl(model: nn.Module, layers: dict[str, nn.Linear], spectra: dict[str, Spectrum],
                  allocations: dict[str, dict[str, Optional[int]]], probe: Probe,
                  device: torch.device | str | None = None) -> dict[str, float]:
    """{label: mean KL(dense ‖ model) on the probe with EVERY layer at that allocation's rank}
    (None: dense), one probe pass each: the whole-model measurement that checks an allocation
    chosen from one-layer-at-a-time sensitivities, whose sum stops predicting the output once
    nearly every layer is cut."""
    return whole_model_scorer(model, layers, spectra, probe, device)(allocations)


def _reconstruction(spectrum: Spectrum, rank: int, layer: nn.Linear) -> Tensor:
    """The rank-r weight U Vᵀ in torch's layout (out x in), the layer's dtype and device."""
    return spectrum.approx(rank).T.to(layer.weight)
