"""A run's data and model, from its config converted once: the experiment layer's face over the
typed `data.build_splits` and `models.build_model` (which never see Hydra)."""

from __future__ import annotations

from typing import Any, Optional

from omegaconf import DictConfig
from torch import nn

from amrc_exp.data import Splits, build_splits
from amrc_exp.experiment.config import RunConfig, to_run_config
from amrc_exp.experiment.env import resolve_device
from amrc_exp.experiment.keys import train_setup
from amrc_exp.models import build_model

__all__ = ["load_splits", "load_model"]


def load_splits(cfg: DictConfig | RunConfig, module: Optional[nn.Module] = None) -> Splits:
    """train / val / calib / heldout for the run (`data.build_splits` with the run's settings)."""
    rc = to_run_config(cfg)
    return build_splits(rc.data, rc.model, calib_samples=rc.calib.num_samples,
                        heldout_samples=rc.calib.heldout_samples, seed=rc.seed, cache_dir=rc.cache_dir,
                        module=module)


def load_model(cfg: DictConfig | RunConfig, splits: Optional[Splits] = None) -> tuple[nn.Module, dict[str, Any]]:
    """The run's model with its weights (`models.build_model`); `model.weights=train` trains on
    the run's device (on `splits`, built here if not given) into the run's cache."""
    rc = to_run_config(cfg)
    if str(rc.model.weights) != "train":
        return build_model(rc.model, seed=rc.seed)
    device = resolve_device(rc.device)
    return build_model(rc.model, seed=rc.seed, splits=splits if splits is not None else load_splits(rc),
                       cache=train_setup(rc, device.type), device=device)
