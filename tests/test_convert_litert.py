"""LiteRT converter: the .tflite runs in LiteRT's runtime like the PyTorch deploy graph (fp32, float16 weights with
half-precision arithmetic, 8-bit image I/O), names its I/O as the manifest does, counts what the GPU delegate would
take, and convert exports, validates and describes it."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY_CONFIG, randomize, require, run_usage_python

require("litert_torch")
require("ai_edge_litert")

from nafnet_edge.cli import main  # noqa: E402
from nafnet_edge.converters import Exported, ExportOptions, SessionSettings, get_target  # noqa: E402
from nafnet_edge.converters.litert import convert_to_tflite, float16_weights, gpu_delegate_readiness  # noqa: E402
from nafnet_edge.deploy import DeployNAFNet, deploy  # noqa: E402
from nafnet_edge.model import NAFNet, NAFNetConfig, build_model  # noqa: E402
from nafnet_edge.pixels import image_io_module, level_agreement  # noqa: E402

SIZE = (64, 96)
MAX_ABS_ERR_FP32 = 2e-6  # the interpreter (XNNPACK) vs PyTorch; measured 6e-7 on the width-16 model
MAX_ABS_ERR_FP16 = 2e-2  # float16 weights and half-precision arithmetic; measured 1.7e-3 on the tiny model
FP16_ARITHMETIC = 1e-4  # half-precision arithmetic moves the output at least this far from float32 arithmetic


@pytest.fixture(scope="module")
def model() -> NAFNet:
    return randomize(NAFNet(TINY_CONFIG))


@pytest.fixture(scope="module")
def graph(model: NAFNet) -> DeployNAFNet:
    target = get_target("litert")
    return deploy(model, norm_form=target.norm_form, input_size=SIZE)


@pytest.fixture(scope="module")
def exported(graph: DeployNAFNet, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Exported]]:
    """One export per precision and I/O: (artifact directory, Exported)."""
    target = get_target("litert")
    target.check_available()
    out = {}
    for key, precision, fmt in [("fp32", "fp32", None), ("fp16", "fp16", None), ("rgba", "fp32", "rgba")]:
        folder = tmp_path_factory.mktemp(f"litert-{key}")
        options = ExportOptions(input_size=SIZE, precision=precision, pixel_format=fmt)
        out[key] = folder, target.export(graph, folder, options)
    return out


def reference(module: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module(torch.from_numpy(x)).numpy()


def interpreter(folder: Path):
    from ai_edge_litert.interpreter import Interpreter

    return Interpreter(model_path=str(folder / "model.tflite"))


@pytest.mark.parametrize(("precision", "bound"), [("fp32", MAX_ABS_ERR_FP32), ("fp16", MAX_ABS_ERR_FP16)])
def test_export_runs_in_litert_like_pytorch(exported, graph, model, precision, bound) -> None:
    folder, result = exported[precision]
    assert result.files == ["model.tflite"] and (folder / "model.tflite").is_file()
    info = result.info
    assert info["io"] == "tensor" and info["file_bytes"] == (folder / "model.tflite").stat().st_size
    ops = info["op_histogram"]
    assert ops["CONV_2D"] > 0 and ops["TRANSPOSE"] == 2 and "DELEGATE" not in ops  # NCHW kept at the two ends
    session = get_target("litert").open_session(folder, export=info, settings=SessionSettings(threads=1))
    assert session.runtime == "litert" and session.info["compute"] == precision and session.profile is None
    if precision == "fp32":
        assert session.info["api"] == "Interpreter" and session.info["xnnpack_partitions"] == 1  # one XNNPACK graph
    rng = np.random.default_rng(0)
    for _ in range(2):
        x = rng.random((1, TINY_CONFIG.img_channels, *SIZE), dtype=np.float32)
        y = session.run(x)
        assert y.dtype == np.float32 and y.shape == x.shape
        assert float(np.abs(y - reference(graph, x)).max()) <= bound
        assert float(np.abs(y - reference(model, x)).max()) <= bound


def test_fp16_computes_in_half_precision_where_the_cpu_can(exported) -> None:
    """The fp16 session's output differs from the same file computed in float32 by the interpreter (its weights
    dequantized at load) by what half-precision arithmetic costs, and says so."""
    folder, result = exported["fp16"]
    session = get_target("litert").open_session(folder, export=result.info, settings=SessionSettings(threads=1))
    assert session.info["api"] == "CompiledModel" and session.info["xnnpack_flags"] == "FORCE_FP16"
    assert session.info["compute"] == "fp16" and session.info["fp16_arithmetic"]
    x = np.random.default_rng(1).random((1, TINY_CONFIG.img_channels, *SIZE), dtype=np.float32)
    fp32 = interpreter(folder).get_signature_runner()(image=x)["restored"]
    assert float(np.abs(session.run(x) - fp32).max()) >= FP16_ARITHMETIC


def test_fp16_stores_float16_weights(exported, model) -> None:
    fp32, fp16 = exported["fp32"][1].info, exported["fp16"][1].info
    conv_weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert fp32["weights"] == "float32" and fp16["weights"] == "float16"
    assert "DEQUANTIZE" not in fp32["op_histogram"] and fp16["op_histogram"]["DEQUANTIZE"] > 0
    assert {k: v for k, v in fp16["op_histogram"].items() if k != "DEQUANTIZE"} == fp32["op_histogram"]
    # two bytes saved per convolution weight, less the DEQUANTIZE operators' overhead (measured 26336 of 37280)
    assert fp32["file_bytes"] - fp16["file_bytes"] >= conv_weights


@pytest.mark.parametrize("key", ["fp32", "rgba"])
def test_the_file_names_its_input_image_and_its_output_restored(exported, key) -> None:
    folder, result = exported[key]
    it = interpreter(folder)
    assert it.get_signature_list() == {"serving_default": {"inputs": ["image"], "outputs": ["restored"]}}
    assert result.info["signature"] == "serving_default"
    assert "image" in it.get_input_details()[0]["name"] and "restored" in it.get_output_details()[0]["name"]


def test_image_io_takes_and_returns_the_same_pixels_as_pytorch(exported, graph) -> None:
    folder, result = exported["rgba"]
    assert result.info["io"] == "image" and result.info["pixel_format"] == "rgba"
    assert "TRANSPOSE" not in result.info["op_histogram"]  # NHWC pixels in and out: no layout change at the ends
    session = get_target("litert").open_session(folder, export=result.info)
    assert session.info["io"] == "image" and session.native is not None
    pixels = np.random.default_rng(2).integers(0, 256, size=(1, *SIZE, 4), dtype=np.uint8)
    got = session.call(pixels)
    assert got.dtype == np.uint8 and got.shape == pixels.shape
    np.testing.assert_array_equal(got, reference(image_io_module(graph, "rgba"), pixels))
    with pytest.raises(ValueError, match="takes uint8 pixels, got float32"):
        session.call(pixels.astype(np.float32))
    with pytest.raises(ValueError, match=r"takes input \(1, 64, 96, 4\), got \(1, 64, 64, 4\): zero-pad"):
        session.call(pixels[:, :, :64])


@pytest.mark.parametrize(("fmt", "channels"), [("bgr", 3), ("gray", 1)])
def test_every_pixel_format_matches_pytorch(fmt, channels, tmp_path) -> None:
    config = NAFNetConfig(width=8, enc_blk_nums=(1, 1), middle_blk_num=1, dec_blk_nums=(1, 1), img_channels=channels)
    graph = deploy(randomize(NAFNet(config)), norm_form="mvn", input_size=SIZE)
    result = get_target("litert").export(graph, tmp_path, ExportOptions(input_size=SIZE, pixel_format=fmt))
    session = get_target("litert").open_session(tmp_path, export=result.info)
    pixels = np.random.default_rng(3).integers(0, 256, size=(1, *SIZE, len(fmt) if fmt != "gray" else 1))
    pixels = pixels.astype(np.uint8)
    np.testing.assert_array_equal(session.call(pixels), reference(image_io_module(graph, fmt), pixels))


def test_fp16_image_io_rounds_within_float16_and_computes_in_fp16(graph, tmp_path) -> None:
    """The pixel rounding is a ROUND (0..255 stays within float16), so the fp16 image-I/O file runs in half
    precision, within one 8-bit level of the fp32 pixels."""
    target = get_target("litert")
    result = target.export(graph, tmp_path, ExportOptions(input_size=SIZE, precision="fp16", pixel_format="bgr"))
    assert result.info["gpu_delegate"]["float16_overflow"] == {} and result.info["op_histogram"]["ROUND"] == 1
    session = target.open_session(tmp_path, export=result.info)
    assert session.info["compute"] == "fp16" and "fp16_unavailable" not in session.info
    x = np.random.default_rng(4).random((1, 3, *SIZE), dtype=np.float32)
    agreement = level_agreement(session.run(x), reference(graph, x))
    assert agreement["within_one_level_share"] >= 0.999 and agreement["max_level_diff"] <= 1


def test_tlc_local_pooling_is_one_xnnpack_graph_the_gpu_delegate_takes(tmp_path) -> None:
    """TLC pools locally at this size (kernels 48x36 .. 12x9 < the feature maps): average pools, pads, transposes
    and fully connected ops, all in one XNNPACK graph and on the GPU delegate's list."""
    target = get_target("litert")
    model = randomize(build_model(TINY_CONFIG.replace(arch="nafnet-local", train_size=(32, 24))), seed=4)
    graph = deploy(model, norm_form=target.norm_form, input_size=SIZE)
    assert graph.recipe.local_pooling[0] == (48, 36)
    info = target.export(graph, tmp_path, ExportOptions(input_size=SIZE, precision="fp32")).info
    assert info["op_histogram"]["AVERAGE_POOL_2D"] == 2 * len(graph.recipe.local_pooling)  # separable
    assert info["gpu_delegate"]["rejected"] == {}
    session = target.open_session(tmp_path, export=info, settings=SessionSettings(threads=1))
    assert session.info["xnnpack_partitions"] == 1
    x = np.random.default_rng(5).random((1, 3, *SIZE), dtype=np.float32)
    assert np.abs(session.run(x) - reference(model, x)).max() <= MAX_ABS_ERR_FP32


