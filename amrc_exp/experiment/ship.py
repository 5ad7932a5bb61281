"""`python -m amrc_exp.experiment.ship [NAME ...] [key=value ...]`: train an embedded model with our
own `models/train.py` (or take it from the training cache) and write it into the package as
the checkpoint `model.weights=shipped` loads: `amrc_exp/models/checkpoints/<name>.safetensors`
and its sidecar `<name>.json` (recipe, torch build, CPU kernel set and processor that trained
it, SHA-256, test top-1). Default names: every embedded model (`fmnist_vit`, `fmnist_vit_small`).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from typing import Any

from hydra import compose, initialize_config_dir

from amrc_exp import CONF_DIR
from amrc_exp.experiment.config import register_schema
from amrc_exp.io import atomic_path, atomic_write_json, cpu_model, file_sha256
from amrc_exp.models.fmnist_vit import EMBEDDED_ARCHS
from amrc_exp.models.shipped import CHECKPOINTS

KEEP = ("test_top1", "train_top1", "train_seconds", "epochs", "steps", "epoch_losses")


def ship(name: str, overrides: list[str] = ()) -> dict[str, Any]:
    """Train (or read from the cache) `name` with `model.weights=train` and ship it; return the sidecar."""
    from amrc_exp.experiment.config import to_run_config
    from amrc_exp.experiment.inputs import load_model
    from amrc_exp.experiment.keys import train_setup

    register_schema()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        rc = to_run_config(compose("config", overrides=[f"model={name}", "model.weights=train", "device=cpu",
                                                        *overrides]))
    _, info = load_model(rc)
    setup = train_setup(rc)
    source = setup.weights_path
    CHECKPOINTS.mkdir(exist_ok=True)
    target = CHECKPOINTS / f"{name}.safetensors"
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)
    record = {
        "name": name, "file": target.name, "sha256": file_sha256(target), "bytes": target.stat().st_size,
        **{k: info[k] for k in KEEP if k in info},
        "trained_by": {"command": " ".join(["python -m amrc_exp.experiment.ship", name, *overrides]),
                       "torch": info.get("torch"), "cpu_capability": info.get("cpu_capability"),
                       "threads": info.get("threads"), "processor": info.get("processor") or cpu_model()},
        "fields": setup.fields,  # what `model.weights=shipped` checks the config against
    }
    atomic_write_json(CHECKPOINTS / f"{name}.json", record)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("args", nargs="*", help="embedded model names, then Hydra overrides (key=value)")
    args = parser.parse_args(argv).args
    overrides = [a for a in args if "=" in a]
    for name in [a for a in args if "=" not in a] or sorted(EMBEDDED_ARCHS):
        record = ship(name, overrides)
        print(f"shipped {name}: test top-1 {record['test_top1']}%, sha256 {record['sha256']}, "
              f"trained on {record['trained_by']['processor']} ({record['trained_by']['cpu_capability']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
