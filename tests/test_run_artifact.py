"""``nafnet-edge run ARTIFACT``: images restored by an artifact in its own runtime, tiled as its validation ran it,
match the PyTorch reference's ``run`` within the artifact's fidelity budget."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from helpers import Converted, require

from nafnet_edge.cli import main
from nafnet_edge.errors import EXIT_BAD_INPUT, EXIT_MISSING_BACKEND, EXIT_USAGE

require("onnxruntime")
require("openvino")


def psnr_db(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)) / 255.0**2
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


def one_error(capsys, code: int, expected: int) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("nafnet-edge: error:")]
    assert code == expected and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def reference(converted_artifacts: Converted, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What the PyTorch ``run`` of the shared checkpoint gives for the shared images when it sees what the
    artifacts see: 64 px tiles with the 32 px overlap their manifests record, and an image smaller than the tile
    zero-padded to it (an artifact's input size is fixed; the model's channel attention averages over the
    padding too), cropped back."""
    root = tmp_path_factory.mktemp("reference")
    (root / "in").mkdir()
    sizes = {}
    for photo in converted_artifacts.data.iterdir():
        pixels = cv2.imread(str(photo))
        sizes[photo.name] = pixels.shape[:2]
        padded = np.zeros((max(64, pixels.shape[0]), max(64, pixels.shape[1]), 3), np.uint8)
        padded[: pixels.shape[0], : pixels.shape[1]] = pixels
        cv2.imwrite(str(root / "in" / photo.name), padded)
    argv = ["run", str(converted_artifacts.checkpoint), str(root / "in"), "-o", str(root / "out")]
    assert main([*argv, "--tile", "64", "--overlap", "32"]) == 0
    for name, (h, w) in sizes.items():
        cv2.imwrite(str(root / "out" / name), cv2.imread(str(root / "out" / name))[:h, :w])
    return root / "out"


def run_artifact(model: Path, converted: Converted, out: Path, capsys) -> str:
    assert main(["run", str(model), str(converted.data), "-o", str(out)]) == 0, capsys.readouterr().err
    return capsys.readouterr().err


@pytest.mark.parametrize(("target", "form"), [("onnx", "directory"), ("openvino", "model.xml")])
def test_an_artifact_restores_like_the_reference_within_its_budget(
    target: str, form: str, converted_artifacts: Converted, reference: Path, tmp_path: Path, capsys
) -> None:
    directory = converted_artifacts.dir(target)
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["tiling"]["overlap_px"] == 32 and manifest["io"]["inputs"][0]["shape"][2:] == [64, 64]
    err = run_artifact(directory if form == "directory" else directory / form, converted_artifacts, tmp_path, capsys)
    runtime = manifest["runtime"]["runtime"]
    assert f"artifact: {directory} ({target} fp32) in {runtime}; 64x64 tiles, overlap 32" in err
    budget = manifest["validation"]["budgets"]["min_fidelity_db"]
    names = sorted(p.name for p in reference.iterdir())
    assert names == sorted(p.name for p in tmp_path.iterdir()) and len(names) == 2
    for name in names:
        ours, ref = cv2.imread(str(tmp_path / name)), cv2.imread(str(reference / name))
        assert ours.shape == ref.shape  # the small image padded to the tile and cropped back, the large one tiled
        assert psnr_db(ours, ref) > budget, name


def test_the_executorch_program_file_names_its_artifact(
    converted_artifacts: Converted, reference: Path, tmp_path: Path, capsys
) -> None:
    require("executorch")
    directory = converted_artifacts.dir("executorch")
    err = run_artifact(directory / "model.pte", converted_artifacts, tmp_path, capsys)
    assert f"artifact: {directory} (executorch fp32) in executorch" in err
    budget = json.loads((directory / "manifest.json").read_text())["validation"]["budgets"]["min_fidelity_db"]
    for image in reference.iterdir():
        assert psnr_db(cv2.imread(str(tmp_path / image.name)), cv2.imread(str(image))) > budget


def test_a_core_ml_package_runs_where_validation_ran_it(
    converted_artifacts: Converted, reference: Path, tmp_path: Path, capsys
) -> None:
    """The .mlpackage names its artifact; off macOS it runs in the ML-program evaluator validation uses (fp16)."""
    require("coremltools")
    directory = converted_artifacts.dir("coreml")
    err = run_artifact(directory / "model.mlpackage", converted_artifacts, tmp_path, capsys)
    runtime = "coreml" if sys.platform == "darwin" else "mil-numpy-evaluator"
    assert f"artifact: {directory} (coreml fp16) in {runtime}" in err
    manifest = json.loads((directory / "manifest.json").read_text())
    budget = manifest["validation"]["budgets"]["min_fidelity_db"]
    for image in reference.iterdir():
        assert psnr_db(cv2.imread(str(tmp_path / image.name)), cv2.imread(str(image))) > budget


