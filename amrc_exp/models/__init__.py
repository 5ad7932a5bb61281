"""Model creation: any timm model (plus our embedded ones) with weights per `model.weights`.

`model.weights` is one of `hub` (timm pretrained, offline-safe), `random` (timm's init, marked
in results), `shipped` (embedded: the checkpoint that ships with the package, SHA-256 checked),
`train` (embedded: train on first use, then cached) or a path to a weights file.
"""

from __future__ import annotations

import difflib
from typing import Any, Callable, Optional

import timm
import torch
from omegaconf import DictConfig
from torch import nn

from amrc_exp.errors import ConfigError, WeightsError
from amrc_exp.experiment.config import as_plain
from amrc_exp.models import fmnist_vit  # noqa: F401  (registers fmnist_vit* into timm)
from amrc_exp.models.weights import load_file, load_hub

__all__ = ["build_model", "check_model_name", "create_kwargs", "create_model", "suggest_models", "WEIGHT_SOURCES"]


def create_kwargs(model_cfg: DictConfig) -> dict[str, Any]:
    """`timm.create_model` kwargs from the `model` config node (pretrained excluded)."""
    return {
        "num_classes": int(model_cfg.num_classes),
        "img_size": int(model_cfg.img_size),
        "in_chans": int(model_cfg.in_chans),
        **as_plain(model_cfg.kwargs),
    }


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


def create_model(model_cfg: DictConfig, pretrained: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """timm model for the `model` config node: random init, or hub weights if `pretrained`."""
    name = check_model_name(str(model_cfg.name))
    kwargs = create_kwargs(model_cfg)
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
# Each source: (cfg, splits) -> (model, info). A path is the fallback, not a registry entry.


def _seeded_model(cfg: DictConfig, seed: Optional[int] = None) -> nn.Module:
    """Random init from `seed` (default `cfg.seed`; reproducible runs; the caller's RNG state is untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(cfg.seed if seed is None else seed))
        return create_model(cfg.model)[0]


def _random(cfg: DictConfig, splits: Any) -> tuple[nn.Module, dict[str, Any]]:
    return _seeded_model(cfg), {"weights": "random", "weights_path": None, "random_weights": True}


def _hub(cfg: DictConfig, splits: Any) -> tuple[nn.Module, dict[str, Any]]:
    model, info = create_model(cfg.model, pretrained=True)
    return model, {"weights": "hub", "random_weights": False, **info}


def _train(cfg: DictConfig, splits: Any) -> tuple[nn.Module, dict[str, Any]]:
    from amrc_exp.data import build_splits
    from amrc_exp.models.train import load_or_train

    model = _seeded_model(cfg, cfg.model.train.seed)  # the cached weights are a function of the key (seed included)
    if splits is None:
        splits = build_splits(cfg)
    if splits.synthetic:
        raise ConfigError("model.weights", "train", "hub, random or a file path: training on data=synthetic "
                          "would give meaningless weights (use data=fashion_mnist)")
    from amrc_exp.experiment.env import resolve_device

    metrics = load_or_train(model, cfg, splits, resolve_device(cfg.device))  # trains on the run's device
    return model, {"weights": "train", "random_weights": False, **metrics}


def _shipped(cfg: DictConfig, splits: Any) -> tuple[nn.Module, dict[str, Any]]:
    from amrc_exp.models.shipped import load_shipped
    from amrc_exp.models.train import embedded_cache_fields

    model = _seeded_model(cfg)  # forked RNG, as for `train`: the caller's RNG state is untouched
    info = load_shipped(model, str(cfg.model.name), embedded_cache_fields(cfg))
    return model, {"weights": "shipped", "random_weights": False, **info}


def _file(cfg: DictConfig, splits: Any) -> tuple[nn.Module, dict[str, Any]]:
    model = create_model(cfg.model)[0]
    info = load_file(model, str(cfg.model.weights))
    return model, {"weights": "file", "random_weights": False, "weights_path": info["weights_path"]}


WEIGHT_SOURCES: dict[str, Callable[[DictConfig, Any], tuple[nn.Module, dict[str, Any]]]] = {
    "random": _random,
    "hub": _hub,
    "train": _train,
    "shipped": _shipped,
}


def build_model(cfg: DictConfig, splits: Optional[Any] = None) -> tuple[nn.Module, dict[str, Any]]:
    """Create `cfg.model.name` with weights per `cfg.model.weights`; return (model in eval mode, info).

    info: {"weights": hub|random|train|shipped|file, "weights_path", "random_weights", "params"}
    plus, for `train` and `shipped`, {"train_seconds", "train_top1", "test_top1"} (and "cached"
    for `train`, "trained_by" and "weights_sha256" for `shipped`). `splits` is only used
    by `train` (built from `cfg` when not given).
    """
    weights = str(cfg.model.weights)
    source = WEIGHT_SOURCES.get(weights, _file)
    if source is _file and not weights.strip():
        raise WeightsError("model.weights is empty: set model.weights=hub|random|train|/path/to/weights.safetensors")
    model, info = source(cfg, splits)
    model.eval()
    info["params"] = sum(p.numel() for p in model.parameters())
    info.setdefault("weights_path", None)
    return model, info
