"""convert / validate end to end: manifest, usage note (its Python runs), budgets, atomic output directories."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from helpers import KODAK, Converted, artifact_dir, require, run_usage_python

from nafnet_edge.cli import main
from nafnet_edge.errors import EXIT_BUDGET, EXIT_USAGE

require("onnxruntime")
require("openvino")


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("NAFNET_EDGE_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def checkpoint(tiny_checkpoint: Path) -> Path:
    """The session's randomized width-8 two-level NAFNet (read-only)."""
    return tiny_checkpoint


@pytest.fixture
def data(kodak_data: Path) -> Path:
    """Two real crops, one larger than the 64 px artifact (tiled), one smaller (padded); read-only."""
    return kodak_data


def convert(checkpoint: Path, out: Path, data: Path, *extra: str) -> int:
    return main(["convert", str(checkpoint), "-o", str(out), "--input-size", "64", "--val-data", str(data), *extra])


@pytest.mark.parametrize("target", ["onnx", "openvino", "executorch"])
def test_convert_writes_artifact_manifest_and_a_usage_note_whose_python_runs(
    target: str, converted_artifacts: Converted, tmp_path: Path
) -> None:
    checkpoint, data = converted_artifacts.checkpoint, converted_artifacts.data  # converted with --input-size 64
    folder = converted_artifacts.dir(target)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["target"] == target and manifest["precision"] == "fp32"
    assert manifest["manifest_version"] == 2
    assert manifest["io"] == {
        "inputs": [
            {
                "name": "image",
                "shape": [1, 3, 64, 64],
                "layout": "NCHW",
                "dtype": "float32",
                "channels": "RGB",
                "range": [0.0, 1.0],
            }
        ],
        "outputs": [
            {
                "name": "restored",
                "shape": [1, 3, 64, 64],
                "layout": "NCHW",
                "dtype": "float32",
                "channels": "RGB",
                "range": None,
                "note": "unclamped; clamp to [0, 1] before quantizing",
            }
        ],
        "scale": 1,
    }
    assert manifest["padding_multiple"] == 4 and manifest["tiling"]["tile"] == [64, 64]
    assert manifest["source"]["sha256"] == __import__("hashlib").sha256(checkpoint.read_bytes()).hexdigest()
    assert "scale_residual_stream" in manifest["deploy"]["passes"]
    assert manifest["tools"]["torch"].startswith("2.13")
    v = manifest["validation"]
    assert v["passed"] and v["summary"]["images"] == 2
    assert v["summary"]["fidelity_db_min"] >= 60.0 and v["summary"]["nonfinite"] == 0
    assert [r["tiles"] for r in v["per_image"]] == [6, 1]  # 96x120: 2x3 tiles of 64 (overlap 32); 50x40: padded
    assert v["per_image"][0]["tiling_db"] is not None  # tiling drift reported apart from precision drift
    assert not [p for p in converted_artifacts.out.iterdir() if p.name.startswith(".")]  # no temporary leftovers
    assert target in converted_artifacts.stdout[target]

    # the usage note's Python, run as written in the artifact directory (a copy) on a real photo
    folder = Path(shutil.copytree(folder, tmp_path / target))
    restored = run_usage_python(folder, data / "crop0.png")
    photo = cv2.imread(str(folder / "photo.png"))
    assert restored.shape == photo.shape == (96, 120, 3)  # the whole photo, larger than the 64x64 tile, not square
    # the snippet tiles and blends as `nafnet-edge run` does through the same artifact (both round to 8 bits)
    assert main(["run", str(folder), str(folder / "photo.png"), "-o", str(tmp_path / "run")]) == 0
    by_run = cv2.imread(str(tmp_path / "run" / "photo.png"))
    assert np.abs(restored.astype(int) - by_run.astype(int)).max() <= 1


def test_missed_budget_exits_3_and_keeps_the_artifact_marked_failed(
    checkpoint: Path, data: Path, tmp_path: Path
) -> None:
    code = convert(checkpoint, tmp_path / "out", data, "--target", "onnx", "--min-fidelity", "400")
    assert code == EXIT_BUDGET
    manifest = json.loads((artifact_dir(tmp_path / "out", "onnx") / "manifest.json").read_text())
    assert not manifest["validation"]["passed"]
    failure = manifest["validation"]["failures"][0]
    assert "fidelity" in failure and "--min-fidelity" in failure
    assert (artifact_dir(tmp_path / "out", "onnx") / "model.onnx").is_file()


