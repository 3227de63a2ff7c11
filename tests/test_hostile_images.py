"""Hostile and careless images through `nafnet-edge run`: each is restored exactly or refused in one line.

The checkpoint has all-zero weights, which makes NAFNet exactly the identity through its global residual: every
output must equal its input pixel for pixel, whatever the size, bit depth, channels or tiling.
"""

from __future__ import annotations

import io
import resource
import struct
import subprocess
import sys
import time
import tracemalloc
import zlib
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from nafnet_edge import inference
from nafnet_edge.cli import main
from nafnet_edge.errors import EXIT_BAD_INPUT, ImageError
from nafnet_edge.images import MAX_IMAGE_PIXELS, check_image_file, read_image
from nafnet_edge.inference import (
    cgroup_available_bytes,
    check_forward_memory,
    forward_peak_bytes,
    frame_peak_bytes,
)
from nafnet_edge.model import NAFNetConfig

TILE_32 = ("--tile", "32", "--overlap", "8")
TINY = NAFNetConfig(width=8, enc_blk_nums=(1, 1, 1, 1), middle_blk_num=1, dec_blk_nums=(1, 1, 1, 1))


def pattern(h: int, w: int, c: int, dtype: type = np.uint8, seed: int = 0) -> np.ndarray:
    """Random samples over the whole range of ``dtype``, so that every value and channel order is checked."""
    top = int(np.iinfo(dtype).max)
    arr = np.random.default_rng(seed).integers(0, top + 1, (h, w, c), dtype=np.int64).astype(dtype)
    return arr[..., 0] if c == 1 else arr


def run(ckpt: Path, inputs: list[Path], out: Path, *options: str) -> int:
    return main(["run", str(ckpt), *map(str, inputs), "-o", str(out), *options])


def read_back(path: Path) -> np.ndarray:
    return cv2.imread(str(path), cv2.IMREAD_UNCHANGED)


# --- restored exactly -------------------------------------------------------------------------------------------


def write_cv2(name: str, arr: np.ndarray) -> Callable[[Path], tuple[Path, np.ndarray]]:
    """An input written by OpenCV; the expected output is the same array."""

    def make(folder: Path) -> tuple[Path, np.ndarray]:
        cv2.imwrite(str(folder / name), arr)
        return folder / name, arr

    return make


def palette_png(folder: Path) -> tuple[Path, np.ndarray]:
    path = folder / "palette.png"
    Image.fromarray(pattern(23, 31, 3)).quantize(colors=16).save(path)
    assert Image.open(path).mode == "P"
    return path, np.asarray(Image.open(path).convert("RGB"))[..., ::-1]  # the palette colours, BGR


def cmyk_jpeg(folder: Path) -> tuple[Path, np.ndarray]:
    path = folder / "cmyk.jpg"
    Image.fromarray(pattern(24, 40, 3)).convert("CMYK").save(path, quality=100)
    assert Image.open(path).mode == "CMYK"
    return path, np.asarray(Image.open(path).convert("RGB"))[..., ::-1]


def rotated_jpeg(folder: Path) -> tuple[Path, np.ndarray]:
    path = folder / "rotated.jpg"
    stored = np.zeros((20, 48, 3), np.uint8)
    stored[:, :24] = (250, 40, 10)  # left half red as stored; displayed rotated 90 degrees clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(path, exif=exif, quality=100)
    return path, np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))[..., ::-1]