def test_a_constant_beyond_float16_is_flagged_and_computed_in_float32(graph, tmp_path) -> None:
    """A file whose arithmetic needs float32 (the 2**23 rounding trick): readiness names the operators, and the
    session computes the fp16 file in float32 (dequantized weights) and says why."""
    target = get_target("litert")
    path = tmp_path / target.artifact
    convert_to_tflite(image_io_module(graph, "bgr").eval(), torch.zeros(1, *SIZE, 3, dtype=torch.uint8), path)
    float16_weights(path)
    readiness = gpu_delegate_readiness(path)
    assert readiness["float16_overflow"] == {"ADD": 1, "SUB": 1}
    export = {"weights": "float16", "io": "image", "pixel_format": "bgr", "gpu_delegate": readiness}
    session = target.open_session(tmp_path, export=export)
    assert session.info["compute"].startswith("fp32") and "float16" in session.info["fp16_unavailable"]
    x = np.random.default_rng(4).random((1, 3, *SIZE), dtype=np.float32)
    agreement = level_agreement(session.run(x), reference(graph, x))
    assert agreement["within_one_level_share"] >= 0.999 and agreement["max_level_diff"] <= 1


def test_the_gpu_delegate_takes_every_operator_of_the_float_graph(exported) -> None:
    for key in ("fp32", "fp16"):
        info = exported[key][1].info
        gpu = info["gpu_delegate"]
        assert gpu["nodes"] == sum(info["op_histogram"].values())  # every operator of the file, DEQUANTIZE included
        assert gpu["accepted"] == gpu["nodes"] and gpu["rejected"] == {} and gpu["float16_overflow"] == {}
        assert get_target("litert").export_summary(info) == f"{gpu['nodes']}/{gpu['nodes']} on GPU"


