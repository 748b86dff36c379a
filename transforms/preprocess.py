"""The geometry and normalisation of the pixels a backbone sees; part of a model's identity.

:class:`Preprocess` says how a decoded RGB image becomes the backbone's input:
resize (and crop or pad), interpolation, mean and std. It comes from a preset
(the EDJE authors' SigLIP processor: squash-resize, bilinear, mean = std = 0.5)
or, without one, from the backbone's own timm config
(:meth:`Preprocess.from_timm`), in which case it gives the pixels of
``timm.data.create_transform`` for that config (tests/test_preprocess.py
checks them for every timm crop mode).

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

# Only resamplers the torch decoder can reproduce with an antialiased F.interpolate: timm also knows nearest, box,
# hamming and lanczos, which are refused rather than approximated (a store must hold one preprocessing).
INTERPOLATIONS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
# squash: both sides to ``size`` (the presets). The others are timm's eval transforms (transforms_imagenet_eval), all
# resizing towards scale = floor(size / crop_pct) and then center-cropping (or padding) to ``size``:
#   shorter_crop  crop_mode="center": keep the aspect ratio, the shorter side (relative to scale) to scale;
#   squash_crop   crop_mode="squash": both sides to scale, ignoring the aspect ratio;
#   longer_pad    crop_mode="border": keep the aspect ratio, the longer side to scale, pad with the mean colour.
RESIZE_MODES = ("squash", "shorter_crop", "squash_crop", "longer_pad")
TIMM_CROP_MODES = {"center": "shorter_crop", "squash": "squash_crop", "border": "longer_pad"}
TIMM_DEFAULT_CROP_PCT = 0.875  # timm.data.constants.DEFAULT_CROP_PCT, what create_transform uses for a missing one


@dataclass(frozen=True)
class Preprocess:
    """``resize`` is one of :data:`RESIZE_MODES`; ``crop_pct`` only applies to
    the timm modes (``squash`` takes exactly 1.0)."""

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
        if not self.crop_pct > 0:
            raise ValueError(f"crop_pct must be > 0, got {self.crop_pct!r}")
        if self.resize == "squash" and self.crop_pct != 1.0:
            # "squash" once silently ignored crop_pct; refuse it so no config claims a crop it does not get.
            raise ValueError(
                f"resize='squash' takes crop_pct=1.0 (got {self.crop_pct!r}); "
                f"'squash_crop' is timm's squash-then-center-crop"
            )

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_timm(cls, data_config: dict) -> Preprocess:
        """From ``timm.data.resolve_model_data_config(model)``: the pixels of ``timm.data.create_transform(**it)``."""
        _, h, w = data_config["input_size"]
        interp = data_config.get("interpolation") or "bilinear"  # create_transform's own default
        if interp not in INTERPOLATIONS:
            raise ValueError(f"timm interpolation {interp!r} is not supported; use one of {sorted(INTERPOLATIONS)}")
        crop_mode = data_config.get("crop_mode") or "center"
        if crop_mode not in TIMM_CROP_MODES:
            # timm treats any unknown crop_mode as "center"; refuse it instead of guessing.
            raise ValueError(f"unknown timm crop_mode {crop_mode!r}; use one of {', '.join(TIMM_CROP_MODES)}")
        if data_config.get("crop_border_pixels"):
            raise ValueError(f"timm crop_border_pixels={data_config['crop_border_pixels']!r} is not supported")
        crop_pct = float(data_config.get("crop_pct") or TIMM_DEFAULT_CROP_PCT)  # `or`: timm treats 0/None alike
        resize = TIMM_CROP_MODES[crop_mode]
        if resize == "squash_crop" and crop_pct == 1.0:
            resize = "squash"  # the same pixels; keeps the identity such configs have always had
        return cls(
            size=(int(h), int(w)),
            resize=resize,
            interpolation=interp,
            mean=tuple(float(x) for x in data_config["mean"]),
            std=tuple(float(x) for x in data_config["std"]),
            crop_pct=crop_pct,
        )

    def _scale_size(self) -> tuple[int, int]:
        th, tw = self.size
        if self.resize == "squash":
            return th, tw
        # timm: math.floor per side, before any aspect-ratio logic.
        return math.floor(th / self.crop_pct), math.floor(tw / self.crop_pct)

    def draft_size(self) -> int:
        """The side length a JPEG may be decoded down to (``Image.draft``) without losing input pixels.

        ``draft`` keeps both sides >= this, whatever the aspect ratio, so it must
        cover the largest resized side the shorter image side can map to.
        """
        sh, sw = self._scale_size()
        if self.resize == "longer_pad":
            # The image is fitted inside (sh, sw): its shorter side maps to at most min(sh, sw).
            return min(sh, sw)
        return max(sh, sw)

    def resized_size(self, h: int, w: int) -> tuple[int, int]:
        """(height, width) an h x w image is resized to before the center crop/pad, as timm computes it."""
        sh, sw = self._scale_size()
        if self.resize in ("squash", "squash_crop"):
            return sh, sw
        if self.resize == "shorter_crop" and sh == sw:
            # torchvision Resize(int): shorter side to sh, longer side truncated (int), w <= h decides the tie.
            if w <= h:
                return int(sh * h / w), sh
            return sh, int(sh * w / h)
        # timm ResizeKeepRatio (non-square shorter_crop, longest=0; longer_pad, longest=1): one ratio, round per side.
        # max(1, ...) only matters for degenerate strips, where timm itself fails on a zero-size resize.
        rh, rw = h / sh, w / sw
        ratio = max(rh, rw) if self.resize == "longer_pad" else min(rh, rw)
        return max(1, round(h / ratio)), max(1, round(w / ratio))

    def _fill(self) -> tuple[int, int, int]:
        # timm pads border mode with the mean colour; torchvision's CenterCrop pads with black.
        if self.resize == "longer_pad":
            return tuple(round(255 * v) for v in self.mean)
        return 0, 0, 0

    def _crop_box(self, nh: int, nw: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        """Per axis (source offset, destination offset, length) of timm's center_crop_or_pad from nh x nw."""
        out = []
        for n, t in ((nh, self.size[0]), (nw, self.size[1])):
            if t > n:  # padded: (t - n) // 2 before, the rest after, then nothing left to crop on this axis
                out.append((0, (t - n) // 2, n))
            else:  # Python's round halves to even, as torchvision's center_crop (int(round(...))) does
                out.append((round((n - t) / 2.0), 0, t))
        return out[0], out[1]

    def resize_pillow(self, im: Image.Image) -> Image.Image:
        """An RGB image at the model's input size."""
        th, tw = self.size
        w, h = im.size
        nh, nw = self.resized_size(h, w)
        if (nw, nh) != (w, h):  # Pillow returns a copy at the same size anyway, as torchvision skips the resize
            im = im.resize((nw, nh), INTERPOLATIONS[self.interpolation])
        if (nh, nw) == (th, tw):
            return im
        (sy, dy, ly), (sx, dx, lx) = self._crop_box(nh, nw)
        part = im.crop((sx, sy, sx + lx, sy + ly))
        if (ly, lx) == (th, tw):
            return part
        out = Image.new("RGB", (tw, th), self._fill())
        out.paste(part, (dx, dy))
        return out

    def resize_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 [3, h, w] -> uint8 [3, H, W] on x's device: resize_pillow's geometry, antialiased like Pillow."""
        th, tw = self.size
        h, w = x.shape[1:]
        nh, nw = self.resized_size(h, w)
        if (nh, nw) != (h, w):
            y = F.interpolate(
                x.unsqueeze(0).float(), size=(nh, nw), mode=self.interpolation, antialias=True, align_corners=False
            )
            x = y.round_().clamp_(0, 255).to(torch.uint8)[0]
        if (nh, nw) == (th, tw):
            return x
        (sy, dy, ly), (sx, dx, lx) = self._crop_box(nh, nw)
        part = x[:, sy : sy + ly, sx : sx + lx]
        if (ly, lx) == (th, tw):
            return part.contiguous()
        out = torch.tensor(self._fill(), dtype=torch.uint8, device=x.device).view(3, 1, 1).expand(3, th, tw).clone()
        out[:, dy : dy + ly, dx : dx + lx] = part
        return out
