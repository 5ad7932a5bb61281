"""The call walk of one run's config, measured: every call made from amrc_exp code into amrc_exp
code from experiment/run.py:compress_stages until compress.calibrate.calibrate starts, in order;
stays (consecutive calls into one module collapsed), rooms (distinct modules), climbs back (a call
from a lower layer into a higher one: math < library < experiment < report), returns (entering a
module left earlier). Loads the shipped model; a fresh temporary cache, so calibration runs.

    python scripts/call_walk.py [hydra overrides...]
"""

from __future__ import annotations

import sys
import tempfile
from types import FrameType
from typing import Any, Optional

import torch
from hydra import compose, initialize_config_dir

import amrc_exp
from amrc_exp.experiment import run as run_module
from amrc_exp.experiment.config import register_schema, to_run_config
from amrc_exp.experiment.env import StageTimer
from amrc_exp.experiment.inputs import load_model, load_splits

LAYER = {"math": 0, "compress": 1, "models": 1, "data": 1, "io": 1, "errors": 1, "experiment": 2, "report": 3}
Call = tuple[str, str, str]  # caller module, callee module, callee function


class _Reached(Exception):
    """Raised by the profiler when calibration starts: the walk ends there."""


def _module(frame: Optional[FrameType]) -> Optional[str]:
    name = frame.f_globals.get("__name__", "") if frame is not None else ""
    return name if name.startswith("amrc_exp") else None


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYER.get(parts[1], 1) if len(parts) > 1 else 2


def record_walk(overrides: list[str]) -> list[Call]:
    register_schema()
    tmp = tempfile.mkdtemp()
    with initialize_config_dir(config_dir=str(amrc_exp.CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["logger=none", f"out_dir={tmp}/out", f"cache_dir={tmp}/cache", *overrides])
    rc = to_run_config(cfg)
    splits = load_splits(rc)
    model, _ = load_model(rc, splits)
    calls: list[Call] = []

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        callee, caller = _module(frame), _module(frame.f_back)
        if event != "call" or callee is None or caller is None:  # torch, Python or a library: not a step
            return
        calls.append((caller, callee, frame.f_code.co_name))
        if callee == "amrc_exp.compress.calibrate" and frame.f_code.co_name == "calibrate":
            raise _Reached

    sys.setprofile(profile)
    try:
        run_module.compress_stages(model, splits, rc, torch.device("cpu"), False, StageTimer())
    except _Reached:
        pass
    finally:
        sys.setprofile(None)
    return calls


def summarize(calls: list[Call]) -> str:
    stays: list[str] = []
    for _, callee, _ in calls:
        if not stays or stays[-1] != callee:
            stays.append(callee)
    returns = sum(1 for i, m in enumerate(stays) if m in stays[:i])
    climbs = [c for c in calls if _layer(c[1]) > _layer(c[0])]
    short = [m.removeprefix("amrc_exp.") for m in stays]
    lines = ["walk: experiment.run -> " + " -> ".join(short),
             f"stays {len(stays)} in {len(set(stays))} rooms, {len(climbs)} climbs back, {returns} returns"]
    lines += [f"  climb: {a} -> {b}.{f}" for a, b, f in climbs]
    return "\n".join(lines)


if __name__ == "__main__":
    print(summarize(record_walk(sys.argv[1:])))
