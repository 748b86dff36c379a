"""The geometry and normalisation of the pixels a backbone sees; part of a model's identity.

:class:`Preprocess` says how a decoded RGB image becomes the backbone's input:
resize (and crop), interpolation, mean and std. It comes from a preset (the
EDJE authors' SigLIP processor: squash-resize, bilinear, mean = std = 0.5) or,
without one, from the backbone's own timm config (:meth:`Preprocess.from_timm`),
in which case it must give the pixels of ``timm.data.create_transform`` for
that config (tests/test_preprocess.py checks it).

Both decoders (transforms/decoders.py) apply the same geometry through
:meth:`Preprocess.resize_pillow` and :meth:`Preprocess.resize_tensor`, so one
store holds one preprocessing whichever decoder handled each image.
Normalisation (mean/std) is not done here: it runs batched on the model's
device (transforms/encoder.py), so the host only moves uint8 pixels.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from PIL import Image

INTERPOLATIONS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
RESIZE_MODES = ("squash", "shorter_crop")


@dataclass(frozen=True)
class Preprocess:
    """``resize``: ``squash`` resizes to ``size`` ignoring aspect ratio;
    ``shorter_crop`` resizes the shorter side to ``size / crop_pct`` and
    center-crops (timm's evaluation transform)."""

    size: tuple[int, int]  # (height, width)
    resize: str = "squash"
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    crop_pct: float = 1.0

    def __post_init__(self):
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"unknown resize mode {self.resize!r}; use one of {', '.join(RESIZE_MODES)}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"unknown interpolation {self.interpolation!r}; use one of {sorted(INTERPOLATIONS)}")

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_timm(cls, data_config: dict) -> "Preprocess":
        """From ``timm.data.resolve_model_data_config(model)``."""
        _, h, w = data_config["input_size"]
        interp = data_config.get("interpolation", "bicubic")
        return cls(
            size=(int(h), int(w)),
            resize="shorter_crop" if data_config.get("crop_mode", "center") == "center" else "squash",
            interpolation=interp if interp in INTERPOLATIONS else "bicubic",
            mean=tuple(float(x) for x in data_config["mean"]),
            std=tuple(float(x) for x in data_config["std"]),
            crop_pct=float(data_config.get("crop_pct", 1.0)),
        )

    def draft_size(self) -> int:
        """The side length a JPEG may be decoded down to (``Image.draft``) without losing input pixels."""
        th, tw = self.size
        if self.resize == "shorter_crop":
            return math.floor(max(th, tw) / self.crop_pct)
        return max(th, tw)

    def resize_pillow(self, im: Image.Image) -> Image.Image:
        """An RGB image at the model's input size."""
        th, tw = self.size
        resample = INTERPOLATIONS[self.interpolation]
        if self.resize == "squash":
            return im.resize((tw, th), resample)
        need = self.draft_size()
        w, h = im.size
        scale = need / min(w, h)
        nw, nh = max(tw, round(w * scale)), max(th, round(h * scale))
        im = im.resize((nw, nh), resample)
        left, top = (nw - tw) // 2, (nh - th) // 2
        return im.crop((left, top, left + tw, top + th))

    def resize_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 [3, h, w] -> uint8 [3, H, W] on x's device (antialiased, like Pillow)."""
        th, tw = self.size
        mode = "bicubic" if self.interpolation == "bicubic" else "bilinear"
        y = x.unsqueeze(0).float()
        if self.resize == "squash":
            y = F.interpolate(y, size=(th, tw), mode=mode, antialias=True, align_corners=False)
        else:
            need = self.draft_size()
            h, w = x.shape[1:]
            scale = need / min(h, w)
            nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
            y = F.interpolate(y, size=(nh, nw), mode=mode, antialias=True, align_corners=False)
            top, left = (nh - th) // 2, (nw - tw) // 2
            y = y[..., top:top + th, left:left + tw]
        return y.round_().clamp_(0, 255).to(torch.uint8)[0]
