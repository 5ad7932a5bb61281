"""Shared fixtures: compose run configs offline, in a temp cache/output dir."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

if os.environ.get("PYTEST_XDIST_WORKER"):
    # The pytest workers (pyproject's `-n 2`) share the machine's cores: each worker's torch,
    # and every subprocess it starts, runs one thread (set above torch's import, for OpenMP), and
    # the code that pins its own count (training's TRAIN_THREADS) sleeps instead of spinning
    # while it waits, so no two thread pools spin against each other (10-50x slowdowns on 2 cores).
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    torch.set_num_threads(1)  # in case a plugin imported torch before OMP_NUM_THREADS was set

import amrc_exp

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from amrc_exp.experiment.config import register_schema

CONF_DIR = str(amrc_exp.CONF_DIR)
os.environ.setdefault("AMRC_OFFLINE", "1")  # tests never reach the network
# `device: auto` would move every pipeline test onto a GPU where one is visible, and their
# expected numbers are CPU fp32 ones: pinned here (subprocesses inherit it); the CUDA tests
# ask for device=cuda explicitly and skip without one.
os.environ.setdefault("AMRC_DEVICE", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_SILENT", "true")
register_schema()


def compose_cfg(overrides: list[str] | None = None) -> DictConfig:
    """Compose `conf/config.yaml` with overrides, as `python -m amrc_exp` would."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=overrides or [], return_hydra_config=False)


@pytest.fixture
def make_cfg(tmp_path):
    """Compose with a private cache_dir and out_dir under tmp_path."""

    def _make(overrides: list[str] | None = None) -> DictConfig:
        base = [f"cache_dir={tmp_path / 'cache'}", f"out_dir={tmp_path / 'out'}"]
        return compose_cfg(base + list(overrides or []))

    return _make


@pytest.fixture(scope="module")
def one_thread():
    """Tiny problems: one thread is faster and immune to other jobs on the machine's 2 cores."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@dataclass
class CliResult:
    """What a CLI invocation returned, shaped like `subprocess.CompletedProcess`."""

    returncode: int
    stdout: str
    stderr: str


def run_cli(args: list[str], env: dict[str, str] | None = None) -> CliResult:
    """`python -m amrc_exp ARGS` inside this process: the console script's own entry
    (`amrc_exp.__main__.cli`: the preflight, `@hydra.main`, the one-line error handling and the
    exit code), with its stdout and stderr captured. A subprocess pays ~5-10 s of imports per
    call on a 2-core machine; the tests that need a real interpreter (a traceback from an
    import, signals, launchers) still start one. The torch thread count, the root logger and
    the environment are restored afterwards."""
    import contextlib
    import io
    import logging
    import sys

    import torch
    from hydra.core.global_hydra import GlobalHydra

    from amrc_exp.__main__ import cli

    env = {"OMP_NUM_THREADS": "1", **(env or {})}
    saved_env = {k: os.environ.get(k) for k in [*env, "HYDRA_FULL_ERROR"]}
    saved = sys.argv, torch.get_num_threads(), logging.root.handlers[:], logging.root.level
    out, err, code = io.StringIO(), io.StringIO(), 0
    os.environ.pop("HYDRA_FULL_ERROR", None)
    os.environ.update(env)
    sys.argv = ["amrc", *args]
    GlobalHydra.instance().clear()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            cli()
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    finally:
        GlobalHydra.instance().clear()
        sys.argv = saved[0]
        torch.set_num_threads(saved[1])
        for handler in logging.root.handlers[:]:
            if handler not in saved[2]:
                handler.close()
        logging.root.handlers[:] = saved[2]
        logging.root.setLevel(saved[3])
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return CliResult(code, out.getvalue(), err.getvalue())


def tiny_timm_loaders(seed: int = 0):
    """A 2-block timm DeiT on 32×32 images (10 classes, random weights) and labelled calibration
    (32 images) and held-out (16) loaders of random images: for library-level search tests."""
    import timm
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    torch.set_default_dtype(torch.float32)
    torch.manual_seed(seed)
    model = timm.create_model("deit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=8, depth=2,
                              embed_dim=48, num_heads=2).eval()
    images, labels = torch.randn(48, 3, 32, 32), torch.randint(0, 10, (48,))
    calib = DataLoader(TensorDataset(images[:32], labels[:32]), batch_size=16)
    heldout = DataLoader(TensorDataset(images[32:], labels[32:]), batch_size=16)
    return model, calib, heldout
