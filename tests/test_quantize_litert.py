"""LiteRT int8: the PTQ file computes its convolutions and multiplies in int8 (read from the LiteRT interpreter's
own operator list), runs in LiteRT's runtime close to the fp32 deploy graph and to PyTorch's quantize/dequantize
simulation; a unit kept float keeps the file's float I/O; image I/O takes and returns pixels; QAT does better than
PTQ in the file the interpreter runs.

One module-scoped PTQ export serves the tests that need an artifact. PSNR uses data range 1.0 (float images in
[0, 1]); the drift budget is measured in the interpreter against the fp32 deploy graph on Kodak regions that
calibration never saw.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from helpers import KODAK, randomize, require

require("litert_torch")
require("ai_edge_litert")

import torch  # noqa: E402
from torchao.quantization.pt2e import allow_exported_model_train_eval  # noqa: E402

from nafnet_edge.converters import get_target  # noqa: E402
from nafnet_edge.converters.base import Exported  # noqa: E402
from nafnet_edge.deploy import DeployNAFNet, deploy  # noqa: E402
from nafnet_edge.deploy.modules import ChannelNorm, DeployBlock  # noqa: E402
from nafnet_edge.images import read_image  # noqa: E402
from nafnet_edge.model import NAFNetConfig, build_model  # noqa: E402
from nafnet_edge.pixels import image_io_module, to_pixels  # noqa: E402
from nafnet_edge.quantization import Quantizer, get_quantizer  # noqa: E402
from nafnet_edge.quantization.litert import LiteRTQuantizer  # noqa: E402
from nafnet_edge.quantization.train import TrainConfig, load_training_images, quantize_graph  # noqa: E402

CFG = NAFNetConfig(width=8, enc_blk_nums=(1, 1), middle_blk_num=1, dec_blk_nums=(1, 1))
SIZE = 32
PHOTOS = sorted(KODAK.glob("*.png"))
MIN_PSNR_VS_FP32_DB = 40.0  # .tflite vs the fp32 deploy graph; measured 47.1-47.9 dB on these crops
MAX_PSNR_VS_FP32_DB = 80.0  # above this the file is not quantized
MIN_PSNR_VS_SIMULATION_DB = 45.0  # .tflite vs PyTorch's quantize/dequantize simulation; measured 49.8-54.3 dB
MIN_PSNR_KEPT_VS_SIMULATION_DB = 55.0  # the same with the ending kept float; measured 63.7-68.0 dB (8.2 dB at most
# when the converter read the input as int8)
MAX_LEVEL_DIFF = 4  # image I/O: 8-bit levels from the simulation's; measured 3 (int8 rounding one step apart)
MAX_LEVELS_OFF = 0.05  # share of output bytes that differ from the simulation's; measured 1.9%


def crop(index: int, top: int, left: int, size: int = SIZE) -> torch.Tensor:
    pixels = read_image(PHOTOS[index]).pixels[top : top + size, left : left + size]
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))[None]


def psnr_db(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    mse = np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2)
    return float(10 * np.log10(1.0 / mse))


def interpreter_ops(path: Path) -> tuple[Counter[tuple[str, str]], list[str], list[str]]:
    """(operator, output type) counts as the LiteRT interpreter lists them before delegation, and the types of the
    file's inputs and outputs."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    dtypes = {t["index"]: np.dtype(t["dtype"]).name for t in interpreter.get_tensor_details()}
    ops = Counter((op["op_name"], dtypes[op["outputs"][0]]) for op in interpreter._get_ops_details())
    inputs = [np.dtype(d["dtype"]).name for d in interpreter.get_input_details()]
    outputs = [np.dtype(d["dtype"]).name for d in interpreter.get_output_details()]
    return ops, inputs, outputs


@dataclass
class Artifact:
    quantizer: LiteRTQuantizer
    graph: DeployNAFNet
    prepared: torch.nn.Module
    simulation: torch.nn.Module  # the calibrated graph in quantize/dequantize form, run by PyTorch
    exported: Exported
    out_dir: Path
    calibration: list[torch.Tensor]
    held_out: list[torch.Tensor]


