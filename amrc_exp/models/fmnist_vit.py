"""Embedded models registered into timm, so `timm.create_model("fmnist_vit")` works.

They are `timm.models.vision_transformer.VisionTransformer`s sized for 1x28x28 Fashion-MNIST,
with two changes from a plain ViT that make them train to >= 88% in a few CPU minutes:
a convolutional stem in place of the one-shot patchify conv ("early convolutions", Xiao et
al. 2021: same 7x7 token grid, much faster convergence) and average pooling of the tokens
instead of a cls token. Patch size 4 gives 7x7 = 49 tokens: the token count matters for the
paper's `asvd_mean`, whose rank it caps. The transformer blocks, the only layers compressed,
are timm's own. No pretrained weights exist: the framework trains them
(`model.weights=train`, see `amrc_exp.models.train`).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

from timm.layers import PatchEmbed
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from amrc_exp.data import FMNIST_MEAN, FMNIST_STD


# Architecture of each embedded model: VisionTransformer kwargs plus `stem_width` (the conv
# stem's hidden channels). JSON-able, since it is part of the trained-weights cache key.
_EMBEDDED_COMMON: dict[str, Any] = dict(patch_size=4, depth=6, mlp_ratio=4.0, stem_width=32,
                                        global_pool="avg", class_token=False)
EMBEDDED_ARCHS: dict[str, dict[str, Any]] = {
    # ~0.33M params, 24 block linears of 64/192/256 wide. Trains to ~89% test top-1 in
    # 8 epochs (~7 min on 2 CPU cores); width 96 would need ~1.6x the time per epoch.
    "fmnist_vit": dict(_EMBEDDED_COMMON, embed_dim=64, num_heads=2),
    # Table 3 at embedded scale: half the width, ~0.28x the params (DeiT-B -> DeiT-S is 0.25x).
    "fmnist_vit_small": dict(_EMBEDDED_COMMON, embed_dim=32, num_heads=2),
}

_INPUT_DEFAULTS: dict[str, Any] = dict(img_size=28, in_chans=1, num_classes=10)


class ConvStemPatchEmbed(PatchEmbed):
    """timm's PatchEmbed with `proj` a stack of stride-2 3x3 convs (log2(patch_size) of them)
    instead of one patch_size x patch_size conv: the same token grid, a convolutional prior."""

    def __init__(self, *args: Any, stem_width: int = 32, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        patch = self.patch_size[0]
        n_convs = int(math.log2(patch))
        if self.patch_size[0] != self.patch_size[1] or 2**n_convs != patch or n_convs < 1:
            raise ValueError(f"conv stem needs a square power-of-two patch size, got {self.patch_size}")
        chans, out = self.proj.in_channels, self.proj.out_channels
        layers: list[nn.Module] = []
        for _ in range(n_convs - 1):  # conv-BN-GELU, then a plain conv to the embedding width
            layers += [nn.Conv2d(chans, stem_width, 3, 2, 1, bias=False), nn.BatchNorm2d(stem_width), nn.GELU()]
            chans = stem_width
        layers.append(nn.Conv2d(chans, out, 3, 2, 1))
        self.proj = nn.Sequential(*layers)


def _cfg(**kwargs: Any) -> dict[str, Any]:
    """timm pretrained cfg: no weights, but the data config `resolve_data_config` reads."""
    return {
        "url": "",
        "num_classes": 10,
        "input_size": (1, 28, 28),
        "pool_size": None,
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": (FMNIST_MEAN,),
        "std": (FMNIST_STD,),
        "first_conv": "patch_embed.proj.0",
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
    stem_width = model_args.pop("stem_width")
    model_args.setdefault("embed_layer", partial(ConvStemPatchEmbed, stem_width=stem_width))
    return build_model_with_cfg(VisionTransformer, variant, pretrained=False, **model_args)


@register_model
def fmnist_vit(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """Embedded default: ViT for 1x28x28 Fashion-MNIST, conv stem to 7x7 tokens, dim 64, depth 6."""
    return _create_embedded("fmnist_vit", pretrained, **kwargs)


@register_model
def fmnist_vit_small(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """Smaller sibling of fmnist_vit (Table 3 at embedded scale): dim 32, depth 6."""
    return _create_embedded("fmnist_vit_small", pretrained, **kwargs)
