"""Embedded models registered into timm, so `timm.create_model("fmnist_vit")` works.

They are plain `timm.models.vision_transformer.VisionTransformer`s sized for 1x28x28
Fashion-MNIST. Patch size 4 gives 7x7 = 49 patch tokens + cls: the token count matters for
the paper's `asvd_mean` whose rank is capped by it. No pretrained weights exist for these:
they are trained by the framework (`model.weights=train`, see `amrc_exp.models.embedded`).
"""

from __future__ import annotations

from typing import Any

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer

FMNIST_MEAN = (0.2860,)
FMNIST_STD = (0.3530,)

# Architecture of each embedded model (VisionTransformer kwargs). A dict, not an if-chain.
EMBEDDED_ARCHS: dict[str, dict[str, Any]] = {
    # ~1.2M params; trains to ~90% Fashion-MNIST test top-1 in a few CPU minutes.
    "fmnist_vit": dict(patch_size=4, embed_dim=128, depth=6, num_heads=4, mlp_ratio=4.0),
    # The "smaller sibling" of Table 3 at embedded scale: ~half of fmnist_vit's params.
    "fmnist_vit_small": dict(patch_size=4, embed_dim=96, depth=5, num_heads=3, mlp_ratio=4.0),
}

_INPUT_DEFAULTS: dict[str, Any] = dict(img_size=28, in_chans=1, num_classes=10)


def _cfg(**kwargs: Any) -> dict[str, Any]:
    """timm pretrained cfg: no weights, but the data config `resolve_data_config` reads."""
    return {
        "url": "",
        "num_classes": 10,
        "input_size": (1, 28, 28),
        "pool_size": None,
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": FMNIST_MEAN,
        "std": FMNIST_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "same as amrc_exp",
        **kwargs,
    }


# Read by timm's `register_model` (it looks up `default_cfgs` in the entrypoint's module).
default_cfgs = generate_default_cfgs({name: _cfg() for name in EMBEDDED_ARCHS})


def _create_embedded(variant: str, pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    if pretrained:
        # Nothing to download: the lead's config path is model.weights=train.
        raise ValueError(
            f"{variant} has no pretrained weights; set model.weights=train (or a file path)"
        )
    model_args = {**_INPUT_DEFAULTS, **EMBEDDED_ARCHS[variant], **kwargs}
    return build_model_with_cfg(VisionTransformer, variant, pretrained=False, **model_args)


@register_model
def fmnist_vit(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """Embedded default: ViT for 1x28x28 Fashion-MNIST, patch 4, dim 128, depth 6."""
    return _create_embedded("fmnist_vit", pretrained, **kwargs)


@register_model
def fmnist_vit_small(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """Smaller sibling of fmnist_vit (Table 3 at embedded scale): dim 96, depth 5."""
    return _create_embedded("fmnist_vit_small", pretrained, **kwargs)
