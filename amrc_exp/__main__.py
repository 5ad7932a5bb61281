"""`python -m amrc_exp [overrides]`: thin Hydra entry around `amrc_exp.run.run`."""

from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig

from amrc_exp.config import register_schema
from amrc_exp.errors import AmrcError

register_schema()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Run one job; return its final top-1 so Hydra sweepers can optimise it."""
    from amrc_exp.run import run  # deferred: `--help` and `--cfg` stay fast

    try:
        return run(cfg)["top1"]
    except AmrcError as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"amrc_exp: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
