"""Partial fine-tuning (Sec 4.1 item 5): only LayerNorms, biases, head and patch embedding.

The compressed factors (U, V, Z) and every other weight matrix stay frozen: they were already
fitted by the compression stages, and this keeps the trainable share near 2% of the model.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn
from tqdm.auto import tqdm

from amrc_exp.compress.evaluate import autocast_for

# Parameter names trained by the paper's partial fine-tune (timm naming).
TRAINABLE = re.compile(r"(^|\.)(norm\d*|ln\w*)\.|\.bias$|^bias$|^head\.|^head$|^patch_embed\.|"
                       r"^cls_token$|^pos_embed$|^dist_token$|^reg_token$")


CHECK_EVERY = 50  # fine-tune steps between reads of the loss (each read is a host-device sync)


def _check_finite(running: torch.Tensor, loss: torch.Tensor | None) -> None:
    if not bool(torch.isfinite(running)):
        last = loss.item() if loss is not None else float("nan")
        raise FloatingPointError(f"fine-tuning loss became {last}; lower finetune.lr")


def trainable_names(model: nn.Module) -> list[str]:
    """Names of the parameters partial fine-tuning updates."""
    return [n for n, _ in model.named_parameters() if TRAINABLE.search(n)]


def partial_finetune(model: nn.Module, loader, *, epochs: int, lr: float, weight_decay: float,
                     device: torch.device, amp: bool = False, seed: int = 0) -> dict:
    """Train the partial parameter set with AdamW and a per-step cosine schedule."""
    names = set(trainable_names(model))
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(name in names)
        if name in names:
            params.append(p)
    n_trainable = sum(p.numel() for p in params)
    history: list[float] = []
    if epochs == 0 or not params:
        return {"trainable_params": n_trainable, "loss_history": history}
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    total = epochs * len(loader)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    bar = tqdm(total=total, desc="finetune", leave=False, dynamic_ncols=True)
    for _ in range(epochs):
        # The loss is summed on the device and read every CHECK_EVERY steps and at the end of
        # the epoch (one host sync each), not once per step; a non-finite sum stops the run.
        running, steps = torch.zeros((), dtype=torch.float64, device=device), 0
        for images, labels in loader:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with autocast_for(device, amp):
                loss = loss_fn(model(images), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running, steps = running + loss.detach().double(), steps + 1
            bar.update()
            if steps % CHECK_EVERY == 0:
                _check_finite(running, loss)
                bar.set_postfix(loss=f"{loss.item():.3f}")
        _check_finite(running, loss if steps else None)  # the epoch's end
        history.append(float(running) / max(steps, 1))
    bar.close()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return {"trainable_params": n_trainable, "loss_history": history}
