"""The embedded checkpoints that ship with the package (`model.weights=shipped`, the default).

`checkpoints/<name>.safetensors` was trained by this project's own `models/train.py`
(`python -m amrc_exp.experiment.ship`); `checkpoints/<name>.json` beside it records the recipe
(the trained-weights cache fields), the torch build, CPU kernel set and processor that trained
it, its SHA-256 and its test top-1. Shipping the file, not the recipe, is what makes every
machine start from the same weights: a retrain is bit-identical only on the same torch build
and CPU kernel set (measured: 89.96% on an Intel Xeon, 89.92% on an AMD EPYC).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from torch import nn

from amrc_exp.errors import ConfigError, WeightsError
from amrc_exp.io import file_sha256, read_json

CHECKPOINTS = Path(__file__).with_name("checkpoints")


def shipped_names() -> list[str]:
    """The models a checkpoint ships for."""
    return sorted(p.stem for p in CHECKPOINTS.glob("*.json"))


def sidecar(name: str) -> Optional[dict[str, Any]]:
    """The shipped checkpoint's record for `name`, or None when none ships."""
    path = CHECKPOINTS / f"{name}.json"
    return read_json(path) if path.is_file() else None


def shipped_sha256(name: str) -> Optional[str]:
    """The SHA-256 the sidecar of `name` records (loading verifies the file against it), or None."""
    return (sidecar(name) or {}).get("sha256")


def _differences(shipped: Any, wanted: Any, prefix: str = "") -> list[str]:
    """Dotted keys where two nested dicts differ, with both values."""
    if isinstance(shipped, dict) and isinstance(wanted, dict):
        return [d for k in sorted(set(shipped) | set(wanted))
                for d in _differences(shipped.get(k), wanted.get(k), f"{prefix}{k}.")]
    return [] if shipped == wanted else [f"{prefix[:-1]}: shipped {shipped!r}, asked {wanted!r}"]


def check_shipped(name: str, fields: dict[str, Any]) -> dict[str, Any]:
    """The sidecar of `name`'s shipped checkpoint, if it was trained with exactly `fields`
    (`models.train.trained_weights_fields`: recipe, architecture, model.train.*; the data's
    location aside); else ConfigError naming `model.weights=train`."""
    record = sidecar(name)
    if record is None:
        raise ConfigError("model.weights", "shipped",
                          f"train, hub, random or a file path: no checkpoint ships for model.name={name} "
                          f"(shipped: {', '.join(shipped_names()) or 'none'})")
    # The data's location is not part of the weights (a copy of Fashion-MNIST elsewhere is fine).
    diff = _differences(*({k: v for k, v in f.items() if k != "data"} for f in (record["fields"], fields)))
    if diff:
        raise ConfigError("model.weights", "shipped",
                          "model.weights=train to train with these settings: the shipped "
                          f"{name} was trained with other ones ({'; '.join(diff)})")
    return record


def load_shipped(model: nn.Module, name: str, fields: dict[str, Any]) -> dict[str, Any]:
    """Load the shipped checkpoint of `name` into `model` after checking its recipe and SHA-256.

    Returns the sidecar's metrics and provenance plus {"weights_path", "weights_sha256"}."""
    from amrc_exp.models.weights import load_file

    record = check_shipped(name, fields)
    path = CHECKPOINTS / record["file"]
    sha = file_sha256(path) if path.is_file() else None
    if sha != record["sha256"]:
        raise WeightsError(f"the shipped checkpoint {path} is {'missing' if sha is None else 'corrupt'} "
                           f"(SHA-256 {sha}, expected {record['sha256']}): reinstall amrc_exp, or set "
                           "model.weights=train to train it here")
    load_file(model, path)
    keep = ("test_top1", "train_top1", "train_seconds", "epochs", "steps", "trained_by")
    return {**{k: record[k] for k in keep if k in record}, "weights_path": str(path), "weights_sha256": sha}
