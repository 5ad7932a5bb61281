"""Typed settings of one compression (the method, not the experiment), with their checks.

These dataclasses are the ONE home of the method's defaults: the experiment layer's Hydra
schema (`amrc_exp.experiment.config.RunConfig`) nests them as its `decomp`, `schedule`,
`z_type` and `zfit` nodes, and a notebook builds them directly::

    AMRCConfig(ratio=0.5, decomp=DecompConfig("asvd_whiten"), zfit=ZFitConfig(solver="closed_form"))

Every check runs in ``__post_init__`` (torchao's style) and raises `ConfigError` with the
config key the experiment layer uses (``decomp.name``, ``zfit.iters``, ...), the bad value
and what is allowed, so the CLI and a notebook get the same one-line message.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Optional

from amrc_exp.errors import ConfigError
from amrc_exp.math.allocate import SCHEDULES
from amrc_exp.math.compensate import Z_TYPES
from amrc_exp.math.decompose import METHODS

__all__ = ["DEFAULT_PATTERNS", "AMRCConfig", "DecompConfig", "ScheduleConfig", "ZConfig", "ZFitConfig",
           "Choice", "choices", "UNIFORM", "PARAM_UNIFORM", "ASVD_SEARCH", "OUTPUT_AWARE", "TRUNCATION_LOSS", "DOBI",
           "SOLVERS", "check"]

# The four linears of every transformer block (Sec 2: QKV, AttnProj, MLP1, MLP2) in timm's
# naming, plus Swin's patch merging ``layers.<s>.downsample.reduction`` (a dense 4C -> 2C linear,
# ~3% of Swin-B, that Sec 5's fine-tuning list does not free, so it is compressed like the rest).
# Anchored so the classifier head and patch embedding never match; Swin's
# ``layers.1.blocks.0.attn.qkv`` matches through the unanchored prefix.
DEFAULT_PATTERNS: tuple[str, ...] = (
    r"(^|\.)blocks\.\d+\.attn\.(qkv|proj)$",
    r"(^|\.)blocks\.\d+\.mlp\.(fc1|fc2)$",
    r"(^|\.)downsample\.reduction$",  # Swin's patch merging (4C -> 2C between stages)
)
UNIFORM = "uniform"  # the non-mixed baseline: one rank fraction for every layer (not a schedule)
PARAM_UNIFORM = "param_uniform"  # SVD-LLM's / FWSVD's: one kept-parameter fraction for every layer
ASVD_SEARCH = "asvd_search"  # ASVD's sensitivity-based rank search (calibration loss)
OUTPUT_AWARE = "output_aware"  # ours: KL-to-dense sensitivities on the exact spectra, Lagrangian allocation
TRUNCATION_LOSS = "truncation_loss"  # SVD-LLM V2's: per-matrix ratios from the theoretical truncation loss
DOBI = "dobi"  # Dobi-SVD's: truncation positions learned by gradient descent on the task loss
ALLOCATORS = (*SCHEDULES, UNIFORM, PARAM_UNIFORM, ASVD_SEARCH, OUTPUT_AWARE, TRUNCATION_LOSS, DOBI)
SOLVERS = ("gd", "closed_form")


class Choice(str, Enum):
    """A config choice: a str (compares, hashes and serializes as its value) whose Enum type
    lets OmegaConf reject a bad value at compose time, naming the key and the allowed values."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


def choices(name: str, values: tuple[str, ...] | list[str]) -> type[Choice]:
    """A `Choice` Enum whose members are exactly `values` (read from the implementing registry)."""
    return Choice(name, {v: v for v in values})  # type: ignore[return-value]


DecompName = choices("DecompName", tuple(METHODS))
ScheduleName = choices("ScheduleName", ALLOCATORS)
ZName = choices("ZName", tuple(Z_TYPES))
Solver = choices("Solver", SOLVERS)


def as_choice(kind: type[Choice], key: str, value: Any) -> Any:
    """`value` as a member of `kind` (a notebook passes plain strings), else ConfigError."""
    if isinstance(value, kind) or value == UNSET:
        return value
    try:
        return kind(value)
    except ValueError:
        raise ConfigError(key, value, "one of " + ", ".join(m.value for m in kind)) from None
UNSET = "???"  # OmegaConf's MISSING: a schema node whose option the config group fills in


def check(key: str, value: Any, ok: Callable[[Any], bool], allowed: str) -> None:
    """ConfigError(key, value, allowed) unless `ok(value)`; an unset (MISSING) node passes."""
    if value == UNSET:
        return
    try:
        good = bool(ok(value))
    except TypeError:
        good = False
    if not good:
        raise ConfigError(key, value, allowed)


def optional_positive_int(key: str, value: Any) -> None:
    check(key, value, lambda v: v is None or (isinstance(v, int) and v >= 1), "null or an integer >= 1")


