"""Decoded images as the model sees them: upright, 8-bit RGB. One rule for every way in.

    img = images.upright_rgb8(PIL.Image.open(path))     # PIL image, mode "RGB"

`tools/prepare_data.py` (builders/common.check_image) writes training and evaluation images by
these rules (at their own resolution), the input pipeline decodes them with `decode`, and
`predict.load_image` and the demo's upload decode users' images by the same rules, so a photo
is seen the way it was in training:
- EXIF orientation (tag 0x0112) != 1: the pixels are transposed to the display orientation (what
  an image viewer, a browser and an annotator show); box coordinates are in that frame;
- 16-bit and 32-bit integer grey ("I;16", "I"): scaled to 8 bit (by 65535 when any value
  exceeds 255, else by 255), rounded;
- alpha (RGBA, LA, PA, P with a transparent colour): composited on black, the colour of the
  zero padding around images in a batch;
- every other mode (L, P, CMYK, YCbCr, 1, ...): PIL's conversion to RGB.

Images up to MAX_PIXELS (12000 × 12000) are read at full resolution; PIL's decompression-bomb
warning is raised to that limit (the views are cut from windows, views/windows.py, so the
model's memory does not grow with the image).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps

EXIF_ORIENTATION = 0x0112
MAX_PIXELS = 12000 * 12000
# PIL warns above MAX_IMAGE_PIXELS and refuses above twice that: warn only beyond our limit.
Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, MAX_PIXELS)


class ImageTooLarge(ValueError):
  """More than MAX_PIXELS pixels; the message says so in one line."""


def check_size(img: Image.Image, name: str = "the image") -> None:
  """ImageTooLarge when `img` (opened, not necessarily loaded) exceeds MAX_PIXELS."""
  w, h = img.size
  if w * h > MAX_PIXELS:
    raise ImageTooLarge(f"{name} is too large: {w}x{h} pixels (at most "
                        f"{MAX_PIXELS / 1e6:g} megapixels, e.g. 12000x12000)")


def orientation(img: Image.Image) -> int:
  """The EXIF orientation (1 = as stored; 2-8 = mirrored and/or rotated)."""
  return img.getexif().get(EXIF_ORIENTATION, 1)


def needs_rgb8(img: Image.Image) -> bool:
  """True when `to_rgb8` changes the image (not plain 8-bit RGB without a transparent colour)."""
  return img.mode != "RGB" or img.info.get("transparency") is not None


def to_rgb8(img: Image.Image) -> Image.Image:
  """8-bit RGB by the module's rules (16-bit scaled, alpha on black)."""
  if img.mode in ("I;16", "I;16B", "I;16L", "I"):
    arr = np.asarray(img, dtype=np.float64)
    top = 65535.0 if arr.max() > 255 else 255.0
    return Image.fromarray(np.clip(arr / top * 255 + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
  if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
    rgba = img.convert("RGBA")
    black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
    return Image.alpha_composite(black, rgba).convert("RGB")
  return img.convert("RGB")


def upright_rgb8(img: Image.Image) -> Image.Image:
  """The loaded image upright (EXIF orientation applied) and in 8-bit RGB."""
  if orientation(img) != 1:
    img = ImageOps.exif_transpose(img)
  return to_rgb8(img) if needs_rgb8(img) else img


def decode(data: bytes) -> np.ndarray:
  """uint8[H, W, 3]: an encoded image file's bytes decoded by the rules above."""
  with Image.open(io.BytesIO(data)) as img:
    check_size(img)
    img.load()
    return np.asarray(upright_rgb8(img), np.uint8)
