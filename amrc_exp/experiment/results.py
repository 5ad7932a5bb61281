"""A run's result files: the finished result a rerun reuses, and the failed.json protocol.

A job directory holds at most one of `RESULTS` (complete; a rerun of the same config skips
the job) and `FAILED` (why it failed; never read as a result, so a rerun retries the job).
`run` and `sensitivity` share these rules.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from amrc_exp.io import atomic_write_json, read_json

log = logging.getLogger(__name__)
RESULTS = "results.json"
FAILED = "failed.json"
# Paths that say where things are, not what was computed: a moved job is still the same job.
LOCATION_KEYS = ("out_dir", "cache_dir")


def comparable(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in LOCATION_KEYS}


def finished_result(path: Path, config: dict[str, Any]) -> dict[str, Any] | None:
    """The complete result at `path` of an earlier run of the same config, if any.

    Unreadable, partial or non-object files never count (they are rerun)."""
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
    return previous if previous.get("status") == "complete" and same else None


def write_failed(out_dir: Path, res: dict[str, Any], err: BaseException) -> None:
    """Record why a run failed, beside (never in place of) a result."""
    atomic_write_json(out_dir / FAILED, {**res, "status": "failed", "error": f"{type(err).__name__}: {err}"})
