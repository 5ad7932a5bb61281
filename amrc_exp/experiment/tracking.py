"""Experiment tracking: W&B (offline into the run directory by default) or nothing.

Offline needs no account and no network. `logger.mode=online` without credentials falls back
to offline with a warning: a sweep must not die, or lose its logs, over a missing API key.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence

log = logging.getLogger(__name__)


class Tracker:
    """No-op tracker (`logger=none`); the W&B one overrides the hooks."""

    mode = "disabled"

    def log(self, metrics: dict[str, Any]) -> None:
        pass

    def summary(self, metrics: dict[str, Any]) -> None:
        pass

    def bar(self, key: str, labels: Sequence[str], values: Sequence[float], title: str) -> None:
        pass

    def lines(self, key: str, xs: Sequence[float], ys: Sequence[Sequence[float]],
              names: Sequence[str], title: str, xname: str) -> None:
        pass

    def table(self, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        pass

    def artifact(self, name: str, kind: str, dirs: Sequence[Path], files: Sequence[Path],
                 metadata: dict[str, Any]) -> None:
        pass

    def finish(self) -> None:
        pass


def _has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path.home() / ".netrc"
    return netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def _say_once_per_sweep(message: str) -> None:
    """A warning the first time in a sweep (a marker file in the sweep dir), info afterwards:
    36 jobs falling back to offline need saying once, not 36 times."""
    from hydra.core.hydra_config import HydraConfig

    marker = None
    if HydraConfig.initialized() and HydraConfig.get().sweep.dir:
        marker = Path(HydraConfig.get().sweep.dir) / ".wandb_offline_fallback"
    if marker is not None and marker.exists():
        log.info(message)
        return
    log.warning(message + (" (said once for this sweep)" if marker is not None else ""))
    if marker is not None:
        try:
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
        except OSError:
            pass


class WandbTracker(Tracker):
    def __init__(self, *, project: str, group: str | None, mode: str, run_dir: str,
                 config: dict[str, Any], name: str | None = None, init_timeout: float = 5.0,
                 entity: str | None = None, job_type: str | None = None, tags: Sequence[str] = ()) -> None:
        import wandb

        if mode == "online" and not _has_credentials():
            _say_once_per_sweep("logger.mode=online but no W&B credentials (WANDB_API_KEY or `wandb login`);"
                                " logging offline into the run directory instead")
            mode = "offline"
        os.makedirs(run_dir, exist_ok=True)
        # Bounded: with a wrong key or no network W&B would retry for its default 60 s per job.
        settings = wandb.Settings(silent=True, console="off", init_timeout=init_timeout)

        def init(mode: str):
            return wandb.init(project=project, group=group, mode=mode, dir=run_dir, config=config, name=name,
                              reinit="finish_previous", settings=settings, entity=entity, job_type=job_type,
                              tags=list(tags))

        try:
            self.run = init(mode)
        except Exception as err:  # noqa: BLE001 - any online failure must not kill the run
            if mode == "offline":
                raise
            _say_once_per_sweep(f"W&B online init failed within logger.init_timeout={init_timeout:g}s "
                                f"({type(err).__name__}); logging offline into the run directory instead")
            mode = "offline"
            self.run = init(mode)
        self.mode = mode
        self._wandb = wandb
        self._broken = False

    def _guard(self, what: str, fn) -> None:
        """Tracking is a side channel: once it fails (full disk, dead W&B service), warn once and
        stop tracking; the run and its results.json go on."""
        if self._broken:
            return
        try:
            fn()
        except Exception as err:  # noqa: BLE001 - never let logging kill hours of compute
            self._broken = True
            log.warning("W&B %s failed (%s: %s); tracking disabled for the rest of this run, "
                        "results.json is unaffected", what, type(err).__name__, err)

    def log(self, metrics: dict[str, Any]) -> None:
        self._guard("log", lambda: self.run.log(metrics))

    def summary(self, metrics: dict[str, Any]) -> None:
        def write() -> None:
            for key, value in metrics.items():
                self.run.summary[key] = value

        self._guard("summary", write)

    def bar(self, key, labels, values, title) -> None:
        def plot() -> None:
            table = self._wandb.Table(data=[[l, v] for l, v in zip(labels, values)], columns=["layer", key])
            self.run.log({key: self._wandb.plot.bar(table, "layer", key, title=title)})

        self._guard("bar plot", plot)

    def lines(self, key, xs, ys, names, title, xname) -> None:
        self._guard("line plot", lambda: self.run.log({key: self._wandb.plot.line_series(
            xs=list(xs), ys=[list(y) for y in ys], keys=list(names), title=title, xname=xname)}))

    def table(self, key, columns, rows) -> None:
        self._guard("table", lambda: self.run.log({key: self._wandb.Table(columns=list(columns),
                                                                            data=[list(r) for r in rows])}))

    def artifact(self, name, kind, dirs, files, metadata) -> None:
        def log_artifact() -> None:
            art = self._wandb.Artifact(name, type=kind, metadata=metadata)
            for d in dirs:
                art.add_dir(str(d), name=Path(d).name)
            for f in files:
                art.add_file(str(f))
            self.run.log_artifact(art)

        self._guard("artifact", log_artifact)

    def finish(self) -> None:
        self._broken = False  # always try to close the run
        self._guard("finish", self.run.finish)
        # `run.finish()` returns once the exit record is handled, but wandb-core writes the run's
        # `.wandb` file only when it closes the stream, which `finish` merely asks for: a reader
        # right after (a test under load, the next sweep job) found no history records in it,
        # and a killed sweep process or joblib worker (no atexit) lost them. Tearing the
        # service down waits for that; the next job's `wandb.init` starts a new one.
        self._guard("teardown", lambda: self._wandb.teardown())


def make_tracker(logger_cfg, run_dir: str, config: dict[str, Any], name: str | None = None,
                 job_type: str | None = None, tags: Sequence[str] = ()) -> Tracker:
    """Build the tracker selected by the `logger` group. W&B's own variables win over the
    config, as W&B users expect: WANDB_MODE (e.g. disabled), WANDB_PROJECT, WANDB_ENTITY."""
    mode = os.environ.get("WANDB_MODE") or str(logger_cfg.mode)
    if logger_cfg.name == "none" or mode == "disabled":
        return Tracker()
    return WandbTracker(project=os.environ.get("WANDB_PROJECT") or logger_cfg.project,
                        entity=os.environ.get("WANDB_ENTITY") or logger_cfg.entity,
                        group=logger_cfg.group or sweep_group(), mode=mode, run_dir=run_dir, config=config,
                        name=name, init_timeout=float(logger_cfg.init_timeout), job_type=job_type, tags=tags)


def sweep_group() -> str | None:
    """In a Hydra multirun, the sweep directory's name, so one sweep's runs share a W&B group."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return Path(HydraConfig.get().sweep.dir).name
