"""Model creation: any timm model (plus our embedded ones) with weights per `ModelConfig.weights`.

`weights` is one of `hub` (timm pretrained, offline-safe), `random` (timm's init, marked in
results), `shipped` (embedded: the checkpoint that ships with the package, SHA-256 checked),
`train` (embedded: train on first use, then cached) or a path to a weights file. Everything here
takes typed settings (`ModelConfig`), never the run's Hydra config: a notebook builds the
embedded model with ``build_model(ModelConfig("fmnist_vit", weights="shipped", num_classes=10,
img_size=28, in_chans=1))``.
"""

from __future__ import annotations

import difflib
from typing import Any, Callable, Optional

import timm
import torch
from torch import nn

from amrc_exp.data import Splits
from amrc_exp.errors import ConfigError, WeightsError
from amrc_exp.models import fmnist_vit  # noqa: F401  (registers fmnist_vit* into timm)
from amrc_exp.models.config import ModelConfig, TrainConfig
from amrc_exp.models.train import TrainSetup
from amrc_exp.models.weights import load_file, load_hub

__all__ = ["build_model", "check_model_name", "create_model", "suggest_models", "ModelConfig", "TrainConfig",
           "TrainSetup", "WEIGHT_SOURCES"]


def suggest_models(name: str, limit: int = 5) -> list[str]:
    """A few timm names close to `name` (wildcard on its first word, then string similarity)."""
    names = timm.list_models()
    stem = name.split("_")[0]
    close = difflib.get_close_matches(name, names, n=limit, cutoff=0.6)
    wildcard = [n for n in timm.list_models(f"*{stem}*") if n not in close] if len(stem) >= 3 else []
    return (close + wildcard)[:limit]


def check_model_name(name: str) -> str:
    """`name` if timm (or our registry) knows it; else ConfigError with close timm names."""
    if not timm.is_model(name):
        suggestions = suggest_models(name) or ["deit_base_patch16_224", "vit_base_patch16_224"]
        raise ConfigError("model.name", name, "a timm model name, e.g. " + ", ".join(suggestions))
    return name


def create_model(spec: ModelConfig, pretrained: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """timm model for `spec`: random init, or hub weights if `pretrained`."""
    name = check_model_name(str(spec.name))
    kwargs = spec.create_kwargs()
    create = load_hub if pretrained else _create_random
    try:
        return create(name, kwargs)
    except TypeError as err:
        # Not every timm family takes img_size (CNNs do not): drop it only if it is refused.
        if "img_size" not in str(err):
            raise
        return create(name, {k: v for k, v in kwargs.items() if k != "img_size"})


def _create_random(name: str, kwargs: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    return timm.create_model(name, pretrained=False, **kwargs), {}


# ----------------------------------------------------------------------------- weight sources
# Each source: (spec, seed, splits, cache, device) -> (model, info). A path is the fallback, not a
# registry entry.


def _seeded_model(spec: ModelConfig, seed: int) -> nn.Module:
    """Random init from `seed` (reproducible runs; the caller's RNG state is untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return create_model(spec)[0]


def _random(spec: ModelConfig, seed: int, splits: Optional[Splits], cache: Optional[TrainSetup],
            device: torch.device) -> tuple[nn.Module, dict[str, Any]]:
    return _seeded_model(spec, seed), {"weights": "random", "weights_path": None, "random_weights": True}


def _hub(spec: ModelConfig, seed: int, splits: Optional[Splits], cache: Optional[TrainSetup],
         device: torch.device) -> tuple[nn.Module, dict[str, Any]]:
    model, info = create_model(spec, pretrained=True)
    return model, {"weights": "hub", "random_weights": False, **info}


def _train(spec: ModelConfig, seed: int, splits: Optional[Splits], cache: Optional[TrainSetup],
           device: torch.device) -> tuple[nn.Module, dict[str, Any]]:
    from amrc_exp.models.train import load_or_train

    if splits is None or cache is None:
        raise ValueError("weights='train' needs the data's splits and a TrainSetup (where the trained "
                         "weights are kept); the experiment layer passes both")
    model = _seeded_model(spec, spec.train.seed)  # the cached weights are a function of the key (seed included)
    if splits.synthetic:
        raise ConfigError("model.weights", "train", "hub, random or a file path: training on data=synthetic "
                          "would give meaningless weights (use data=fashion_mnist)")
    metrics = load_or_train(model, spec, splits, cache, device)  # trains on the run's device
    return model, {"weights": "train", "random_weights": False, **metrics}


def _shipped(spec: ModelConfig, seed: int, splits: Optional[Splits], cache: Optional[TrainSetup],
             device: torch.device) -> tuple[nn.Module, dict[str, Any]]:
    from amrc_exp.models.shipped import load_shipped
    from amrc_exp.models.train import trained_weights_fields

    model = _seeded_model(spec, seed)  # forked RNG, as for `train`: the caller's RNG state is untouched
    info = load_shipped(model, str(spec.name), trained_weights_fields(spec))
    return model, {"weights": "shipped", "random_weights": False, **info}


def _file(spec: ModelConfig, seed: int, splits: Optional[Splits], cache: Optional[TrainSetup],
          device: torch.device) -> tuple[nn.Module, dict[str, Any]]:
    model = create_model(spec)[0]
    info = load_file(model, str(spec.weights))
    return model, {"weights": "file", "random_weights": False, "weights_path": info["weights_path"]}


WeightSource = Callable[[ModelConfig, int, Optional[Splits], Optional[TrainSetup], torch.device],
                        tuple[nn.Module, dict[str, Any]]]
WEIGHT_SOURCES: dict[str, WeightSource] = {
    "random": _random,
    "hub": _hub,
    "train": _train,
    "shipped": _shipped,
}


def build_model(spec: ModelConfig, *, seed: int = 0, splits: Optional[Splits] = None,
                cache: Optional[TrainSetup] = None, device: torch.device | str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Create `spec.name` with weights per `spec.weights`; return (model in eval mode, info).

    `seed` seeds a random init; `weights="train"` also needs the data's `splits` (it trains on
    them, on `device`) and a `cache` (where the trained weights are kept and how the data is loaded, `models.train.TrainSetup`).
    info: {"weights": hub|random|train|shipped|file, "weights_path", "random_weights", "params"}
    plus, for `train` and `shipped`, {"train_seconds", "train_top1", "test_top1"} (and "cached"
    for `train`, "trained_by" and "weights_sha256" for `shipped`).
    """
    weights = str(spec.weights)
    source = WEIGHT_SOURCES.get(weights, _file)
    if source is _file and not weights.strip():
        raise WeightsError("model.weights is empty: set model.weights=hub|random|train|/path/to/weights.safetensors")
    model, info = source(spec, seed, splits, cache, torch.device(device))
    model.eval()
    info["params"] = sum(p.numel() for p in model.parameters())
    info.setdefault("weights_path", None)
    return model, info
