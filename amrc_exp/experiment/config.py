"""The experiment's typed configuration: the schema Hydra composes into, converted once.

`RunConfig` is registered in Hydra's ConfigStore as `config_schema` and pulled into
`conf/config.yaml`'s defaults, so a wrong *type* fails at compose time. `to_run_config(cfg)`
turns the composed DictConfig into these dataclasses (`OmegaConf.to_object`) once per run;
every dataclass checks its values in ``__post_init__`` and raises `ConfigError` naming the
key, the bad value and what is allowed. The method's nodes (decomp, schedule, z_type, zfit)
are the library's own dataclasses (`amrc_exp.compress.config`), the `model` and `data` nodes
those of `amrc_exp.models.config` and `amrc_exp.data`: defaults live there, once.
"""

from __future__ import annotations

import difflib
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from amrc_exp.compress.finetune import LOSSES, SCOPES, FinetuneLoss
from amrc_exp.errors import UnknownKeyError
from amrc_exp.compress.config import (
    AMRCConfig,
    DecompConfig,
    ScheduleConfig,
    ZConfig,
    ZFitConfig,
    as_choice,
    check,
    check_recipe,
    choices,
    non_negative_float,
    positive_float,
    positive_int,
)
from amrc_exp.data import DataConfig
from amrc_exp.models.config import ModelConfig

LOGGERS = ("wandb", "none")
LOGGER_MODES = ("offline", "online", "disabled")
DEVICES = ("auto", "cpu", "cuda")
METHODS = ("paper", "ours", "svd_ft", "dense", "svd", "svdllm", "svdllm_v2", "dobi", "asvd", "fwsvd", "ours_oa", "ours_kd", "ours_fm", "ours_wf",
           "ours_wf_kd")  # conf/method/*.yaml
LoggerName, LoggerMode, Device, LossName, ScopeName = (choices(n, v) for n, v in (
    ("LoggerName", LOGGERS), ("LoggerMode", LOGGER_MODES), ("Device", DEVICES),
    ("LossName", tuple(LOSSES)), ("ScopeName", SCOPES)))


@dataclass
class LoggerConfig:
    name: LoggerName = LoggerName("wandb")
    mode: LoggerMode = LoggerMode("offline")
    project: str = "amrc_exp"  # WANDB_PROJECT wins
    entity: Optional[str] = None  # WANDB_ENTITY wins
    group: Optional[str] = None
    init_timeout: float = 5.0  # seconds an online W&B init may take before the run logs offline

    def __post_init__(self) -> None:
        positive_float("logger.init_timeout", self.init_timeout)
        self.name = as_choice(LoggerName, "logger.name", self.name)
        self.mode = as_choice(LoggerMode, "logger.mode", self.mode)


@dataclass
class CalibConfig:
    num_samples: int = 1024  # proxy dataset size (Sec 4.1 item 1)
    heldout_samples: int = 256  # held-out samples for residual-error reporting (Tab 1, Fig 3)
    batch_size: int = 64
    probe_samples: int = 256  # of the calibration images: fwsvd's Fisher, asvd_search / output_aware's sensitivities

    def __post_init__(self) -> None:
        for key in ("num_samples", "heldout_samples", "batch_size", "probe_samples"):
            positive_int(f"calib.{key}", getattr(self, key))


@dataclass
class FinetuneConfig:
    epochs: int = 20  # Sec 4.1 item 5; 0 disables fine-tuning
    lr: float = 1.0e-4
    batch_size: int = 64
    weight_decay: float = 0.0
    loss: LossName = "ce"  # ce (the paper) | kd (distil the dense model) | ce+kd
    kd_temperature: float = 2.0  # T of the softened outputs (kd, ce+kd)
    kd_weight: float = 0.5  # the KD share of ce+kd
    params: ScopeName = "partial"  # partial (the paper: LN, biases, head, patch embed) | all (+ U, V, Z, dense weights)
    feature_weight: float = 0.0  # β of feature matching on the compressed layers' outputs (0: off; needs the dense model)

    def __post_init__(self) -> None:
        check_recipe("finetune", self)
        self.loss = as_choice(LossName, "finetune.loss", self.loss)
        self.params = as_choice(ScopeName, "finetune.params", self.params)
        positive_float("finetune.kd_temperature", self.kd_temperature)
        check("finetune.kd_weight", self.kd_weight, lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]")
        non_negative_float("finetune.feature_weight", self.feature_weight)

    def objective(self) -> FinetuneLoss:
        """The library's loss for these settings."""
        return FinetuneLoss(str(self.loss), float(self.kd_temperature), float(self.kd_weight),
                            float(self.feature_weight))


