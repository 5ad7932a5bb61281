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
from amrc_exp.compress.staged import CachedInputs, chain_of, reproduces, whole_chain
from amrc_exp.math.decompose import Spectrum

__all__ = ["Probe", "take_probe", "fisher_rows", "eval_mode", "replaced_weight", "layer_sensitivity", "allocation_kl",
           "whole_model_scorer", "METRICS"]


@dataclass
class Probe:
    """A few calibration images (and their labels, where the loader has them), kept in memory."""

    images: Tensor
    labels: Optional[Tensor] = None
    batch_size: int = 64
    # Per-image weights of every mean measured on the probe (None: equal). A sample drawn with
    # unequal probabilities (`kl_predict.pps_sample`) carries 1/π here, the Horvitz-Thompson weights.
    weights: Optional[Tensor] = None

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def batches(self) -> Iterator[tuple[Tensor, Optional[Tensor]]]:
        for i in range(0, len(self), self.batch_size):
            labels = None if self.labels is None else self.labels[i: i + self.batch_size]
            yield self.images[i: i + self.batch_size], labels

    def batch_weights(self) -> list[Tensor]:
        """Each batch's image weights, normalised to sum to 1 over the probe (float64)."""
        w = torch.ones(len(self), dtype=torch.float64) if self.weights is None else self.weights.double()
        return list((w / w.sum()).split(self.batch_size))

    def subset(self, n: Optional[int]) -> "Probe":
        """The first `n` images (all of them for None or n >= len)."""
        if n is None or n >= len(self):
            return self
        return self.take(torch.arange(n))

    def take(self, index: Tensor, weights: Optional[Tensor] = None) -> "Probe":
        """The images at `index`, in that order, with `weights` (None: equal)."""
        return Probe(self.images[index], None if self.labels is None else self.labels[index], self.batch_size, weights)

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
    return kl_rows(dense_logp, F.log_softmax(logits.double(), dim=-1))


def _loss(logits: Tensor, dense_logp: Tensor, labels: Optional[Tensor]) -> Tensor:
    return F.cross_entropy(logits.double(), labels, reduction="none")


# metric -> per-image values (float64) from (logits, dense log-probabilities, labels)
METRICS: dict[str, Callable[[Tensor, Tensor, Optional[Tensor]], Tensor]] = {"kl": _kl, "loss": _loss}


# The unit inputs a scorer keeps for its probe (`staged.CachedInputs`; fewer units past this).
CACHE_BYTES = 2 * 2**30


class _Scorer:
    """`metric` on the probe against the dense output (measured once, at construction), with the
    model's unit inputs cached (`compress.staged`): `measure(start)` reruns the model from unit
    `start`, right whenever the layers before it are as they were at the last `rebase`."""

    def __init__(self, model: nn.Module, probe: Probe, metric: str, device: torch.device) -> None:
        self.score = METRICS[metric]
        self.labels = [None if y is None else y.to(device) for _, y in probe.batches()]
        images = [x.to(device) for x, _ in probe.batches()]
        self.chain = chain_of(model)
        self.cache = CachedInputs(self.chain, images, CACHE_BYTES)
        outputs = self.cache.refresh()
        # The chain is checked against the model on the first batch's output, which the cache
        # pass has just computed: one extra forward of one batch, not two (`chain_of(check=)`).
        if not reproduces(model, images[0], outputs[0]):  # a subclass with its own forward
            self.chain = whole_chain(model)
            self.cache = CachedInputs(self.chain, images, CACHE_BYTES)
            outputs = self.cache.refresh()
        self.dense = [F.log_softmax(z.double(), dim=-1) for z in outputs]
        # equal weights: the plain mean, summed as before weights existed (the same bits)
        self.weights = None if probe.weights is None else [w.to(device) for w in probe.batch_weights()]
        self.n = len(probe)

    def rebase(self) -> None:
        """Cache the unit inputs of the model as it is now."""
        self.cache.refresh()

    def measure(self, start: int = 0) -> float:
        """The probe's (weighted) mean of the metric."""
        rows = (self.score(self.cache.run(i, start), d, y) for i, (d, y) in enumerate(zip(self.dense, self.labels)))
        if self.weights is None:
            return sum(float(r.sum()) for r in rows) / self.n
        return sum(float(r @ w) for r, w in zip(rows, self.weights))