EXACT = [
    pytest.param(write_cv2("one.png", pattern(1, 1, 3)), (), "one.png", 0, id="1x1"),
    pytest.param(write_cv2("small.png", pattern(5, 7, 3)), (), "small.png", 0, id="5x7-below-padding-multiple"),
    pytest.param(write_cv2("odd.png", pattern(17, 33, 3)), (), "odd.png", 0, id="17x33"),
    pytest.param(write_cv2("odd.png", pattern(37, 53, 3)), ("--tile", "0"), "odd.png", 0, id="37x53-whole"),
    pytest.param(write_cv2("tiled.png", pattern(100, 77, 3)), TILE_32, "tiled.png", 0, id="100x77-tiled"),
    pytest.param(write_cv2("deep.png", pattern(19, 21, 3, np.uint16)), (), "deep.png", 0, id="16-bit-png"),
    pytest.param(write_cv2("gray.png", pattern(18, 29, 1)), (), "gray.png", 0, id="gray-png"),
    pytest.param(write_cv2("rgba.png", pattern(13, 27, 4)), (), "rgba.png", 0, id="rgba-png"),
    pytest.param(write_cv2("deep.tif", pattern(21, 19, 3, np.uint16)), (), "deep.tif", 0, id="16-bit-tiff"),
    pytest.param(write_cv2("gray16.tif", pattern(40, 70, 1, np.uint16)), TILE_32, "gray16.tif", 0, id="gray16-tiled"),
    pytest.param(palette_png, (), "palette.png", 0, id="palette-png"),
    pytest.param(cmyk_jpeg, (), "cmyk.png", 2, id="cmyk-jpeg"),  # two JPEG decoders: a level or two apart
    pytest.param(rotated_jpeg, (), "rotated.png", 1, id="exif-rotated-jpeg"),
]


@pytest.mark.parametrize(("make", "options", "output", "tolerance"), EXACT)
def test_run_reproduces_the_input_through_the_identity_network(
    zero_ckpt: Path, tmp_path: Path, make: Callable, options: tuple[str, ...], output: str, tolerance: int
) -> None:
    src, expected = make(tmp_path)
    out = tmp_path / "out"
    assert run(zero_ckpt, [src], out, *options) == 0
    assert [p.name for p in out.iterdir()] == [output]
    got = read_back(out / output)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    diff = np.abs(got.astype(np.int64) - expected.astype(np.int64)).max()
    assert diff <= tolerance


def test_rotated_jpeg_comes_out_upright(zero_ckpt: Path, tmp_path: Path) -> None:
    src, _ = rotated_jpeg(tmp_path)
    assert run(zero_ckpt, [src], tmp_path / "out") == 0
    got = read_back(tmp_path / "out" / "rotated.png")
    assert got.shape == (48, 20, 3)  # portrait: the stored 20x48 turned
    assert got[:24, :, 2].mean() > 200 and got[24:, :, 2].mean() < 30  # the red half now on top (BGR)


