"""Evaluation: top-1 accuracy and measured inference throughput."""

from __future__ import annotations

import time
from contextlib import nullcontext

import torch
from torch import nn
from tqdm.auto import tqdm


def autocast_for(device: torch.device, enabled: bool):
    """bf16 autocast on CUDA when enabled; a no-op elsewhere (CPU runs stay exact fp32)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


@torch.no_grad()
def top1(model: nn.Module, loader, device: torch.device, amp: bool = False, desc: str = "eval") -> float:
    """Top-1 accuracy in percent over the whole loader."""
    model.eval()
    correct = total = 0
    for images, labels in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True):
        images, labels = images.to(device, non_blocking=True), labels.to(device)
        with autocast_for(device, amp):
            logits = model(images)
        correct += (logits.argmax(-1) == labels).sum().item()
        total += labels.numel()
    return 100.0 * correct / max(total, 1)


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
