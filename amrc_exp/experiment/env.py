"""A run's environment: seeds, the device, stage timing, writable directories."""

from __future__ import annotations

import logging
import os
import random
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from amrc_exp.errors import ConfigError, DiskSpaceError

log = logging.getLogger(__name__)


class StageTimer:
    """Wall-clock seconds per stage, in the order the stages ran."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        log.info("stage %s ...", name)
        start = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - start, 3)
        log.info("stage %s done in %.1f s", name, self.seconds[name])


def apply_thread_env() -> None:
    """Honour OMP_NUM_THREADS (e.g. a sweep's `hydra.job.env_set`) even when torch was imported
    before Hydra set it: torch reads the variable only at import, and the config schema imports
    the library, hence torch."""
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0 and torch.get_num_threads() != int(threads):
        torch.set_num_threads(int(threads))


def apply_precision(device: torch.device, tf32: bool) -> dict[str, bool]:
    """Set TF32 for cuBLAS and cuDNN on CUDA (both off unless asked: cuDNN's default is on,
    which alone puts ~1e-3 relative error in the patch embedding); return what is in force."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
    return {"tf32_matmul": device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32,
            "tf32_cudnn": device.type == "cuda" and torch.backends.cudnn.allow_tf32}


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", name, "auto or cpu (no CUDA device is visible)")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(str(name))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_writable(path: Path, key: str = "out_dir") -> None:
    """Create `path` and prove a file can be written there, before any work is done."""
    fix = {"out_dir": "set hydra.run.dir= (or hydra.sweep.dir= for -m) to a writable path",
           "cache_dir": "set cache_dir= (or AMRC_CACHE_DIR) to a writable path"}[key]
    probe = path / f".write_probe.{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        blocker = path.absolute()
        while not blocker.exists() and blocker.parent != blocker:
            blocker = blocker.parent
        why = f"{blocker} is not a directory" if not blocker.is_dir() else f"{err.strerror or err}: {blocker}"
        raise ConfigError(key, str(path), f"a writable directory ({why}); {fix}") from None


def check_free_space(path: Path, needed: int) -> None:
    """DiskSpaceError, before the long stages, when `path`'s file system has less than `needed`
    bytes free (what the export will write, plus a margin)."""
    import shutil

    free = shutil.disk_usage(path).free
    if free < needed:
        raise DiskSpaceError(f"not enough free space for the results in {path}: the export needs about "
                             f"{needed / 2**20:.1f} MiB, {free / 2**20:.1f} MiB are free; free some space or "
                             "set hydra.run.dir= (hydra.sweep.dir= for -m) elsewhere")