# --- refused in one line, nothing written -----------------------------------------------------------------------


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_with_header(width: int, height: int) -> bytes:
    """A well-formed PNG whose IHDR claims ``width`` x ``height`` RGB, with a few bytes of pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 16)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def encoded(suffix: str, arr: np.ndarray) -> bytes:
    return cv2.imencode(suffix, arr)[1].tobytes()


def webp_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pattern(8, 8, 3)).save(buf, "WEBP")
    return buf.getvalue()


PHOTO = pattern(64, 80, 3)
BAD = [
    pytest.param("empty.png", b"", "the file is empty (0 bytes)", id="zero-byte-png"),
    pytest.param("notes.jpg", b"shopping list\n" * 20, "its content is not PNG, JPEG or TIFF", id="text-named-jpg"),
    pytest.param("cut.png", encoded(".png", PHOTO)[:-600], "PNG file is truncated", id="truncated-png"),
    pytest.param("cut.jpg", encoded(".jpg", PHOTO)[:-600], "JPEG file is truncated", id="truncated-jpeg"),
    pytest.param("cut.tif", encoded(".tif", PHOTO)[:-600], "TIFF file is truncated", id="truncated-tiff"),
    pytest.param("bomb.png", png_with_header(100_000, 100_000), "over the limit", id="huge-header-png"),
    pytest.param(
        "weights.png",
        b"PK\x03\x04" + bytes(26) + b"archive/data.pkl",
        "is a model checkpoint, not an image",
        id="checkpoint-named-png",
    ),  # fmt: skip
    pytest.param("flat.png", png_with_header(0, 5), "0x5 pixels", id="zero-width-png"),
    pytest.param("anim.gif", b"GIF89a" + b"\0" * 20, "unsupported image type; use PNG, JPEG or TIFF", id="gif"),
    pytest.param("old.bmp", encoded(".bmp", PHOTO), "unsupported image type; use PNG, JPEG or TIFF", id="bmp"),
    pytest.param("web.webp", webp_bytes(), "unsupported image type; use PNG, JPEG or TIFF", id="webp"),
    pytest.param("renamed.png", webp_bytes(), "it is a WebP file, whatever its .png name says", id="webp-named-png"),
]


def assert_refused_in_one_line(code: int, err: str, fragment: str, named: Path, out: Path) -> None:
    """Exit 5, one error line naming the input, no output file and no leftover temporary in ``out``.

    Files are checked (structure, and the memory their pass needs) before the model's banner is printed, so
    stderr is that one line.
    """
    assert code == EXIT_BAD_INPUT, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("nafnet-edge: error: "), err
    assert fragment in lines[-1] and str(named) in lines[-1], err
    assert not out.exists() or list(out.iterdir()) == []


@pytest.mark.parametrize(("name", "content", "fragment"), BAD)
def test_bad_images_are_refused_in_one_line(
    zero_ckpt: Path, tmp_path: Path, capfd: pytest.CaptureFixture, name: str, content: bytes, fragment: str
) -> None:
    src = tmp_path / name
    src.write_bytes(content)
    out = tmp_path / "out"
    code = run(zero_ckpt, [src], out)
    assert_refused_in_one_line(code, capfd.readouterr().err, fragment, src, out)
    if src.suffix in (".png", ".jpg", ".tif"):
        with pytest.raises(ImageError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
            check_image_file(src)  # the cheap pre-check refuses it too, before anything is decoded


def test_a_folder_without_images_is_refused(zero_ckpt: Path, tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "anim.gif").write_bytes(b"GIF89a")
    (folder / "notes.txt").write_text("no images here")
    out = tmp_path / "out"
    code = run(zero_ckpt, [folder], out)
    assert_refused_in_one_line(code, capfd.readouterr().err, "contains no PNG, JPEG or TIFF images", folder, out)


def test_a_decompression_bomb_is_refused_from_its_header_without_allocating(tmp_path: Path) -> None:
    src = tmp_path / "bomb.png"
    src.write_bytes(png_with_header(100_000, 100_000))  # 10 gigapixels: 120 GB as float32 RGB
    rss_before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    start = time.perf_counter()
    with pytest.raises(ImageError) as info:
        read_image(src)
    seconds = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    message = str(info.value)
    assert (
        "100000x100000 = 10,000 megapixels" in message
        and f"limit of {MAX_IMAGE_PIXELS / 1e6:,.0f} megapixels" in message
    )
    assert "OPENCV_IO_MAX_IMAGE_PIXELS" in message and "\n" not in message
    assert seconds < 1.0 and peak < 1 << 20
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before_kb < 50 * 1024


def test_the_pixel_limit_follows_opencvs_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "wide.png"
    cv2.imwrite(str(src), pattern(10, 20, 3))
    monkeypatch.setenv("OPENCV_IO_MAX_IMAGE_PIXELS", "199")
    with pytest.raises(ImageError, match="20x10 = 0 megapixels"):
        read_image(src)
    monkeypatch.setenv("OPENCV_IO_MAX_IMAGE_PIXELS", "200")
    assert read_image(src).pixels.shape == (10, 20, 3)


def test_trailing_bytes_after_the_end_marker_are_accepted(tmp_path: Path) -> None:
    for suffix in (".png", ".jpg"):
        src = tmp_path / f"padded{suffix}"
        src.write_bytes(encoded(suffix, PHOTO) + b"\0" * 512)
        assert read_image(src).pixels.shape == (64, 80, 3)


def test_every_truncation_is_refused(tmp_path: Path) -> None:
    """Cut at every byte of a small file (and a progressive JPEG with restart markers): never a silent success."""
    small = pattern(8, 12, 3)
    for suffix, params in [(".png", []), (".jpg", [cv2.IMWRITE_JPEG_PROGRESSIVE, 1, cv2.IMWRITE_JPEG_RST_INTERVAL, 1])]:
        data = cv2.imencode(suffix, small, params)[1].tobytes()
        src = tmp_path / f"cut{suffix}"
        for cut in range(len(data)):
            src.write_bytes(data[:cut])
            with pytest.raises(ImageError):
                check_image_file(src)


# --- too large for memory without tiling ------------------------------------------------------------------------


def test_whole_image_beyond_memory_is_refused_with_the_flag_that_fixes_it(
    zero_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture
) -> None:
    src = tmp_path / "big.png"
    image = pattern(520, 530, 3)
    cv2.imwrite(str(src), image)
    # One default tile fits next to the image's own buffers, the whole image does not.
    available = forward_peak_bytes(TINY, 512, 512) + frame_peak_bytes(520, 530, alpha=False, bit_depth=8)
    monkeypatch.setattr(inference, "available_memory_bytes", lambda device: available)
    out = tmp_path / "out"
    code = run(zero_ckpt, [src], out, "--tile", "0")
    err = capfd.readouterr().err
    assert_refused_in_one_line(code, err, "restoring 520x530 in one pass needs about", src, out)
    assert err.splitlines()[-1].endswith("are available; tile it: --tile 512 (the default)")
    assert run(zero_ckpt, [src], out) == 0  # default tiling: 512-pixel tiles
    assert np.array_equal(read_back(out / "big.png"), image)


@pytest.mark.parametrize(
    ("height", "width", "tiled", "batch", "overlap", "fits", "advice"),
    [
        pytest.param(3000, 4000, False, 1, 64, 512, "; tile it: --tile 512 (the default)", id="whole-frame"),
        pytest.param(512, 512, True, 4, 64, 512, "; fewer tiles per pass: --tile-batch 1", id="tile-batch"),
        pytest.param(1024, 1024, True, 1, 64, 512, "; smaller tiles: --tile 512 (the default)", id="big-tiles"),
        pytest.param(1024, 1024, True, 2, 64, 256, "; smaller tiles: --tile 256 --tile-batch 1", id="big-tile-batch"),
        pytest.param(300, 300, False, 1, 256, 256, "; tile it: --tile 256 --overlap 64", id="overlap-too-large"),
        pytest.param(300, 300, False, 1, 64, 32, "; free some memory or use a smaller model", id="nothing-fits"),
    ],
)
def test_memory_refusals_name_the_option_that_fixes_them(
    monkeypatch: pytest.MonkeyPatch,
    height: int,
    width: int,
    tiled: bool,
    batch: int,
    overlap: int,
    fits: int,
    advice: str,
) -> None:
    monkeypatch.setattr(inference, "available_memory_bytes", lambda device: forward_peak_bytes(TINY, fits, fits))
    with pytest.raises(ImageError) as info:
        check_forward_memory(
            TINY, height, width, tiled=tiled, batch=batch, overlap_px=overlap, device=torch.device("cpu"), name="x.png"
        )
    assert str(info.value).startswith("x.png: restoring ") and str(info.value).endswith(advice)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's peak-RSS reset")
def test_memory_estimate_covers_the_measured_peak() -> None:
    """Peak RSS rise over one whole-image restore_tensor call in a fresh process, against the estimate.

    The peak is the kernel's VmHWM, reset just before the call (ru_maxrss would include the parent's RSS at exec).
    """
    h, w = 384, 512
    code = f"""
