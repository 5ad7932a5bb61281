"""Shared fixtures: compose run configs offline, in a temp cache/output dir."""

from __future__ import annotations

import os
from pathlib import Path

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
