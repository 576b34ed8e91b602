"""Image decoding shared by shards, converters and predict: high-bit-depth grayscale is scaled, not clipped."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
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


@pytest.fixture
def small_pillow_limit(monkeypatch):
    """Pillow's decompression-bomb limit at 2 x 600 pixels (and fscs's read limit at 40 000): a 60 x 40
    test image is then 'over Pillow's limit' like a 20000 x 10000 drone image."""
    import fscs.data.transforms as tr

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 600)
    monkeypatch.setattr(tr, "PIL_LIMIT_PIXELS", 1200)
    monkeypatch.setattr(tr, "MAX_READ_PIXELS", 40_000)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_an_image_over_pillows_limit_is_read_downscaled_upright(tmp_path, small_pillow_limit, fmt):
    from fscs.data.transforms import open_image, upright_rgb

    arr = np.zeros((40, 60, 3), dtype=np.uint8)
    arr[:, :30] = (200, 40, 40)
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees: upright 40 wide, 60 high
    Image.fromarray(arr).save(tmp_path / "big", format=fmt, exif=exif)
    with pytest.raises(Image.DecompressionBombError):
        Image.open(tmp_path / "big")  # what predict and shards folder did before
    with open_image(tmp_path / "big") as im:
        small, full = upright_rgb(im, 15)
    assert full == (60, 40) and small.shape == (15, 10, 3)
    assert abs(int(small[1, 5, 0]) - 200) < 20 and int(small[-2, 5, 0]) < 20  # red half on top, upright
    with open_image(tmp_path / "big") as im:
        whole, full = upright_rgb(im, 0)  # 0 = full size
    assert whole.shape == (60, 40, 3) and full == (60, 40)


def test_a_sixteen_bit_image_over_pillows_limit_keeps_its_scaling(tmp_path, small_pillow_limit):
    from fscs.data.transforms import open_image, upright_rgb

    Image.fromarray(np.full((40, 60), 200 * 257, dtype=np.uint16)).save(tmp_path / "grey16.png")
    with open_image(tmp_path / "grey16.png") as im:
        assert im.mode.startswith("I;16")
        small, full = upright_rgb(im, 15)
    assert small.shape == (10, 15, 3) and full == (40, 60) and (small == 200).all()


def test_an_image_over_the_read_limit_names_its_size_and_a_working_fix(tmp_path, small_pillow_limit):
    from fscs.data.transforms import open_image

    Image.fromarray(np.zeros((200, 250), dtype=np.uint8)).save(tmp_path / "huge.png")
    with pytest.raises(Image.DecompressionBombError,
                       match=r"^250x200 pixels \(\d+ MP\) is over the \d+ MP fscs reads; downscale it "
                             r"\(longer side <= 223 px"):
        open_image(tmp_path / "huge.png")


@pytest.mark.parametrize("compression", ["raw", "tiff_lzw"])
def test_a_tiff_over_pillows_limit_is_read_too(tmp_path, small_pillow_limit, compression):
    """TIFF checks Pillow's limit again when its pixels are decoded (not only when opened): the usual format of
    drone and satellite images must be read like a JPEG or PNG, not refused at decoding."""
    from fscs.data.transforms import open_image, upright_rgb

    arr = np.zeros((40, 60, 3), dtype=np.uint8)
    arr[:, :30] = (200, 40, 40)
    Image.fromarray(arr).save(tmp_path / "big.tif", compression=compression)
    with open_image(tmp_path / "big.tif") as im:
        small, full = upright_rgb(im, 15)
    assert full == (40, 60) and small.shape == (10, 15, 3)
    assert abs(int(small[5, 1, 0]) - 200) < 20 and int(small[5, -2, 0]) < 20
    with open_image(tmp_path / "big.tif") as im:
        whole, _ = upright_rgb(im, 0)
    np.testing.assert_array_equal(whole, arr)
    assert Image.MAX_IMAGE_PIXELS == 600  # Pillow's limit is back for everything else


def test_resize_mask_is_nearest_and_keeps_labels_and_ignore():
    """Label masks resize by nearest neighbour (source index floor(i * in / out), as torch 'nearest' and the
    reference): class ids and the 255 ignore band survive exactly, never blended, rows stay rows."""
    from fscs.data.transforms import resize_mask

    mask = np.array([[0, 7, 7, 255],
                     [3, 3, 255, 255],
                     [0, 0, 7, 0],
                     [255, 3, 3, 0]], dtype=np.uint8)
    down = resize_mask(mask, 2)
    assert down.dtype == torch.long
    assert down.tolist() == [[0, 7], [0, 7]]  # rows 0, 2 and columns 0, 2
    up = resize_mask(np.array([[7, 255], [0, 3]], dtype=np.uint8), 4)
    assert up.tolist() == [[7, 7, 255, 255], [7, 7, 255, 255], [0, 0, 3, 3], [0, 0, 3, 3]]
    wide = np.array([[1, 2, 255, 4], [5, 6, 7, 8]], dtype=np.uint8)  # 2 x 4 -> 4 x 4: rows 0, 0, 1, 1
    assert resize_mask(wide, 4).tolist() == [[1, 2, 255, 4], [1, 2, 255, 4], [5, 6, 7, 8], [5, 6, 7, 8]]
    assert set(resize_mask(mask, 7).unique().tolist()) == {0, 3, 7, 255}
    assert torch.equal(resize_mask(mask, 4), torch.from_numpy(mask).long())


def test_to_tensor_image_is_rgb_scaled_then_imagenet_normalised():
    from fscs.data.transforms import IMAGENET_MEAN, IMAGENET_STD, to_tensor_image

    img = np.zeros((2, 2, 3), dtype=np.uint8)
    img[0, 1] = (255, 0, 51)
    x = to_tensor_image(img, 2)
    assert x.shape == (3, 2, 2) and x.dtype == torch.float32
    want = [(v / 255 - m) / s for v, m, s in zip((255, 0, 51), IMAGENET_MEAN, IMAGENET_STD)]
    assert x[:, 0, 1].tolist() == pytest.approx(want, abs=1e-6)
    black = [-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]
    assert x[:, 1, 0].tolist() == pytest.approx(black, abs=1e-6)
    flat = np.full((5, 7, 3), (10, 200, 90), dtype=np.uint8)  # resizing a flat image keeps its colour
    y = to_tensor_image(flat, 4)
    assert y.shape == (3, 4, 4)
    want = [(v / 255 - m) / s for v, m, s in zip((10, 200, 90), IMAGENET_MEAN, IMAGENET_STD)]
    assert y[:, 2, 3].tolist() == pytest.approx(want, abs=1e-5)


def test_to_tensor_image_resize_is_centred_and_antialiased_like_pil():
    """The image resize is pixel-centred (align_corners=False, no shift: a ramp's resize is point-symmetric)
    and antialiased like PIL's bilinear reduction."""
    from fscs.data.transforms import IMAGENET_MEAN, IMAGENET_STD, to_tensor_image

    ramp = (np.arange(16, dtype=np.uint8).reshape(4, 4) * 10)[..., None].repeat(3, axis=2)
    y = to_tensor_image(ramp, 3)[0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]  # back to [0, 1]
    assert torch.allclose(y + y.flip(0).flip(1), torch.full((3, 3), 150 / 255), atol=1e-5)
    z = to_tensor_image(ramp, 2)[0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]
    pil = np.asarray(Image.fromarray(ramp).resize((2, 2), Image.BILINEAR))[..., 0] / 255.0
    assert np.allclose(z.numpy(), pil, atol=1 / 255)
