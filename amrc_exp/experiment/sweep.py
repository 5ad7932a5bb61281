"""`python -m amrc_exp.experiment.sweep --config-dir sweeps --config-name NAME [overrides...]`:
every job of a sweep — its overrides, its directory and its state (done / failed / pending) —
without running anything (Hydra refuses `-m ... --cfg job`).

Jobs and directories are computed as Hydra's basic sweeper and job naming compute them: the
product of `hydra.sweeper.params` and the command line's comma lists (the command line wins
for a key both set), and `hydra.sweep.dir/hydra.sweep.subdir` with `override_dirname`'s
exclude list. Other launchers (joblib, submitit) run the same jobs in the same directories.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from amrc_exp import CONF_DIR
from amrc_exp.experiment.results import OUTPUTS, job_state


@dataclass
class Job:
    overrides: list[str]
    dir: Path
    state: str  # done | failed | pending


def list_jobs(config_dir: str | Path, config_name: str, overrides: list[str]) -> list[Job]:
    """The jobs `python -m amrc_exp -m --config-dir DIR --config-name NAME OVERRIDES` would run."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.config_loader_impl import get_overrides_dirname
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from amrc_exp.experiment import config, sensitivity

    def composed(job: list[str]):
        with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base="1.3"):
            return compose(config_name=config_name, overrides=[f"hydra.searchpath=[file://{CONF_DIR}]", *job],
                           return_hydra_config=True)

    parser = OverridesParser.create()
    fixed = [o for o, p in zip(overrides, parser.parse_overrides(overrides)) if not p.is_sweep_override()]
    try:
        cfg = composed(fixed)
    except Exception:  # noqa: BLE001 - a sensitivity sweep (fig2_*): its schema has `sensitivity`
        sensitivity.register_schema()
        cfg = composed(fixed)
    task = [o for o in overrides if not o.lstrip("+~").startswith(("hydra.", "hydra/"))]  # Hydra's own: not the job's
    params = {**{str(k): str(v) for k, v in (cfg.hydra.sweeper.params or {}).items()},
              **{o.partition("=")[0]: o.partition("=")[2] for o in task}}  # the command line wins
    batches = BasicSweeper.split_arguments(parser.parse_overrides([f"{k}={v}" for k, v in params.items()]), None)
    job_cfg = cfg.hydra.job.config.override_dirname
    sweep_dir = Path(OmegaConf.select(cfg, "hydra.sweep.dir"))
    named = "override_dirname" in str(OmegaConf.to_container(cfg.hydra.sweep, resolve=False)["subdir"])
    jobs = []
    for job in (j for batch in batches for j in batch):
        dirname = get_overrides_dirname(parser.parse_overrides(job), list(job_cfg.exclude_keys),
                                        job_cfg.item_sep, job_cfg.kv_sep)
        subdir = config.job_dirname(dirname) if named else str(len(jobs))  # the root config numbers jobs
        path = sweep_dir / subdir
        jobs.append(Job(job, path, job_state(path)))
    config.register_schema()
    return jobs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m amrc_exp.experiment.sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-dir", default="sweeps")
    parser.add_argument("--config-name", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    jobs = list_jobs(args.config_dir, args.config_name, args.overrides)
    for job in jobs:
        print(f"{job.state:8s} {job.dir}  {' '.join(job.overrides)}")
    counts = {s: sum(j.state == s for j in jobs) for s in ("done", "failed", "pending")}
    print(f"{len(jobs)} job(s): " + ", ".join(f"{n} {s}" for s, n in counts.items()) +
          f" (outputs: {', '.join(OUTPUTS)})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
