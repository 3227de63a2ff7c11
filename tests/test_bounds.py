"""Memory and time are bounded by what the user asked, not by what a file claims: every numeric option has an upper
bound (a usage error, exit 2, in one line), an image that cannot fit in memory is refused before it is decoded with
advice that fits, tile settings that make no progress are refused, and the pre-decode checks of an image file are
linear in its size."""

from __future__ import annotations

import re
import shlex
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from helpers import randomize, save_tiny_checkpoint

from nafnet_edge import cli, inference
from nafnet_edge.cli import build_parser, main
from nafnet_edge.errors import EXIT_BAD_INPUT, EXIT_USAGE, ImageError, UsageError
from nafnet_edge.images import check_image_file
from nafnet_edge.inference import (
    check_restore_memory,
    forward_peak_bytes,
    frame_peak_bytes,
    tile_count,
)
from nafnet_edge.model import NAFNet, NAFNetConfig

TINY = NAFNetConfig(width=8, enc_blk_nums=(1, 1), middle_blk_num=1, dec_blk_nums=(1, 1))  # save_tiny_checkpoint's
GB = 1 << 30


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bounds")
    save_tiny_checkpoint(root / "tiny.pth")
    cv2.imwrite(str(root / "x.png"), (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))
    (root / "empty").mkdir()
    return root


def run_cli(argv: list[str]) -> tuple[int, str]:
    try:
        return main(argv), ""
    except SystemExit as e:  # argparse
        return int(e.code or 0), ""


def one_line(capsys: pytest.CaptureFixture, code: int, expected_code: int) -> str:
    err = capsys.readouterr().err
    assert code == expected_code, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err.rstrip("\n")


# --- every numeric option has an upper bound ----------------------------------------------------------------------

# The minimal arguments each command needs to parse.
REQUIRED = {
    "inspect": [],
    "run": ["x.png", "-o", "o"],
    "reparam": ["-o", "o.safetensors"],
    "convert": ["--target", "onnx"],
    "quantize": ["--target", "openvino", "--train-data", "d"],
    "validate": ["d"],
    "bench": ["d"],
    "report": ["d"],
    "plan": ["d", "--frame", "100x100"],
}
# Pass/fail thresholds, not amounts of work: any finite value is a valid (if strict or lax) budget.
THRESHOLDS = {"--min-fidelity", "--max-drift", "--max-latency-ms"}


def numeric_options() -> list[tuple[str, str]]:
    subparsers = next(a for a in build_parser()._actions if a.choices and "run" in a.choices).choices
    found = []
    for command, parser in subparsers.items():
        for action in parser._actions:
            if not action.option_strings or action.type is None or action.type is Path:
                continue
            try:
                sample = action.type("1")
            except Exception:
                sample = None
            numeric = isinstance(sample, int | float) or (
                isinstance(sample, tuple) and all(isinstance(v, int) for v in sample)
            )
            if numeric and action.option_strings[-1] not in THRESHOLDS:
                found.append((command, action.option_strings[-1]))
    return found


def test_the_option_walk_finds_the_numeric_options() -> None:
    found = numeric_options()
    for option in [("run", "--tile"), ("bench", "--threads"), ("bench", "--frame"), ("inspect", "--size")]:
        assert option in found
    assert ("convert", "--keep-float") not in found and ("run", "--output") not in found
    assert len(found) >= 30, found


@pytest.mark.parametrize(("command", "option"), numeric_options())
def test_every_numeric_option_refuses_a_huge_value_in_one_line(command: str, option: str, capsys) -> None:
    value = "9" * 24  # more than any size, count, seed or rate that can be served
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args([command, *REQUIRED[command], option, value])
    err = one_line(capsys, int(info.value.code or 0), EXIT_USAGE)
    assert err.startswith(f"nafnet-edge {command}: error: argument {option}") and f"got '{value}'" in err, err
    assert re.search(r"expected (at most \d|a power of two from 1 to 64)", err), err