@dataclass
class PTQConfig:
    bits: int = 0  # 0: off; N: N-bit RTN channel-wise on every weight matrix (App. B)
    # Also measured, each on a copy of the model (the export is unaffected): N-bit PTQ's size
    # and top-1 before and after fine-tuning, for the accuracy-memory frontier.
    frontier_bits: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        check("ptq.bits", self.bits, lambda v: isinstance(v, int) and (v == 0 or 2 <= v <= 8),
              "0 (off) or an integer 2..8")
        check("ptq.frontier_bits", list(self.frontier_bits),
              lambda v: all(isinstance(b, int) and 2 <= b <= 8 for b in v) and len(set(v)) == len(v),
              "a list of distinct integers 2..8, e.g. [8,6,4,3]")


@dataclass
class PrecisionConfig:
    """CUDA numerics per stage (CPU runs are always exact fp32). bf16 autocast applies only
    while the root `amp` is true; the calibration Grams are accumulated in fp32/fp64 either way."""

    tf32: bool = False  # TF32 in cuBLAS matmuls and cuDNN convolutions: faster, ~1e-3 relative error
    calibrate: bool = True  # bf16 autocast of the calibration forward
    eval: bool = True  # ... of every evaluation and the throughput measurement
    finetune: bool = True  # ... of the partial fine-tune


@dataclass
class EvalConfig:
    batch_size: int = 256

    def __post_init__(self) -> None:
        positive_int("eval.batch_size", self.batch_size)


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
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    # Fraction of the WHOLE model's parameters removed (Tab 2). A root float, not a group:
    # Hydra rejects float group overrides, and `ratio=0.5` must work as typed.
    ratio: float = 0.5
    compress: bool = True  # false: the dense model as loaded, evaluated (and PTQ'd): Tab 3/4 references
    target_params: Optional[int] = None  # absolute budget instead of ratio (Tab 3)
    seed: int = 0
    device: Device = Device("auto")
    amp: bool = True  # bf16 autocast on CUDA, for the stages precision.* enables; false: fp32 everywhere
    cache_dir: str = "~/.cache/amrc_exp"
    out_dir: str = "."  # set to Hydra's run dir by conf/config.yaml
    method: Optional[str] = None  # the sweep's label (paper | ours | svd_ft | dense); set by conf/method/

    def __post_init__(self) -> None:
        self.device = as_choice(Device, "device", self.device)
        # An empty AMRC_CACHE_DIR would silently put a large cache in the current directory.
        check("cache_dir", self.cache_dir, lambda v: bool(str(v).strip()),
              "a directory path (AMRC_CACHE_DIR is set but empty: unset it or give a path)")
        check("method", self.method, lambda v: v is None or v in METHODS, "null or one of " + ", ".join(METHODS))
        self.amrc()  # ratio, target_params, seed: checked where the method defines them
        # The ratio estimator predicts on probe images, which are calibration images: more than
        # there are would silently predict on fewer than asked.
        probe = min(self.calib.probe_samples, self.calib.num_samples)
        check("schedule.ratio_samples", self.schedule.ratio_samples, lambda v: v is None or v <= probe,
              f"at most {probe} (calib.probe_samples={self.calib.probe_samples}, "
              f"calib.num_samples={self.calib.num_samples}: the probe images it predicts on)")

    def autocast(self, device_type: str) -> dict[str, bool]:
        """Effective bf16 autocast per stage on `device_type` (never on the CPU)."""
        on = self.amp and device_type == "cuda"
        p = self.precision
        return {"calibrate": on and p.calibrate, "eval": on and p.eval, "finetune": on and p.finetune}

    def amrc(self) -> AMRCConfig:
        """The library's config of this run's compression."""
        return AMRCConfig(ratio=self.ratio, target_params=self.target_params, decomp=self.decomp,
                          schedule=self.schedule, z_type=self.z_type, zfit=self.zfit, seed=self.seed)


