"""Image decoding shared by shards, converters and predict: high-bit-depth grayscale is scaled, not clipped."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from fscs.data.transforms import pil_rgb


def _roundtrip(arr: np.ndarray, **save) -> Image.Image:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", **save)
    return Image.open(io.BytesIO(buf.getvalue()))


def test_sixteen_bit_grey_png_keeps_its_pixels():
    grey8 = np.arange(64, dtype=np.uint8).reshape(8, 8) * 3 + 40
    im16 = _roundtrip(grey8.astype(np.uint16) * 257)  # the same picture stored in 16 bits
    assert im16.mode.startswith("I")
    assert np.asarray(im16.convert("RGB")).min() == 255  # what PIL's own conversion gives: a white image
    out = pil_rgb(im16)
    assert out.dtype == np.uint8 and out.shape == (8, 8, 3)
    np.testing.assert_array_equal(out[..., 0], grey8)
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_float_and_eight_bit_modes():
    ramp = np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4)
    np.testing.assert_array_equal(pil_rgb(Image.fromarray(ramp, mode="F"))[..., 1],
                                  np.rint(ramp * 255).astype(np.uint8))
    rgb = np.random.default_rng(0).integers(0, 256, (5, 6, 3), dtype=np.uint8)
    np.testing.assert_array_equal(pil_rgb(Image.fromarray(rgb)), rgb)
    grey = np.full((3, 3), 17, dtype=np.uint8)
    np.testing.assert_array_equal(pil_rgb(Image.fromarray(grey)), np.full((3, 3, 3), 17, dtype=np.uint8))


def test_mask_foreground_one_rule_for_every_way_of_drawing_a_binary_mask():
    from PIL import Image

    from fscs.data.transforms import mask_foreground

    obj = np.zeros((6, 8), dtype=bool)
    obj[2:4, 3:6] = True
    grey = Image.fromarray(obj.astype(np.uint8) * 255)
    alpha_only = np.zeros((6, 8, 4), dtype=np.uint8)  # black everywhere, the object drawn in transparency
    alpha_only[..., 3] = obj * 255
    on_white = np.full((6, 8, 4), 255, dtype=np.uint8)  # black object painted on a transparent white layer
    on_white[..., 3] = 0
    on_white[obj] = (0, 0, 0, 255)
    opaque = np.zeros((6, 8, 4), dtype=np.uint8)  # an RGBA file without transparency: the grey level
    opaque[..., 3] = 255
    opaque[obj, :3] = 200
    la = np.stack([np.full((6, 8), 255, np.uint8), obj.astype(np.uint8) * 255], axis=-1)
    pal = Image.fromarray(obj.astype(np.uint8), "P")
    pal.putpalette([255, 255, 255, 0, 0, 0] + [0] * 762)
    pal.info["transparency"] = 0  # index 0 (white) transparent, index 1 (black) = the object
    for im in (grey, Image.fromarray(alpha_only, "RGBA"), Image.fromarray(on_white, "RGBA"),
               Image.fromarray(opaque, "RGBA"), Image.fromarray(la, "LA"), pal):
        assert np.array_equal(mask_foreground(im), obj), im.mode