BOUNDS = [
    ("run {x.png} -o o --tile 16385", "argument --tile: expected at most 16384 (px, the largest model input side), "
     "got '16385'"),
    ("run {x.png} -o o --tile-batch 1025", "argument --tile-batch: expected at most 1024, got '1025'"),
    ("inspect --size 16385", "argument --size: expected at most 16384 px per side, got '16385'"),
    ("inspect --size 99999999999999999999", "argument --size: expected at most 16384 px per side, "
     "got '99999999999999999999'"),
    ("inspect --train-size 256x20000", "argument --train-size: expected at most 16384 px per side, got '256x20000'"),
    ("reparam -o o.pt2 --input-size 16384x16400", "argument --input-size: expected at most 16384 px per side, "
     "got '16384x16400'"),
    ("reparam -o o.pt2 --stream-scale 3", "argument --stream-scale: expected a power of two from 1 to 64, got '3'"),
    ("convert --target coreml --sizes 256 100000", "argument --sizes: expected at most 16384 px per side, "
     "got '100000'"),
    ("convert --target onnx --seed 4294967296", "argument --seed: expected at most 4294967295, got '4294967296'"),
    ("convert --target onnx --seed -1", "argument --seed: expected a non-negative integer, got '-1'"),
    ("quantize --target openvino --train-data d --lr 2", "argument --lr: expected at most 1 (a step as large as the "
     "weights), got '2'"),
    ("quantize --target openvino --train-data d --search-rounds 17", "argument --search-rounds: expected at most 16, "
     "got '17'"),
    ("quantize --target openvino --train-data d --steps 1000001", "argument --steps: expected at most 1000000, "
     "got '1000001'"),
    ("bench d --frame 70000x100", "argument --frame: expected at most 65535 px per side, got '70000x100'"),
    ("bench d --frame 40000x30000", "argument --frame: expected at most 1074 megapixels (the image reader's "
     "limit), got '40000x30000'"),
    ("bench d --frame 201MP", "argument --frame: expected megapixels like 12MP (at most 200), got '201MP'"),
    ("bench d --warmup 1000001", "argument --warmup: expected at most 1000000, got '1000001'"),
    ("report d --images 1001", "argument --images: expected at most 1000, got '1001'"),
]  # fmt: skip


@pytest.mark.parametrize(("argv", "message"), BOUNDS, ids=[b[0].split(" --")[-1] for b in BOUNDS])
def test_each_bound_is_named_in_a_one_line_usage_error(files: Path, capsys, monkeypatch, argv, message) -> None:
    monkeypatch.chdir(files)
    args = [a.replace("{x.png}", str(files / "x.png")) for a in shlex.split(argv)]
    code, _ = run_cli(args)
    command = args[0]
    assert one_line(capsys, code, EXIT_USAGE) == (
        f"nafnet-edge {command}: error: {message} (see nafnet-edge {command} --help)"
    )


def test_threads_are_bounded_by_the_cores_here(capsys, monkeypatch) -> None:
    monkeypatch.setattr("nafnet_edge.cli.common.cpu_count", lambda: 4)
    assert build_parser().parse_args(["bench", "d", "--threads", "4"]).threads == 4
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["bench", "d", "--threads", "1000"])
    assert one_line(capsys, int(info.value.code or 0), EXIT_USAGE) == (
        "nafnet-edge bench: error: argument --threads: expected at most 4 (the CPU cores here), got '1000' "
        "(see nafnet-edge bench --help)"
    )


def test_a_tiny_megapixel_frame_is_at_least_one_pixel() -> None:
    assert cli.parse_frame("0.0000001MP") == (1, 1)


# --- sizes bounded by the memory their forward pass needs ---------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        ("reparam {tiny.pth} -o {empty}/d.safetensors --input-size 1024", "--input-size"),
        ("convert {tiny.pth} --target onnx -o {empty}/c --no-validate --input-size 1024", "--input-size"),
        ("convert {tiny.pth} --target coreml -o {empty}/c --no-validate --input-size 64 --sizes 1024", "--sizes"),
    ],
)
def test_an_input_size_beyond_memory_is_refused_with_a_size_that_fits(
    files: Path, capsys, monkeypatch, argv: str, option: str
) -> None:
    available = forward_peak_bytes(TINY, 256, 256)
    monkeypatch.setattr(inference, "available_memory_bytes", lambda device: available)
    args = [a.replace("{", str(files) + "/").replace("}", "") for a in shlex.split(argv)]
    err = one_line(capsys, main(args), EXIT_USAGE)
    needed = forward_peak_bytes(TINY, 1024, 1024) / 1e6
    assert err.startswith(
        f"nafnet-edge: error: {option} 1024x1024: one forward pass of this model at that size needs about "
        f"{needed:.0f} MB, {available / 1e6:.0f} MB are available; use {option} "
    ), err
    side = int(re.search(rf"use {option} (\d+) or smaller$", err)[1])
    assert forward_peak_bytes(TINY, side, side) <= available < forward_peak_bytes(TINY, side + 8, side + 8)
    assert not (files / "empty" / "c").exists() and not (files / "empty" / "d.safetensors").exists()


