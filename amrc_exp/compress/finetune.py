"""Partial fine-tuning (Sec 4.1 item 5): only LayerNorms, biases, head and patch embedding.

The compressed factors (U, V, Z) and every other weight matrix stay frozen: they were already
fitted by the compression stages, and this keeps the trainable share near 2% of the model.

The loss is the paper's cross-entropy on labels (`ce`), or distillation from the dense model
(`kd`: Hinton et al. 2015, arXiv:1503.02531, T^2 KL between the temperature-softened outputs),
or their mix (`ce+kd`). The dense teacher's logits are computed on the fly, so augmented views
are distilled correctly. Optionally (`feature_weight` > 0) a feature-matching term is added: the
mean over the compressed layers of ‖f_s − f_t‖² / ‖f_t‖², each compressed layer's output against
the same layer's output in the dense model on the same batch (a FitNets-style hint, Romero et al.
2015, arXiv:1412.6550, on every replaced linear; normalised so every layer counts alike whatever
its scale).
"""

from __future__ import annotations

import math
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from amrc_exp.compress.evaluate import autocast_for, kl_rows
from amrc_exp.compress.lowrank import LowRankLinear

# Parameter names trained by the paper's partial fine-tune (timm naming).
TRAINABLE = re.compile(r"(^|\.)(norm\d*|ln\w*)\.|\.bias$|^bias$|^head\.|^head$|^patch_embed\.|"
                       r"^cls_token$|^pos_embed$|^dist_token$|^reg_token$")


CHECK_EVERY = 50  # fine-tune steps between reads of the loss (each read is a host-device sync)


def _check_finite(running: torch.Tensor, loss: torch.Tensor | None) -> None:
    if not bool(torch.isfinite(running)):
        last = loss.item() if loss is not None else float("nan")
        raise FloatingPointError(f"fine-tuning loss became {last}; lower finetune.lr")


def distill_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), averaged over the batch.

    The T^2 keeps its gradient on the scale of cross-entropy's as T changes (Hinton et al. 2015)."""
    log_s = F.log_softmax(student.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher.float() / temperature, dim=-1)
    return kl_rows(log_t, log_s).mean().to(student.dtype if student.is_floating_point() else torch.float32) \
        * temperature ** 2


def feature_mismatch(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean over layers of ‖f_s − f_t‖² / ‖f_t‖² (whole batch), the feature-matching term."""
    terms = [(student[n].float() - teacher[n].float()).pow(2).sum() / teacher[n].float().pow(2).sum().clamp_min(1e-12)
             for n in teacher]
    return torch.stack(terms).mean()


@contextmanager
def capture_outputs(model: nn.Module, names: list[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Record the outputs of `model`'s submodules `names` on each forward (hooks removed on exit)."""
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(f"feature matching: no module {missing[0]!r} in {type(model).__name__}; the teacher "
                         "must be the dense model the compressed one was made from")
    outputs: dict[str, torch.Tensor] = {}
    hooks = [modules[n].register_forward_hook(lambda m, i, o, n=n: outputs.__setitem__(n, o)) for n in names]
    try:
        yield outputs
    finally:
        for h in hooks:
            h.remove()


@dataclass(frozen=True)
class FinetuneLoss:
    """What partial fine-tuning minimises. `weight`: the KD share of `ce+kd` (ignored otherwise);
    `feature_weight`: β of the feature-matching term added to it (0: off)."""

    name: str = "ce"
    temperature: float = 2.0
    weight: float = 0.5
    feature_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in LOSSES:
            raise ValueError(f"loss {self.name!r}: one of {', '.join(LOSSES)}")
        if not self.feature_weight >= 0:
            raise ValueError(f"feature_weight {self.feature_weight!r}: a number >= 0")

    @property
    def needs_teacher(self) -> bool:
        return self.name != "ce" or self.feature_weight > 0

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor,
                 teacher_logits: Optional[torch.Tensor]) -> torch.Tensor:
        return LOSSES[self.name](self, logits, labels, teacher_logits)


