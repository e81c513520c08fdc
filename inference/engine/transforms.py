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

MAX_INPUT_PIXELS = 20_000_000  # pil_img2rgb rejects larger images (data_utils.py:121)
UINT16_TO_8 = 257.0  # 65535 / 255: full-range 16-bit -> 8-bit, as PIL and libpng scale


@dataclass(frozen=True)
class ResizeRule:
    max_size: int
    min_size: int
    stride: int
    max_pixels: int

    def target_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after the reference's resize rule (``transforms.py:73-85``).

        Any size from 1x1 is valid: the min-side term scales small images up (13x7 -> 700x378 under
        VIT_CHAT, 64x32 under VAE_EDIT; 1x1 -> 378x378).
        """
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
    """PIL image, numpy array or torch tensor -> RGB PIL image, validated; converted like ``pil_img2rgb``.

    Arrays/tensors: HxW, HxWx1, HxWx3, HxWx4 (or CxHxW tensors), read by dtype:

    - uint8: as is.
    - uint16: full-range 16-bit, divided by 257 (0..65535 -> 0..255) and rounded; PIL images in modes
      ``I;16*`` and ``I`` (how 16-bit PNG/TIFF files open) are read the same way.
    - other integer types: must already be in 0..255, else ValueError (signed data such as HU needs a
      window that only the caller knows).
    - float: must be in [0, 1] (times 255, rounded), else ValueError; PIL mode ``F`` likewise.

    The reference converts every non-8-bit image with ``convert("RGB")``, which clips at 255; these
    scalings replace that hazard. Images of any size from 1x1 up are accepted (the resize rule scales
    small ones up, ``transforms.py:73-75``); over 20 megapixels raises ValueError (``data_utils.py:121``).

    Transparency follows ``pil_img2rgb`` (``data_utils.py:124-130``): RGBA images and images whose
    ``info`` has a ``transparency`` entry (palette, or an RGB/L tRNS colour key) are pasted onto white
    through their alpha; every other mode (LA and PA included) is converted to RGB, dropping alpha.
    """
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16
            t = t.float()
        if t.dim() == 3 and t.shape[0] in (1, 3, 4) and t.shape[-1] not in (1, 3, 4):
            t = t.permute(1, 2, 0)
        image = t.numpy()
    if isinstance(image, Image.Image) and image.mode in _WIDE_PIL_MODES:
        _check_size(*image.size)
        arr = np.asarray(image)
        if image.mode != "F":  # I;16* and I (32-bit, how Pillow opens 16-bit PNGs) hold 16-bit samples
            if arr.size and (arr.min() < 0 or arr.max() > 65535):
                raise InputError(f"PIL mode {image.mode} image values must be 16-bit (0..65535)")
            arr = arr.astype(np.uint16)
        image = arr
    if isinstance(image, np.ndarray):
        image = Image.fromarray(np.ascontiguousarray(_to_uint8(image)))
    if not isinstance(image, Image.Image):
        raise InputError(f"unsupported image type {type(image).__name__}; pass a PIL image, numpy array or tensor")
    _check_size(*image.size)
    if image.mode == "RGBA" or image.info.get("transparency") is not None:
        # data_utils.py:124-128: paste through the alpha band onto white
        rgba = image.convert("RGBA")
        white = Image.new("RGB", rgba.size, (255, 255, 255))
        white.paste(rgba, mask=rgba.split()[3])
        return white
    return image.convert("RGB")  # data_utils.py:130 (LA/PA: alpha dropped)


_WIDE_PIL_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """A numpy image -> uint8 by the dtype rules of :func:`to_pil_rgb`."""
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        raise InputError(f"image array must be HxW, HxWx3 or HxWx4, got shape {arr.shape}")
    _check_size(arr.shape[1], arr.shape[0])
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_ or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise InputError(f"image array dtype {arr.dtype} is not supported (use uint8, uint16 or float in [0, 1])")
    f = arr.astype(np.float64)
    if not np.isfinite(f).all():
        raise InputError("image contains NaN or Inf values")
    if np.issubdtype(arr.dtype, np.floating):
        if f.min() < 0 or f.max() > 1:
            raise InputError("float images must be in [0, 1] (scale them, e.g. by a window, first)")
        f = f * 255.0
    elif arr.dtype == np.uint16:
        f = f / UINT16_TO_8
    elif f.min() < 0 or f.max() > 255:
        raise InputError(
            f"{arr.dtype} images must be in 0..255; pass uint16 for 16-bit data or window signed data (HU) first"
        )
    return np.clip(np.rint(f), 0, 255).astype(np.uint8)


def _check_size(width: int, height: int) -> None:
    if width * height > MAX_INPUT_PIXELS:
        raise InputError(f"image of {width}x{height} pixels is over the 20 megapixel limit")
    if width < 1 or height < 1:
        raise InputError(f"image of {width}x{height} pixels has no pixels")


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