def test_the_gpu_delegate_leaves_the_uint8_casts_and_unlisted_operators_to_the_cpu(exported) -> None:
    folder, result = exported["rgba"]
    gpu = result.info["gpu_delegate"]
    it = interpreter(folder)
    dtypes = {t["index"]: np.dtype(t["dtype"]) for t in it.get_tensor_details()}
    uint8_ops = Counter(
        op["op_name"]
        for op in it._get_ops_details()
        if any(dtypes[i] == np.uint8 for i in [*op["inputs"], *op["outputs"]] if i >= 0)
    )
    assert uint8_ops == {"CAST": 2}  # the pixel conversions at the two ends
    assert gpu["rejected"] == {"CAST": 2, "RELU_0_TO_1": 1, "ROUND": 1} and gpu["accepted"] == gpu["nodes"] - 4
    assert "uint8 -> float32" in gpu["reasons"]["CAST"] and "operator list" in gpu["reasons"]["RELU_0_TO_1"]
    assert "operator list" in gpu["reasons"]["ROUND"]


def test_the_gpu_delegate_refuses_tensors_of_more_than_four_dimensions(tmp_path) -> None:
    """A small module that goes through a 5-D tensor: exactly the operators touching a 5-D tensor (counted here from
    the interpreter's own tensor details) are rejected, with the reason."""

    class FiveD(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.sqrt(x + 1.0)
            return (y.reshape(1, 2, 2, 4, 4) * 2.0).reshape(1, 4, 4, 4) - 1.0

    path = tmp_path / "model.tflite"
    convert_to_tflite(FiveD().eval(), torch.rand(1, 4, 4, 4), path)
    gpu = gpu_delegate_readiness(path)
    it = interpreter(tmp_path)
    ranks = {t["index"]: len(t["shape"]) for t in it.get_tensor_details()}
    ops = it._get_ops_details()
    five_d = Counter(op["op_name"] for op in ops if any(ranks[i] > 4 for i in [*op["inputs"], *op["outputs"]]))
    assert sum(five_d.values()) >= 2 and gpu["nodes"] == len(ops)
    assert gpu["rejected"] == dict(five_d) and gpu["accepted"] == gpu["nodes"] - sum(five_d.values())
    assert all(reason.startswith("5-D tensor") for reason in gpu["reasons"].values())


def test_refuses_int8(graph, tmp_path) -> None:
    with pytest.raises(ValueError, match="supports precision fp32, fp16, not int8"):
        get_target("litert").export(graph, tmp_path, ExportOptions(input_size=SIZE, precision="int8"))


def test_convert_validates_and_describes_the_artifact(tiny_checkpoint, kodak_data, tmp_path, monkeypatch) -> None:
    from nafnet_edge.api import convert

    monkeypatch.setenv("NAFNET_EDGE_CACHE", str(tmp_path / "cache"))
    result = convert(tiny_checkpoint, target="litert", output=tmp_path / "out", input_size=64, val_data=kodak_data)
    assert result.passed and result.directory.name == "litert-fp32"
    assert result.validation is not None
    summary = result.validation.summary
    assert summary["fidelity_db_min"] >= 60.0 and summary["nonfinite"] == 0
    manifest = json.loads((result.directory / "manifest.json").read_text())
    assert manifest["target"] == "litert" and manifest["files"] == ["model.tflite", "NafnetTiler.kt"]
    assert manifest["export"]["op_histogram"]["CONV_2D"] > 0
    assert manifest["runtime"]["compute"] == "fp32" and manifest["export"]["gpu_delegate"]["rejected"] == {}
    note = (result.directory / "USAGE.md").read_text()
    assert 'Interpreter(model_path="model.tflite"' in note and "CompiledModel" in note and "not compiled" in note
    assert (result.directory / "NafnetTiler.kt").is_file()


def test_image_io_convert_validates_and_its_usage_python_runs(tiny_checkpoint, kodak_data, tmp_path, monkeypatch):
    monkeypatch.setenv("NAFNET_EDGE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    args = ["convert", str(tiny_checkpoint), "--target", "litert", "-o", str(out), "--input-size", "64"]
    assert main([*args, "--io", "image", "--val-data", str(kodak_data)]) == 0
    folder = out / "litert-fp32-image"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["export"]["pixel_format"] == "rgba" and manifest["validation"]["passed"]
    assert manifest["validation"]["summary"]["within_one_level_share_min"] >= 0.999
    note = (folder / "USAGE.md").read_text()
    assert "writeInt8(pixels)" in note and "NafnetPixelTiler" in note
    copy = Path(shutil.copytree(folder, tmp_path / "copy"))
    restored = run_usage_python(copy, kodak_data / "crop0.png")
    assert main(["run", str(copy), str(copy / "photo.png"), "-o", str(tmp_path / "run")]) == 0
    import cv2

    by_run = cv2.imread(str(tmp_path / "run" / "photo.png"))
    assert restored.shape == by_run.shape and np.abs(restored.astype(int) - by_run.astype(int)).max() <= 1


def test_shared_artifact_usage_python_runs_like_nafnet_edge_run(converted_artifacts, tmp_path) -> None:
    """The convert CLI's LiteRT artifact (the session's shared one): its USAGE.md Python, run as written on a real
    photo, tiles and blends as `nafnet-edge run` does through the same file."""
    import cv2

    folder = Path(shutil.copytree(converted_artifacts.dir("litert"), tmp_path / "litert"))
    assert "litert" in converted_artifacts.stdout["litert"]
    restored = run_usage_python(folder, converted_artifacts.data / "crop0.png")
    assert restored.shape == cv2.imread(str(folder / "photo.png")).shape == (96, 120, 3)
    assert main(["run", str(folder), str(folder / "photo.png"), "-o", str(tmp_path / "run")]) == 0
    by_run = cv2.imread(str(tmp_path / "run" / "photo.png"))
    assert np.abs(restored.astype(int) - by_run.astype(int)).max() <= 1
