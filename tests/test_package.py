"""Installed like a real package: a built wheel carries the configs, the notebook, the shipped
embedded checkpoints and the `amrc` console script, and the Hydra app composes from the installed copy (not the checkout)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out, src = tmp_path_factory.mktemp("wheel"), tmp_path_factory.mktemp("src")
    # Built from a copy: a build leaves build/ and *.egg-info beside the sources it reads.
    for folder in ("amrc_exp", "conf", "notebooks"):  # conf/ and notebooks/ are mapped into the package
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__", ".ipynb_checkpoints"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(src)], check=True, capture_output=True, timeout=300)
    return next(out.glob("amrc_exp-*.whl"))


def test_wheel_holds_configs_notebook_and_console_script(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    # The top-level conf/ and notebooks/ land inside the package, every module of amrc_exp/ too.
    conf = {"amrc_exp/" + p.relative_to(ROOT).as_posix() for p in (ROOT / "conf").rglob("*.yaml")}
    assert conf and conf <= names, sorted(conf - names)
    assert "amrc_exp/notebooks/figures.ipynb" in names
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "amrc_exp").rglob("*.py")}
    assert modules <= names, sorted(modules - names)
    shipped = {p.relative_to(ROOT).as_posix() for p in (ROOT / "amrc_exp" / "models" / "checkpoints").iterdir()}
    assert {"amrc_exp/models/checkpoints/fmnist_vit.safetensors", "amrc_exp/models/checkpoints/fmnist_vit.json",
            "amrc_exp/models/checkpoints/fmnist_vit_small.safetensors"} <= shipped <= names, sorted(shipped - names)
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    scripts = zipfile.ZipFile(wheel).read(entry).decode()
    for line in ("amrc = amrc_exp.__main__:cli", "amrc-tables = amrc_exp.report.tables:main",
                 "amrc-figures = amrc_exp.report.figures:main", "amrc-bench = amrc_exp.report.bench:main",
                 "amrc-export = amrc_exp.experiment.onnx_export:main"):
        assert line in scripts, scripts


def test_installed_copy_composes_from_another_directory(wheel, tmp_path):
    """`amrc model=swin_b ratio=0.5 --cfg job` from a directory with no checkout in it."""
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    code = (f"import sys; sys.path.insert(0, {str(site)!r}); import amrc_exp; "
            f"assert amrc_exp.__file__.startswith({str(site)!r}), amrc_exp.__file__; "
            "sys.argv = ['amrc', 'model=swin_b', 'ratio=0.5', '--cfg', 'job']; "
            "from amrc_exp.__main__ import cli; cli()")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "name: swin_base_patch4_window7_224" in proc.stdout and "ratio: 0.5" in proc.stdout
