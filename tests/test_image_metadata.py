"""What the photographer's file says beyond its pixels survives `nafnet-edge run`; what cannot survive is refused.

The identity checkpoint of test_hostile_images (all-zero weights) makes outputs equal to inputs, so pixels and
metadata can both be compared exactly.
"""

from __future__ import annotations

import random
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
from PIL import Image, ImageCms, ImageOps
from test_hostile_images import assert_refused_in_one_line, pattern, read_back, run

from nafnet_edge.errors import EXIT_BAD_INPUT, ImageError, display_path
from nafnet_edge.images import check_image_file, read_image

SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
MAKE, MODEL, EXPOSURE_TIME, EXIF_IFD, ORIENTATION = 0x010F, 0x0110, 0x829A, 0x8769, 0x0112
PIL_FORMAT = {".png": "PNG", ".jpg": "JPEG", ".tif": "TIFF"}


def camera_exif(orientation: int = 1) -> Image.Exif:
    exif = Image.Exif()
    exif[MAKE], exif[MODEL], exif[ORIENTATION] = "Canon", "EOS R5", orientation
    exif.get_ifd(EXIF_IFD)[EXPOSURE_TIME] = 0.004  # a sub-directory tag, as cameras write them
    return exif


def photo(folder: Path, suffix: str, *, orientation: int = 1, array: np.ndarray | None = None) -> Path:
    """An 8-bit RGB photo tagged with an ICC profile, camera EXIF and 300 dpi, written by Pillow."""
    path = folder / f"photo{suffix}"
    array = pattern(20, 28, 3) if array is None else array
    options = {"quality": 100} if suffix == ".jpg" else {}
    Image.fromarray(array).save(
        path, PIL_FORMAT[suffix], icc_profile=SRGB, exif=camera_exif(orientation).tobytes(), dpi=(300, 300), **options
    )
    return path


def assert_metadata_kept(path: Path) -> None:
    with Image.open(path) as out:
        exif = out.getexif()
        assert out.info.get("icc_profile") == SRGB
        assert tuple(round(v) for v in out.info["dpi"]) == (300, 300)
        assert (exif[MAKE], exif[MODEL], exif[ORIENTATION]) == ("Canon", "EOS R5", 1)
        assert float(exif.get_ifd(EXIF_IFD)[EXPOSURE_TIME]) == 0.004


@pytest.mark.parametrize("fmt", ["png", "jpg", "tiff"])
@pytest.mark.parametrize("suffix", [".png", ".jpg", ".tif"])
def test_icc_exif_and_dpi_survive_every_format_pair(zero_ckpt: Path, tmp_path: Path, suffix: str, fmt: str) -> None:
    src = photo(tmp_path, suffix)
    out = tmp_path / "out"
    assert run(zero_ckpt, [src], out, "--format", fmt) == 0
    (result,) = out.iterdir()
    assert_metadata_kept(result)
    if fmt != "jpg" and suffix != ".jpg":  # lossless both ways: the identity network returns the very pixels
        assert np.array_equal(read_back(result), read_back(src))


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".tif"])
def test_exif_orientation_is_applied_once_and_written_as_1(zero_ckpt: Path, tmp_path: Path, suffix: str) -> None:
    stored = np.zeros((20, 48, 3), np.uint8)
    stored[:, :24] = (250, 40, 10)  # left half red as stored; orientation 6 displays it turned clockwise
    src = photo(tmp_path, suffix, orientation=6, array=stored)
    out = tmp_path / "out"
    assert run(zero_ckpt, [src], out, "--format", "png") == 0
    result = out / "photo.png"
    assert_metadata_kept(result)
    got = read_back(result)
    assert got.shape == (48, 20, 3)  # portrait: the stored 20x48 turned
    assert got[:24, :, 2].mean() > 200 and got[24:, :, 2].mean() < 30  # the red half now on top (BGR)


@pytest.mark.parametrize("fmt", ["png", "tiff"])
def test_16_bit_outputs_keep_icc_dpi_and_exif(zero_ckpt: Path, tmp_path: Path, fmt: str) -> None:
    """A 16-bit TIFF written by tifffile (ICC, 300 dpi, Make and Model tags) restored to 16-bit PNG and TIFF."""
    src = tmp_path / "deep.tif"
    deep = pattern(18, 26, 3, np.uint16)
    tifffile.imwrite(
        src,
        deep,
        photometric="rgb",
        iccprofile=SRGB,
        resolution=(300, 300),
        resolutionunit="INCH",
        extratags=[(MAKE, "s", 0, "Canon", True), (MODEL, "s", 0, "EOS R5", True)],
    )
    out = tmp_path / "out"
    assert run(zero_ckpt, [src], out, "--format", fmt) == 0
    (result,) = out.iterdir()
    assert np.array_equal(read_back(result), deep[:, :, ::-1])  # 16 bits, exactly
    with Image.open(result) as image:
        exif = image.getexif()
        assert image.info.get("icc_profile") == SRGB
        assert tuple(round(v) for v in image.info["dpi"]) == (300, 300)
        assert (exif[MAKE], exif[MODEL]) == ("Canon", "EOS R5")


def multipage_tiff(path: Path) -> None:
    tifffile.imwrite(path, np.stack([pattern(16, 16, 3, seed=s) for s in range(3)]), photometric="rgb")


def animated_png(path: Path) -> None:
    frames = [Image.fromarray(pattern(16, 16, 3, seed=s)) for s in range(3)]
    frames[0].save(path, save_all=True, append_images=frames[1:])