def test_validate_reruns_in_the_runtime_and_rewrites_the_manifest(checkpoint: Path, data: Path, tmp_path: Path) -> None:
    assert convert(checkpoint, tmp_path / "out", data, "--target", "onnx", "--no-validate") == 0
    folder = artifact_dir(tmp_path / "out", "onnx")
    assert "validation" not in json.loads((folder / "manifest.json").read_text())
    assert main(["validate", str(folder), "--val-data", str(data)]) == 0  # the checkpoint path is recorded
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["validation"]["passed"] and manifest["runtime"]["runtime"] == "onnxruntime"
    assert main(["validate", str(folder), "--val-data", str(data), "--max-drift", "0", "--min-fidelity", "999"]) == 3


@pytest.mark.slow
def test_default_validation_scores_drift_against_ground_truth(checkpoint: Path, tmp_path: Path) -> None:
    """Without --data: the shipped photos with seeded noise, clean photos as ground truth (task PSNR, SSIM)."""
    assert main(["convert", str(checkpoint), "-o", str(tmp_path / "out"), "--target", "onnx"]) == 0
    manifest = json.loads((artifact_dir(tmp_path / "out", "onnx") / "manifest.json").read_text())
    summary = manifest["validation"]["summary"]
    assert summary["images"] == 4
    assert abs(summary["drift_db_mean"]) < 0.01
    assert 0 < summary["artifact_ssim_mean"] <= 1


def test_a_failing_export_leaves_nothing_and_keeps_the_previous_result(
    checkpoint: Path, data: Path, tmp_path: Path, monkeypatch
) -> None:
    out = tmp_path / "out"
    assert convert(checkpoint, out, data, "--target", "onnx", "--no-validate") == 0
    before = (artifact_dir(out, "onnx") / "manifest.json").read_text()

    from nafnet_edge.converters.onnx import ONNXTarget

    def broken(self, graph, out_dir, options):  # writes part of the artifact, then fails
        (out_dir / "model.onnx").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(ONNXTarget, "export", broken)
    assert convert(checkpoint, out, data, "--target", "onnx", "--force") == 130
    assert (artifact_dir(out, "onnx") / "manifest.json").read_text() == before  # the previous result is untouched
    assert sorted(p.name for p in out.iterdir()) == ["onnx-fp32"]  # and no temporary directory is left


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--target", "onnx", "--input-size", "66"], "multiple of 4"),
        (["--target", "openvino", "--dynamic"], "--dynamic is an option of --target onnx"),
        (["--target", "onnx", "--val-data", "nowhere"], "not a folder"),
    ],
)
def test_bad_options_are_refused_before_anything_is_written(
    extra: list[str], message: str, checkpoint: Path, tmp_path: Path, capsys
) -> None:
    code = main(["convert", str(checkpoint), "-o", str(tmp_path / "out"), *extra])
    assert code in (EXIT_USAGE, 5)
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_reference_outputs_are_cached_by_checkpoint_and_image(checkpoint: Path, data: Path, tmp_path: Path) -> None:
    assert convert(checkpoint, tmp_path / "out", data, "--target", "onnx") == 0
    cached = sorted((tmp_path / "cache" / "reference").glob("*.ref"))
    assert len(cached) == 2
    stamp = [p.stat().st_mtime_ns for p in cached]
    assert convert(checkpoint, tmp_path / "out", data, "--target", "openvino") == 0
    assert [p.stat().st_mtime_ns for p in cached] == stamp  # reused, not recomputed
    # header (32 bytes) + float32 HxWx3 + HMAC (32 bytes) for the 50x40 and the 96x120 crop
    assert sorted(p.stat().st_size for p in cached) == [64 + 4 * 50 * 40 * 3, 64 + 4 * 96 * 120 * 3]


