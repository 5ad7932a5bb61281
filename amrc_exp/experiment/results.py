"""A run's result files: the finished result a rerun reuses, and the failed.json protocol.

A job directory holds at most one of `RESULTS` (complete; a rerun of the same config skips
the job) and `FAILED` (why it failed; never read as a result, so a rerun retries the job).
`run` and `sensitivity` share these rules.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from amrc_exp.io import atomic_write_json, file_sha256, read_json

log = logging.getLogger(__name__)
RESULTS = "results.json"
FAILED = "failed.json"
# Paths that say where things are, not what was computed: a moved job is still the same job.
LOCATION_KEYS = ("out_dir", "cache_dir")
SCHEMA = "amrc_exp.results/2"  # /2: typed RunResult; "method" in config; layers as LayerReport rows


@dataclass
class RunResult:
    """`results.json`: one run's measurements, all taken by that run. Optional fields are
    absent from the file (not null) when their stage did not run (e.g. no fine-tuning)."""

    config: dict[str, Any]
    device: str
    status: str = "running"  # running | complete | failed (failed.json)
    schema: str = SCHEMA
    model: dict[str, Any] = field(default_factory=dict)  # weights source, params, training metrics
    data: dict[str, Any] = field(default_factory=dict)  # split sizes
    synthetic: bool = False  # random weights or data: never a paper number
    params_before: Optional[int] = None
    params_after: Optional[int] = None
    params_target: Optional[int] = None
    ratio_achieved: Optional[float] = None
    size_mib_dense_fp16: Optional[float] = None
    size_mib_compressed_fp16: Optional[float] = None
    size_mib_ptq: Optional[float] = None
    top1_baseline: Optional[float] = None
    top1_compressed: Optional[float] = None
    top1_finetuned: Optional[float] = None
    top1_ptq: Optional[float] = None
    top1: Optional[float] = None  # the last stage's top-1
    # per stage after the baseline: top-1 agreement with the dense model (%) and mean KL(dense ‖ stage)
    fidelity: Optional[dict[str, dict[str, float]]] = None
    # ptq.frontier_bits: one row per bit width {bits, size_mib, top1_<stage>, agree_<stage>, kl_<stage>}
    ptq_frontier: Optional[list[dict[str, Any]]] = None
    calibration_cached: Optional[bool] = None
    zfit_minibatches: Optional[int] = None
    layers: Optional[list[dict[str, Any]]] = None  # one LayerReport row per compressible layer
    table1: Optional[dict[str, float]] = None  # Z overhead and mean held-out errors (Tab 1)
    energy_curves: Optional[dict[str, list[float]]] = None  # Fig 1
    allocation_kl: Optional[dict[str, float]] = None  # schedule.check_uniform: whole-model probe KL per allocation
    finetune: Optional[dict[str, Any]] = None  # trainable params, loss per epoch
    throughput: Optional[dict[str, float]] = None  # compressed vs dense images/s, side by side
    precision: dict[str, Any] = field(default_factory=dict)  # TF32 and bf16 autocast per stage, as run
    inputs: dict[str, Any] = field(default_factory=dict)  # weights / data content hashes (input_identity)
    seconds: dict[str, float] = field(default_factory=dict)  # per stage
    error: Optional[str] = None  # failed runs only

    def final_top1(self) -> float:
        for value in (self.top1_ptq, self.top1_finetuned, self.top1_compressed, self.top1_baseline):
            if value is not None:
                return value
        raise ValueError("no top-1 measured")

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


WEIGHT_SOURCES = ("hub", "random", "train")  # named sources: the config identifies them


def input_identity(weights: str, data_name: str, data_root: Optional[str],
                   model_name: str = "") -> dict[str, Optional[str]]:
    """What a result depends on beyond its config: the weights file's and the data's content
    (SHA-256s; None where the config alone identifies them; for `shipped`, the SHA-256 its
    sidecar records, which loading verifies). Stored in results.json, compared by
    `finished_result` and re-checked by the tables."""
    from amrc_exp.data import data_identity
    from amrc_exp.models.shipped import shipped_sha256

    path = Path(str(weights)).expanduser()
    if str(weights) == "shipped":
        weights_sha = shipped_sha256(model_name)
    else:
        weights_sha = file_sha256(path) if str(weights) not in WEIGHT_SOURCES and path.is_file() else None
    return {"weights_sha256": weights_sha, "data_sha256": data_identity(str(data_name), data_root)}


def inputs_of(config: dict[str, Any]) -> dict[str, Optional[str]]:
    """`input_identity` of a results.json's config, as the files are now."""
    return input_identity(config["model"]["weights"], config["data"]["name"], config["data"].get("root"),
                          config["model"]["name"])


def comparable(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in LOCATION_KEYS}


def finished_result(path: Path, config: dict[str, Any], inputs: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The complete result at `path` of an earlier run of the same config and, when `inputs`
    is given, the same weights and data content. Unreadable, partial or non-object files never
    count (they are rerun)."""
    if not path.exists():
        return None
    try:
        previous = read_json(path)
    except (OSError, ValueError):
        log.warning("%s is unreadable; rerunning", path)
        return None
    if not isinstance(previous, dict):
        log.warning("%s does not hold a result object; rerunning", path)
        return None
    same = comparable(previous.get("config") or {}) == comparable(config)
    if inputs is not None and previous.get("inputs") != inputs:
        same = False  # the weights file or the data changed under the same config
    return previous if previous.get("status") == "complete" and same else None


OUTPUTS = (RESULTS, "sensitivity.json")  # a job's complete result, per app (run, sensitivity)


def is_complete(job_dir: Path) -> bool:
    """The job directory holds a readable result with status complete."""
    for name in OUTPUTS:
        try:
            if json.loads((job_dir / name).read_text()).get("status") == "complete":
                return True
        except (OSError, ValueError, AttributeError):
            pass
    return False


def job_state(job_dir: Path) -> str:
    """done (a complete result), failed (a failed.json and no result) or pending."""
    return "done" if is_complete(job_dir) else "failed" if (job_dir / FAILED).exists() else "pending"


def failure_reason(job_dir: Path) -> str:
    try:
        return json.loads((job_dir / FAILED).read_text()).get("error", "see failed.json")
    except (OSError, ValueError, AttributeError):
        return "see failed.json"


def write_failed(out_dir: Path, res: dict[str, Any], err: BaseException) -> None:
    """Record why a run failed, beside (never in place of) a result."""
    atomic_write_json(out_dir / FAILED, {**res, "status": "failed", "error": f"{type(err).__name__}: {err}"})


def write_result(out_dir: Path, res: RunResult) -> dict[str, Any]:
    """Write the complete result (atomically); return it as the dict in the file."""
    out = res.to_dict()
    atomic_write_json(out_dir / RESULTS, out)
    return out