def float_tiff(path: Path) -> None:
    tifffile.imwrite(path, np.random.default_rng(0).random((16, 16, 3), dtype=np.float32), photometric="rgb")


def lzma_tiff(path: Path) -> None:
    tifffile.imwrite(path, pattern(16, 16, 3), photometric="rgb", compression="lzma")


@pytest.mark.parametrize(
    ("name", "make", "fragment"),
    [
        pytest.param(
            "pages.tif",
            multipage_tiff,
            "the TIFF has several pages; nafnet-edge restores single images only",
            id="multi-page-tiff",
        ),
        pytest.param(
            "anim.png",
            animated_png,
            "the PNG is animated (3 frames); nafnet-edge restores single images only",
            id="apng",
        ),
        pytest.param(
            "float.tif",
            float_tiff,
            "32-bit floating-point samples, which are not supported; convert it to 8- or 16-bit integer TIFF",
            id="float32-tiff",
        ),
        pytest.param(
            "xz.tif", lzma_tiff, "the TIFF uses lzma compression, which cannot be decoded here", id="lzma-tiff"
        ),
    ],
)
def test_what_would_lose_pages_or_cannot_be_decoded_is_refused(
    zero_ckpt: Path, tmp_path: Path, capfd: pytest.CaptureFixture, name: str, make, fragment: str
) -> None:
    src = tmp_path / name
    make(src)
    out = tmp_path / "out"
    code = run(zero_ckpt, [src], out)
    assert_refused_in_one_line(code, capfd.readouterr().err, fragment, src, out)


def test_a_tiff_preview_directory_is_not_a_second_page(tmp_path: Path) -> None:
    src = tmp_path / "with-preview.tif"
    with tifffile.TiffWriter(src) as tif:
        tif.write(pattern(32, 32, 3), photometric="rgb")
        tif.write(pattern(8, 8, 3), photometric="rgb", subfiletype=1)  # reduced-resolution preview
    assert check_image_file(src).width == 32


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        pytest.param(
            lambda p: cv2.imwrite(str(p), pattern(12, 14, 4)),
            "the image has an alpha channel (transparency), which JPEG cannot hold; use --format png",
            id="rgba",
        ),
        pytest.param(
            lambda p: cv2.imwrite(str(p), pattern(12, 14, 3, np.uint16)),
            "a 16-bit image cannot be written as JPEG (8 bits per channel); use --format png",
            id="16-bit",
        ),
    ],
)
def test_a_jpg_batch_is_refused_before_any_output_is_written(
    zero_ckpt: Path, tmp_path: Path, capfd: pytest.CaptureFixture, make, fragment: str
) -> None:
    folder = tmp_path / "batch"
    folder.mkdir()
    cv2.imwrite(str(folder / "a-plain.png"), pattern(12, 14, 3))  # sorted first: it would be written first
    make(folder / "b-special.png")
    out = tmp_path / "out"
    code = run(zero_ckpt, [folder], out, "--format", "jpg")
    assert_refused_in_one_line(code, capfd.readouterr().err, fragment, folder / "b-special.png", out)


def test_random_bytes_are_never_called_text_or_a_checkpoint(tmp_path: Path) -> None:
    src = tmp_path / "noise.png"
    for seed in range(200):
        src.write_bytes(random.Random(seed).randbytes(4096))
        with pytest.raises(ImageError) as info:
            check_image_file(src)
        assert "its content is not PNG, JPEG or TIFF" in str(info.value), (seed, str(info.value))


def test_a_hostile_file_name_is_printed_escaped(zero_ckpt: Path, tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    src = tmp_path / "evil\x1b[31m\nname.png"
    src.write_bytes(b"not an image at all")
    code = run(zero_ckpt, [src], tmp_path / "out")
    err = capfd.readouterr().err
    assert code == EXIT_BAD_INPUT
    assert "\x1b" not in err and err.count("\n") == 1, err
    assert err.startswith("nafnet-edge: error: ") and "evil\\x1b[31m\\nname.png" in err, err

    good = tmp_path / "plain.png"
    cv2.imwrite(str(good), pattern(8, 8, 3))
    out = tmp_path / "out\x1b[0m"
    assert run(zero_ckpt, [good], out) == 0
    err = capfd.readouterr().err
    assert "\x1b" not in err and f"to {display_path(out)}" in err, err


def test_display_path_escapes_only_what_a_terminal_would_interpret() -> None:
    assert display_path("photos/IMG 0001.png") == "photos/IMG 0001.png"
    assert display_path("a\x1b[2Jb.png") == "'a\\x1b[2Jb.png'"
    assert display_path(b"caf\xe9.png") == "'caf\\udce9.png'"  # a Latin-1 name on a UTF-8 system
    assert display_path(Path("tab\there")) == "'tab\\there'"


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_every_exif_orientation_reads_as_pillow_shows_it(tmp_path: Path, suffix: str) -> None:
    for orientation in range(1, 9):
        src = photo(tmp_path, suffix, orientation=orientation, array=pattern(4, 6, 3, seed=orientation))
        with Image.open(src) as image:
            expected = np.asarray(ImageOps.exif_transpose(image))
        image = read_image(src)
        assert np.array_equal(np.rint(image.pixels * 255).astype(np.uint8), expected), orientation
        exif = Image.Exif()
        exif.load(image.metadata.exif)
        assert exif[ORIENTATION] == 1 and exif[MAKE] == "Canon"
