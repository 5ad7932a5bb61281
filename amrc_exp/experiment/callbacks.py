"""The multirun callback (named in conf/config.yaml, so every `-m` sweep has it): log each failed
job as it ends, and at the end of the sweep list the jobs that failed and exit 2.

It reads each job's directory, not in-process state, so it tells the truth under every
launcher: the basic one, `joblib` (jobs in worker processes) and `submitit` (SLURM jobs). A job
of this sweep failed when it wrote a failed.json after the sweep started and holds no
results.json (a user-fixable error: `run` writes failed.json, validation errors included)."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from amrc_exp.experiment.results import FAILED, failure_reason, is_complete

log = logging.getLogger(__name__)


class SweepSummary(Callback):
    def __init__(self) -> None:
        self._sweep_started = time.time()
        self._job_started = 0.0

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        self._sweep_started = time.time()

    def on_job_start(self, config: Any, **kwargs: Any) -> None:
        self._job_started = time.time()

    def on_job_end(self, config: Any, job_return: Any, **kwargs: Any) -> None:
        from hydra.core.utils import JobStatus

        out_dir = Path(config.hydra.runtime.output_dir)
        if job_return.status == JobStatus.FAILED:
            err = job_return._return_value
            why = f"{type(err).__name__}: {err}"
        elif _failed_since(out_dir, self._job_started):
            why = failure_reason(out_dir)
        else:
            return
        log.error("job FAILED in %s: %s (rerun the sweep command to retry it)", out_dir, why)

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        jobs = [d for d in sweep_dir.iterdir() if d.is_dir()] if sweep_dir.is_dir() else []
        failed = sorted(d for d in jobs if _failed_since(d, self._sweep_started))
        done = sum(is_complete(d) for d in jobs)
        log.info("sweep %s: %d complete job(s), %d failed; tables: python -m amrc_exp.report.tables %s, "
                 "figures: python -m amrc_exp.report.figures", sweep_dir, done, len(failed), sweep_dir)
        if failed:
            print(f"amrc_exp: error: {len(failed)} job(s) of the sweep failed (see failed.json in each):\n"
                  + "\n".join(f"  {d}: {failure_reason(d)}" for d in failed), file=sys.stderr, flush=True)
            sys.exit(2)


def _failed_since(job_dir: Path, since: float) -> bool:
    failed = job_dir / FAILED
    return failed.exists() and failed.stat().st_mtime >= since - 1 and not is_complete(job_dir)