def test_a_gray_image_runs_through_an_rgb_artifact_and_stays_gray(
    converted_artifacts: Converted, tmp_path: Path, capsys
) -> None:
    photo = converted_artifacts.data / "crop0.png"  # the crop larger than the 64 px tile: tiled the same way
    gray = cv2.cvtColor(cv2.imread(str(photo)), cv2.COLOR_BGR2GRAY)
    cv2.imwrite(str(tmp_path / "gray.png"), gray)
    outputs = {}
    for name, model, options in (
        ("reference", converted_artifacts.checkpoint, ["--tile", "64", "--overlap", "32"]),
        ("artifact", converted_artifacts.dir("onnx"), []),
    ):
        out = tmp_path / name
        assert main(["run", str(model), str(tmp_path / "gray.png"), "-o", str(out), *options]) == 0
        outputs[name] = cv2.imread(str(out / "gray.png"), cv2.IMREAD_UNCHANGED)
    assert outputs["artifact"].shape == gray.shape
    assert psnr_db(outputs["artifact"], outputs["reference"]) > 60
    capsys.readouterr()


def test_a_model_file_without_its_manifest_is_refused_in_one_line(
    converted_artifacts: Converted, tmp_path: Path, capsys
) -> None:
    stray = tmp_path / "model.pte"
    stray.write_bytes(b"not written by nafnet-edge")
    code = main(["run", str(stray), str(converted_artifacts.data), "-o", str(tmp_path / "out")])
    line = one_error(capsys, code, EXIT_BAD_INPUT)
    assert "has no manifest.json beside it" in line and "pass the directory" in line
    copy = Path(shutil.copytree(converted_artifacts.dir("openvino"), tmp_path / "openvino-fp32"))
    (copy / "model.onnx").write_bytes(b"a file its manifest does not list")
    code = main(["run", str(copy / "model.onnx"), str(converted_artifacts.data), "-o", str(tmp_path / "out")])
    line = one_error(capsys, code, EXIT_BAD_INPUT)
    assert "is not the artifact of" in line and "model.xml, model.bin" in line and f"pass the directory {copy}" in line
    assert not (tmp_path / "out").exists()


def test_what_an_artifact_cannot_honour_is_a_usage_error(
    converted_artifacts: Converted, tmp_path: Path, capsys
) -> None:
    directory, images = str(converted_artifacts.dir("onnx")), str(converted_artifacts.data)
    for options, needle in (
        (["--tile", "128"], "--tile: an artifact restores the 64x64 tiles"),
        (["--tile-batch", "2"], "--tile-batch: an artifact runs one 64x64 tile at a time"),
        (["--device", "cpu"], "--device: an artifact runs in its own runtime"),
        (["--overlap", "64"], "--overlap 64 must be smaller than this artifact's 64x64 tiles"),
    ):
        code = main(["run", directory, images, "-o", str(tmp_path / "out"), *options])
        assert needle in one_error(capsys, code, EXIT_USAGE)
    assert not (tmp_path / "out").exists()


def test_an_artifact_this_machine_cannot_run_exits_4(
    converted_artifacts: Converted, tmp_path: Path, capsys, monkeypatch
) -> None:
    from nafnet_edge.converters.base import NotRunnable
    from nafnet_edge.converters.onnx import ONNXTarget

    def refuse(self, out_dir, *, export=None, settings=None):
        raise NotRunnable("this runtime exists only on another platform; run it there")

    monkeypatch.setattr(ONNXTarget, "open_session", refuse)
    directory = converted_artifacts.dir("onnx")
    code = main(["run", str(directory), str(converted_artifacts.data), "-o", str(tmp_path / "out")])
    line = one_error(capsys, code, EXIT_MISSING_BACKEND)
    assert f"{directory} cannot run on this machine: this runtime exists only on another platform" in line
    assert not (tmp_path / "out").exists()


def test_a_folder_of_artifacts_given_as_images_names_them(
    converted_artifacts: Converted, tmp_path: Path, capsys
) -> None:
    code = main(["run", str(converted_artifacts.out), "-o", str(tmp_path / "out")])
    line = one_error(capsys, code, EXIT_BAD_INPUT)
    assert "contains no PNG, JPEG or TIFF images; it holds artifacts" in line
    assert str(converted_artifacts.dir("onnx")) in line or "..." in line
