"""Wall time and peak memory per stage, and a description of the machine (for `amrc_exp.report.bench`).

`StageMeter` is a drop-in for `run.StageTimer` (``with meter("calibrate"): ...``) that also
records, per stage:

* the peak resident set size (RSS) of the process during the stage: a background thread
  samples the current RSS (psutil, else ``/proc/self/statm``) every `interval` seconds, and
  when the process-lifetime peak (``getrusage`` ``ru_maxrss``) rose during the stage, that
  new peak was reached in the stage and is exact, so it is taken too;
* on CUDA, ``torch.cuda.max_memory_allocated`` after resetting the peak at the stage's start
  (the device is synchronized at both ends so the time covers the queued kernels).
"""

from __future__ import annotations

import os
import platform
import resource
import sys
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch

from amrc_exp.io import cpu_model

MIB = 2**20


def _rss_reader() -> Callable[[], int]:
    try:
        import psutil

        proc = psutil.Process()
        return lambda: int(proc.memory_info().rss)
    except ImportError:  # psutil is a dependency, but the meter must not need it
        page = os.sysconf("SC_PAGE_SIZE")

        def statm() -> int:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * page
        return statm


current_rss = _rss_reader()


def max_rss() -> int:
    """The process's peak RSS so far, in bytes (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class _Sampler(threading.Thread):
    """Keeps the highest current RSS seen until stopped."""

    def __init__(self, interval: float) -> None:
        super().__init__(daemon=True)
        self.interval, self.peak = interval, current_rss()
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            self.peak = max(self.peak, current_rss())

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return max(self.peak, current_rss())


class PassCounter:
    """Forward passes through a model's blocks (`compress.staged.Chain.blocks`), counted by
    forward hooks: `image_passes` is images x blocks run / blocks, i.e. whole-model forwards of
    one image (a pass from block b onward counts (blocks - b) / blocks of one). Every unit weighs
    the same: right for ViT/DeiT, whose blocks are identical, and close for Swin, whose stages
    trade 4x fewer tokens for 2x the width, so a block's linears cost the same in every stage
    (its patch-merging units are lighter and count as blocks). Backward passes (FWSVD's Fisher,
    Dobi-SVD's training) are not counted: each costs about two forwards more."""

    def __init__(self) -> None:
        self.block_images, self.blocks, self._handles = 0, 1, []

    def attach(self, model: torch.nn.Module) -> None:
        from amrc_exp.compress.staged import chain_of

        self.detach()
        blocks = chain_of(model).blocks or (model,)
        self.blocks = len(blocks)

        def count(module: torch.nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            self.block_images += int(inputs[0].shape[0]) if inputs and hasattr(inputs[0], "shape") else 1
        self._handles = [b.register_forward_hook(count) for b in blocks]

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def image_passes(self) -> float:
        return self.block_images / self.blocks


class StageMeter:
    """Seconds and peak memory per stage, in run order; a stage name seen twice gets a suffix.
    With a `PassCounter`, each stage also records the forward passes it ran (`image_passes`)."""

    def __init__(self, device: torch.device, interval: float = 0.005, passes: PassCounter | None = None) -> None:
        self.device, self.interval, self.passes = device, interval, passes
        self.stages: dict[str, dict[str, Any]] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        peak_before, rss_start = max_rss(), current_rss()
        passes_before = self.passes.image_passes() if self.passes else None
        sampler = _Sampler(self.interval)
        sampler.start()
        start = time.perf_counter()
        try:
            yield
            if cuda:
                torch.cuda.synchronize(self.device)
        finally:
            seconds = time.perf_counter() - start
            sampled = sampler.stop()
        peak_after = max_rss()
        row = {
            "seconds": round(seconds, 6),
            "rss_start_mib": round(rss_start / MIB, 1),
            "rss_end_mib": round(current_rss() / MIB, 1),
            # a new process-lifetime peak during the stage was reached in the stage: exact
            "rss_peak_mib": round(max(sampled, peak_after if peak_after > peak_before else 0) / MIB, 1),
            "process_peak_rss_mib": round(peak_after / MIB, 1),
            "cuda_peak_mib": round(torch.cuda.max_memory_allocated(self.device) / MIB, 1) if cuda else None,
        }
        if self.passes is not None:
            row["image_passes"] = round(self.passes.image_passes() - passes_before, 2)
        key, n = name, 2
        while key in self.stages:
            key, n = f"{name}_{n}", n + 1
        self.stages[key] = row

    def take(self) -> dict[str, dict[str, Any]]:
        """The stages recorded so far; the meter starts empty again."""
        stages, self.stages = self.stages, {}
        return stages


def machine_info(device: torch.device) -> dict[str, Any]:
    """CPU model, cores, memory, torch build and threads, and the accelerator if one is used."""
    info: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gib": _mem_total_gib(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "env_threads": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")},
        "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda)
    return info


def _mem_total_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None
