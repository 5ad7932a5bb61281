"""Second-order predictions of each probe image's KL, the control variate that lets the
output-aware measurements run on few images (issue 33: their cost is proportional to them).

For a truncation that changes layer l's output by δy_l (one image), the KL to the dense model is,
to second order, ½ δzᵀ F δz with F the Fisher of the class distribution at the logits z and
δz ≈ Σ_l J_l δy_l. Over classes c with probabilities p_c and h_{c,l} = ∂ log p_c / ∂y_l:

    KL ≈ ½ Σ_c p_c (Σ_l h_{c,l} · δy_l)²                                        (1)

(F = Σ_c p_c ∇log p_c ∇log p_cᵀ, since Σ_c p_c ∇log p_c = 0). Summing over 1000 classes
would cost 1000 backward passes an image; the classes are coarsened to the image's top
`classes` ones and "the rest", whose Fisher (1) with those `classes` + 1 outcomes is exact.
For layer l at rank r, with W_hat(r) = Σ_{i≤r} σ_i a_i b_iᵀ (the spectrum's left a_i, right b_i):

    h · δy(r) = h · X (W − W_hat(r)) = h · (y − bias) − Σ_{i≤r} σ_i (X a_i) · (h b_i)   (2)

so one backward pass per outcome gives every rank of every layer at once.

The prediction is not used as the KL: it is the control variate of a ratio estimator (Cochran,
*Sampling Techniques*, 3rd ed. 1977, Ch. 6), and the size measure of the sample. The n_S measured
images are drawn from the n_B predicted ones with probability π_i proportional to each image's
pooled prediction (systematic PPS, Ch. 9A; `pps_sample`), since a few images carry much of every
KL, and a KL measured on them with weights 1/π is rescaled by the prediction's mean over the n_B
over its weighted mean over the n_S:

    KL_hat = KL_S,w · Q_B / Q_S,w                                                (3)

exact when each image's KL is proportional to its prediction, and close where they are
correlated (embedded model, 16 of 256 images, the 144 one-layer KLs of `ours_oa`: median
|log error| against the 256-image KL 0.59 on 16 images drawn at random, 0.12 with (3), 0.06 with (3)
on a drawn sample; BENCHMARKS.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from amrc_exp.compress.probe import Probe, eval_mode
from amrc_exp.math.decompose import Spectrum

__all__ = ["KLPrediction", "Sample", "predict_kl", "pps_sample", "ratio_estimate", "CLASSES", "DEFENSIVE"]

CLASSES = 3  # top classes kept apart (+ the rest): as good as all 10 on the embedded model
# Images per backward: the graph of a batch is kept for its `classes` + 1 backward passes (DeiT-B:
# about 0.2 GiB an image), so batches are smaller than the probe's.
BATCH = 8
DEFENSIVE = 0.1  # share of the uniform design in the sampling (`pps_sample`)


@dataclass
class KLPrediction:
    """Eq (1) for every probe image, layer and rank: `weights` (n, m) are the coarsened class
    probabilities, `terms[layer]` (n, m, k + 1) the h · δy(r) of Eq (2) for r = 0..k (float64)."""

    weights: Tensor
    terms: dict[str, Tensor]

    def __len__(self) -> int:
        return int(self.weights.shape[0])

    def _term(self, name: str, rank: int) -> Tensor:
        t = self.terms[name]
        return t[:, :, min(rank, t.shape[2] - 1)]  # above the spectrum's cap: its residual

    def allocation(self, ranks: dict[str, Optional[int]]) -> Tensor:
        """Eq (1) per image with every listed layer at its rank (None: dense), (n,)."""
        total = torch.zeros_like(self.weights)
        for name, r in ranks.items():
            if r is not None:
                total = total + self._term(name, r)
        return 0.5 * (self.weights * total.square()).sum(1)

    def size(self) -> Tensor:
        """Each image's share of the predicted KLs, pooled: Eq (1) of every layer alone at every
        rank, each over its mean across the images, averaged (n,). The sampling's size measure."""
        columns = []
        for t in self.terms.values():
            q = 0.5 * (self.weights[:, :, None] * t.square()).sum(1)  # (n, k + 1)
            mean = q.mean(0)
            columns.append(q[:, mean > 0] / mean[mean > 0])
        return torch.cat(columns, 1).mean(1) if columns else torch.ones(len(self), dtype=torch.float64)


@dataclass
class Sample:
    """The measured images: their positions among the predicted ones and their weights 1/π."""

    index: Tensor
    weights: Tensor

    @classmethod
    def first(cls, n: int) -> "Sample":
        return cls(torch.arange(n), torch.ones(n, dtype=torch.float64))


