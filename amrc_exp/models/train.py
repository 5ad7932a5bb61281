"""Train the embedded model (`model.weights=train`) once, then serve it from a disk cache.

The recipe: AdamW (no decay on biases / norms / pos-embed / cls token), linear warmup then
cosine decay per step, gradient clipping, cross-entropy, a seeded loader; no augmentation
(a few epochs do not overfit, see AUGMENT). `trained_weights_fields` lists exactly the
settings the trained weights depend on; the experiment layer hashes them (with the data's
location) into the cache key (`experiment.keys`), so sweeps over compression settings train once.
"""

from __future__ import annotations

import fcntl
import math
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from amrc_exp.compress.evaluate import top1
from amrc_exp.data import Splits, make_loader
from amrc_exp.io import atomic_path, atomic_write_json, cpu_model, read_json
from amrc_exp.models.config import ModelConfig
from amrc_exp.models.fmnist_vit import EMBEDDED_ARCHS

# Bump when the training recipe changes in a way that changes the weights: old caches retire.
RECIPE_VERSION = 3
WARMUP_FRACTION = 0.05  # of all steps; short, since the runs are only a few epochs
CLIP_GRAD_NORM = 1.0  # keeps the high peak LR stable (ViTs spike without it)
# A few epochs on 60k images do not overfit: augmentation would only slow convergence.
AUGMENT = False
EVAL_BATCH_SIZE = 500
LOG_EVERY = 50  # steps between progress-bar loss updates (each one is a host-device sync)
# CPU training runs on exactly this many intra-op threads, whatever OMP_NUM_THREADS says: the
# thread count changes the order of float sums in the matmul kernels, and over ~7500 steps that
# changes the checkpoint (measured: 1 vs 2 threads differ by 2.8e-5 in the weights after 150
# steps; the likely cause of the 89.96 / 89.92 / 89.76% test top-1 of checkouts that trained
# under a sweep's OMP_NUM_THREADS=1 or the default 2). With it pinned, a retrain is bit-identical on the same
# torch build and CPU kernel set (`torch.backends.cpu.get_cpu_capability()`, saved with the
# cache entry); another ISA (AVX2 vs AVX-512) or torch version still gives another checkpoint.
TRAIN_THREADS = 2


@dataclass(frozen=True)
class TrainSetup:
    """Where trained embedded weights are kept (`<key>.safetensors` + its `<key>.json`, written
    last), the fields their key hashes (saved with them), and the training DataLoader's options
    (`data.loader_options`). Made by the experiment layer (`experiment.keys.train_setup`)."""

    weights_path: Path
    meta_path: Path
    fields: dict[str, Any]
    loader: dict[str, Any] = field(default_factory=dict)