def positive_int(key: str, value: Any) -> None:
    check(key, value, lambda v: isinstance(v, int) and v >= 1, "an integer >= 1")


def non_negative_int(key: str, value: Any) -> None:
    check(key, value, lambda v: isinstance(v, int) and v >= 0, "an integer >= 0")


def check_recipe(prefix: str, recipe: Any) -> None:
    """The checks every training recipe shares (epochs, lr, batch_size, weight_decay under `prefix`):
    the embedded model's `model.train` and the partial fine-tune's `finetune`."""
    non_negative_int(f"{prefix}.epochs", recipe.epochs)
    positive_float(f"{prefix}.lr", recipe.lr)
    positive_int(f"{prefix}.batch_size", recipe.batch_size)
    non_negative_float(f"{prefix}.weight_decay", recipe.weight_decay)


def positive_float(key: str, value: Any) -> None:  # inf passes `> 0` and fails hours later
    check(key, value, lambda v: 0 < v < math.inf, "a finite number > 0")


def seed_int(key: str, value: Any) -> None:
    check(key, value, lambda v: isinstance(v, int) and 0 <= v < 2**32, "an integer in [0, 2**32)")


def non_negative_float(key: str, value: Any) -> None:
    check(key, value, lambda v: 0 <= v < math.inf, "a finite number >= 0")


@dataclass
class DecompConfig:
    """Sec 3.1: `svd`, `asvd_mean` (the paper's Eq 6-7) or `asvd_whiten` (ours: Eq 5's optimum);
    the peers `svdllm` (SVD-LLM's whitening), `svdllm_v2` (SVD-LLM V2's two-SVD truncation),
    `dobi` (Dobi-SVD's weight update from truncated activations),
    `asvd` (ASVD's channel scaling) and `fwsvd` (Fisher-weighted SVD), and ours two-sided,
    `whiten_fisher` (asvd_whiten's input and FWSVD's output weighting at once), see `amrc_exp.math.decompose`."""

    name: DecompName = DecompName("asvd_mean")
    damp: float = 1.0e-4  # relative damping of H (asvd_whiten, closed-form Z): keeps singular H solvable
    alpha: float = 0.5  # ASVD's scaling exponent (its paper's default)

    def __post_init__(self) -> None:
        self.name = as_choice(DecompName, "decomp.name", self.name)
        non_negative_float("decomp.damp", self.damp)
        positive_float("decomp.alpha", self.alpha)


@dataclass
class ScheduleConfig:
    """Sec 3.2's rank allocation: Algorithm 1 with the `exp` (Eq 9), `linear` or `oneshot`
    schedule; the baselines `uniform` (one rank fraction) and `param_uniform` (one kept-parameter
    fraction, SVD-LLM / FWSVD); ASVD's `asvd_search`; SVD-LLM V2's `truncation_loss`; Dobi-SVD's
    `dobi` (its training keys: `epochs`, `lr`, `beta`, `penalty`, at its code's defaults); ours,
    `output_aware`."""

    name: ScheduleName = ScheduleName("exp")
    iters: int = 500
    gamma: float = 80.0
    min_rank: int = 1  # 0 lets a layer keep its bias alone
    candidates: int = 6  # output_aware: ranks measured per layer (the rest interpolated)
    # output_aware: also measure the whole model's probe KL at the param_uniform ranks and keep
    # whichever allocation has the lower one (the per-layer sum misleads when nearly all are cut)
    check_uniform: bool = False
    # output_aware: then at most this many one-rank moves between layers, each lowering the whole
    # model's probe KL (`amrc_exp.math.refine`; 0: none)
    refine_steps: int = 0
    # output_aware: stop the refinement after a move that lowered the KL by less than this
    # fraction of it (0: only refine_steps stops it)
    refine_tol: float = 0.0
    # asvd_search / output_aware (and its check and refinement): the first this many of the probe
    # images are what the sensitivities and whole-model KLs are measured on (None: all of them).
    # The measurements' cost is proportional to it (BENCHMARKS.md, "cost model").
    score_samples: Optional[int] = None
    # output_aware, with score_samples: the second-order KL prediction on the first this many
    # probe images; the score_samples measured images are drawn from them with probability
    # proportional to it, and each measured KL is rescaled by the prediction's mean over all of
    # them over its weighted mean on the drawn ones (`compress.kl_predict`; None: off)
    ratio_samples: Optional[int] = None
    epochs: int = 20  # dobi: passes over the labelled probe images
    lr: float = 5 / 2048  # dobi: Adam's step in fractions of a layer's max rank (theirs: 5 of 2048 positions)
    beta: float = 10.0  # dobi: sharpness of the tanh truncation mask, per rank position
    penalty: float = 200.0  # dobi: weight of |kept fraction - target| in the loss

    def __post_init__(self) -> None:
        self.name = as_choice(ScheduleName, "schedule.name", self.name)
        positive_int("schedule.iters", self.iters)
        positive_float("schedule.gamma", self.gamma)
        non_negative_int("schedule.min_rank", self.min_rank)
        positive_int("schedule.candidates", self.candidates)
        check("schedule.check_uniform", self.check_uniform, lambda v: isinstance(v, bool), "true or false")
        check("schedule.check_uniform", self.check_uniform, lambda v: not v or self.name in (OUTPUT_AWARE, UNSET),
              f"false with schedule.name={self.name} (it checks output_aware's allocation only)")
        non_negative_int("schedule.refine_steps", self.refine_steps)
        check("schedule.refine_steps", self.refine_steps, lambda v: not v or self.name in (OUTPUT_AWARE, UNSET),
              f"0 with schedule.name={self.name} (it refines output_aware's allocation only)")
        check("schedule.refine_tol", self.refine_tol,
              lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= v < 1.0, "a number in [0, 1)")
        if self.score_samples is not None:
            positive_int("schedule.score_samples", self.score_samples)
        if self.ratio_samples is not None:
            positive_int("schedule.ratio_samples", self.ratio_samples)
            check("schedule.ratio_samples", self.ratio_samples, lambda v: self.name in (OUTPUT_AWARE, UNSET),
                  f"null with schedule.name={self.name} (it rescales output_aware's KLs only)")
            check("schedule.ratio_samples", self.ratio_samples,
                  lambda v: self.score_samples is not None and v > self.score_samples,
                  f"more than schedule.score_samples={self.score_samples} (the images measured; "
                  "set schedule.score_samples below it)")
        positive_int("schedule.epochs", self.epochs)
        positive_float("schedule.lr", self.lr)
        positive_float("schedule.beta", self.beta)
        non_negative_float("schedule.penalty", self.penalty)