def test_a_frame_beyond_memory_is_refused_with_a_frame_that_fits(files: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(inference, "available_memory_bytes", lambda device: GB)
    err = one_line(capsys, main(["bench", str(files / "empty"), "--frame", "10000x10000"]), EXIT_USAGE)
    match = re.fullmatch(
        r"nafnet-edge: error: --frame 10000x10000 needs about 4\.8 GB for the frame, 1\.1 GB are available; "
        r"use --frame (\d+)x(\d+) or smaller",
        err,
    )
    assert match, err
    assert int(match[1]) * int(match[2]) * cli.FRAME_BYTES_PER_PIXEL <= GB


# --- tiles that make no progress, batches larger than the tile count ----------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ("--tile 2 --overlap 0", "--tile 2 is smaller than this model's padding multiple (4 px): use --tile 512 or "
         "--tile 0 (the whole image)"),
        ("--tile 16 --overlap 15", "--tile 16 with --overlap 15 advances by 1 px, less than this model's padding "
         "multiple (4 px): use --overlap 12 or less"),
        ("--tile 2", "--overlap (64) must be smaller than --tile (2)"),
    ],
)  # fmt: skip
def test_tiles_that_make_no_progress_are_usage_errors(files: Path, tmp_path: Path, capsys, options, message) -> None:
    out = tmp_path / "out"
    argv = ["run", str(files / "tiny.pth"), str(files / "x.png"), "-o", str(out), *options.split()]
    assert one_line(capsys, main(argv), EXIT_USAGE) == f"nafnet-edge: error: {message}"
    assert not out.exists()