def calibrated(quantizer: Quantizer, graph: DeployNAFNet, calibration: list[torch.Tensor]) -> torch.nn.Module:
    prepared = quantizer.prepare(graph, calibration[0], qat=False, calibration=calibration)
    with torch.no_grad():  # what the shared loop does: one pass over all calibration crops
        prepared(torch.cat(calibration))
    return prepared


@pytest.fixture(scope="module")
def graph() -> DeployNAFNet:
    return deploy(randomize(build_model(CFG)), norm_form=LiteRTQuantizer().norm_form, input_size=(SIZE, SIZE))


@pytest.fixture(scope="module")
def artifact(graph: DeployNAFNet, tmp_path_factory: pytest.TempPathFactory) -> Artifact:
    quantizer = get_quantizer("litert")
    assert isinstance(quantizer, LiteRTQuantizer)
    quantizer.check_available()
    calibration = [crop(i, 100, 50) for i in range(len(PHOTOS))]
    prepared = calibrated(quantizer, graph, calibration)
    out_dir = tmp_path_factory.mktemp("litert-int8")
    exported = quantizer.export(prepared, out_dir, calibration[0])
    held_out = [crop(i, 300, 300) for i in range(len(PHOTOS))]  # regions calibration never saw
    simulation = quantizer.convert(prepared)
    return Artifact(quantizer, graph, prepared, simulation, exported, out_dir, calibration, held_out)


def test_convolutions_and_multiplies_are_int8_in_the_file(artifact: Artifact) -> None:
    ops, inputs, outputs = interpreter_ops(artifact.out_dir / "model.tflite")
    modules = list(artifact.graph.modules())
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in modules)
    blocks = sum(isinstance(m, DeployBlock) for m in modules)
    assert ops[("CONV_2D", "int8")] + ops[("DEPTHWISE_CONV_2D", "int8")] == convs  # every convolution
    assert ops[("CONV_2D", "float32")] == ops[("DEPTHWISE_CONV_2D", "float32")] == 0
    assert ops[("MUL", "int8")] == 3 * blocks  # both SimpleGates and the channel attention of each block
    assert ops[("MEAN", "int8")] == blocks  # the attention pooling; the norms' channel means stay float
    norms = sum(isinstance(m, ChannelNorm) for m in modules)
    assert ops[("SQRT", "float32")] == ops[("DIV", "float32")] == norms  # the norms stay float
    upsamplings = sum(isinstance(m, torch.nn.ConvTranspose2d) for m in modules)
    assert ops[("TRANSPOSE_CONV", "float32")] == upsamplings  # no transposed-conv pattern in the quantizer
    assert inputs == outputs == ["float32"]  # tensor I/O stays float

    info = artifact.exported.info
    assert info["quantization_method"] == "ptq" and "per-channel" in info["quantization_scheme"]
    summary = {(op, "int8"): n for op, n in info["int8_ops"].items()}
    summary |= {(op, "float32"): n for op, n in info["fp32_ops"].items()}
    conversions = {k: n for k, n in ops.items() if k[0] in ("QUANTIZE", "DEQUANTIZE")}
    assert summary == {k: n for k, n in ops.items() if k not in conversions}  # the export's summary is the file's
    assert info["int8_fp32_conversions"] == sum(conversions.values())
    assert info["file_bytes"] == (artifact.out_dir / "model.tflite").stat().st_size
    assert info["gpu_delegate"]["nodes"] == sum(ops.values())


def test_tflite_runs_in_litert_within_the_budget_of_the_fp32_graph_and_its_simulation(artifact: Artifact) -> None:
    runner = get_target("litert").load_runner(artifact.out_dir, export=artifact.exported.info)
    assert runner.runtime == "litert" and runner.info["compute"].startswith("int8")
    for x in artifact.held_out:
        y = runner.run(x.numpy())
        assert y.shape == tuple(x.shape) and y.dtype == np.float32 and np.isfinite(y).all()
        with torch.no_grad():
            reference, expected = artifact.graph(x).numpy(), artifact.simulation(x).numpy()
        assert MIN_PSNR_VS_FP32_DB < psnr_db(y, reference) < MAX_PSNR_VS_FP32_DB
        assert psnr_db(y, expected) > MIN_PSNR_VS_SIMULATION_DB


