"""Loading weights: timm's pretrained hub weights (cache first, never hang offline) and local files.

Every failure a user can fix raises `WeightsError` naming the override to set
(`model.weights=/path/to/weights.safetensors`, `model.weights=random`, `model.num_classes=...`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Optional
from urllib.parse import urlparse

import torch
from torch import nn

from amrc_exp.io import network_available
from amrc_exp.errors import WeightsError

WEIGHTS_HINT = "set model.weights=/path/to/weights.safetensors (or model.weights=random for timing only)"
# torch.compile's parameter-name prefix (timm's loader already strips DDP's `module.`).
COMPILE_PREFIX = "_orig_mod."
HUB_FILENAMES = ("model.safetensors", "pytorch_model.bin")
_SHOW = 5  # how many keys of each kind an error message lists


# ----------------------------------------------------------------------------- hub


def hub_offline() -> bool:
    """True when the HF hub must not be contacted (HF_HUB_OFFLINE / AMRC_OFFLINE or no route)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return True
    from huggingface_hub import constants

    endpoint = urlparse(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    return not network_available((endpoint.hostname or "huggingface.co", port), timeout=2.0)


def cached_hub_file(name: str) -> Optional[str]:
    """Local path of `name`'s pretrained weights if already in the HF or torch-hub cache."""
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo_id, _, revision = cfg.hf_hub_id.partition("@")
        filenames = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else HUB_FILENAMES
        for filename in filenames:
            found = try_to_load_from_cache(repo_id, filename, revision=revision or None)
            if isinstance(found, str) and os.path.isfile(found):
                return found
    if cfg.url:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(cfg.url).path)
        if cached.is_file():
            return str(cached)
    return None


def load_hub(name: str, create_kwargs: Optional[Mapping[str, Any]] = None) -> tuple[nn.Module, dict[str, Any]]:
    """`timm.create_model(name, pretrained=True, **create_kwargs)`, offline-safe.

    Looks in the local caches first; goes online only when the hub is reachable, so with no
    network it fails in seconds with a WeightsError instead of retrying for minutes.
    Returns the model and {"weights_path": local file or hub id}.
    """
    import timm

    create_kwargs = dict(create_kwargs or {})
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        raise WeightsError(f"timm has no pretrained weights for model.name={name}: {WEIGHTS_HINT}; "
                           f"embedded models (fmnist_vit*) are trained by us: model.weights=train")
    local = cached_hub_file(name)
    if local is not None:
        # A `file` overlay makes timm load the cached file itself: no hub call, same filters.
        model = _create_pretrained(name, dict(create_kwargs, pretrained_cfg_overlay={"file": local}))
        return model, {"weights_path": local}
    if hub_offline():
        raise WeightsError(
            f"pretrained weights for {name} ({cfg.hf_hub_id or cfg.url}) are not in the local cache "
            f"and the hub is unreachable (offline): {WEIGHTS_HINT}"
        )
    return _create_pretrained(name, create_kwargs), {"weights_path": cfg.hf_hub_id or cfg.url}


def _create_pretrained(name: str, create_kwargs: dict[str, Any]) -> nn.Module:
    import timm

    try:
        return timm.create_model(name, pretrained=True, **create_kwargs)
    except (WeightsError, TypeError):
        raise  # TypeError: a kwarg the family refuses (img_size); the caller retries without it
    except Exception as err:  # network, hash, or format errors from timm/hf: all "no weights"
        raise WeightsError(f"loading pretrained weights for {name} failed ({type(err).__name__}: "
                           f"{err}): {WEIGHTS_HINT}") from err


