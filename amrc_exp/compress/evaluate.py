"""Evaluation: top-1 accuracy, fidelity to the dense model, and measured inference throughput."""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm


def autocast_for(device: torch.device, enabled: bool):
    """bf16 autocast on CUDA when enabled; a no-op elsewhere (CPU runs stay exact fp32)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def kl_rows(ref_logp: Tensor, logp: Tensor) -> Tensor:
    """KL(ref ‖ p) per row, from log-probabilities (float64)."""
    ref, own = ref_logp.double(), logp.double()
    return (ref.exp() * (ref - own)).sum(-1)


@dataclass
class Evaluation:
    """One pass over the evaluation set: top-1 and the log-probabilities (CPU float32), which a
    later stage compares with (`fidelity`)."""

    top1: float
    log_probs: Tensor

    def fidelity(self, reference: "Evaluation") -> dict[str, float]:
        """Top-1 agreement with `reference` (%) and mean KL(reference ‖ self) in nats: they
        separate methods where top-1 is saturated."""
        if reference.log_probs.shape != self.log_probs.shape:
            raise ValueError(f"evaluations of different sets: {tuple(reference.log_probs.shape)} vs "
                             f"{tuple(self.log_probs.shape)}")
        agree = (reference.log_probs.argmax(-1) == self.log_probs.argmax(-1)).double().mean()
        kl = kl_rows(reference.log_probs, self.log_probs).mean()
        return {"agreement": round(100.0 * float(agree), 4), "kl": float(kl)}


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, amp: bool = False, desc: str = "eval") -> Evaluation:
    """Top-1 (%) and the log-probabilities over the whole loader."""
    model.eval()
    correct = total = 0
    log_probs = []
    for images, labels in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True):
        images, labels = images.to(device, non_blocking=True), labels.to(device)
        with autocast_for(device, amp):
            logits = model(images)
        correct += (logits.argmax(-1) == labels).sum()  # on the device: one sync per pass
        log_probs.append(F.log_softmax(logits.float(), dim=-1).cpu())
        total += labels.numel()
    return Evaluation(100.0 * int(correct) / max(total, 1), torch.cat(log_probs) if log_probs else torch.empty(0))


def top1(model: nn.Module, loader, device: torch.device, amp: bool = False, desc: str = "eval") -> float:
    """Top-1 accuracy in percent over the whole loader."""
    return evaluate(model, loader, device, amp, desc).top1


@torch.no_grad()
def throughput_side_by_side(models: dict[str, nn.Module], sample: torch.Tensor, device: torch.device,
                            repeats: int = 5, warmup: int = 1, amp: bool = False) -> dict[str, list[float]]:
    """Seconds per forward of one batch for each model, measured interleaved.

    After `warmup` untimed calls of each, every repetition times each model once, the order
    alternating between repetitions, so machine noise and drift fall on all of them alike.
    Returns {name: [seconds per repetition]}; images/s = batch / median."""
    sample = sample.to(device)
    for model in models.values():
        model.eval()

    def once(model: nn.Module) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with autocast_for(device, amp):
            model(sample)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    names = list(models)
    for _ in range(warmup):
        for name in names:
            once(models[name])
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(repeats):
        for name in names if rep % 2 == 0 else names[::-1]:
            times[name].append(once(models[name]))
    return times


def median(values: list[float]) -> float:
    """The median (mean of the middle two for an even count)."""
    s = sorted(values)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2