def test_a_unit_kept_float_keeps_float_io_and_the_exact_input_in_the_residual(
    artifact: Artifact, tmp_path: Path
) -> None:
    """Keeping ``ending`` float leaves the input consumed by a quantize and a float add; the converter's default
    mode then read the input as int8 (8 dB against its simulation). The file keeps float I/O and computes as
    simulated."""
    quantizer = get_quantizer("litert", keep_float=["ending"])
    prepared = calibrated(quantizer, artifact.graph, artifact.calibration)
    exported = quantizer.export(prepared, tmp_path, artifact.calibration[0])
    ops, inputs, outputs = interpreter_ops(tmp_path / "model.tflite")
    assert inputs == outputs == ["float32"]
    assert ops[("CONV_2D", "float32")] == 1 and exported.info["kept_float"] == ["ending"]
    simulation = quantizer.convert(prepared)
    runner = get_target("litert").load_runner(tmp_path, export=exported.info)
    for x in artifact.held_out:
        with torch.no_grad():
            expected = simulation(x).numpy()
        assert psnr_db(runner.run(x.numpy()), expected) > MIN_PSNR_KEPT_VS_SIMULATION_DB


def test_image_io_takes_and_returns_pixels_with_the_input_on_the_pixel_grid(artifact: Artifact, tmp_path: Path) -> None:
    exported = artifact.quantizer.export(artifact.prepared, tmp_path, artifact.calibration[0], pixel_format="rgb")
    assert "exactly pixel - 128" in exported.info["input_quantization"]
    _, inputs, outputs = interpreter_ops(tmp_path / "model.tflite")
    assert inputs == outputs == ["uint8"]
    assert exported.info["op_histogram"]["ROUND"] == 1 and exported.info["gpu_delegate"]["float16_overflow"] == {}
    converted = artifact.quantizer.convert(artifact.prepared)
    allow_exported_model_train_eval(converted)  # the image-I/O wrapper switches it to eval
    simulation = image_io_module(converted, "rgb")
    session = get_target("litert").load_runner(tmp_path, export=exported.info)
    assert session.native is not None
    for x in artifact.held_out:
        pixels = to_pixels(x.numpy(), "rgb")
        assert pixels.shape == (1, SIZE, SIZE, 3)
        y = session.native(pixels).astype(int)
        with torch.no_grad():
            expected = simulation(torch.from_numpy(pixels)).numpy().astype(int)
        assert np.abs(y - expected).max() <= MAX_LEVEL_DIFF
        assert np.mean(y != expected) < MAX_LEVELS_OFF


QAT_GAIN_DB = 0.5  # measured: PTQ .tflite 47.33 dB, QAT (60 steps) .tflite 48.70 dB against fp32 on these crops


@pytest.mark.slow
def test_qat_file_is_closer_to_fp32_than_the_ptq_file(tmp_path: Path) -> None:
    """Same graph, same seed, same calibration crops: fine-tuning must pay off in the file LiteRT runs."""
    size = 64
    graph = deploy(randomize(build_model(CFG)), norm_form=LiteRTQuantizer().norm_form, input_size=(size, size))
    images = load_training_images(KODAK, size)
    evaluation = [crop(i, t, x, size) for i in range(len(PHOTOS)) for t, x in ((300, 300), (50, 400))]
    quantizer = get_quantizer("litert")
    fidelity = {}
    for method in ("ptq", "qat"):
        prepared, _ = quantize_graph(
            quantizer, graph, images, size, TrainConfig(method=method, iters=60), progress=False
        )
        out = tmp_path / method
        out.mkdir()
        exported = quantizer.export(prepared, out, evaluation[0])
        runner = get_target("litert").load_runner(out, export=exported.info)
        with torch.no_grad():
            fidelity[method] = np.mean([psnr_db(runner.run(x.numpy()), graph(x)) for x in evaluation])
    assert fidelity["qat"] > fidelity["ptq"] + QAT_GAIN_DB, fidelity