# ----------------------------------------------------------------------------- files


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a .safetensors / .pth / .pt / .bin file into a flat {name: tensor} state dict."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise WeightsError(f"model.weights={str(path)!r} is a directory, not a weights file: name the "
                           f".safetensors/.pth file inside it; {WEIGHTS_HINT}")
    if not path.is_file():
        raise WeightsError(f"weights file not found: model.weights={str(path)!r}; {WEIGHTS_HINT}")
    import timm.models

    try:
        # timm's reader: .safetensors or torch files; the EMA weights when the checkpoint has
        # them (state_dict_ema / model_ema), else state_dict / model; DDP's `module.` stripped.
        checkpoint: Any = timm.models.load_state_dict(str(path), use_ema=True, device="cpu")
    except AttributeError:  # timm's clean-up of something that is not a {name: tensor} dict
        checkpoint = None
    except Exception as err:  # safetensors/pickle/zip errors on corrupt bytes: all unreadable
        raise WeightsError(f"cannot read weights file model.weights={str(path)!r} "
                           f"({type(err).__name__}: {err}); is it corrupt? {WEIGHTS_HINT}") from err
    if not isinstance(checkpoint, Mapping) or not all(torch.is_tensor(v) for v in checkpoint.values()):
        raise WeightsError(f"model.weights={str(path)!r} holds no state dict (expected a {{name: tensor}} "
                           "dict, possibly under state_dict_ema, model_ema, state_dict or model)")
    # torch.compile's wrapper prefix, which timm's clean-up does not know.
    return {k.removeprefix(COMPILE_PREFIX): v for k, v in checkpoint.items()}


def load_file(model: nn.Module, path: str | os.PathLike) -> dict[str, Any]:
    """Load a weights file into `model` with a strict check; WeightsError with a readable diff."""
    state_dict = read_state_dict(path)
    check_state_dict(model, state_dict, source=f"model.weights={str(path)!r}")
    model.load_state_dict(state_dict, strict=True)
    return {"weights_path": str(Path(path).expanduser()), "tensors": len(state_dict)}


def check_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise WeightsError listing missing / unexpected / mis-shaped keys, with the fix to apply."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [k for k in expected if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)]
    if not (missing or unexpected or mismatched):
        return
    lines = [f"{source} does not match the model's architecture:"]
    for label, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            lines.append(f"  {len(keys)} {label} keys: {', '.join(keys[:_SHOW])}{' ...' if len(keys) > _SHOW else ''}")
    if mismatched:
        shown = [f"{k} file {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}" for k in mismatched[:_SHOW]]
        lines.append(f"  {len(mismatched)} shape mismatches: {'; '.join(shown)}{' ...' if len(mismatched) > _SHOW else ''}")
    lines += _hints(model, state_dict, mismatched)
    if missing or unexpected:
        lines.append("  (is model.name the architecture the file was saved from?)")
    raise WeightsError("\n".join(lines))


def _hints(model: nn.Module, state_dict: Mapping[str, torch.Tensor], mismatched: list[str]) -> list[str]:
    """Turn the usual shape mismatches into the override that fixes them; each hint only when
    the dimension it names is the one that differs."""
    hints = []
    expected = model.state_dict()

    def differs(key: str, dim: int) -> bool:
        got, want = state_dict[key].shape, expected[key].shape
        return len(got) != len(want) or got[dim] != want[dim]

    classifier = str(getattr(model, "pretrained_cfg", {}).get("classifier") or "head")
    head_key = f"{classifier}.weight"
    if head_key in mismatched and differs(head_key, 0):
        hints.append(f"  the file's head has {state_dict[head_key].shape[0]} classes: "
                     f"set model.num_classes={state_dict[head_key].shape[0]}")
    first_conv = str(getattr(model, "pretrained_cfg", {}).get("first_conv") or "patch_embed.proj")
    conv_key = f"{first_conv}.weight"
    if conv_key in mismatched and state_dict[conv_key].ndim == 4:
        if differs(conv_key, 1):
            hints.append(f"  the file's input has {state_dict[conv_key].shape[1]} channels: "
                         f"set model.in_chans={state_dict[conv_key].shape[1]}")
    # The embedding width: the position embedding's last dim (a conv stem's first conv has its
    # own width), else the patchify conv's output channels.
    width_key, width_dim = ("pos_embed", -1) if "pos_embed" in mismatched else (conv_key, 0)
    if width_key in mismatched and state_dict[width_key].ndim >= 2 and differs(width_key, width_dim):
        hints.append(f"  the file's embedding width is {state_dict[width_key].shape[width_dim]}, the model's "
                     f"{expected[width_key].shape[width_dim]}: check model.name / model.kwargs")
    if "pos_embed" in mismatched and differs("pos_embed", 1):
        hints.append("  the position embedding has another token count: check model.img_size")
    return hints
