"""Image reading/writing: bit depths, grayscale, alpha, EXIF orientation, rounding, atomic writes."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from nafnet_edge.errors import ImageError
from nafnet_edge.images import RGBImage, quantize, read_image, write_image


def gradient(h: int, w: int, c: int, dtype: type) -> np.ndarray:
    top = np.iinfo(dtype).max
    base = np.linspace(0, top, h * w * c, dtype=np.float64).reshape(h, w, c)
    return np.rint(base).astype(dtype)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_rgb_roundtrip_is_lossless_at_8_and_16_bits(tmp_path: Path, suffix: str, dtype: type) -> None:
    bgr = gradient(7, 9, 3, dtype)
    path = tmp_path / f"in{suffix}"
    cv2.imwrite(str(path), bgr)
    img = read_image(path)
    assert img.bit_depth == (8 if dtype == np.uint8 else 16)
    assert img.pixels.shape == (7, 9, 3) and img.pixels.dtype == np.float32
    np.testing.assert_allclose(img.pixels[..., 0], bgr[..., 2] / np.iinfo(dtype).max, atol=1e-7)  # RGB order
    out = tmp_path / f"out{suffix}"
    write_image(out, img)
    assert np.array_equal(cv2.imread(str(out), cv2.IMREAD_UNCHANGED), bgr)


def test_grayscale_and_alpha(tmp_path: Path) -> None:
    gray = gradient(5, 6, 1, np.uint16)[..., 0]
    cv2.imwrite(str(tmp_path / "g.png"), gray)
    g = read_image(tmp_path / "g.png")
    assert g.pixels.shape == (5, 6, 1) and g.alpha is None and g.bit_depth == 16
    bgra = gradient(5, 6, 4, np.uint8)
    cv2.imwrite(str(tmp_path / "a.png"), bgra)
    a = read_image(tmp_path / "a.png")
    assert a.pixels.shape == (5, 6, 3)
    np.testing.assert_allclose(a.alpha, bgra[..., 3] / 255.0, atol=1e-7)
    write_image(tmp_path / "a_out.png", a)
    assert np.array_equal(cv2.imread(str(tmp_path / "a_out.png"), cv2.IMREAD_UNCHANGED), bgra)
    Image.fromarray(np.stack([gray.astype(np.uint8)] * 2, axis=-1), mode="LA").save(tmp_path / "la.png")
    la = read_image(tmp_path / "la.png")
    assert la.pixels.shape == (5, 6, 1) and la.alpha is not None


def test_jpeg_exif_orientation_is_applied(tmp_path: Path) -> None:
    rgb = np.zeros((20, 40, 3), np.uint8)
    rgb[:, :20] = 255  # white left half
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(rgb).save(tmp_path / "r.jpg", exif=exif, quality=100)
    img = read_image(tmp_path / "r.jpg")
    assert img.pixels.shape == (40, 20, 3)  # upright: portrait
    assert img.pixels[:20].mean() > 0.9 and img.pixels[20:].mean() < 0.1  # white half now on top


def test_palette_and_cmyk_become_rgb(tmp_path: Path) -> None:
    Image.fromarray(gradient(8, 8, 3, np.uint8)).convert("P").save(tmp_path / "p.png")
    assert read_image(tmp_path / "p.png").pixels.shape == (8, 8, 3)
    Image.fromarray(gradient(8, 8, 3, np.uint8)).convert("CMYK").save(tmp_path / "c.jpg")
    assert read_image(tmp_path / "c.jpg").pixels.shape == (8, 8, 3)


def test_output_is_clamped_and_rounded_like_the_official_evaluation() -> None:
    values = np.array([-0.2, 0.0, 0.5 / 255, 1.49 / 255, 1.51 / 255, 1.0, 1.7], np.float32)
    assert quantize(values, 8).tolist() == [0, 0, 0, 1, 2, 255, 255]  # np.rint: half to even
    assert quantize(np.array([0.5], np.float32), 16).tolist() == [32768]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.png", b"", "cannot decode"),
        ("text.png", b"definitely not an image\n" * 10, "cannot decode"),
        ("photo.gif", b"GIF89a", "unsupported image type"),
    ],
)
def test_unreadable_images_raise_clear_errors(tmp_path: Path, name: str, content: bytes, message: str) -> None:
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ImageError, match=message):
        read_image(tmp_path / name)


def test_writes_are_atomic_and_16_bit_jpeg_is_refused(tmp_path: Path) -> None:
    img = RGBImage(np.full((4, 4, 3), 0.5, np.float32), None, 16)
    with pytest.raises(ImageError, match="JPEG holds only 8 bits"):
        write_image(tmp_path / "x.jpg", img)
    assert list(tmp_path.iterdir()) == []  # nothing half-written
    write_image(tmp_path / "sub" / "x.png", img)
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["x.png"]