# finetune.loss -> (loss config, student logits, labels, teacher logits) -> scalar loss
LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "ce": lambda c, out, y, t: F.cross_entropy(out, y),
    "kd": lambda c, out, y, t: distill_kl(out, t, c.temperature),
    "ce+kd": lambda c, out, y, t: ((1 - c.weight) * F.cross_entropy(out, y)
                                   + c.weight * distill_kl(out, t, c.temperature)),
}


SCOPES = ("partial", "all")  # partial: the paper's set (TRAINABLE); all: the low-rank factors and Z too


def trainable_names(model: nn.Module, scope: str = "partial") -> list[str]:
    """Names of the parameters fine-tuning updates: the paper's partial set, or every parameter."""
    if scope not in SCOPES:
        raise ValueError(f"fine-tuning scope {scope!r}: one of {', '.join(SCOPES)}")
    return [n for n, _ in model.named_parameters() if scope == "all" or TRAINABLE.search(n)]


def partial_finetune(model: nn.Module, loader, *, epochs: int, lr: float, weight_decay: float,
                     device: torch.device, amp: bool = False, seed: int = 0,
                     loss: FinetuneLoss = FinetuneLoss(), teacher: Optional[nn.Module] = None,
                     scope: str = "partial") -> dict:
    """Train the `scope` parameter set (`trainable_names`) with AdamW and a per-step cosine schedule.

    `teacher` (the dense model, frozen, in eval mode) is required by the `kd` and `ce+kd` losses
    and by feature matching."""
    if loss.needs_teacher and teacher is None:
        raise ValueError(f"fine-tuning loss {loss.name!r} (feature_weight {loss.feature_weight}) distils from "
                         "a teacher: pass the dense model")
    names = set(trainable_names(model, scope))
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(name in names)
        if name in names:
            params.append(p)
    n_trainable = sum(p.numel() for p in params)
    if epochs == 0 or not params:
        return {"trainable_params": n_trainable, "loss_history": []}
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    total = epochs * len(loader)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    if teacher is not None:
        teacher.eval()
    # feature matching: the outputs of the compressed layers, here and in the dense model
    matched = [n for n, m in model.named_modules() if isinstance(m, LowRankLinear)] if loss.feature_weight else []
    with capture_outputs(model, matched) as own, \
            capture_outputs(teacher if teacher is not None else model, matched) as dense:
        history = _train(model, loader, opt, sched, epochs, device, amp, loss, teacher, own, dense)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return {"trainable_params": n_trainable, "loss_history": history}


def _train(model, loader, opt, sched, epochs: int, device, amp: bool, loss: FinetuneLoss,
           teacher: Optional[nn.Module], own: dict, dense: dict) -> list[float]:
    """The epochs of `partial_finetune`; `own` / `dense` fill with the matched layers' outputs."""
    history: list[float] = []
    total = epochs * len(loader)
    model.train()
    bar = tqdm(total=total, desc="finetune", leave=False, dynamic_ncols=True)
    for _ in range(epochs):
        # The loss is summed on the device and read every CHECK_EVERY steps and at the end of
        # the epoch (one host sync each), not once per step; a non-finite sum stops the run.
        running, steps = torch.zeros((), dtype=torch.float64, device=device), 0
        for images, labels in loader:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with autocast_for(device, amp):
                with torch.no_grad():
                    target = teacher(images) if loss.needs_teacher else None
                step_loss = loss(model(images), labels, target)
                if dense:
                    step_loss = step_loss + loss.feature_weight * feature_mismatch(own, dense)
            opt.zero_grad(set_to_none=True)
            step_loss.backward()
            opt.step()
            sched.step()
            running, steps = running + step_loss.detach().double(), steps + 1
            bar.update()
            if steps % CHECK_EVERY == 0:
                _check_finite(running, step_loss)
                bar.set_postfix(loss=f"{step_loss.item():.3f}")
        _check_finite(running, step_loss if steps else None)  # the epoch's end
        history.append(float(running) / max(steps, 1))
    bar.close()
    return history