@dataclass
class ZConfig:
    """Sec 3.3: the error-compensation type and its share of each layer's dense parameters."""

    name: ZName = ZName("lowrank")
    fraction: float = 0.05

    def __post_init__(self) -> None:
        self.name = as_choice(ZName, "z_type.name", self.name)
        check("z_type.fraction", self.fraction, lambda v: 0.0 <= v < 1.0, "a number in [0, 1)")


@dataclass
class ZFitConfig:
    """How Z is fitted: `gd` (the paper's Adam on Eq 10, Sec 4.1 item 4) or `closed_form` (ours)."""

    solver: Solver = Solver("gd")
    lr: float = 1.0e-3
    iters: int = 2000
    batch_size: int = 64  # GD mini-batch in samples (Sec 4.1 item 4); 0 = the full calibration set
    max_chunk_gib: Optional[float] = None  # cap of the per-mini-batch Grams (above: full batch); null: by device

    def __post_init__(self) -> None:
        self.solver = as_choice(Solver, "zfit.solver", self.solver)
        positive_float("zfit.lr", self.lr)
        positive_int("zfit.iters", self.iters)
        non_negative_int("zfit.batch_size", self.batch_size)
        check("zfit.max_chunk_gib", self.max_chunk_gib, lambda v: v is None or 0 < v < math.inf,
              "null (by device) or a finite number > 0")


@dataclass
class AMRCConfig:
    """One compression: the budget plus the four stages' settings.

    Args:
        ratio: fraction of the WHOLE model's parameters removed (Tab 2), in (0, 1).
        target_params: an absolute parameter budget instead of `ratio` (Tab 3).
        seed: seeds the GD start of Z, its mini-batch order and the images
            `schedule.ratio_samples` draws.
        patterns: regexes (``re.search``) of the ``nn.Linear`` names to compress.
    """

    ratio: float = 0.5
    target_params: Optional[int] = None
    decomp: DecompConfig = field(default_factory=DecompConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    z_type: ZConfig = field(default_factory=ZConfig)
    zfit: ZFitConfig = field(default_factory=ZFitConfig)
    seed: int = 0
    patterns: tuple[str, ...] = DEFAULT_PATTERNS

    def __post_init__(self) -> None:
        check("ratio", self.ratio, lambda v: 0.0 < v < 1.0, "a number strictly between 0 and 1")
        optional_positive_int("target_params", self.target_params)
        seed_int("seed", self.seed)

    def params_to_remove(self, n0: int) -> int:
        """The whole model's budget: ratio·N0, or N0 − target_params."""
        if self.target_params is not None:
            if self.target_params >= n0:
                raise ConfigError("target_params", self.target_params, f"fewer than the model's {n0} parameters")
            return n0 - self.target_params
        return round(self.ratio * n0)