def pps_sample(size: Tensor, n: int, generator: torch.Generator, floor: float = DEFENSIVE) -> Sample:
    """`n` distinct images drawn with probability π_i ∝ (1 − floor) · size_i / Σ size + floor / N
    (Cochran Ch. 9A, systematic PPS in a random order; π capped at 1: those images are always
    measured).

    The KL's mean is carried by few images (embedded model: the 16 largest of 256 hold 45% of
    it), so drawing by the prediction measures those and weights them down by 1/π. `floor` mixes
    a share of the uniform design in (a defensive mixture), so no image's weight exceeds
    N / (floor · n) where the prediction misses it."""
    big = len(size)
    if n >= big:
        return Sample.first(big)
    size = size.double().clamp_min(0)
    size = (1 - floor) * size / size.sum().clamp_min(1e-300) + floor / big
    pi, always = torch.zeros_like(size), torch.zeros(big, dtype=torch.bool)
    while True:  # cap at 1, spread the rest of n over the others
        rest = ~always
        pi[rest] = (n - int(always.sum())) * size[rest] / size[rest].sum()
        over = rest & (pi >= 1)
        if not over.any():
            break
        always |= over
    pi[always] = 1.0
    order = torch.randperm(big, generator=generator)
    ends = pi[order].cumsum(0)
    ends = ends * (n / ends[-1])  # exactly n units long: n points, one apart, n distinct images
    points = torch.rand(1, generator=generator, dtype=torch.float64) + torch.arange(n, dtype=torch.float64)
    picked = order[torch.searchsorted(ends, points, right=True).clamp_max(big - 1)]
    return Sample(picked, 1.0 / pi[picked])


def ratio_estimate(measured: float, prediction: Tensor, sample: Sample) -> float:
    """Eq (3): `measured` (the sample's weighted mean) times the prediction's mean over all the
    images over its weighted mean over the sample; `measured` itself where that is undefined."""
    w = sample.weights.to(prediction)
    small = float((prediction[sample.index] * w).sum() / w.sum())
    if not small > 0.0:
        return measured
    return measured * float(prediction.mean()) / small


@torch.no_grad()
def _coarse(logp: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """The top-m classes of each row and the log-probability of the rest, as index and mask."""
    m = min(m, logp.shape[1] - 1)
    top = logp.topk(m, dim=1).indices
    rest = torch.ones_like(logp, dtype=torch.bool).scatter_(1, top, False)
    return top, rest


def predict_kl(model: nn.Module, layers: dict[str, nn.Linear], spectra: dict[str, Spectrum], probe: Probe,
               classes: int = CLASSES, device: torch.device | str | None = None, batch_size: int = BATCH
               ) -> KLPrediction:
    """Eq (1)-(2) on every probe image: one forward and `classes` + 1 backward passes a batch
    (to the layers' outputs only), then two projections per layer and outcome."""
    device = torch.device(device or next(model.parameters()).device)
    names = list(layers)
    weights, terms = [], {n: [] for n in names}
    with eval_mode(model), torch.enable_grad():
        for x in tqdm(probe.images.split(batch_size), desc="kl prediction", leave=False, dynamic_ncols=True):
            x = x.to(device)
            inputs, outputs = {}, {}

            def keep(module: nn.Module, args: tuple, out: Tensor, name: str) -> Tensor:
                if not out.requires_grad:  # a frozen model: the outputs still need gradients
                    out = out.detach().requires_grad_()
                inputs[name], outputs[name] = args[0].detach(), out
                return out

            hooks = [layers[n].register_forward_hook(lambda mod, a, o, n=n: keep(mod, a, o, n)) for n in names]
            try:
                logp = F.log_softmax(model(x).double(), dim=-1)
            finally:
                for h in hooks:
                    h.remove()
            top, rest = _coarse(logp.detach(), classes)
            outcomes = [logp.gather(1, top[:, j: j + 1]).sum() for j in range(top.shape[1])]
            outcomes.append(logp.masked_fill(~rest, float("-inf")).logsumexp(1).sum())
            p = logp.detach().exp()
            pt = p.gather(1, top)
            weights.append(torch.cat([pt, (1 - pt.sum(1, keepdim=True)).clamp_min(0)], 1).cpu())
            outs = [outputs[n] for n in names]
            b = x.shape[0]
            # X a_i of every layer, shared by the outcomes (the inputs themselves are not needed again)
            xa = {n: inputs.pop(n).reshape(b, -1, layers[n].in_features) @ spectra[n].left.to(x.dtype) for n in names}
            per_layer: dict[str, list[Tensor]] = {n: [] for n in names}
            for j, o in enumerate(outcomes):  # one outcome's gradients alive at a time
                grads = torch.autograd.grad(o, outs, retain_graph=j < len(outcomes) - 1, allow_unused=True)
                for n, y, g in zip(names, outs, grads):
                    g = torch.zeros_like(y) if g is None else g  # a layer the logits do not read
                    per_layer[n].append(_layer_terms(xa[n], y.detach(), g, layers[n], spectra[n], b).cpu())
                del grads
            for n in names:
                terms[n].append(torch.stack(per_layer[n], 1))
    return KLPrediction(torch.cat(weights), {n: torch.cat(t) for n, t in terms.items()})


def _layer_terms(xa: Tensor, y: Tensor, h: Tensor, layer: nn.Linear, spectrum: Spectrum, b: int) -> Tensor:
    """Eq (2) for r = 0..k from X a (b, tokens, k) and one outcome's gradient `h`, (b, k + 1)
    float64. Leading dimensions are image-major (Swin's windows are too), so each image's
    tokens are one reshape away."""
    y = y.reshape(b, -1, y.shape[-1])
    h = h.reshape(b, -1, h.shape[-1])
    if layer.bias is not None:
        y = y - layer.bias.detach()
    kept = (xa * (h @ spectrum.right.to(h))).sum(1).double() * spectrum.sigma.double()
    whole = (h * y).flatten(1).sum(1).double()  # h · (y − bias) = h · X W
    return whole[:, None] - torch.cat([kept.new_zeros(b, 1), kept.cumsum(1)], 1)  # minus σ_i (X a_i)·(h b_i), i ≤ r
