"""data/images.py through the ways users' images come in (predict.load_image, the demo's upload):
EXIF orientation against the EXIF specification's meaning of each value, 16-bit and alpha
against hand-computed pixels, and the prepared training images by the same rules."""

import io

import numpy as np
import pytest
from PIL import Image

from dynrefer_jax import predict
from dynrefer_jax.data.builders import common
from dynrefer_jax.demo import server

# EXIF 2.3, tag 0x0112: where the stored 0th row and 0th column are in the displayed image, as
# the numpy transform from stored pixels [H, W, C] to what a viewer shows.
DISPLAYED = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],                      # 0th row top, 0th column right
    3: lambda a: a[::-1, ::-1],                   # bottom, right
    4: lambda a: a[::-1],                         # bottom, left
    5: lambda a: a.transpose(1, 0, 2),            # left side, top
    6: lambda a: a[::-1].transpose(1, 0, 2),      # right side, top (rotate 90° clockwise)
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),  # right side, bottom
    8: lambda a: a[:, ::-1].transpose(1, 0, 2),   # left side, bottom (90° anticlockwise)
}


def _photo(h=30, w=50):
  """An asymmetric image: every pixel distinct enough that a wrong transform shows."""
  y, x = np.mgrid[0:h, 0:w]
  return np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x * 7 + y * 3) % 256], -1
                  ).astype(np.uint8)


def _jpeg_with_orientation(path, value):
  exif = Image.Exif()
  exif[0x0112] = value
  Image.fromarray(_photo()).save(path, quality=95, exif=exif)
  with Image.open(path) as im:  # the stored pixels, decoded without applying the tag
    return np.asarray(im.convert("RGB"))


@pytest.mark.parametrize("value", sorted(DISPLAYED))
def test_exif_orientation_is_applied_as_a_viewer_shows_it(tmp_path, value):
  path = str(tmp_path / f"o{value}.jpg")
  stored = _jpeg_with_orientation(path, value)
  want = DISPLAYED[value](stored)
  got = predict.load_image(path)
  np.testing.assert_array_equal(got, want)
  with open(path, "rb") as f:
    uploaded = server.decode_image(f.read(), "photo.jpg", server.Limits())
  np.testing.assert_array_equal(uploaded, want)


def test_sixteen_bit_grey_is_scaled_to_eight_bits(tmp_path):
  values = np.array([[0, 257, 32768, 65535], [1000, 20000, 40000, 60000]], np.uint16)
  path = str(tmp_path / "g16.png")
  Image.fromarray(values).save(path)
  with Image.open(path) as im:
    assert im.mode.startswith("I")  # really a 16-bit image on disk
  want = np.floor(values.astype(np.float64) * 255 / 65535 + 0.5).astype(np.uint8)
  np.testing.assert_array_equal(predict.load_image(path), np.repeat(want[..., None], 3, -1))


def test_alpha_is_composited_on_black(tmp_path):
  rgba = np.zeros((6, 8, 4), np.uint8)
  rgba[..., :3] = (200, 120, 40)
  rgba[..., 3] = 255
  rgba[:, :3, 3] = 0  # transparent columns: black, whatever colour they store
  path = str(tmp_path / "a.png")
  Image.fromarray(rgba, "RGBA").save(path)
  want = np.where(rgba[..., 3:] == 255, rgba[..., :3], 0)
  np.testing.assert_array_equal(predict.load_image(path), want)
  with open(path, "rb") as f:
    np.testing.assert_array_equal(server.decode_image(f.read(), "a.png", server.Limits()), want)


def test_prepared_images_follow_the_same_rules(tmp_path):
  """What the dataset builders store for training is what predict reads from the original
  file."""
  path = str(tmp_path / "o6.jpg")
  _jpeg_with_orientation(path, 6)
  encoded, size, scale = common.check_image(path, common.Report())
  assert size == (30, 50) and scale == (1.0, 1.0)
  with Image.open(io.BytesIO(encoded)) as im:
    assert im.format == "PNG"  # repaired: stored losslessly
    np.testing.assert_array_equal(np.asarray(im), predict.load_image(path))
