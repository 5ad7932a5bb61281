"""`amrc [overrides]` (or `python -m amrc_exp [overrides]`): thin Hydra entry around
`amrc_exp.experiment.run.run`. Hydra's job name is `amrc` (log file, submitit job names);
tab completion: `eval "$(amrc -sc install=bash)"`.

A user-fixable error (`AmrcError`) prints one line and exits 2. In a multirun (`-m`) it fails
only its own job (its `failed.json` says why): the other jobs still run, and the sweep exits 2
at the end, listing the failed jobs; a rerun of the same sweep skips the finished ones.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from amrc_exp.experiment.config import register_schema
from amrc_exp.errors import AmrcError

register_schema()
FAILED_JOBS: list[str] = []  # multirun jobs that failed with a user-fixable error


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Run one job; return its final top-1 so Hydra sweepers can optimise it."""
    from amrc_exp.experiment.run import run  # deferred: `--help` and `--cfg` stay fast

    try:
        return run(cfg)["top1"]
    except AmrcError as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        if _multirun():
            print(f"amrc_exp: error in job {cfg.out_dir}: {err}", file=sys.stderr, flush=True)
            FAILED_JOBS.append(str(cfg.out_dir))
            return None
        print(f"amrc_exp: error: {err}", file=sys.stderr)
        sys.exit(2)


def _multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def preflight_output_dir(argv: list[str]) -> str | None:
    """Why the literal `hydra.run.dir=` (or `hydra.sweep.dir=` with -m) in `argv` cannot be
    written, or None. Hydra creates that directory before any of our code runs, and its
    failure would otherwise surface as a traceback."""
    if any(a in ("-h", "--help", "--hydra-help", "-c", "--cfg", "--info", "-i") for a in argv):
        return None
    key = "hydra.sweep.dir" if any(a in ("-m", "--multirun") for a in argv) else "hydra.run.dir"
    values = [v.strip("'\"") for n, sep, v in (a.partition("=") for a in argv) if sep and n.lstrip("+~") == key]
    if not values or not values[-1] or "${" in values[-1]:  # the last override wins
        return None
    existing = Path(values[-1]).expanduser().absolute()
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        problem = f"{existing} is not a directory"
    elif not os.access(existing, os.W_OK | os.X_OK):
        problem = f"{existing} is not writable"
    else:
        return None
    return (f"invalid config value {key}={values[-1]!r}: expected a writable directory ({problem}); "
            f"set {key}=/a/writable/path")


def cli() -> None:
    """The console script `amrc`: preflight, the Hydra app, and exit 2 when a job failed."""
    problem = preflight_output_dir(sys.argv[1:])
    if problem:
        print(f"amrc_exp: error: {problem}", file=sys.stderr)
        sys.exit(2)
    main()
    if FAILED_JOBS:
        print(f"amrc_exp: error: {len(FAILED_JOBS)} job(s) failed (see failed.json in each): "
              + ", ".join(FAILED_JOBS), file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