def train_embedded(model: nn.Module, splits: Splits, spec: ModelConfig,
                   loader: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Train `model` in place with `spec.train`; return metrics (test top-1 on the full val split).
    `loader`: DataLoader options (workers, pinned memory)."""
    # Forked RNG: seeded here (augmentation and loader order reproducible), and the
    # caller's global RNG state is left as it was.
    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(spec.train.seed))
        torch.set_num_threads(TRAIN_THREADS)
        try:
            return {**_train(model, splits, spec, loader or {}), **build_identity()}
        finally:
            torch.set_num_threads(threads)


def build_identity() -> dict[str, Any]:
    """What besides the config a CPU checkpoint depends on (saved with it, for the record)."""
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": TRAIN_THREADS, "processor": cpu_model()}


def _train(model: nn.Module, splits: Splits, spec: ModelConfig, loader_options: dict[str, Any]) -> dict[str, Any]:
    train_cfg = spec.train
    train_set = splits.train_full if AUGMENT else splits.train_plain
    if train_set is None:  # a hand-built Splits without the full splits
        train_set = splits.train
    loader = make_loader(train_set, int(train_cfg.batch_size), shuffle=True, seed=int(train_cfg.seed), drop_last=True,
                         **loader_options)
    total_steps = max(1, int(train_cfg.epochs) * len(loader))
    warmup_steps = max(1, int(WARMUP_FRACTION * total_steps))
    optimizer = _adamw(model, float(train_cfg.lr), float(train_cfg.weight_decay))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _warmup_cosine(step, warmup_steps, total_steps))

    device = next(model.parameters()).device  # the run's device: the caller moved the model there
    model.train()
    start = time.perf_counter()
    correct = seen = 0
    epoch_losses: list[float] = []
    with tqdm(total=total_steps, desc=f"train {spec.name}", unit="step",
              mininterval=1.0 if sys.stderr.isatty() else 30.0) as bar:
        for epoch in range(int(train_cfg.epochs)):
            # Counted on the device and read once per epoch: no host sync per step on a GPU.
            correct_t, seen = torch.zeros((), dtype=torch.long, device=device), 0
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            for step, (images, labels) in enumerate(loader):
                images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                logits = model(images)
                loss = F.cross_entropy(logits, labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if CLIP_GRAD_NORM:
                    nn.utils.clip_grad_norm_(model.parameters(), CLIP_GRAD_NORM)
                optimizer.step()
                schedule.step()
                correct_t += (logits.argmax(-1) == labels).sum()
                loss_sum += loss.detach().double()
                seen += len(labels)
                if step % LOG_EVERY == 0:
                    bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}", refresh=False)
                bar.update()
            correct = int(correct_t)
            epoch_losses.append(round(float(loss_sum) / max(1, len(loader)), 5))  # mean train loss (W&B curve)
            bar.write(f"epoch {epoch + 1}/{int(train_cfg.epochs)}: last loss {loss.item():.3f}, "
                      f"train top-1 {100.0 * correct / max(seen, 1):.2f}, {time.perf_counter() - start:.0f}s")
    train_seconds = time.perf_counter() - start
    test_set = splits.val_full if splits.val_full is not None else splits.val
    test_top1 = top1(model, make_loader(test_set, EVAL_BATCH_SIZE, shuffle=False, seed=0), device, desc="test")
    model.eval()
    return {
        "train_seconds": round(train_seconds, 2),
        "train_top1": round(100.0 * correct / max(seen, 1), 3),
        "test_top1": round(test_top1, 3),
        "epochs": int(train_cfg.epochs),
        "steps": total_steps,
        "epoch_losses": epoch_losses,
    }


def trained_weights_fields(spec: ModelConfig, device_type: str = "cpu") -> dict[str, Any]:
    """Exactly the settings trained weights depend on, besides the data: the recipe version, the
    architecture, `model.train.*` and the device type it trains on (a shipped checkpoint's
    sidecar records them; the cache key adds the data's location)."""
    return {
        "recipe": {"version": RECIPE_VERSION, "warmup": WARMUP_FRACTION, "clip": CLIP_GRAD_NORM,
                   "augment": AUGMENT,
                   "threads": TRAIN_THREADS},
        "model": {
            "name": str(spec.name),
            "arch": EMBEDDED_ARCHS.get(str(spec.name)),  # a resized registry entry retires old caches
            "img_size": int(spec.img_size),
            "in_chans": int(spec.in_chans),
            "num_classes": int(spec.num_classes),
            "kwargs": dict(spec.kwargs),
            "train": {k: v for k, v in asdict(spec.train).items() if k != "seed"},
        },
        "seed": int(spec.train.seed),  # where the run seed used to be: the keys of seed 0 stay
        # Trained on a GPU, the weights differ (other kernels): keyed apart. CPU keys unchanged.
        **({"device": device_type} if device_type != "cpu" else {}),
    }


def load_or_train(model: nn.Module, spec: ModelConfig, splits: Splits, setup: TrainSetup,
                  device: torch.device | str = "cpu") -> dict[str, Any]:
    """Load the cached trained weights into `model`, or train them on `device` and cache them.
    The model is left on `device`.

    Returns the metrics plus {"cached": bool, "weights_path": ...}. A corrupt or incomplete
    cache entry is reported with a warning and retrained. Concurrent jobs (a parallel sweep)
    wait on a file lock, so only one of them trains.
    """
    device = torch.device(device)
    weights_path, meta_path = setup.weights_path, setup.meta_path
    model.to(device)
    with _file_lock(weights_path.with_suffix(".lock")):
        metrics = _load_cached(model, weights_path, meta_path)
        if metrics is not None:
            return {**metrics, "cached": True, "weights_path": str(weights_path)}
        metrics = train_embedded(model, splits, spec, setup.loader)
        _save_cache(model, weights_path, meta_path, {**metrics, "fields": setup.fields})
    return {**metrics, "cached": False, "weights_path": str(weights_path)}


def _load_cached(model: nn.Module, weights_path: Path, meta_path: Path) -> dict[str, Any] | None:
    if not weights_path.exists() and not meta_path.exists():
        return None
    from amrc_exp.errors import WeightsError
    from amrc_exp.models.weights import load_file

    try:
        metrics = read_json(meta_path)  # written last: its absence means an interrupted save
        load_file(model, weights_path)
    except (OSError, ValueError, WeightsError) as err:
        warnings.warn(f"embedded-model cache entry {weights_path} is unreadable ({err}); retraining",
                      stacklevel=3)
        return None
    return {k: v for k, v in metrics.items() if k != "fields"}


def _save_cache(model: nn.Module, weights_path: Path, meta_path: Path, metrics: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    state_dict = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(weights_path) as tmp:
        save_file(state_dict, str(tmp))
    atomic_write_json(meta_path, metrics)  # the commit marker: written after the weights


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _adamw(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    # Decay only matrices: biases, norms, pos-embed and cls token are excluded (timm's rule).
    no_decay = getattr(model, "no_weight_decay", lambda: set())()
    decay, keep = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (keep if param.ndim <= 1 or name in no_decay else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr)


def _warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
