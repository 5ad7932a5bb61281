#!/usr/bin/env bash
# One-step set-up on a fresh machine: system data package, virtualenv, pinned torch, the package.
# Idempotent: a second run only checks. Usage: bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."

# Fashion-MNIST IDX files (the embedded default's real data) come from Debian.
if [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist
fi

PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# torch/torchvision are pinned in pyproject.toml (2.14.1 / 0.29.1, the registry's builds).
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[dev]"
.venv/bin/python -c "import torch, torchvision, timm; print('amrc_exp setup ok: torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__)"
