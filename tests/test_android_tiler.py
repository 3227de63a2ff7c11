"""The Android (Kotlin) tiler shipped with ExecuTorch artifacts, compiled with kotlinc and run on the JVM with the
runtime call behind its TileModule interface: it must cut and blend exactly as the Python tiler validation uses."""

from __future__ import annotations

import shutil
import subprocess
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import running_in_ci

from nafnet_edge.tiling import tile_plan
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
