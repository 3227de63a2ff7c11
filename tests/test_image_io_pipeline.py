"""Image I/O end to end through the command line: for every target, the image-I/O artifact of a checkpoint is
converted and validated in its runtime (Core ML through the ML-program evaluator) beside the tensor-I/O artifact
of the same checkpoint, both restore the same photos (larger than the tile, smaller, odd-sized) to 8-bit outputs
that agree within one level, the usage note's Python restores a whole photo through the pixel interface, and
16-bit input is refused with a pointer to tensor I/O."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from helpers import Converted, artifact_dir, require, run_usage_python, without_progress

from nafnet_edge.cli import main
from nafnet_edge.errors import EXIT_BAD_INPUT
from nafnet_edge.pixels import pixel_channels

TARGETS = {
    "onnx": "onnxruntime",
    "openvino": "openvino",
    "executorch": "executorch",
    "coreml": "coremltools",
    "litert": "ai_edge_litert",
}
DEFAULT_FORMATS = {"onnx": "rgb", "openvino": "bgr", "executorch": "rgba", "coreml": "rgb", "litert": "rgba"}


@pytest.fixture(scope="module")
def image_artifacts(tmp_path_factory: pytest.TempPathFactory, converted_artifacts: Converted) -> Path:
    """The shared tiny checkpoint converted with ``--io image`` for every target (default pixel formats), at the
    tensor artifacts' 64 px and validated on the same photos."""
    for module in TARGETS.values():
        require(module)
    root = tmp_path_factory.mktemp("image-io")
    out = root / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NAFNET_EDGE_CACHE", str(root / "cache"))
        for target in TARGETS:
            args = ["convert", str(converted_artifacts.checkpoint), "--target", target, "-o", str(out)]
            args += ["--input-size", "64", "--io", "image", "--val-data", str(converted_artifacts.data)]
            with contextlib.redirect_stdout(io.StringIO()):
                assert main(args) == 0, f"converting the {target} image-I/O artifact failed"
    return out


def _image_dir(out: Path, target: str) -> Path:
    return artifact_dir(out, target).with_name(artifact_dir(out, target).name + "-image")


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory, converted_artifacts: Converted) -> Path:
    """The validation photos plus an odd-sized crop (53x37)."""
    folder = tmp_path_factory.mktemp("photos")
    for p in converted_artifacts.data.iterdir():
        shutil.copy(p, folder / p.name)
    first = cv2.imread(str(next(iter(sorted(converted_artifacts.data.iterdir())))))
    cv2.imwrite(str(folder / "odd.png"), first[7:60, 11:48])
    return folder


@pytest.mark.parametrize("target", list(TARGETS))
def test_image_and_tensor_artifacts_agree_within_one_level(
    target: str, image_artifacts: Path, converted_artifacts: Converted, photos: Path, tmp_path: Path
) -> None:
    folder = _image_dir(image_artifacts, target)
    manifest = json.loads((folder / "manifest.json").read_text())
    fmt = DEFAULT_FORMATS[target]
    depth = pixel_channels(fmt)
    assert manifest["io"]["inputs"][0] | {"note": ""} == {
        "name": "image",
        "shape": [1, 64, 64, depth],
        "layout": "NHWC",
        "dtype": "uint8",
        "channels": fmt.upper(),
        "range": [0.0, 255.0],
        "note": "",
    }
    assert manifest["io"]["outputs"][0]["dtype"] == "uint8" and manifest["export"]["pixel_format"] == fmt
    v = manifest["validation"]
    assert v["passed"], v["failures"]
    assert v["budgets"]["min_within_one_level"] == 0.999
    assert v["summary"]["within_one_level_share_min"] >= 0.999

    outputs = {}
    for kind, directory in (("tensor", converted_artifacts.dir(target)), ("image", folder)):
        assert main(["run", str(directory), str(photos), "-o", str(tmp_path / kind)]) == 0
        outputs[kind] = {p.name: cv2.imread(str(p)) for p in sorted((tmp_path / kind).iterdir())}
    assert sorted(outputs["image"]) == ["crop0.png", "crop1.png", "odd.png"]
    for name, tensor_out in outputs["tensor"].items():
        image_out = outputs["image"][name]
        assert image_out.shape == tensor_out.shape == cv2.imread(str(photos / name)).shape
        diff = np.abs(image_out.astype(int) - tensor_out.astype(int))
        assert np.mean(diff <= 1) >= 0.999, (name, np.mean(diff <= 1), diff.max())


@pytest.mark.parametrize("target", ["onnx", "openvino", "executorch"])
def test_usage_python_restores_a_whole_photo_through_pixels(
    target: str, image_artifacts: Path, converted_artifacts: Converted, tmp_path: Path
) -> None:
    folder = Path(shutil.copytree(_image_dir(image_artifacts, target), tmp_path / target))
    note = (folder / "USAGE.md").read_text()
    assert "uint8" in note and "NHWC" in note
    restored = run_usage_python(folder, converted_artifacts.data / "crop0.png")
    assert restored.shape == (96, 120, 3)
    assert main(["run", str(folder), str(folder / "photo.png"), "-o", str(tmp_path / "run")]) == 0
    by_run = cv2.imread(str(tmp_path / "run" / "photo.png"))
    assert np.abs(restored.astype(int) - by_run.astype(int)).max() <= 1


def test_16_bit_input_is_refused_by_an_image_artifact(image_artifacts: Path, tmp_path: Path, capsys) -> None:
    deep = (np.arange(48 * 40 * 3, dtype=np.uint16).reshape(48, 40, 3) * 37).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "deep.png"), deep)
    code = main(
        ["run", str(_image_dir(image_artifacts, "onnx")), str(tmp_path / "deep.png"), "-o", str(tmp_path / "o")]
    )
    err = without_progress(capsys.readouterr().err)
    assert code == EXIT_BAD_INPUT, err
    assert "16-bit" in err and "--io tensor" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("target", ["openvino", "executorch"])
def test_validate_rescores_an_image_artifact_on_8_bit_outputs(
    target: str, image_artifacts: Path, converted_artifacts: Converted, tmp_path: Path
) -> None:
    folder = Path(shutil.copytree(_image_dir(image_artifacts, target), tmp_path / target))
    assert main(["validate", str(folder), "--val-data", str(converted_artifacts.data)]) == 0
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["io"]["inputs"][0]["dtype"] == "uint8" and manifest["runtime"]["io"] == "image"
    v = manifest["validation"]
    assert v["budgets"]["min_within_one_level"] == 0.999 and v["summary"]["within_one_level_share_min"] >= 0.999
    assert v["summary"]["max_abs_error"] <= 1 / 255 + 1e-6  # 8-bit values: at most one level apart here
    assert "uint8" in (folder / "USAGE.md").read_text()
