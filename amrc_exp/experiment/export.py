"""Export a compressed model to safetensors and reload it into a timm model with one call.

An export directory holds two files, each written atomically (`amrc_exp.io.atomic_path`):

* ``model.safetensors`` — the full state dict (LowRankLinear factors, their Z and int32
  index buffers, every untouched tensor);
* ``model.json`` — how to rebuild the module tree: the timm model name and
  ``timm.create_model`` kwargs, the dtype, every `LowRankLinear`'s constructor arguments
  (shape, rank, Z type and size), the parameter count, a SHA-256 of the weights file (so a
  json and a weights file from two different saves are never paired silently) and the
  caller's `meta`.

`load_compressed` creates the timm model (random init, nothing downloaded), swaps the recorded
layers for empty `LowRankLinear` shells of the recorded shapes, loads the state dict strictly
and returns the model in eval mode: its logits equal the saved model's bit for bit.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any, Optional

import timm
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from amrc_exp.errors import WeightsError
from amrc_exp.io import atomic_path, atomic_write_json, file_sha256, read_json
from amrc_exp.compress.lowrank import LowRankLinear, count_params

__all__ = ["FORMAT", "WEIGHTS_FILE", "MANIFEST_FILE", "save_compressed", "load_compressed", "default_create_kwargs"]

FORMAT = "amrc_exp.compressed/2"  # /2: Z as a submodule (z.down, z.up, ...)
WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "model.json"


def _register_embedded_models() -> None:
    """Import `amrc_exp.models` so timm knows the embedded `fmnist_vit*` names."""
    try:
        importlib.import_module("amrc_exp.models")
    except ModuleNotFoundError as err:  # only a missing amrc_exp.models itself is tolerated
        if err.name not in ("amrc_exp.models",):
            raise


def default_create_kwargs(model: nn.Module) -> dict[str, Any]:
    """The kwargs read back from a timm ViT/DeiT/Swin: num_classes, img_size, in_chans.

    Architecture kwargs that differ from the named timm config (embed_dim, depth, …) cannot
    be read back; pass them to `save_compressed` as `create_kwargs`.
    """
    kwargs: dict[str, Any] = {}
    if hasattr(model, "num_classes"):
        kwargs["num_classes"] = int(model.num_classes)
    pe = getattr(model, "patch_embed", None)
    img = getattr(pe, "img_size", None)
    if img is not None:
        img = tuple(int(v) for v in (img if isinstance(img, (tuple, list)) else (img, img)))
        kwargs["img_size"] = img[0] if img[0] == img[1] else list(img)
    # The first conv of the patch embedding (a plain patchify conv, or a conv stem's first layer).
    conv = next((m for m in pe.modules() if isinstance(m, nn.Conv2d)), None) if pe is not None else None
    if conv is not None:
        kwargs["in_chans"] = int(conv.in_channels)
    return kwargs


def _model_name(model: nn.Module) -> Optional[str]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture")


def _build_skeleton(model_name: str, create_kwargs: dict[str, Any], layers: dict[str, dict],
                    dtype: torch.dtype, device: torch.device | str) -> nn.Module:
    """timm model with the recorded layers swapped for empty LowRankLinear shells."""
    _register_embedded_models()
    if not timm.is_model(model_name):
        raise WeightsError(f"exported model {model_name!r} is not a timm (or amrc_exp) model name")
    with torch.device(device):
        model = timm.create_model(model_name, pretrained=False, **create_kwargs)
        model.to(dtype)
        for name, spec in layers.items():
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            old = getattr(parent, attr, None)
            if not isinstance(old, (nn.Linear, LowRankLinear)):
                raise WeightsError(f"exported layer {name!r} is not a linear layer of {model_name}")
            setattr(parent, attr, LowRankLinear(**spec, dtype=dtype))
    return model


def save_compressed(
    model: nn.Module,
    out_dir: str | os.PathLike,
    meta: Optional[dict[str, Any]] = None,
    *,
    model_name: Optional[str] = None,
    create_kwargs: Optional[dict[str, Any]] = None,
) -> Path:
    """Write ``model.safetensors`` and ``model.json`` to `out_dir`; return the directory.

    Args:
        model: a timm model, possibly with `LowRankLinear` layers (`compress_`) and PTQ.
        out_dir: created if missing; existing export files are replaced atomically.
        meta: anything JSON-serialisable to keep with the model (config, metrics).
        model_name: timm name; defaults to ``model.pretrained_cfg["architecture"]``.
        create_kwargs: ``timm.create_model`` kwargs (num_classes, img_size, in_chans, extra
            architecture kwargs); defaults to `default_create_kwargs(model)`.

    Before writing, the skeleton the manifest describes is built on the meta device and its
    state-dict shapes are checked against `model`'s, so an export that could not be reloaded
    fails here, not later.
    """
    out = Path(out_dir)
    model_name = model_name or _model_name(model)
    if not model_name:
        raise ValueError("save_compressed: model has no pretrained_cfg['architecture']; pass model_name")
    kwargs = dict(default_create_kwargs(model) if create_kwargs is None else create_kwargs)
    layers = {n: m.constructor_args() for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    state = model.state_dict()
    floats = [v.dtype for v in state.values() if v.is_floating_point()]
    dtype = floats[0] if floats else torch.float32

    skeleton = _build_skeleton(model_name, kwargs, layers, dtype, "meta").state_dict()
    got = {k: tuple(v.shape) for k, v in state.items()}
    want = {k: tuple(v.shape) for k, v in skeleton.items()}
    if got != want:
        diff = sorted(set(got.items()) ^ set(want.items()))[:6]
        raise ValueError(f"save_compressed: timm.create_model({model_name!r}, **{kwargs}) does not rebuild "
                         f"this model (first differences: {diff}); pass the missing create_kwargs")

    # Distinct contiguous CPU copies: safetensors refuses tensors sharing storage.
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}
    with atomic_path(out / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT})
        digest = file_sha256(tmp)
    manifest = {
        "format": FORMAT,
        "model_name": model_name,
        "create_kwargs": kwargs,
        "dtype": str(dtype).removeprefix("torch."),
        "layers": [{"name": n, **spec} for n, spec in layers.items()],  # a list keeps model order
        "n_params": count_params(model),
        "weights_sha256": digest,
        "meta": meta or {},
    }
    atomic_write_json(out / MANIFEST_FILE, manifest)
    return out


def load_compressed(out_dir: str | os.PathLike, device: torch.device | str = "cpu") -> nn.Module:
    """Rebuild the model saved by `save_compressed` in `out_dir`, in eval mode, on `device`.

    Raises:
        WeightsError: files missing, from two different saves, or not matching the manifest.
    """
    out = Path(out_dir)
    manifest_path, weights_path = out / MANIFEST_FILE, out / WEIGHTS_FILE
    for p in (manifest_path, weights_path):
        if not p.is_file():
            raise WeightsError(f"no compressed model at {out}: {p.name} is missing")
    manifest = read_json(manifest_path)
    if manifest.get("format") != FORMAT:
        raise WeightsError(f"{manifest_path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    if file_sha256(weights_path) != manifest["weights_sha256"]:
        raise WeightsError(f"{weights_path} does not belong to {manifest_path} (SHA-256 mismatch)")
    dtype = getattr(torch, manifest["dtype"])
    layers = {entry["name"]: {k: v for k, v in entry.items() if k != "name"} for entry in manifest["layers"]}
    model = _build_skeleton(manifest["model_name"], manifest["create_kwargs"], layers, dtype, "cpu")
    try:
        model.load_state_dict(load_file(str(weights_path)), strict=True)
    except RuntimeError as err:
        raise WeightsError(f"{weights_path} does not match {manifest['model_name']}: {err}") from err
    return model.to(device).eval()