def test_a_damaged_or_unwritable_cache_costs_time_not_correctness(
    checkpoint: Path, data: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    def summary(out: Path) -> dict:
        return json.loads((artifact_dir(out, "onnx") / "manifest.json").read_text())["validation"]["summary"]

    monkeypatch.setattr("nafnet_edge.validation._cache_warned", False)
    assert convert(checkpoint, tmp_path / "a", data, "--target", "onnx") == 0
    cached = sorted((tmp_path / "cache" / "reference").glob("*.ref"))
    sizes = [p.stat().st_size for p in cached]
    cached[0].write_bytes(b"not an entry")  # damaged
    cached[1].write_bytes(cached[1].read_bytes()[: sizes[1] // 2])  # truncated
    assert convert(checkpoint, tmp_path / "b", data, "--target", "onnx") == 0
    assert summary(tmp_path / "b") == summary(tmp_path / "a")  # recomputed, the same verdict
    assert [p.stat().st_size for p in cached] == sizes  # and the cache repaired

    (tmp_path / "afile").write_text("")
    monkeypatch.setenv("NAFNET_EDGE_CACHE", str(tmp_path / "afile" / "cache"))  # cannot be created
    capsys.readouterr()
    assert convert(checkpoint, tmp_path / "c", data, "--target", "onnx") == 0
    assert summary(tmp_path / "c") == summary(tmp_path / "a")
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "reference outputs not cached" in warnings[0]


@pytest.mark.slow
def test_every_target_converts_and_validates_in_its_runtime(checkpoint: Path, tmp_path: Path, capsys) -> None:
    """--target all on a tiny model: each artifact runs in its own runtime (Core ML through the ML-program
    evaluator off Apple platforms) and meets the default budgets; --json gives one object."""
    folder = tmp_path / "one"
    folder.mkdir()
    image = cv2.imread(str(sorted(KODAK.glob("*.png"))[2]))[60:140, 90:170]  # 80x80: 4 tiles of 64
    cv2.imwrite(str(folder / "crop.png"), image)
    code = convert(checkpoint, tmp_path / "out", folder, "--target", "all", "--json")
    report = json.loads(capsys.readouterr().out)
    assert code == 0, report
    got = {a["target"]: a for a in report["artifacts"]}
    assert sorted(got) == ["coreml", "executorch", "executorch-coreml", "litert", "onnx", "openvino"], report["skipped"]
    for target, artifact in got.items():
        assert artifact["passed"] and artifact["validation"]["nonfinite"] == 0, target
        assert all(Path(f).exists() for f in artifact["files"])
        floor = 60.0 if artifact["precision"] == "fp32" else 45.0
        assert artifact["validation"]["fidelity_db_min"] >= floor, (target, artifact["validation"])
    assert got["coreml"]["precision"] == "fp16" and got["openvino"]["runtime"]["inference_precision"] == "f32"
    assert got["executorch"]["runtime"]["runtime"] == "executorch"
    assert got["onnx"]["runtime"]["runtime"] == "onnxruntime"
    if sys.platform != "darwin":
        assert got["coreml"]["runtime"]["runtime"] == "mil-numpy-evaluator"


def test_an_existing_output_is_refused_without_force(checkpoint: Path, data: Path, tmp_path: Path, capsys) -> None:
    assert convert(checkpoint, tmp_path / "out", data, "--target", "onnx", "--no-validate") == 0
    capsys.readouterr()
    assert convert(checkpoint, tmp_path / "out", data, "--target", "onnx", "--no-validate") == EXIT_USAGE
    assert "pass --force" in capsys.readouterr().err
    assert convert(checkpoint, tmp_path / "out", data, "--target", "onnx", "--no-validate", "--force") == 0


def test_a_missing_backend_gives_a_one_line_install_hint(checkpoint: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    from nafnet_edge.converters.onnx import ONNXTarget

    monkeypatch.setattr(ONNXTarget, "modules", ("no_such_runtime_module",))
    assert main(["convert", str(checkpoint), "-o", str(tmp_path / "out"), "--target", "onnx"]) == 4
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'nafnet-edge[onnx]'" in err


def test_an_unknown_target_is_a_usage_error(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["convert", "--target", "tflite"])
    assert e.value.code == EXIT_USAGE and "invalid choice: 'tflite'" in capsys.readouterr().err
