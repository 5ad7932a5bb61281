"""On-disk cache of calibration statistics, keyed by exactly the config fields they depend on.

`calibration_stats` wraps the library's `calibrate`: the library never sees the cache. A sweep over ratio, z_type, schedule, decomp or the Z solver reuses one calibration. Entries
are a safetensors file plus a JSON manifest written last (both atomically), so an entry whose
manifest is missing, unreadable or disagrees with the tensors is treated as absent and rebuilt.
"""

from __future__ import annotations

import logging
import uuid
import zlib
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from amrc_exp.compress.calibrate import CalibStats, LayerStats, calibrate, find_layers, gd_chunk_size
from amrc_exp.compress.probe import take_probe
from amrc_exp.compress.search import needs_gram, needs_probe
from amrc_exp.experiment.config import RunConfig
from amrc_exp.experiment.keys import STATS_FORMAT, stats_key
from amrc_exp.io import atomic_path, atomic_write_json, read_json

log = logging.getLogger(__name__)
CACHED = ("H", "x_rep", "abs_mean", "G")  # the LayerStats tensors an entry stores (fisher is per run)
REQUIRED = ("H", "x_rep")  # in every entry; the others only where collected


def _paths(cache_dir: str, key: str) -> tuple[Path, Path]:
    root = Path(cache_dir).expanduser() / "stats"
    return root / f"{key}.safetensors", root / f"{key}.json"


def save_stats(cache_dir: str, key: str, sets: dict[str, dict[str, LayerStats]]) -> None:
    """Store {set_name: {layer: LayerStats}} (e.g. calib and heldout) under `key`."""
    tensors, manifest = {}, {"format": STATS_FORMAT, "sets": {}}
    for set_name, stats in sets.items():
        manifest["sets"][set_name] = {}
        for layer, s in stats.items():
            for stat in CACHED:
                if getattr(s, stat) is not None:
                    tensors[f"{set_name}/{layer}/{stat}"] = getattr(s, stat).detach().cpu().contiguous()
            manifest["sets"][set_name][layer] = {"n_samples": s.n_samples, "n_tokens": s.n_tokens,
                                                  "n_skipped": s.n_skipped}
    # One id in both files: a manifest is only ever paired with the tensors of its own save.
    manifest["entry"] = uuid.uuid4().hex
    # A CRC-32 of every tensor's bytes: a file with intact sizes and header but damaged data
    # (zeroed blocks) must not pass. Cost: one read of the bytes, measured 2.15 GiB/s on the
    # project's CPU (DeiT-B's 2.35 GB of statistics: ~1.1 s per save or load, against ~400 s
    # of CPU calibration).
    manifest["crc32"] = {name: _crc(t) for name, t in tensors.items()}
    tensor_path, manifest_path = _paths(cache_dir, key)
    try:
        with atomic_path(tensor_path) as tmp:
            save_file(tensors, str(tmp), metadata={"entry": manifest["entry"]})
        atomic_write_json(manifest_path, manifest)  # written last: its presence marks a valid entry
    except (OSError, SafetensorError) as err:  # a full or read-only cache must not cost the statistics
        log.warning("could not write calibration cache entry %s (%s); continuing without caching",
                    tensor_path, err)


def load_stats(cache_dir: str, key: str) -> dict[str, dict[str, LayerStats]] | None:
    """The cached entry, or None when absent or corrupt (a corrupt one is reported)."""
    tensor_path, manifest_path = _paths(cache_dir, key)
    if not manifest_path.exists():
        return None
    try:
        manifest = read_json(manifest_path)
        with safe_open(str(tensor_path), framework="pt") as f:
            entry = (f.metadata() or {}).get("entry")
            if entry != manifest.get("entry"):
                raise ValueError("tensor file and manifest come from different saves")
            # Cloned into torch's own (64-byte aligned) memory: safetensors hands out tensors at
            # the file's 8-byte offsets, and MKL's kernels (e.g. the triangular solves of the
            # whitening) sum in another order on unaligned data, so a cache read came out 1 ulp
            # away from a fresh calibration on AMD EPYC (tests/test_determinism.py).
            tensors = {k: f.get_tensor(k).clone() for k in f.keys()}
        expected = manifest.get("crc32", {})
        bad = [k for k, t in tensors.items() if expected.get(k) != _crc(t)]
        if bad:
            raise ValueError(f"checksum mismatch in {len(bad)} tensor(s), e.g. {bad[0]}")
        sets = {}
        for set_name, layers in manifest["sets"].items():
            sets[set_name] = {
                layer: LayerStats(**{stat: tensors[f"{set_name}/{layer}/{stat}"] if stat in REQUIRED
                                     else tensors.get(f"{set_name}/{layer}/{stat}") for stat in CACHED},
                                  n_samples=meta["n_samples"], n_tokens=meta["n_tokens"],
                                  n_skipped=meta["n_skipped"])
                for layer, meta in layers.items()
            }
        _check_finite(sets)
        return sets
    except Exception as err:  # noqa: BLE001 - any unreadable entry is recomputed, never trusted
        log.warning("calibration cache entry %s is corrupt (%s); recomputing", tensor_path.name, err)
        manifest_path.unlink(missing_ok=True)
        return None


def _crc(t: torch.Tensor) -> int:
    """CRC-32 of a CPU tensor's bytes (no copy for a contiguous tensor)."""
    return zlib.crc32(memoryview(t.contiguous().view(torch.uint8).numpy()))


def _check_finite(sets: dict[str, dict[str, LayerStats]]) -> None:
    for stats in sets.values():
        for layer, s in stats.items():
            if not all(bool(torch.isfinite(t).all()) for t in s.tensors().values()):
                raise ValueError(f"non-finite statistics for {layer}")


def calibration_stats(model: nn.Module, splits: Any, cfg: RunConfig, device: torch.device,
                      amp: bool) -> tuple[CalibStats, bool]:
    """`calibrate` on the run's calibration and held-out splits (in GD mini-batch chunks),
    or the cached statistics of an earlier run with the same key. Returns (stats on `device`, hit)."""
    from amrc_exp.data import loader_options, make_loader

    layers = find_layers(model)
    n_calib = len(splits.calib)
    chunk = gd_chunk_size(cfg.zfit.batch_size, cfg.zfit.max_chunk_gib, layers, n_calib, device)
    method = cfg.amrc()  # converted once: what the statistics must hold depends on the method
    gram = needs_gram(method)
    key = stats_key(cfg, chunk, torch.device(device).type, amp and torch.device(device).type == "cuda", gram)

    def loader(dataset: Any) -> Any:
        return make_loader(dataset, cfg.calib.batch_size, shuffle=False, seed=cfg.seed,
                           **loader_options(cfg.data, device))

    # The probe (a few labelled calibration images) is data, not statistics: read, never cached.
    probe = take_probe(loader(splits.calib), min(cfg.calib.probe_samples, n_calib)) if needs_probe(method) else None
    sets = load_stats(cfg.cache_dir, key)
    if sets is not None:
        chunks = [sets[k] for k in sorted(sets) if k.startswith("calib/")]
        return CalibStats.from_chunks(chunks, sets["heldout"], probe).to(device), True

    stats = calibrate(model, loader(splits.calib), loader(splits.heldout), num_samples=n_calib,
                      heldout_samples=len(splits.heldout), chunk_size=chunk, layers=layers,
                      device=device, amp=amp, gram=gram)
    chunks = stats.chunks or [stats.calib]
    save_stats(cfg.cache_dir, key, {"heldout": stats.heldout, **{f"calib/{i:04d}": c for i, c in enumerate(chunks)}})
    return replace(stats, probe=probe).to(device), False