def test_a_batch_larger_than_the_tile_count_counts_only_the_tiles(
    files: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    tiles = tile_count(64, 64, tile_px=32, overlap_px=8, pad_multiple=TINY.pad_multiple)
    assert tiles == 9
    # Room for the image and the 9 tiles at once, not for the 64 tiles --tile-batch 64 asks for.
    available = frame_peak_bytes(64, 64, alpha=False, bit_depth=8) + forward_peak_bytes(TINY, 32, 32, batch=tiles)
    assert available < forward_peak_bytes(TINY, 32, 32, batch=64)
    monkeypatch.setattr(inference, "available_memory_bytes", lambda device: available)
    out = tmp_path / "out"
    argv = ["run", str(files / "tiny.pth"), str(files / "x.png"), "-o", str(out)]
    assert main([*argv, "--tile", "32", "--overlap", "8", "--tile-batch", "64"]) == 0, capsys.readouterr().err
    assert cv2.imread(str(out / "x.png")).shape == (64, 64, 3)


# --- images beyond memory: refused before decoding, with advice that fits -----------------------------------------


def zero_png(path: Path, width: int, height: int) -> Path:
    """A valid RGB PNG of zeros, compressed as the 1.17 MB 20000x20000 file of the report: one deflate block
    repeated after full flushes (each starts afresh), so that writing it costs no more than its size."""
    row = bytes(1 + 3 * width)  # filter byte 0, then the samples
    rows_per_block = 100
    assert height % rows_per_block == 0
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = compressor.compress(row * rows_per_block) + compressor.flush(zlib.Z_FULL_FLUSH)
    raw_size = len(row) * height
    adler = ((raw_size % 65521) << 16) | 1  # adler32 of zeros: A = 1, B = the length
    stream = b"\x78\xda" + block * (height // rows_per_block) + b"\x03\x00" + struct.pack(">I", adler)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", stream) + chunk(b"IEND", b""))
    return path


def test_the_zero_png_is_valid(tmp_path: Path) -> None:
    decoded = cv2.imread(str(zero_png(tmp_path / "z.png", 300, 200)))
    assert decoded.shape == (200, 300, 3) and not decoded.any()


def _no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import ImageFile

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("the image was decoded")

    monkeypatch.setattr(cv2, "imdecode", fail)
    monkeypatch.setattr(cv2, "imread", fail)
    monkeypatch.setattr(ImageFile.ImageFile, "load", fail)


@pytest.mark.parametrize("tile", ["512", "0"])
def test_a_20000px_png_beyond_memory_is_refused_before_decoding(
    files: Path, tmp_path: Path, capsys, monkeypatch, tile: str
) -> None:
    src = zero_png(tmp_path / "big.png", 20000, 20000)
    assert src.stat().st_size < 2_000_000
    available = 8 * GB
    monkeypatch.setattr(inference, "available_memory_bytes", lambda device: available)
    _no_decoding(monkeypatch)
    out = tmp_path / "out"
    code = main(["run", str(files / "tiny.pth"), str(src), "-o", str(out), "--tile", tile])
    err = one_line(capsys, code, EXIT_BAD_INPUT)
    frame = frame_peak_bytes(20000, 20000, alpha=False, bit_depth=8)
    what = "20000x20000 in 512x512 tiles" if tile == "512" else "20000x20000 in one pass"
    forward = forward_peak_bytes(TINY, 512, 512) if tile == "512" else forward_peak_bytes(TINY, 20000, 20000)
    room = available - forward_peak_bytes(TINY, 512, 512)
    assert err == (
        f"nafnet-edge: error: {src}: restoring {what} needs about {(frame + forward) / 1e9:.0f} GB ({frame / 1e9:.0f} "
        f"GB of it for the whole image), 8.6 GB are available; the image is too large for this machine's memory: "
        f"crop it into parts of at most {int(room / (frame / 20000**2) / 1e6)} megapixels, with --tile 512 (the "
        "default)"
    )
    assert not out.exists()


@pytest.fixture(scope="module")
def tiny_model() -> NAFNet:
    return randomize(NAFNet(TINY))


@pytest.mark.parametrize("available_mb", [150, 200, 300, 400, 600, 1000, 2000])
@pytest.mark.parametrize(("tile", "overlap", "batch"), [(0, 64, 1), (1024, 64, 1), (512, 64, 8), (512, 500, 2)])
def test_memory_advice_only_suggests_what_fits(
    tiny_model: NAFNet, monkeypatch, available_mb: int, tile: int, overlap: int, batch: int
) -> None:
    """Whatever the refusal advises, tile options or parts to crop, passes the same check."""
    monkeypatch.setattr(inference, "available_memory_bytes", lambda device: available_mb * 10**6)
    height, width = 3000, 4000
    options = {"tile_px": tile, "overlap_px": overlap, "batch": batch}
    try:
        check_restore_memory(tiny_model, height, width, **options, name="x.png")
        return  # it fits as asked
    except UsageError:
        assert tile - overlap < TINY.pad_multiple
        return
    except ImageError as e:
        message = str(e)
    assert message.startswith("x.png: restoring 3000x4000 ")
    if message.endswith("free some memory or use a smaller model"):  # not even a megapixel in 64-pixel tiles
        with pytest.raises(ImageError):
            check_restore_memory(tiny_model, 1000, 1000, tile_px=64, overlap_px=16, batch=1, name="small.png")
        return
    advice = message.split("; ")[1]
    kinds = ("smaller tiles: ", "tile it: ", "fewer tiles per pass: ", "the image is too large for this machine's")
    assert advice.startswith(kinds), message
    for flag, value in re.findall(r"--(tile-batch|tile|overlap) (\d+)", advice):
        options[{"tile": "tile_px", "overlap": "overlap_px", "tile-batch": "batch"}[flag]] = int(value)
    if parts := re.search(r"crop it into parts of at most (\d+) megapixels", message):
        height = width = int((int(parts[1]) * 1e6) ** 0.5)
    check_restore_memory(tiny_model, height, width, **options, name="x.png")


def test_the_memory_estimate_covers_the_measured_peak_of_reading_restoring_and_writing(tmp_path: Path) -> None:
    """Peak RSS rise over read_image, restore_image and write_image of incompressible images, each in a fresh
    process (freed memory would be reused), against frame_peak_bytes. The model's forward is the identity here:
    the forward passes have their own estimate."""
    rng = np.random.default_rng(0)
    for name, shape, top, dtype in [
        ("rgb8", (1000, 1200, 3), 255, np.uint8),
        ("rgba16", (1000, 1200, 4), 65535, np.uint16),
    ]:
        cv2.imwrite(str(tmp_path / f"{name}.png"), (rng.random(shape) * top).astype(dtype))
        cv2.imwrite(str(tmp_path / f"small-{name}.png"), (rng.random((16, 16, shape[2])) * top).astype(dtype))
    code = """
import sys
from pathlib import Path
from nafnet_edge.images import read_image, write_image
from nafnet_edge.inference import restore_image
from nafnet_edge.model import NAFNet, NAFNetConfig
def status(key):
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(key))
    return int(line.split()[1]) * 1024
class Identity(NAFNet):
    def forward(self, x):
        return x.clone()
model = Identity(NAFNetConfig(width=8, enc_blk_nums=(1, 1), middle_blk_num=1, dec_blk_nums=(1, 1))).eval()
write_image(sys.argv[2], restore_image(model, read_image(sys.argv[3])))  # imports and first calls, on 16x16
Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
before = status("VmRSS")
write_image(sys.argv[2], restore_image(model, read_image(sys.argv[1])))
print(status("VmHWM") - before)
"""
    for name, alpha, bit_depth in [("rgb8", False, 8), ("rgba16", True, 16)]:
        src, dst, small = (tmp_path / f"{prefix}{name}.png" for prefix in ("", "out-", "small-"))
        argv = [sys.executable, "-c", code, src, dst, small]
        result = subprocess.run(argv, capture_output=True, text=True, check=True)
        measured = int(result.stdout)
        estimate = frame_peak_bytes(1000, 1200, alpha=alpha, bit_depth=bit_depth)
        assert measured <= estimate <= 2 * measured, (name, measured, estimate)


# --- pre-decode checks are linear in the file size ----------------------------------------------------------------


def test_a_long_run_of_ff_bytes_after_a_jpeg_start_is_refused_at_once(tmp_path: Path) -> None:
    """4 MB of 0xFF: the marker search used to retry a greedy 0xFF+ from every byte (quadratic: 21 s for 40 KB,
    days for this one); now it returns, refusing the file as truncated."""
    src = tmp_path / "ff.jpg"
    src.write_bytes(b"\xff\xd8" + b"\xff" * (4 << 20))
    with pytest.raises(ImageError) as info:
        check_image_file(src)
    assert str(info.value) == f"{src}: the JPEG file is truncated or damaged (it ends early); copy or download it again"


def test_fill_bytes_before_a_marker_are_still_skipped(tmp_path: Path) -> None:
    data = cv2.imencode(".jpg", np.full((16, 24, 3), 128, np.uint8))[1].tobytes()
    src = tmp_path / "fill.jpg"
    src.write_bytes(data[:2] + b"\xff" * (1 << 20) + data[2:])  # fill bytes are legal before any marker
    probe = check_image_file(src)
    assert (probe.format, probe.width, probe.height) == ("JPEG", 24, 16)


def _tiff(path: Path, *, next_ifd: str) -> Path:
    """An 8x8 RGB TIFF whose first directory points to itself (``self``) or to nothing (``none``)."""
    pixels = bytes(8 * 8 * 3)
    ifd_offset = 8 + len(pixels)
    entries = [(256, 3, 8), (257, 3, 8), (258, 3, 8), (259, 3, 1), (262, 3, 2), (273, 4, 8), (277, 3, 3)]
    entries += [(278, 3, 8), (279, 4, len(pixels))]
    ifd = struct.pack("<H", len(entries))
    for tag, kind, value in entries:
        ifd += struct.pack("<HHIHH", tag, kind, 1, value, 0) if kind == 3 else struct.pack("<HHII", tag, kind, 1, value)
    ifd += struct.pack("<I", ifd_offset if next_ifd == "self" else 0)
    path.write_bytes(b"II*\x00" + struct.pack("<I", ifd_offset) + pixels + ifd)
    return path


def test_a_tiff_whose_directory_chain_loops_is_read_once(tmp_path: Path) -> None:
    looped = check_image_file(_tiff(tmp_path / "loop.tif", next_ifd="self"))
    plain = check_image_file(_tiff(tmp_path / "plain.tif", next_ifd="none"))
    assert looped == plain and (looped.width, looped.height, looped.channels) == (8, 8, 3)


def test_a_png_of_many_chunks_is_walked_once(tmp_path: Path) -> None:
    data = cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))[1].tobytes()
    text = b"tEXt" + b"k\x00v"
    chunk = struct.pack(">I", 3) + text + struct.pack(">I", zlib.crc32(text))
    src = tmp_path / "chunks.png"
    src.write_bytes(data[:33] + chunk * 200_000 + data[33:])  # after IHDR: 2.4 MB of tiny chunks
    probe = check_image_file(src)
    assert (probe.format, probe.width, probe.height) == ("PNG", 8, 8)


def test_cpu_refusal_counts_the_image_on_the_host_when_the_model_is_elsewhere(tiny_model: NAFNet, monkeypatch) -> None:
    """On a GPU the tiles go to the device but the whole image stays in host memory: it is checked there."""
    monkeypatch.setattr(inference, "available_memory_bytes", lambda device: GB if device.type == "cpu" else 100 * GB)
    monkeypatch.setattr(NAFNet, "parameters", lambda self: iter([torch.empty(0, device="meta")]))
    with pytest.raises(ImageError) as info:
        check_restore_memory(tiny_model, 20000, 20000, tile_px=512, overlap_px=64, batch=1, name="x.png")
    assert str(info.value).startswith("x.png: restoring 20000x20000 needs about 46 GB of host memory")
