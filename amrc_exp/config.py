"""Typed run configuration: the schema Hydra composes into, and the checks run at start-up.

The dataclasses are registered in Hydra's ConfigStore as `config_schema` and pulled into
`conf/config.yaml`'s defaults, so a wrong *type* fails at compose time. `validate()` then
checks values (ranges, choices) and raises `ConfigError` naming the key, the bad value and
what is allowed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from amrc_exp.errors import ConfigError


@dataclass
class TrainConfig:
    """How the embedded model is trained when `model.weights=train` (first use only)."""

    epochs: int = 6
    lr: float = 2.0e-3
    batch_size: int = 128
    weight_decay: float = 0.05


@dataclass
class ModelConfig:
    name: str = MISSING  # timm model name, or a model registered by amrc_exp (fmnist_vit)
    weights: str = "hub"  # hub | random | train | path to a .safetensors/.pth file
    num_classes: int = 1000
    img_size: int = 224
    in_chans: int = 3
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model kwargs
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class DataConfig:
    name: str = MISSING  # fashion_mnist | imagenet | synthetic
    root: Optional[str] = None
    num_classes: int = 10
    synthetic: bool = False  # True: random tensors, results are marked and never fill a table
    num_train: int = 1024  # synthetic only: sizes of the random splits
    num_val: int = 256
    augment: bool = True  # fine-tuning images: train transforms (crop/flip) or the eval view
    finetune_subset: Optional[int] = None  # fine-tune on a seeded subset of train (None: all)
    eval_subset: Optional[int] = None  # evaluate on a seeded subset of val (None: all)
    num_workers: int = 0


@dataclass
class DecompConfig:
    name: str = MISSING  # svd | asvd_mean | asvd_whiten
    damp: float = 1.0e-4  # relative damping of H (asvd_whiten; keeps singular H solvable)


@dataclass
class ScheduleConfig:
    name: str = MISSING  # exp | linear | oneshot | uniform
    iters: int = 500
    gamma: float = 80.0
    min_rank: int = 1


@dataclass
class ZConfig:
    name: str = MISSING  # lowrank | sparse_unstructured | sparse_structured | diagonal | none
    fraction: float = 0.05  # Z's share of the layer's dense parameters


@dataclass
class LoggerConfig:
    name: str = "wandb"  # wandb | none
    mode: str = "offline"  # offline | online | disabled
    project: str = "amrc_exp"
    group: Optional[str] = None


@dataclass
class CalibConfig:
    num_samples: int = 1024  # proxy dataset size (Sec 4.1 item 1)
    heldout_samples: int = 256  # held-out samples for residual-error reporting (Tab 1, Fig 3)
    batch_size: int = 64


@dataclass
class ZFitConfig:
    solver: str = "gd"  # gd (the paper's, Sec 3.3) | closed_form (ours, exact where it exists)
    lr: float = 1.0e-3
    iters: int = 2000
    batch_size: int = 64  # gd mini-batch in samples (Sec 4.1 item 4); 0 = full calibration set
    max_chunk_gib: float = 2.0  # memory cap for the per-mini-batch Grams; above it: full batch


@dataclass
class FinetuneConfig:
    epochs: int = 20  # Sec 4.1 item 5; 0 disables fine-tuning
    lr: float = 1.0e-4
    batch_size: int = 64
    weight_decay: float = 0.0


@dataclass
class PTQConfig:
    bits: int = 0  # 0: off; N: N-bit RTN channel-wise on every weight matrix (App. B)


@dataclass
class EvalConfig:
    batch_size: int = 256


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    decomp: DecompConfig = field(default_factory=DecompConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    z_type: ZConfig = field(default_factory=ZConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    calib: CalibConfig = field(default_factory=CalibConfig)
    zfit: ZFitConfig = field(default_factory=ZFitConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    ptq: PTQConfig = field(default_factory=PTQConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # Fraction of the WHOLE model's parameters removed (Tab 2). A root float, not a group:
    # Hydra rejects float group overrides, and `ratio=0.5` must work as typed.
    ratio: float = 0.5
    compress: bool = True  # false: the dense model as loaded, evaluated (and PTQ'd): Tab 3/4 references
    target_params: Optional[int] = None  # absolute budget instead of ratio (Tab 3)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    amp: bool = True  # autocast on CUDA for forward passes (calibration, eval)
    cache_dir: str = "~/.cache/amrc_exp"
    out_dir: str = "."  # set to Hydra's run dir by conf/config.yaml


def register_schema() -> None:
    """Register the schema so `conf/config.yaml` can list `config_schema` in its defaults."""
    ConfigStore.instance().store(name="config_schema", node=RunConfig)


CHOICES: dict[str, tuple[str, ...]] = {
    "data.name": ("fashion_mnist", "imagenet", "synthetic"),
    "decomp.name": ("svd", "asvd_mean", "asvd_whiten"),
    "schedule.name": ("exp", "linear", "oneshot", "uniform"),
    "z_type.name": ("lowrank", "sparse_unstructured", "sparse_structured", "diagonal", "none"),
    "logger.name": ("wandb", "none"),
    "logger.mode": ("offline", "online", "disabled"),
    "zfit.solver": ("gd", "closed_form"),
    "device": ("auto", "cpu", "cuda"),
}

POSITIVE_INTS = (
    "model.num_classes", "model.img_size", "model.in_chans", "model.train.batch_size",
    "data.num_classes", "data.num_train", "data.num_val",
    "schedule.iters", "schedule.min_rank", "calib.num_samples", "calib.heldout_samples",
    "calib.batch_size", "zfit.iters", "finetune.batch_size", "eval.batch_size",
)
NON_NEGATIVE_INTS = ("model.train.epochs", "finetune.epochs", "data.num_workers", "zfit.batch_size")
POSITIVE_FLOATS = ("schedule.gamma", "zfit.lr", "finetune.lr", "model.train.lr", "zfit.max_chunk_gib")
NON_NEGATIVE_FLOATS = ("finetune.weight_decay", "model.train.weight_decay")
OPTIONAL_POSITIVE_INTS = ("data.finetune_subset", "data.eval_subset", "target_params")


def validate(cfg: DictConfig) -> None:
    """Check values the types cannot express; raise ConfigError on the first bad one."""
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise ConfigError(key, value, "one of " + ", ".join(allowed))
    if not 0.0 < cfg.ratio < 1.0:
        raise ConfigError("ratio", cfg.ratio, "a number strictly between 0 and 1")
    for key in POSITIVE_INTS:
        _check(cfg, key, lambda v: v >= 1, "an integer >= 1")
    for key in NON_NEGATIVE_INTS:
        _check(cfg, key, lambda v: v >= 0, "an integer >= 0")
    for key in POSITIVE_FLOATS:  # inf passes `> 0` and only fails hours later: finite too
        _check(cfg, key, lambda v: 0 < v < math.inf, "a finite number > 0")
    for key in NON_NEGATIVE_FLOATS:
        _check(cfg, key, lambda v: 0 <= v < math.inf, "a finite number >= 0")
    for key in OPTIONAL_POSITIVE_INTS:
        _check(cfg, key, lambda v: v is None or v >= 1, "null or an integer >= 1")
    _check(cfg, "z_type.fraction", lambda v: 0.0 <= v < 1.0, "a number in [0, 1)")
    _check(cfg, "decomp.damp", lambda v: 0 <= v < math.inf, "a finite number >= 0")
    _check(cfg, "ptq.bits", lambda v: v == 0 or 2 <= v <= 8, "0 (off) or an integer 2..8")


def _check(cfg: DictConfig, key: str, ok, allowed: str) -> None:
    value = OmegaConf.select(cfg, key)
    if not ok(value):
        raise ConfigError(key, value, allowed)
