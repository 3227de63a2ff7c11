"""The Android (Kotlin) tiler shipped with ExecuTorch artifacts, compiled with kotlinc and run on the JVM with the
runtime call behind its TileModule interface: it must cut and blend exactly as the Python tiler validation uses.

Its pixel path (NafnetPixelTiler, for image-I/O artifacts: uint8 tiles in and out) must cut the same tiles and
blend their bytes to exactly the frame the Python in an image-I/O artifact's USAGE.md computes, which these tests
execute as it is written there."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import KODAK, randomize, require, running_in_ci
from PIL import Image

from nafnet_edge.tiling import TilePlan, tile_plan
from nafnet_edge.usage import FROM_FORMAT, PYTHON_SAVE_IMAGE
from nafnet_edge.validation import apply_tiled

TESTS = Path(__file__).resolve().parent
CASES = [  # height, width, tile, overlap, align
    (100, 130, 64, 16, 16),
    (150, 203, 64, 32, 4),
    (40, 50, 64, 32, 16),  # smaller than the tile: one padded call
    (300, 97, 48, 31, 16),  # a step smaller than the alignment: starts by the pixel
    (256, 256, 256, 32, 16),
    (3024, 4032, 256, 32, 16),
]


@pytest.fixture(scope="module")
def tiler(tmp_path_factory: pytest.TempPathFactory) -> Path:
    kotlinc = shutil.which("kotlinc")
    if kotlinc is None:
        if running_in_ci():
            pytest.fail("kotlinc is missing under CI=true: .ci/run installs Debian's kotlin package", pytrace=False)
        pytest.skip("kotlinc not installed (apt-get install kotlin)")
    source = Path(str(resources.files("nafnet_edge") / "android" / "NafnetTiler.kt"))
    jar = tmp_path_factory.mktemp("kotlin") / "tiler.jar"
    subprocess.run(
        [kotlinc, str(source), str(TESTS / "kotlin" / "TilerCheck.kt"), "-include-runtime", "-d", str(jar)],
        check=True,
        capture_output=True,
    )
    return jar


def kotlin(jar: Path, *args: object) -> dict[str, list[str]]:
    done = subprocess.run(["java", "-jar", str(jar), *map(str, args)], check=True, capture_output=True, text=True)
    lines: dict[str, list[str]] = {}
    for line in done.stdout.splitlines():
        key, *values = line.split(" ")
        if key in ("wy", "wx"):
            key = f"{key}{values.pop(0)}"
        lines[key] = values
    return lines


@pytest.mark.parametrize(("height", "width", "tile", "overlap", "align"), CASES)
def test_tile_origins_and_blend_weights_equal_the_python_tilers_bit_for_bit(
    tiler: Path, height: int, width: int, tile: int, overlap: int, align: int
) -> None:
    got = kotlin(tiler, "plan", height, width, tile, tile, overlap, align)
    plan = tile_plan(height, width, tile=(tile, tile), overlap_px=overlap, align_px=align)
    assert [int(v) for v in got["padded"]] == list(plan.padded)
    assert tuple(int(v) for v in got["ys"]) == plan.ys and tuple(int(v) for v in got["xs"]) == plan.xs
    for axis, weights in (("wy", plan.weights_y), ("wx", plan.weights_x)):
        for k, w in enumerate(weights):
            expected = np.asarray(w, np.float32).view(np.int32)  # float32 bit patterns: equal, not close
            assert np.array_equal(np.asarray(got[f"{axis}{k}"], np.int64).astype(np.int32), expected), (axis, k)


@pytest.mark.parametrize(("height", "width", "tile", "overlap", "align"), CASES[:5])
def test_a_module_returning_its_input_gives_back_the_frame(
    tiler: Path, height: int, width: int, tile: int, overlap: int, align: int
) -> None:
    got = kotlin(tiler, "identity", height, width, 3, tile, overlap, align)
    assert float(got["max_abs_diff"][0]) <= 1e-6
    assert int(got["argb_mismatches"][0]) == 0  # ARGB_8888 in, opaque ARGB_8888 out, every pixel unchanged


def tile_dependent(t: torch.Tensor) -> torch.Tensor:
    """A stand-in for the network whose output depends on the whole tile (as channel attention does)."""
    return t * t + t.mean(dim=(2, 3), keepdim=True) + 0.1 * t.flip(3)


@pytest.mark.parametrize(("height", "width", "tile", "overlap", "align"), CASES[:5])
def test_golden_tile_outputs_blend_to_the_python_result(
    tiler: Path, tmp_path: Path, height: int, width: int, tile: int, overlap: int, align: int
) -> None:
    frame = np.random.default_rng(height + width).random((height, width, 3), dtype=np.float32)
    inputs, outputs = [], []

    def recorded(t: torch.Tensor) -> torch.Tensor:
        y = tile_dependent(t)
        inputs.append(t.numpy().copy())
        outputs.append(y.numpy().copy())
        return y

    expected, calls = apply_tiled(recorded, frame, (tile, tile), overlap, align)
    frame.tofile(tmp_path / "frame.f32")
    np.concatenate([x.ravel() for x in inputs]).astype("<f4").tofile(tmp_path / "inputs.f32")
    np.concatenate([y.ravel() for y in outputs]).astype("<f4").tofile(tmp_path / "outputs.f32")
    got = kotlin(tiler, "replay", tmp_path, height, width, 3, tile, overlap, align)
    assert int(got["calls"][0]) == calls == len(inputs)
    assert float(got["input_max_abs_diff"][0]) == 0.0  # the same tiles, padding included, in the same order
    blended = np.fromfile(tmp_path / "out.f32", "<f4").reshape(height, width, 3)
    assert np.abs(blended - expected).max() <= 1e-6


SCALED_CASES = [  # height, width, tile, overlap, align, scale: super-resolution artifacts, tiles in input pixels
    (50, 65, 32, 8, 1, 2),
    (37, 29, 24, 6, 1, 4),  # odd sizes
    (20, 30, 32, 8, 1, 2),  # smaller than the tile: one padded call
]


@pytest.mark.parametrize(("height", "width", "tile", "overlap", "align", "scale"), SCALED_CASES)
def test_scaled_plans_and_blends_equal_the_python_tilers(
    tiler: Path, tmp_path: Path, height: int, width: int, tile: int, overlap: int, align: int, scale: int
) -> None:
    """A x2/x4 artifact: the blend weights in output pixels bit for bit, the blended frame as validation's tiler
    blends it, and 8-bit frames of a nearest-neighbour "artifact" come back as the nearest-neighbour upscale."""
    got = kotlin(tiler, "plan", height, width, tile, tile, overlap, align, scale)
    plan = tile_plan(height, width, tile=(tile, tile), overlap_px=overlap, align_px=align, scale=scale)
    assert tuple(int(v) for v in got["ys"]) == plan.ys and tuple(int(v) for v in got["xs"]) == plan.xs
    for axis, weights in (("wy", plan.weights_y), ("wx", plan.weights_x)):
        for k, w in enumerate(weights):
            assert len(w) == tile * scale
            expected = np.asarray(w, np.float32).view(np.int32)
            assert np.array_equal(np.asarray(got[f"{axis}{k}"], np.int64).astype(np.int32), expected), (axis, k)
    frame = np.random.default_rng(height + width).random((height, width, 3), dtype=np.float32)
    inputs, outputs = [], []

    def recorded(t: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.interpolate(tile_dependent(t), scale_factor=scale, mode="bilinear")
        inputs.append(t.numpy().copy())
        outputs.append(y.numpy().copy())
        return y

    expected_frame, calls = apply_tiled(recorded, frame, (tile, tile), overlap, align, scale)
    frame.tofile(tmp_path / "frame.f32")
    np.concatenate([x.ravel() for x in inputs]).astype("<f4").tofile(tmp_path / "inputs.f32")
    np.concatenate([y.ravel() for y in outputs]).astype("<f4").tofile(tmp_path / "outputs.f32")
    got = kotlin(tiler, "replay", tmp_path, height, width, 3, tile, overlap, align, scale)
    assert int(got["calls"][0]) == calls == len(inputs)
    assert float(got["input_max_abs_diff"][0]) == 0.0
    blended = np.fromfile(tmp_path / "out.f32", "<f4").reshape(height * scale, width * scale, 3)
    assert np.abs(blended - expected_frame).max() <= 1e-6
    for p in (4, 3):
        got = kotlin(tiler, "pixel-upsample", height, width, p, tile, overlap, align, scale)
        assert int(got["size"][0]) == height * width * scale * scale * p and int(got["mismatches"][0]) == 0


PIXEL_CASES = [  # height, width, pixel format, tile, overlap, align
    (100, 130, "rgba", 64, 16, 16),
    (151, 203, "rgba", 64, 32, 4),  # odd sizes
    (37, 53, "rgba", 64, 32, 16),  # smaller than the tile: one padded call
    (300, 97, "bgr", 48, 31, 16),  # a step smaller than the alignment
    (99, 101, "gray", 64, 16, 16),
    (256, 256, "bgra", 256, 32, 16),
]


def channels_of(fmt: str) -> int:
    return 1 if fmt == "gray" else len(fmt)


@pytest.mark.parametrize(("height", "width", "fmt", "tile", "overlap", "align"), PIXEL_CASES)
def test_a_pixel_module_returning_its_input_gives_back_the_frame_bytes(
    tiler: Path, height: int, width: int, fmt: str, tile: int, overlap: int, align: int
) -> None:
    p = channels_of(fmt)
    got = kotlin(tiler, "pixel-identity", height, width, p, tile, overlap, align)
    assert int(got["calls"][0]) == len(tile_plan(height, width, tile=(tile, tile), overlap_px=overlap, align_px=align))
    assert int(got["mismatches"][0]) == 0  # every byte back, alpha 255 for 4-byte formats
    if p == 4:
        assert int(got["opaque_in"][0]) < height * width // 2  # the input alphas were random: 255 is the tiler's
    # the Bitmap path: the buffer copyPixelsToBuffer filled (position at its end) is read from index 0, left as it
    # was, and the restored bytes come back at position 0 for copyPixelsFromBuffer
    n = height * width * p
    assert [int(v) for v in got["buffer_position"]] == [n, 0, n]
    assert int(got["buffer_mismatches"][0]) == 0


def usage_python_restore(
    pixels: np.ndarray, plan: TilePlan, fmt: str, run: Callable[[np.ndarray], np.ndarray], folder: Path
) -> np.ndarray:
    """The blended uint8 frame (``y``) of USAGE.md's image-I/O Python, executed as written there with ``run``
    (it also saves restored.png, into ``folder``)."""
    h, w = plan.tile
    frame = np.zeros((*plan.padded, pixels.shape[2]), np.uint8)
    frame[: pixels.shape[0], : pixels.shape[1]] = pixels
    code = PYTHON_SAVE_IMAGE.format(h=h, w=w, p=pixels.shape[2], from_format=FROM_FORMAT[fmt])
    code = code.replace('"restored.png"', repr(str(folder / "restored.png")))
    scope = {"np": np, "Image": Image, "frame": frame, "plan": plan, "pixels": pixels, "run": run}
    exec(code, scope)  # noqa: S102 -- the documented snippet itself, not a copy of it
    y = scope["y"]
    assert isinstance(y, np.ndarray) and y.dtype == np.uint8 and y.shape == pixels.shape
    return y


def replay_in_kotlin(
    jar: Path, folder: Path, pixels: np.ndarray, fmt: str, plan: TilePlan, run: Callable[[np.ndarray], np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """USAGE.md's Python frame with ``run`` as the artifact, and the Kotlin pixel tiler's frame when each of its
    calls returns the output ``run`` gave for that tile (after checking it got the same input bytes)."""
    inputs, outputs = [], []

    def recorded(x: np.ndarray) -> np.ndarray:
        y = run(x)
        assert x.dtype == y.dtype == np.uint8 and x.shape == y.shape == (1, *plan.tile, pixels.shape[2])
        inputs.append(x.copy())
        outputs.append(y.copy())
        return y

    expected = usage_python_restore(pixels, plan, fmt, recorded, folder)
    pixels.tofile(folder / "frame.u8")
    np.concatenate([x.ravel() for x in inputs]).tofile(folder / "inputs.u8")
    np.concatenate([y.ravel() for y in outputs]).tofile(folder / "outputs.u8")
    height, width, p = pixels.shape
    got = kotlin(jar, "pixel-replay", folder, height, width, p, plan.tile[0], plan.overlap_px, plan.align_px)
    assert int(got["calls"][0]) == len(inputs) == len(plan)
    assert int(got["input_mismatches"][0]) == 0  # the same tile bytes, padding included, in the same order
    return np.fromfile(folder / "out.u8", np.uint8).reshape(pixels.shape), expected


def tile_dependent_pixels(x: np.ndarray) -> np.ndarray:
    """A stand-in for an image-I/O artifact whose output depends on the whole tile and on the position in it, so
    that overlapping tiles disagree and the blend decides every overlap byte (alpha 255 out, as the artifact)."""
    v = x.astype(np.int64)
    y = (255 - v + 7 * int(v.mean()) + 3 * np.arange(x.shape[2])[None, None, :, None]) % 256
    if x.shape[3] == 4:
        y[..., 3] = 255
    return y.astype(np.uint8)


@pytest.mark.parametrize(("height", "width", "fmt", "tile", "overlap", "align"), PIXEL_CASES)
def test_golden_pixel_tiles_blend_to_the_usage_python_frame_byte_for_byte(
    tiler: Path, tmp_path: Path, height: int, width: int, fmt: str, tile: int, overlap: int, align: int
) -> None:
    pixels = np.random.default_rng(height * width).integers(0, 256, (height, width, channels_of(fmt)), np.uint8)
    plan = tile_plan(height, width, tile=(tile, tile), overlap_px=overlap, align_px=align)
    blended, expected = replay_in_kotlin(tiler, tmp_path, pixels, fmt, plan, tile_dependent_pixels)
    assert np.array_equal(blended, expected)
    if len(plan) > 1:  # the overlaps were blends, not copies of one tile's bytes
        whole = tile_dependent_pixels(np.pad(pixels, ((0, tile), (0, tile), (0, 0)))[None, :tile, :tile])[0]
        assert not np.array_equal(blended[:tile, :tile], whole[: min(tile, height), : min(tile, width)])


@pytest.fixture(scope="module")
def executorch_rgba(tmp_path_factory: pytest.TempPathFactory) -> Callable[[np.ndarray], np.ndarray]:
    """The native call (uint8 rgba pixels in and out) of a real 64 px ExecuTorch image-I/O program of a
    randomized one-block NAFNet."""
    require("executorch")
    from nafnet_edge.converters import ExportOptions, get_target
    from nafnet_edge.deploy import deploy
    from nafnet_edge.model import NAFNet, NAFNetConfig

    converter = get_target("executorch")
    model = randomize(NAFNet(NAFNetConfig(width=8, enc_blk_nums=(), middle_blk_num=1, dec_blk_nums=())), seed=3)
    graph = deploy(model, norm_form=converter.norm_form, input_size=(64, 64))
    folder = tmp_path_factory.mktemp("executorch-rgba")
    exported = converter.export(graph, folder, ExportOptions(input_size=(64, 64), pixel_format="rgba"))
    assert exported.info["io"] == "image" and exported.info["pixel_format"] == "rgba"
    return converter.open_session(folder, export=exported.info).native


def test_an_executorch_image_program_tiled_in_kotlin_gives_the_usage_python_frame(
    tiler: Path, tmp_path: Path, executorch_rgba: Callable[[np.ndarray], np.ndarray]
) -> None:
    from nafnet_edge.images import read_image
    from nafnet_edge.pixels import to_pixels

    rgb = read_image(sorted(KODAK.glob("*.png"))[0]).pixels[100:201, 40:171]  # 101 x 131: odd, six 64 px tiles
    pixels = to_pixels(rgb.transpose(2, 0, 1)[None], "rgba")[0]
    pixels[..., 3] = np.random.default_rng(0).integers(0, 256, pixels.shape[:2])  # ignored by the program
    plan = tile_plan(*pixels.shape[:2], tile=(64, 64), overlap_px=16, align_px=16)
    blended, expected = replay_in_kotlin(tiler, tmp_path, pixels, "rgba", plan, executorch_rgba)
    assert len(plan) == 6 and np.array_equal(blended, expected)
    assert (blended[..., 3] == 255).all()
