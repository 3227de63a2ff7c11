"""Core ML int8 (nafnet_edge.quantization.coreml): the W8A8 and weight-only ML programs of a tiny deploy graph,
what they hold, and their outputs through ``CoreMLTarget``'s runner (Core ML on macOS; elsewhere the saved
program evaluated op by op in numpy, fp16 as declared) against the fp32 deploy graph; QAT gradients; the
quantize command end to end.

Width-8 model with randomized weights, calibrated on Kodak crops and evaluated on other regions of the same
photos. PSNR uses data range 1.0 (float images in [0, 1]).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import cv2
import numpy as np
import pytest
from helpers import artifact_dir, require

require("coremltools")
require("executorch")
require("torchao")

import torch  # noqa: E402
from helpers import randomize  # noqa: E402

from nafnet_edge.cli import main  # noqa: E402
from nafnet_edge.converters.base import Exported  # noqa: E402
from nafnet_edge.converters.coreml import CoreMLTarget  # noqa: E402
from nafnet_edge.converters.coreml_mil import MilProgram, load_program  # noqa: E402
from nafnet_edge.deploy import DeployNAFNet, deploy  # noqa: E402
from nafnet_edge.errors import EXIT_USAGE  # noqa: E402
from nafnet_edge.images import read_image  # noqa: E402
from nafnet_edge.model import NAFNetConfig, build_model  # noqa: E402
from nafnet_edge.quantization import get_quantizer  # noqa: E402
from nafnet_edge.quantization.coreml import CoreMLQuantizer  # noqa: E402

KODAK_DIR = Path(str(resources.files("nafnet_edge") / "data" / "kodak"))
KODAK = sorted(KODAK_DIR.glob("*.png"))
CFG = NAFNetConfig(width=8, enc_blk_nums=(1, 1), middle_blk_num=1, dec_blk_nums=(1, 1))
SIZE = (64, 64)
MIN_PSNR_W8A8_DB = 42.0  # W8A8 PTQ program vs the fp32 deploy graph; measured 44.9-45.5 dB on these crops
MIN_PSNR_W8A8_VS_SIMULATION_DB = 42.0  # vs PyTorch's quantize/dequantize simulation (fp32); measured 44.5-44.8 dB
MIN_PSNR_QAT_VS_CONVERSION_DB = 60.0  # frozen QAT fake quantizers vs their quantize/dequantize form; measured identical
MIN_PSNR_WEIGHTS_DB = 48.0  # weight-only int8 vs fp32; measured 50.7-51.8 dB (fp16 programs alone: 68-70 dB)


def crop(index: int, top: int, left: int) -> torch.Tensor:
    pixels = read_image(KODAK[index]).pixels[top : top + SIZE[0], left : left + SIZE[1]]
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))[None]


def psnr_db(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    mse = np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2)
    return float(10 * np.log10(1.0 / mse))


@dataclass
class Artifact:
    prepared: torch.nn.Module
    exported: Exported
    out_dir: Path
    program: MilProgram

    def run(self, x: torch.Tensor) -> np.ndarray:
        runner = CoreMLTarget().load_runner(self.out_dir, export=self.exported.info)
        return runner.run(x.numpy())


@pytest.fixture(scope="module")
def graph() -> DeployNAFNet:
    return deploy(randomize(build_model(CFG)), norm_form="layer-norm", input_size=SIZE)


@pytest.fixture(scope="module")
def calibration() -> list[torch.Tensor]:
    return [crop(i, 100, 50) for i in range(len(KODAK))]


@pytest.fixture(scope="module")
def held_out() -> list[torch.Tensor]:
    return [crop(i, 300, 300) for i in range(len(KODAK))]  # regions calibration never saw


def _ptq(quantizer: CoreMLQuantizer, graph, calibration, out_dir: Path) -> Artifact:
    prepared = quantizer.prepare(graph, calibration[0], qat=False, calibration=calibration)
    with torch.no_grad():  # what the shared loop does: one pass over all calibration crops
        prepared(torch.cat(calibration))
    exported = quantizer.export(prepared, out_dir, calibration[0])
    return Artifact(prepared, exported, out_dir, load_program(out_dir / "model.mlpackage"))


@pytest.fixture(scope="module")
def w8a8(graph, calibration, tmp_path_factory: pytest.TempPathFactory) -> Artifact:
    quantizer = get_quantizer("coreml")
    assert isinstance(quantizer, CoreMLQuantizer) and quantizer.mode == "w8a8"
    return _ptq(quantizer, graph, calibration, tmp_path_factory.mktemp("coreml-w8a8"))


@pytest.fixture(scope="module")
def weights(graph, calibration, tmp_path_factory: pytest.TempPathFactory) -> Artifact:
    quantizer = get_quantizer("coreml", mode="weights")
    return _ptq(quantizer, graph, calibration, tmp_path_factory.mktemp("coreml-weights"))  # type: ignore[arg-type]


def _int8_weight_data(program: MilProgram) -> list[np.ndarray]:
    ops = [op for op in program.ops if op.type == "constexpr_affine_dequantize"]
    return [program.consts[op.inputs["quantized_data"]] for op in ops]  # type: ignore[index]


def test_w8a8_program_holds_int8_weights_and_activation_quantizers(w8a8: Artifact) -> None:
    program, info = w8a8.program, w8a8.exported.info
    assert w8a8.exported.files == ["model.mlpackage"]
    assert info["quantization_mode"] == "w8a8" and info["quantization_method"] == "ptq"
    assert info["compute_precision"] == "fp16" and info["minimum_target"] == "iOS17"
    assert not any(p.requires_grad for p in w8a8.prepared.parameters())  # PTQ trains nothing
    # 5 blocks of 9 convs, intro, ending, 2 downsamplings: 49 int8 weights; the 2 upsamplings have no pattern
    assert len(data := _int8_weight_data(program)) == 49 and all(d.dtype == np.int8 for d in data)
    assert info["int8_weights"] == 49 and info["float_weights"] == 2
    quantizers = [op for op in program.ops if op.type == "quantize"]
    assert len(quantizers) == info["activation_quantizers"] == 94
    assert {op.dtypes[0] for op in quantizers} == {np.dtype(np.int8)}
    zero_points = [op for op in program.ops if op.type in ("quantize", "dequantize") and "zero_point" in op.inputs]
    assert not zero_points  # symmetric: zero point 0, which the program leaves out
    assert info["mil_ops"] == {
        "add": 13,
        "cast": 2,  # float32 I/O around the fp16 program
        "constexpr_affine_dequantize": 49,
        "conv": 49,
        "conv_transpose": 2,
        "dequantize": 106,
        "layer_norm": 10,
        "mul": 15,
        "quantize": 94,
        "reduce_mean": 5,
        "transpose": 20,
    }
    # between int8 tensors: every conv, the adds but the global residual, SimpleGate and attention multiplies
    assert info["int8_ops"] == {"add": 12, "conv": 49, "mul": 15, "reduce_mean": 5}
    assert info["fp16_ops"] == {"add": 1, "conv_transpose": 2, "layer_norm": 10, "transpose": 20}


def test_w8a8_runs_in_the_coreml_runner_close_to_the_fp32_graph(w8a8: Artifact, graph, held_out) -> None:
    for x in held_out:
        y = w8a8.run(x)
        assert y.shape == tuple(x.shape) and y.dtype == np.float32 and np.isfinite(y).all()
        with torch.no_grad():
            reference = graph(x).numpy()
        assert MIN_PSNR_W8A8_DB < psnr_db(y, reference) < 60.0  # quantized, not an fp16 program (68-70 dB)


def test_w8a8_program_computes_the_quantize_dequantize_simulation(w8a8: Artifact, held_out) -> None:
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    simulation = convert_pt2e(copy.deepcopy(w8a8.prepared))
    for x in held_out[:2]:
        with torch.no_grad():
            expected = simulation(x).numpy()
        assert psnr_db(w8a8.run(x), expected) > MIN_PSNR_W8A8_VS_SIMULATION_DB


def test_weight_only_program_stores_every_weight_int8(weights: Artifact, graph, held_out) -> None:
    info = weights.exported.info
    assert info["quantization_mode"] == "weights" and info["quantization_method"] == "ptq"
    assert len(data := _int8_weight_data(weights.program)) == 51 and all(d.dtype == np.int8 for d in data)
    assert info["int8_weights"] == 51 and info["float_weights"] == 0  # the upsamplings' weights too
    assert info["activation_quantizers"] == 0 and "dequantize" not in info["mil_ops"]
    for x in held_out:
        with torch.no_grad():
            reference = graph(x).numpy()
        assert MIN_PSNR_WEIGHTS_DB < psnr_db(weights.run(x), reference) < 60.0


def test_weight_only_refuses_qat(graph, calibration) -> None:
    with pytest.raises(ValueError, match="post-training only"):
        CoreMLQuantizer(mode="weights").prepare(graph, calibration[0], qat=True)
    with pytest.raises(ValueError, match="w8a8"):
        CoreMLQuantizer(mode="int4")  # type: ignore[arg-type]


def test_qat_prepared_module_trains_every_weight_and_converts_as_trained(graph, calibration) -> None:
    """What every quantizer does (a trained copy, frozen ranges) is in test_quantizer_contract.py."""
    quantizer = CoreMLQuantizer()
    prepared = quantizer.prepare(graph, calibration[0], qat=True, calibration=calibration[:2])
    x = calibration[2]
    quantizer.set_training(prepared, True)
    with torch.no_grad():
        target = graph(x)
    torch.nn.functional.mse_loss(prepared(x), target).backward()
    params = dict(prepared.named_parameters())
    assert params.keys() == dict(graph.named_parameters()).keys()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params.values())
    torch.optim.SGD(prepared.parameters(), lr=0.1).step()
    quantizer.freeze_observers(prepared)

    # what QAT trains is what gets exported: the conversion keeps the fake quantizers' scales
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    quantizer.set_training(prepared, False)
    simulation = convert_pt2e(copy.deepcopy(prepared).requires_grad_(False))
    with torch.no_grad():
        assert psnr_db(simulation(x), prepared(x)) > MIN_PSNR_QAT_VS_CONVERSION_DB


def _quantize_tiny(tmp_path: Path, *options: str) -> int:
    """``nafnet-edge quantize`` of a tiny random model for Core ML into tmp_path/out, validated on one crop."""
    path = tmp_path / "tiny.pth"
    torch.save({"params": randomize(build_model(CFG)).state_dict()}, path)
    val = tmp_path / "val"
    val.mkdir()
    cv2.imwrite(str(val / "crop.png"), cv2.imread(str(KODAK[1]))[200:264, 100:164])
    argv = ["quantize", str(path), "--target", "coreml", "--train-data", str(KODAK_DIR), "-o", str(tmp_path / "out")]
    return main([*argv, "--input-size", "64", "--val-data", str(val), "--json", *options])


def test_quantize_command_writes_a_validated_coreml_int8_artifact(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    code = _quantize_tiny(tmp_path, "--method", "ptq", "--min-fidelity", "30")
    report = json.loads(capsys.readouterr().out)
    assert code == 0, report
    manifest = json.loads((artifact_dir(out, "coreml", "int8") / "manifest.json").read_text())
    assert manifest["precision"] == "int8" and manifest["quantization"]["method"] == "ptq"
    assert manifest["export"]["quantization_mode"] == "w8a8" and "W8A8" in manifest["export"]["quantization_scheme"]
    assert manifest["export"]["int8_weights"] == 49
    assert manifest["runtime"]["compute_precision"] == "fp16"
    summary = manifest["validation"]["summary"]
    assert manifest["validation"]["passed"] and 40.0 <= summary["fidelity_db_min"] < 60  # measured 50.6 dB
    assert summary["nonfinite"] == 0


def test_quantize_command_writes_weight_only_coreml_int8(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    code = _quantize_tiny(tmp_path, "--weights-only", "--min-fidelity", "45")
    report = json.loads(capsys.readouterr().out)
    assert code == 0, report
    manifest = json.loads((artifact_dir(out, "coreml", "int8") / "manifest.json").read_text())
    assert manifest["quantization"]["method"] == "ptq"  # implied: nothing to fine-tune
    # all 51 conv weights, the two transposed convs too (W8A8 leaves those fp16)
    assert manifest["export"]["quantization_mode"] == "weights" and manifest["export"]["int8_weights"] == 51
    # weight-only keeps fp16 activations: closer to fp32 than W8A8 (measured 50.7-51.8 dB on the tiny model)
    assert manifest["validation"]["summary"]["fidelity_db_min"] >= 45.0

    code = main(["quantize", "--target", "executorch", "--weights-only", "--train-data", str(KODAK_DIR)])
    assert code == EXIT_USAGE and "--weights-only is an option of --target coreml" in capsys.readouterr().err
