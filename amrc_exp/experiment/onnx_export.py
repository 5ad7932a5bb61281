"""Deploy a compressed model: `python -m amrc_exp.experiment.onnx_export <export dir> [--out F]`
(or `amrc-export`) writes the run's saved model (`<run dir>/model`, see `export.py`) as ONNX,
`LowRankLinear` factors and Z as their own MatMuls (never ``U Vᵀ``), a dynamic batch axis,
and prints its weight bytes and the largest logit difference from torch under onnxruntime.

torch's TorchScript-based exporter (``dynamo=False``) is used: the dynamo exporter cannot trace
low-rank Z's shape-dependent fused path. Needs the ``onnx`` extra (onnx, onnxruntime).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from amrc_exp.experiment.export import MANIFEST_FILE, load_compressed
from amrc_exp.io import atomic_path, read_json

OPSET = 17


def input_shape(model_dir: Path) -> tuple[int, int, int]:
    """(channels, height, width) the saved model was created for (its manifest's kwargs)."""
    kwargs = read_json(model_dir / MANIFEST_FILE)["create_kwargs"]
    size = int(kwargs.get("img_size", 224))
    return int(kwargs.get("in_chans", 3)), size, size


def export_onnx(model: nn.Module, path: str | os.PathLike, shape: tuple[int, int, int]) -> Path:
    """Write `model` (eval mode, float32, CPU) to `path` as ONNX with a dynamic batch axis, atomically."""
    model = model.float().cpu().eval()
    example = torch.zeros(2, *shape)
    path = Path(path)
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(model, (example,), str(tmp), input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, opset_version=OPSET,
                          dynamo=False)
    return path


def weight_stats(path: str | os.PathLike) -> dict[str, int]:
    """The ONNX file's initializers: element count and bytes (what a runtime loads as weights)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    arrays = [numpy_helper.to_array(t) for t in model.graph.initializer]
    return {"elements": int(sum(a.size for a in arrays)), "bytes": int(sum(a.nbytes for a in arrays))}


def max_logit_diff(model: nn.Module, path: str | os.PathLike, images: torch.Tensor) -> float:
    """max |onnxruntime logits - torch logits| on `images`."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ours = sess.run(None, {"images": images.numpy()})[0]
    with torch.no_grad():
        ref = model.float().cpu().eval()(images).numpy()
    return float(abs(ours - ref).max())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m amrc_exp.experiment.onnx_export", description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", type=Path, help="a run's saved model: <run dir>/model (or the run dir)")
    parser.add_argument("--out", type=Path, default=None, help="the .onnx file (default: <model dir>/model.onnx)")
    args = parser.parse_args(argv)
    model_dir = args.model_dir / "model" if (args.model_dir / "model" / MANIFEST_FILE).is_file() else args.model_dir
    if not (model_dir / MANIFEST_FILE).is_file():
        parser.error(f"no saved model in {args.model_dir} (expected {MANIFEST_FILE} there or under model/)")
    model = load_compressed(model_dir)
    shape = input_shape(model_dir)
    out = export_onnx(model, args.out or model_dir / "model.onnx", shape)
    stats: dict[str, Any] = weight_stats(out)
    diff = max_logit_diff(model, out, torch.randn(4, *shape, generator=torch.Generator().manual_seed(0)))
    print(f"wrote {out}: {stats['elements']:,} weights, {stats['bytes'] / 2**20:.3f} MiB float32; "
          f"max |onnxruntime - torch| logit difference {diff:.2e} on 4 random inputs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
