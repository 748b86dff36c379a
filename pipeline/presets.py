"""Named model configurations. A preset pins its adapter's preprocessing."""

from __future__ import annotations

from dataclasses import replace

from edje_indexer.transforms.model import ModelSpec
from edje_indexer.transforms.preprocess import Preprocess

PRESETS: dict[str, ModelSpec] = {
    # The paper's model: SigLIP2 ViT-L/16 at 384 px, 64 x 384 tokens. The
    # authors trained the adapter on Hugging Face's SigLIP processor output:
    # squash-resize to 384x384, bilinear, mean = std = 0.5 (not timm's default).
    "edje-siglip2-l16-384": ModelSpec(
        backbone="vit_large_patch16_siglip_384.v2_webli",
        num_queries=64,
        out_dim=384,
        mlp_hidden=8192,
        preprocess=Preprocess(
            size=(384, 384), resize="squash", interpolation="bilinear", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)
        ),
    ),
    # Tests and the demo: a 2-block random ViT on 64 px input with the real
    # token shape (64 x 384), seeded so every run and machine builds the same model.
    "tiny": ModelSpec(
        backbone="vit_tiny_patch16_224",
        backbone_kwargs=(("depth", 2), ("img_size", 64)),
        random_weights=True,
        random_adapter=True,
        seed=0,
        num_queries=64,
        out_dim=384,
        mlp_hidden=512,
        preprocess=Preprocess(
            size=(64, 64), resize="squash", interpolation="bilinear", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)
        ),
    ),
}


def resolve_spec(
    preset: str | None,
    backbone: str | None = None,
    weights: str | None = None,
    adapter: str | None = None,
    random_weights: bool = False,
    random_adapter: bool = False,
    jpeg_draft: bool = True,
    decoder: str = "pillow",
) -> ModelSpec:
    """A preset, with command-line overrides applied, or a bare backbone."""
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; available: {', '.join(sorted(PRESETS))}")
        spec = PRESETS[preset]
        if backbone and backbone != spec.backbone:
            raise ValueError(f"preset {preset!r} fixes the backbone to {spec.backbone}; drop --backbone or --preset")
    elif backbone:
        spec = ModelSpec(backbone=backbone)  # preprocessing from the backbone's own timm config
    else:
        raise ValueError("choose a model: --preset NAME or --backbone TIMM_NAME")
    changes = {}
    if weights:
        changes.update(weights=weights, random_weights=False)
    elif random_weights:
        changes["random_weights"] = True
    if adapter:
        changes.update(adapter_weights=adapter, random_adapter=False)
    elif random_adapter:
        changes["random_adapter"] = True
    changes.update(jpeg_draft=jpeg_draft, decoder=decoder)
    return replace(spec, **changes)
