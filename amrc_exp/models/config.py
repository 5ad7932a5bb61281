"""The typed settings of a model: which architecture, which weights, and how the embedded
models are trained when `weights="train"`. The experiment layer's Hydra schema nests
`ModelConfig` as its `model` node (the one home of these defaults); a notebook builds it
directly, e.g. ``ModelConfig("fmnist_vit", weights="shipped", num_classes=10, img_size=28,
in_chans=1)`` (the values of `conf/model/fmnist_vit.yaml`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from amrc_exp.compress.config import UNSET, check_recipe, positive_int, seed_int

__all__ = ["ModelConfig", "TrainConfig"]


@dataclass
class TrainConfig:
    """How the embedded model is trained when `model.weights=train` (first use only)."""

    epochs: int = 8
    lr: float = 2.0e-3
    batch_size: int = 64
    weight_decay: float = 0.05
    # The training run's own seed (init and batch order), apart from the run's `seed`: a sweep
    # over seed=0,1,2 (calibration sampling, fine-tune order) compresses ONE trained model.
    seed: int = 0

    def __post_init__(self) -> None:
        check_recipe("model.train", self)
        seed_int("model.train.seed", self.seed)


@dataclass
class ModelConfig:
    name: str = UNSET  # timm model name, or a model registered by amrc_exp (fmnist_vit)
    weights: str = "hub"  # hub | random | shipped | train | path to a .safetensors/.pth file
    num_classes: int = 1000
    img_size: int = 224
    in_chans: int = 3
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model kwargs
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        for key in ("num_classes", "img_size", "in_chans"):
            positive_int(f"model.{key}", getattr(self, key))
        if isinstance(self.train, dict):  # a notebook may pass the recipe as a dict
            self.train = TrainConfig(**self.train)

    def create_kwargs(self) -> dict[str, Any]:
        """`timm.create_model` kwargs (pretrained excluded)."""
        return {"num_classes": int(self.num_classes), "img_size": int(self.img_size),
                "in_chans": int(self.in_chans), **dict(self.kwargs)}
