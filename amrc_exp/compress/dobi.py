"""Dobi-SVD's differentiable truncation positions (Qinsi Wang et al. 2025, arXiv:2502.02723, Sec 3.2).

Every compressed layer gets one trainable truncation position k_l. In the forward pass its
OUTPUT activation A (all tokens of a batch, rows x out) is replaced by its soft truncation

    A Q diag(T) Q^T,   T_i = 0.5 tanh(beta (k_l - i)) + 0.5,   A = P diag(s) Q^T,

and the k_l are trained by Adam on the task loss plus a penalty pulling the layers' kept
parameters to the budget, the model itself frozen. As in their code: the loss is the
exponentiated cross-entropy (their perplexity) + penalty * |kept fraction - target| + a squared
penalty outside [0, max rank]; the start is the uniform kept-parameter rank; the learning rate
follows a cosine between lr and 0.8 lr each epoch; the positions with the lowest loss seen win.

Adapted to a ViT: a batch's tokens form one activation matrix (an LLM's unit is one 2048-token
sequence); with 64 images x 50 tokens it has full rank, so a position is a rank directly (their
``min(in, out) / seq_len`` rescaling is 1). Their backward goes through the SVD (a
Taylor-stabilised formula); here Q is held constant within a step, so the gradient reaches each
position through its mask and the earlier positions through A, not through the rotation of Q.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from amrc_exp.compress.config import ScheduleConfig
from amrc_exp.compress.probe import Probe
from amrc_exp.math.allocate import LayerSpec

__all__ = ["truncation_mask", "soft_truncate", "learn_positions"]


def truncation_mask(position: Tensor, k: int, beta: float) -> Tensor:
    """T_i = 0.5 tanh(beta (position - i)) + 0.5 for i = 1..k: ~1 up to the position, ~0 after."""
    i = torch.arange(1, k + 1, dtype=position.dtype, device=position.device)
    return 0.5 * torch.tanh(beta * (position - i)) + 0.5


def soft_truncate(a: Tensor, position: Tensor, beta: float) -> Tensor:
    """A Q diag(T) Q^T for the rows x out activation `a` (the right singular vectors Q held
    constant); the position is clipped to [1, rank of a] as in their code."""
    with torch.no_grad():
        q = torch.linalg.svd(a, full_matrices=False).Vh.mT  # out x min(rows, out)
    t = truncation_mask(position.clamp(1, q.shape[1]), q.shape[1], beta)
    return ((a @ q) * t) @ q.mT


def learn_positions(model: nn.Module, layers: dict[str, nn.Linear], probe: Probe, specs: Sequence[LayerSpec],
                    params_to_remove: int, schedule: ScheduleConfig, seed: int = 0) -> dict[str, float]:
    """Truncation position per layer (a real rank), trained on the labelled probe images (see the
    module doc); `math.allocate.allocate_positions` turns them into ranks under the exact budget."""
    labels = probe.require_labels("schedule=dobi (the task loss)")
    device = next(model.parameters()).device
    dense = sum(s.dense_params for s in specs)
    target = 1.0 - params_to_remove / dense  # kept fraction of the compressed layers' weights
    max_rank = torch.tensor([float(min(s.n_in, s.n_out)) for s in specs], device=device)
    step = torch.tensor([float(s.rank_step) for s in specs], device=device)
    size = torch.tensor([float(s.dense_params) for s in specs], device=device)
    # Positions as fractions of each layer's max rank, so one learning rate fits every width.
    frac = nn.Parameter((target * size / step / max_rank).clamp(0, 1))
    opt = torch.optim.Adam([frac], lr=schedule.lr)
    per_epoch = math.ceil(len(probe) / probe.batch_size)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=per_epoch, eta_min=0.8 * schedule.lr)

    index = {s.name: i for i, s in enumerate(specs)}

    def hook(name: str):
        def truncate(module: nn.Module, inputs: tuple[Tensor, ...], out: Tensor) -> Tensor:
            pos = frac[index[name]] * max_rank[index[name]]
            return soft_truncate(out.reshape(-1, out.shape[-1]), pos, schedule.beta).reshape(out.shape)
        return truncate

    handles = [layers[s.name].register_forward_hook(hook(s.name)) for s in specs]
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    best, best_loss = frac.detach().clone(), math.inf
    try:
        with torch.enable_grad(), tqdm(total=schedule.epochs * per_epoch, desc="dobi positions", leave=False,
                                       dynamic_ncols=True) as bar:
            for _ in range(schedule.epochs):
                order = torch.randperm(len(probe), generator=gen)
                for b in range(per_epoch):
                    idx = order[b * probe.batch_size: (b + 1) * probe.batch_size]
                    x, y = probe.images[idx].to(device), labels[idx].to(device)
                    pos = frac * max_rank
                    kept = torch.minimum(pos * step, size).sum() / dense
                    out_of_range = (F.relu(-pos) ** 2 + F.relu(pos - max_rank) ** 2).sum()
                    loss = (torch.exp(F.cross_entropy(model(x), y)) + schedule.penalty * (kept - target).abs()
                            + out_of_range)
                    value = float(loss.detach())
                    if value < best_loss:  # the positions that produced this loss
                        best, best_loss = frac.detach().clone(), value
                    opt.zero_grad()
                    loss.backward(inputs=[frac])
                    opt.step()
                    cosine.step()
                    bar.set_postfix(loss=f"{value:.3f}", kept=f"{float(kept.detach()):.3f}")
                    bar.update()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {s.name: float(best[i] * max_rank[i]) for i, s in enumerate(specs)}