import torch
from pathlib import Path
from nafnet_edge.inference import restore_tensor
from nafnet_edge.model import NAFNet, NAFNetConfig
def status(key):
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(key))
    return int(line.split()[1]) * 1024
torch.set_num_threads(2)
model = NAFNet(NAFNetConfig(width=8, enc_blk_nums=(1,) * 4, middle_blk_num=1, dec_blk_nums=(1,) * 4)).eval()
x = torch.rand(1, 3, {h}, {w})
Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
before = status("VmRSS")
restore_tensor(model, x, tile_px=0)
print(status("VmHWM") - before)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    measured = int(result.stdout)
    estimate = forward_peak_bytes(TINY, h, w)
    assert measured <= estimate <= 4 * measured, (measured, estimate)


def test_cgroup_limit_counts_reclaimable_cache_as_available(tmp_path: Path) -> None:
    assert cgroup_available_bytes(tmp_path) is None  # no cgroup v2 files: no limit known
    (tmp_path / "memory.max").write_text("max\n")
    assert cgroup_available_bytes(tmp_path) is None
    (tmp_path / "memory.max").write_text(f"{8 << 30}\n")
    (tmp_path / "memory.current").write_text(f"{6 << 30}\n")
    (tmp_path / "memory.stat").write_text(f"anon {5 << 30}\ninactive_file {1 << 30}\n")
    assert cgroup_available_bytes(tmp_path) == 3 << 30