def register_schema(schema: type = None) -> None:
    """Register `schema` (default RunConfig) as `config_schema`, which `conf/config.yaml` lists
    in its defaults, and the `amrc.run_dir` resolver its `out_dir` uses."""
    ConfigStore.instance().store(name="config_schema", node=schema or RunConfig)
    if not OmegaConf.has_resolver("amrc.run_dir"):
        OmegaConf.register_new_resolver("amrc.run_dir", _run_dir, use_cache=False)
    if not OmegaConf.has_resolver("amrc.dirname"):
        OmegaConf.register_new_resolver("amrc.dirname", job_dirname)


MAX_DIRNAME = 240  # bytes; most file systems allow 255 per path component


def job_dirname(overrides: str) -> str:
    """A sweep job's directory name: its overrides, or, past MAX_DIRNAME, a readable prefix
    plus a hash of the whole string (deterministic, so a rerun finds the same directory; the
    full overrides stay in the job's .hydra/overrides.yaml and results.json)."""
    import hashlib

    if len(overrides.encode()) <= MAX_DIRNAME:
        return overrides
    digest = hashlib.sha256(overrides.encode()).hexdigest()[:16]
    return overrides.encode()[: MAX_DIRNAME - 18].decode(errors="ignore").rstrip(",") + "~" + digest


def _run_dir() -> str:
    """Hydra's job output dir; "." where there is none (`--cfg job --resolve` prints the config
    without creating a run, so Hydra's own `${hydra:runtime.output_dir}` is None there)."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        out = OmegaConf.select(HydraConfig.get(), "runtime.output_dir", default=None, throw_on_missing=False)
        if out is not None:
            return str(out)
    return "."


def to_run_config(cfg: DictConfig | RunConfig) -> RunConfig:
    """The composed config as typed dataclasses, converted once; every value is checked on
    the way (ConfigError on the first bad one), and a key the schema does not have (even one
    added with `+`) is refused, naming the closest valid key. A RunConfig passes through."""
    if isinstance(cfg, RunConfig):
        return cfg
    schema = OmegaConf.get_type(cfg)
    for key, value in _walk(cfg):
        check_key(key, value, schema if is_dataclass(schema) else RunConfig)
    return OmegaConf.to_object(cfg)


def _walk(node: DictConfig, prefix: str = "") -> typing.Iterator[tuple[str, Any]]:
    """(dotted key, value) of every leaf; free-form dict nodes (model.kwargs) are leaves."""
    for key in node.keys():
        value = node._get_node(key)
        full = f"{prefix}{key}"
        if isinstance(value, DictConfig) and is_dataclass(OmegaConf.get_type(value)):
            yield from _walk(value, full + ".")
        else:
            yield full, OmegaConf.select(node, str(key), throw_on_missing=False) if not isinstance(value, DictConfig) else {}


def schema_keys(schema: type = None, prefix: str = "") -> list[str]:
    """Every dotted key of the schema (dict-typed fields such as model.kwargs end a key)."""
    schema = schema or RunConfig
    keys = []
    for name, hint in typing.get_type_hints(schema).items():
        if name not in {f.name for f in fields(schema)}:
            continue
        keys.append(prefix + name)
        if is_dataclass(hint):
            keys += schema_keys(hint, f"{prefix}{name}.")
    return keys


def check_key(key: str, value: Any, schema: type = None) -> None:
    """UnknownKeyError unless `key` (dotted; anything below a dict-typed field is free) is in
    `schema` (default: RunConfig)."""
    node: Any = schema or RunConfig
    for part in key.split("."):
        if not is_dataclass(node):
            return  # below a dict-typed field: free-form
        hints = typing.get_type_hints(node)
        if part not in {f.name for f in fields(node)}:
            close = difflib.get_close_matches(key, schema_keys(schema or RunConfig), n=1, cutoff=0.6)
            raise UnknownKeyError(key, value, close[0] if close else None)
        node = hints[part]
        if typing.get_origin(node) is typing.Union:  # Optional[X]
            node = next(a for a in typing.get_args(node) if a is not type(None))


def validate(cfg: DictConfig) -> RunConfig:
    """Check every value (see `to_run_config`); return the typed config."""
    return to_run_config(cfg)


def as_plain(node: Any) -> Any:
    """A config node (DictConfig or dataclass) as plain dicts and lists, interpolations resolved."""
    if isinstance(node, DictConfig):
        return OmegaConf.to_container(node, resolve=True)
    if is_dataclass(node):
        return asdict(node)
    return node