@torch.no_grad()
def layer_sensitivity(model: nn.Module, layers: dict[str, nn.Linear], spectra: dict[str, Spectrum],
                      ranks: dict[str, Sequence[int]], probe: Probe, metric: str = "kl",
                      device: torch.device | str | None = None) -> dict[str, dict[int, float]]:
    """{layer: {rank: metric on the probe with only that layer at that rank}} (see module doc).

    The rank-r weight is the spectrum's reconstruction (U Vᵀ); biases stay. Costs
    sum_l len(ranks[l]) probe passes, each from the layer's block onward (`compress.staged`)."""
    device = torch.device(device or next(model.parameters()).device)
    if metric == "loss":
        probe.require_labels("schedule=asvd_search (calibration loss)")
    out: dict[str, dict[int, float]] = {}
    with eval_mode(model), tqdm(total=sum(len(r) for r in ranks.values()), desc=f"sensitivity ({metric})",
                                leave=False, dynamic_ncols=True) as bar:
        scorer = _Scorer(model, probe, metric, device)
        for name, rs in ranks.items():
            layer, start = layers[name], scorer.chain.unit_of(layers[name])
            out[name] = {}
            for r in rs:
                with replaced_weight(layer, _reconstruction(spectra[name], r, layer)):
                    out[name][r] = scorer.measure(start)
                bar.update()
    return out


Allocation = dict[str, Optional[int]]


def whole_model_scorer(model: nn.Module, layers: dict[str, nn.Linear], spectra: dict[str, Spectrum],
                       probe: Probe, device: torch.device | str | None = None
                       ) -> Callable[..., dict[str, float]]:
    """`allocation_kl` bound to a model whose dense output is measured once, here, and whose
    rank-r weights are reconstructed once per layer: ``score(allocations, base=None)``.

    With `base` (an allocation), the unit inputs under `base` are cached first (one probe pass,
    only when `base` changed), and each allocation reruns the model from the first unit where it
    differs from `base`: a neighbour of `base` costs the blocks from its changed layer on. The
    numbers are those of whole-model passes either way."""
    device = torch.device(device or next(model.parameters()).device)
    with eval_mode(model), torch.no_grad():
        scorer = _Scorer(model, probe, "kl", device)
    unit = {name: scorer.chain.unit_of(layer) for name, layer in layers.items()}
    weights: dict[tuple[str, int], Tensor] = {}  # allocations that differ in a few layers share the rest
    cached: Allocation = {}  # the allocation the cache holds ({}: dense)

    def weight(name: str, r: int) -> Tensor:
        if (name, r) not in weights:
            weights[name, r] = _reconstruction(spectra[name], r, layers[name])
        return weights[name, r]

    @contextmanager
    def applied(ranks: Allocation) -> Iterator[None]:
        with ExitStack() as stack:
            for name, r in ranks.items():
                if r is not None:
                    stack.enter_context(replaced_weight(layers[name], weight(name, r)))
            yield

    def cut(ranks: Allocation) -> Allocation:
        """The layers an allocation cuts (None: dense, the same as absent)."""
        return {n: r for n, r in ranks.items() if r is not None}

    def first_change(ranks: Allocation) -> int:
        changed = [unit[n] for n in set(ranks) | set(cached) if ranks.get(n) != cached.get(n)]
        return min(changed, default=len(scorer.chain.units) - 1)

    @torch.no_grad()
    def score(allocations: dict[str, Allocation], base: Optional[Allocation] = None) -> dict[str, float]:
        nonlocal cached
        out = {}
        with eval_mode(model):
            if base is not None and cut(base) != cached:
                with applied(base):
                    scorer.rebase()
                cached = cut(base)
            for label, ranks in allocations.items():
                with applied(ranks):
                    out[label] = scorer.measure(first_change(cut(ranks)))
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
