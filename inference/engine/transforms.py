"""Image preprocessing of the reference (spec 3.1 ``build_transform``, 3.3 ``vae_transform``).

Rule (``MaxLongEdgeMinShortEdgeResize``): scale = max(min(max_size/long, 1), min_size/short); each side
``round(side*scale)`` snapped to the nearest multiple of the stride (at least one stride); if the area is
over max_pixels, each side is multiplied by the *pixel* ratio (not its square root, as the reference does)
and snapped again; if the long side still exceeds max_size, rescale to it and snap. Then PIL bicubic
resize, /255 and (x - 0.5)/0.5 -> [-1, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .errors import InputError

MAX_INPUT_PIXELS = 20_000_000  # pil_img2rgb rejects larger images
MIN_INPUT_SIDE = 14  # one ViT patch


@dataclass(frozen=True)
class ResizeRule:
    max_size: int
    min_size: int
    stride: int
    max_pixels: int

    def target_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after the reference's resize rule."""
        scale = min(self.max_size / max(width, height), 1.0)
        scale = max(scale, self.min_size / min(width, height))
        w, h = self._apply(width, height, scale)
        if w * h > self.max_pixels:
            w, h = self._apply(w, h, self.max_pixels / (w * h))
        if max(w, h) > self.max_size:
            w, h = self._apply(w, h, self.max_size / max(w, h))
        return w, h

    def _snap(self, v: int) -> int:
        return max(self.stride, int(round(v / self.stride) * self.stride))

    def _apply(self, width: int, height: int, scale: float) -> tuple[int, int]:
        return self._snap(round(width * scale)), self._snap(round(height * scale))


# chat() / build_transform (vlm_sft in default.yaml)
VIT_CHAT = ResizeRule(max_size=980, min_size=378, stride=14, max_pixels=2_007_040)
# InterleaveInferencer / interactive_image_generator: vit_transform (980, 387, 14) and vae_transform (1024, 32, 16)
VIT_INTERLEAVE = ResizeRule(max_size=980, min_size=387, stride=14, max_pixels=14 * 14 * 9 * 1024)
VAE_EDIT = ResizeRule(max_size=1024, min_size=32, stride=16, max_pixels=14 * 14 * 9 * 1024)


def to_pil_rgb(image) -> Image.Image:
    """PIL image, numpy array or torch tensor -> RGB PIL image, validated.

    Arrays/tensors: uint8 HxW, HxWx3, HxWx4 (or 3xHxW tensors); float arrays are read as [0, 1].
    Transparent images are composited onto white, as the reference does.
    """
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.dim() == 3 and t.shape[0] in (1, 3, 4) and t.shape[-1] not in (1, 3, 4):
            t = t.permute(1, 2, 0)
        image = t.numpy()
    if isinstance(image, np.ndarray):
        arr = image
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
            raise InputError(f"image array must be HxW, HxWx3 or HxWx4, got shape {arr.shape}")
        _check_size(arr.shape[1], arr.shape[0])
        if arr.dtype != np.uint8:
            if not np.issubdtype(arr.dtype, np.floating) and not np.issubdtype(arr.dtype, np.integer):
                raise InputError(f"image array dtype {arr.dtype} is not supported (use uint8)")
            f = arr.astype(np.float64)
            if not np.isfinite(f).all():
                raise InputError("image contains NaN or Inf values")
            if np.issubdtype(arr.dtype, np.floating):
                if f.min() < 0 or f.max() > 1:
                    raise InputError("float images must be in [0, 1]")
                f = f * 255.0
            elif f.min() < 0 or f.max() > 255:
                raise InputError("integer images must be in 0..255 (convert to 8-bit first)")
            arr = np.clip(np.rint(f), 0, 255).astype(np.uint8)
        image = Image.fromarray(np.ascontiguousarray(arr))
    if not isinstance(image, Image.Image):
        raise InputError(f"unsupported image type {type(image).__name__}; pass a PIL image, numpy array or tensor")
    _check_size(*image.size)
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _check_size(width: int, height: int) -> None:
    if width * height > MAX_INPUT_PIXELS:
        raise InputError(f"image of {width}x{height} pixels is over the 20 megapixel limit")
    if width < MIN_INPUT_SIDE or height < MIN_INPUT_SIDE:
        raise InputError(
            f"image of {width}x{height} pixels is smaller than one {MIN_INPUT_SIDE}x{MIN_INPUT_SIDE} patch"
        )


def resize(image: Image.Image, rule: ResizeRule) -> Image.Image:
    w, h = rule.target_size(*image.size)
    if (w, h) == image.size:
        return image
    return image.resize((w, h), Image.BICUBIC)


def to_model_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL -> [3, H, W] float32 in [-1, 1] (ToTensor then Normalize(0.5, 0.5))."""
    arr = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
    return (arr - 0.5) / 0.5


def preprocess(image, rule: ResizeRule) -> torch.Tensor:
    return to_model_tensor(resize(to_pil_rgb(image), rule))
