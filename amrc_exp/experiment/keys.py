"""The cache keys of a run, built in one place from its typed config (`RunConfig`), in one pass:
the embedded model's trained weights (`train_setup`) and the calibration statistics
(`stats_key`). Each key is a hash (`io.cache_key`) of exactly the fields the cached artefact
depends on, so a sweep over compression settings trains and calibrates once."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from amrc_exp.experiment.config import RunConfig
from amrc_exp.io import cache_key
from amrc_exp.models.fmnist_vit import EMBEDDED_ARCHS
from amrc_exp.models.shipped import shipped_sha256
from amrc_exp.models.train import TrainSetup, trained_weights_fields

__all__ = ["weights_fields", "train_setup", "stats_key_fields", "stats_key", "STATS_FORMAT", "STATS_VERSION"]

STATS_FORMAT = 2  # 2: per-tensor CRC-32 in the manifest
# Bump when calibrate.py changes the numbers it stores (e.g. how ||X_i W||² is summed): older
# entries then miss instead of being read as if the new code had made them.
STATS_VERSION = 3  # 3: abs_mean per channel, optional unnormalised Gram G


def weights_fields(rc: RunConfig, device_type: str = "cpu") -> dict[str, Any]:
    """What trained embedded weights depend on: `models.train.trained_weights_fields` plus the
    data they were trained on (its name and location)."""
    data = {"name": str(rc.data.name), "root": None if rc.data.root is None else str(rc.data.root)}
    return {**trained_weights_fields(rc.model, device_type), "data": data}


def train_setup(rc: RunConfig, device_type: str = "cpu") -> TrainSetup:
    """<cache_dir>/embedded/<key>.{safetensors,json} for this config's trained weights, the fields
    hashed into <key>, and the training loader's options on `device_type`."""
    from amrc_exp.data import loader_options

    fields = weights_fields(rc, device_type)
    folder = Path(str(rc.cache_dir)).expanduser() / "embedded"
    key = cache_key(fields)
    return TrainSetup(folder / f"{key}.safetensors", folder / f"{key}.json", fields,
                      loader_options(rc.data, device_type))


def stats_key_fields(rc: RunConfig, chunk: int, device: str = "cpu", amp: bool = False,
                     gram: bool = False) -> dict[str, Any]:
    """The fields calibration statistics depend on (and nothing else); `chunk` is the number
    of samples per stored calibration chunk (the GD mini-batch, or the whole set). The device
    type and the effective bf16 autocast are part of it: a CUDA bf16 forward gives other
    statistics than a CPU fp32 one, and neither may stand in for the other."""
    model = asdict(rc.model)
    model["registry_arch"] = EMBEDDED_ARCHS.get(str(rc.model.name))  # not in the config; None for timm's
    if model.get("weights") == "train":  # trained here: the statistics depend on what the weights depend on
        model["trained_weights"] = cache_key(weights_fields(rc, device))  # recipe version included
    else:
        model.pop("train", None)  # the training recipe only matters for weights trained here
    if model.get("weights") == "shipped":  # a new shipped checkpoint retires the old statistics
        model["shipped_sha256"] = shipped_sha256(str(rc.model.name))
    data = {k: getattr(rc.data, k) for k in ("name", "root", "synthetic", "num_train")}
    calib = {k: getattr(rc.calib, k) for k in ("num_samples", "heldout_samples")}
    return {"format": STATS_FORMAT, "version": STATS_VERSION, "model": model, "data": data, "calib": calib,
            "seed": rc.seed, "chunk": chunk, "device": device, "amp": bool(amp),
            **({"gram": True} if gram else {})}  # entries without G keep their keys


def stats_key(rc: RunConfig, chunk: int, device: str = "cpu", amp: bool = False, gram: bool = False) -> str:
    return cache_key(stats_key_fields(rc, chunk, device, amp, gram))
