"""Image I/O for the command line (klvae.images) and the numpy quality metrics (klvae.cli.quality)."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image, ImageOps

from klvae.cli.quality import comparison_image, error_heatmap, psnr, ssim
from klvae.images import (ImageError, apply_orientation, encode_png, from_model_output, pad_to_multiple, quantize,
                          read_image, to_channels, to_model_input, write_image)

RNG = np.random.default_rng(0)


def _png_bytes(a: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("mode,channels", [("RGB", 3), ("L", 1), ("LA", 2), ("RGBA", 4)])
def test_8bit_modes_read_exactly(mode, channels):
    a = RNG.integers(0, 256, (7, 9, channels), dtype=np.uint8)
    img = read_image(_png_bytes(a[..., 0] if channels == 1 else a, mode))
    assert img.bits == 8 and img.size == (7, 9) and img.pixels.dtype == np.float32
    np.testing.assert_array_equal(quantize(img.pixels, 8), a)


def test_palette_with_transparency_becomes_rgba_and_bilevel_becomes_grey():
    p = Image.new("P", (4, 3))
    p.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    p.putpixel((1, 1), 1)
    p.info["transparency"] = 0
    buf = io.BytesIO()
    p.save(buf, format="PNG", transparency=0)
    img = read_image(buf.getvalue())
    assert img.pixels.shape == (3, 4, 4)
    assert img.pixels[1, 1].tolist() == [0, 0, 1, 1] and img.pixels[0, 0, 3] == 0
    buf = io.BytesIO()
    Image.new("1", (5, 2), 1).save(buf, format="PNG")
    assert read_image(buf.getvalue()).pixels.shape == (2, 5, 1)


@pytest.mark.parametrize("filter_type", range(5))
@pytest.mark.parametrize("channels", [1, 3, 4])
def test_16bit_png_keeps_every_bit(tmp_path, channels, filter_type):
    a = RNG.integers(0, 65536, (6, 11, channels)).astype(np.uint16)
    path = tmp_path / "x.png"
    path.write_bytes(encode_png(a, filter_type))
    img = read_image(str(path))
    assert img.bits == 16
    np.testing.assert_array_equal(quantize(img.pixels, 16), a)


def test_8bit_png_writer_matches_pillow_reader():
    for f in range(5):
        a = RNG.integers(0, 256, (5, 8, 3), dtype=np.uint8)
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(encode_png(a, f)))), a)


def test_16bit_write_read_round_trip(tmp_path):
    pixels = RNG.random((9, 4, 3), dtype=np.float32)
    write_image(str(tmp_path / "w.png"), pixels, bits=16)
    back = read_image(str(tmp_path / "w.png"))
    assert back.bits == 16 and np.abs(back.pixels - pixels).max() <= 0.5 / 65535 + 1e-7
    with pytest.raises(ImageError, match="16-bit images are written as PNG"):
        write_image(str(tmp_path / "w.jpg"), pixels, bits=16)


def test_16bit_grey_through_pillow():
    g = RNG.integers(0, 65536, (5, 6)).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(g).save(buf, format="PNG")
    img = read_image(buf.getvalue())
    assert img.bits == 16
    np.testing.assert_array_equal(quantize(img.pixels, 16)[..., 0], g)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pillow(orientation):
    a = RNG.integers(0, 256, (6, 10, 3), dtype=np.uint8)
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    im.save(buf, format="PNG", exif=exif)
    img = read_image(buf.getvalue())
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(buf.getvalue()))))
    np.testing.assert_array_equal(quantize(img.pixels, 8), expected)
    assert (img.size == (10, 6)) == (orientation >= 5)


def test_orientation_of_jpeg(tmp_path):
    a = np.zeros((8, 16, 3), np.uint8)
    a[:, :8] = 255  # left half white
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 6  # stored rotated: display = rotate 90 degrees clockwise
    im.save(tmp_path / "r.jpg", exif=exif, quality=95)
    img = read_image(str(tmp_path / "r.jpg"))
    assert img.size == (16, 8)
    assert img.pixels[:6].mean() > 0.9 and img.pixels[10:].mean() < 0.1  # the white half is now on top


def test_channel_adaptation():
    rgb = RNG.random((3, 4, 3), dtype=np.float32)
    grey = to_channels(rgb, 1)
    np.testing.assert_allclose(grey[..., 0], rgb @ np.array([0.299, 0.587, 0.114], np.float32), rtol=1e-6)
    np.testing.assert_array_equal(to_channels(grey, 3), np.repeat(grey, 3, axis=-1))
    rgba = np.concatenate([rgb, np.full((3, 4, 1), 0.25, np.float32)], axis=-1)
    np.testing.assert_allclose(to_channels(rgba, 3), rgb * 0.25 + 0.75, rtol=1e-6)  # over white
    np.testing.assert_array_equal(to_channels(rgb, 4)[..., 3], 1.0)
    assert to_channels(rgba, 4) is rgba
    with pytest.raises(ImageError, match="takes 5"):
        to_channels(rgb, 5)


def test_pad_mirrors_and_model_range():
    x = np.arange(3 * 5, dtype=np.float32).reshape(3, 5, 1)
    p = pad_to_multiple(x, 4)
    assert p.shape == (4, 8, 1)
    np.testing.assert_array_equal(p[:3, :5], x)
    np.testing.assert_array_equal(p[3], p[2])                 # symmetric: the edge row repeats
    np.testing.assert_array_equal(p[:3, 5:8, 0], x[:, [4, 3, 2], 0])
    assert pad_to_multiple(np.zeros((1, 1, 3)), 8).shape == (8, 8, 3)
    pixels = RNG.random((4, 6, 3), dtype=np.float32)
    m = to_model_input(pixels)
    assert m.shape == (3, 4, 6) and m.min() >= -1 and m.max() <= 1
    np.testing.assert_allclose(from_model_output(m), pixels, atol=1e-6)


def test_read_errors_are_typed(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ImageError, match="bad.png: cannot read as an image"):
        read_image(str(tmp_path / "bad.png"))
    with pytest.raises(ImageError, match="no such file"):
        read_image(str(tmp_path / "missing.png"))


def test_orientation_identity_for_unknown_tags():
    a = RNG.random((2, 3, 1))
    assert apply_orientation(a, 1) is a and apply_orientation(a, 0) is a


# ---------------------------------------------------------------------------------------------- metrics
def test_psnr_by_hand():
    a = np.zeros((4, 4, 3), np.float32)
    b = a.copy()
    b[0, 0, 0] = 0.5  # mse = 0.25 / 48
    assert psnr(a, b) == pytest.approx(10 * math.log10(48 / 0.25), rel=1e-12)
    assert psnr(a, a) == math.inf


def test_ssim_matches_skimage_and_torch_metric():
    a = RNG.random((23, 31, 3))
    b = np.clip(a + RNG.normal(0, 0.1, a.shape), 0, 1)
    ours = ssim(a, b)
    skimage = pytest.importorskip("skimage.metrics")
    ref = skimage.structural_similarity(a, b, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                        use_sample_covariance=False, channel_axis=-1)
    assert ours == pytest.approx(ref, abs=1e-10)
    assert ssim(a, a) == pytest.approx(1.0)
    assert math.isnan(ssim(a[:10], b[:10]))


def test_heatmap_and_comparison_layout():
    a = np.zeros((5, 6, 3), np.float32)
    b = a.copy()
    b[2, 3] = 1.0
    heat = error_heatmap(a, b, full_scale=0.5)
    np.testing.assert_allclose(heat[0, 0], np.array([0, 0, 4]) / 255, atol=1e-6)    # no error: darkest
    np.testing.assert_allclose(heat[2, 3], np.array([252, 255, 164]) / 255, atol=1e-6)  # clipped: brightest
    comp = comparison_image(a, b, 0.5, gap=2)
    assert comp.shape == (5, 3 * 6 + 4, 3)
    np.testing.assert_array_equal(comp[:, 6:8], 1.0)
    np.testing.assert_array_equal(comp[:, 8:14], b)
    np.testing.assert_array_equal(comp[:, 16:], heat)
