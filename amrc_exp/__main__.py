"""`amrc [overrides]` (or `python -m amrc_exp [overrides]`): thin Hydra entry around
`amrc_exp.experiment.run.run`. Hydra's job name is `amrc` (log file, submitit job names);
tab completion: `eval "$(amrc -sc install=bash)"`.

A user-fixable error (`AmrcError`) prints one line and exits 2. In a multirun (`-m`) it fails
only its own job (its `failed.json` says why): the other jobs still run, and the sweep exits 2
at the end, listing the failed jobs (`amrc_exp.experiment.callbacks.SweepSummary`, under any
launcher); a rerun of the same sweep skips the finished ones.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from amrc_exp.experiment import interrupt

# First, before torch's import can swallow a Ctrl-C (experiment/interrupt.py); only when this
# process is the command itself (`python -m amrc_exp`, the `amrc` script), not a test or a sweep
# worker that imports the module.
if __name__ == "__main__" or Path(sys.argv[0]).name == "amrc":
    interrupt.install()

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from amrc_exp.experiment.config import register_schema  # noqa: E402
from amrc_exp.errors import AmrcError  # noqa: E402

register_schema()


@hydra.main(version_base="1.3", config_path="pkg://amrc_exp.conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Run one job; return its final top-1 so Hydra sweepers can optimise it."""
    from amrc_exp.experiment.run import run  # deferred: `--help` and `--cfg` stay fast

    try:
        return run(cfg)["top1"]
    except AmrcError as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        err = _one_line(err)
        if _multirun():  # the job's failed.json is written; the sweep's callback lists it and exits 2
            print(f"amrc_exp: error in job {cfg.out_dir}: {err}", file=sys.stderr, flush=True)
            return None
        print(f"amrc_exp: error: {err}", file=sys.stderr)
        sys.exit(2)


def _one_line(err: AmrcError) -> str:
    """The error's own message; from a DataLoader worker, torch wraps it in the worker's
    traceback text, whose last line is the message."""
    msg = str(err)
    if "Original Traceback" in msg:
        msg = msg.strip().splitlines()[-1].split(": ", 1)[-1]
    return msg


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
    target = Path(values[-1]).expanduser().absolute()
    existing = target
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        problem = f"{existing} is not a directory"
    else:
        # Proven by doing, not by os.access: root passes every permission check, yet /proc
        # or a read-only mount still refuses. Hydra would create the directory next anyway.
        try:
            target.mkdir(parents=True, exist_ok=True)
            probe = target / f".write_probe.{os.getpid()}"
            probe.write_text("")
            probe.unlink()
            return None
        except OSError as err:
            problem = f"{err.strerror or err} under {existing}"
    return (f"invalid config value {key}={values[-1]!r}: expected a writable directory ({problem}); "
            f"set {key}=/a/writable/path")


def preflight_keys(argv: list[str]) -> str | None:
    """Why a dotted override in `argv` names no key of the schema (a typo), or None. Hydra would
    answer `zfit.solvr=gd` by suggesting `+zfit.solvr=gd`, which would then be ignored; this
    names the closest valid key instead. (The run itself refuses unknown keys too, however
    they got in: `to_run_config`.)"""
    from amrc_exp.errors import UnknownKeyError
    from amrc_exp.experiment.config import check_key

    for arg in argv:
        key, sep, value = arg.partition("=")
        key = key.lstrip("+~")
        if not sep or arg.startswith("-") or "/" in key or "." not in key or key.startswith("hydra."):
            continue
        try:
            check_key(key, value)
        except UnknownKeyError as err:
            return str(err)
    return None


def cli() -> None:
    """The console script `amrc`: preflight, then the Hydra app (a multirun with a failed job
    exits 2 through the SweepSummary callback)."""
    problem = preflight_output_dir(sys.argv[1:]) or preflight_keys(sys.argv[1:])
    if problem:
        print(f"amrc_exp: error: {problem}", file=sys.stderr)
        sys.exit(2)
    try:
        interrupt.ready()  # from here a Ctrl-C unwinds (failed.json, the tracker, a sweep's workers)
        main()
    except KeyboardInterrupt:  # Ctrl-C: one line, the shell's 128 + SIGINT; no partial result is trusted
        interrupt.say()
        sys.exit(130)


if __name__ == "__main__":
    cli()
