"""XNNPACK int8: the PTQ program is one XNNPACK partition, runs in ExecuTorch's runtime close to the fp32 deploy
graph and to its own quantize/dequantize simulation; the QAT-prepared graph trains every weight.

One module-scoped PTQ export (lowering takes most of this file's time) serves every test that needs an artifact.
PSNR uses data range 1.0 (float images in [0, 1]).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from helpers import require

require("executorch")
require("torchao")

import torch  # noqa: E402
from helpers import randomize  # noqa: E402
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e  # noqa: E402

from nafnet_edge.converters.base import Exported  # noqa: E402
from nafnet_edge.converters.executorch import ExecuTorchTarget  # noqa: E402
from nafnet_edge.deploy import DeployNAFNet, deploy  # noqa: E402
from nafnet_edge.images import read_image  # noqa: E402
from nafnet_edge.model import NAFNetConfig, build_model  # noqa: E402
from nafnet_edge.quantization import get_quantizer  # noqa: E402
from nafnet_edge.quantization.xnnpack import XNNPACKQuantizer  # noqa: E402

KODAK = sorted(Path(str(resources.files("nafnet_edge") / "data" / "kodak")).glob("*.png"))
CFG = NAFNetConfig(width=8, enc_blk_nums=(1, 1), middle_blk_num=1, dec_blk_nums=(1, 1))
SIZE = (64, 64)
MIN_PSNR_VS_FP32_DB = 38.0  # int8 .pte vs the fp32 deploy graph; measured 42.9-43.4 dB on these crops
MIN_PSNR_VS_SIMULATION_DB = 43.0  # .pte vs PyTorch's quantize/dequantize simulation; measured 47.1-48.5 dB
MIN_PSNR_QAT_VS_CONVERSION_DB = 60.0  # QAT fake quantizers vs their quantize/dequantize form; measured identical
MIN_PSNR_FP16_VS_FP32_NORMS_DB = 43.0  # fp16 centred norms vs fp32 norms, both int8 programs: measured 46.4-46.9 dB
NORMS = 10  # two channel norms per block, five blocks
MAX_ABS_VS_SIMULATION = 0.05  # measured 0.0124: XNNPACK's requantization rounds a few values one step apart


def crop(index: int, top: int, left: int) -> torch.Tensor:
    pixels = read_image(KODAK[index]).pixels[top : top + SIZE[0], left : left + SIZE[1]]
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))[None]


def psnr_db(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    mse = np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2)
    return float(10 * np.log10(1.0 / mse))


@dataclass
class Artifact:
    quantizer: XNNPACKQuantizer
    graph: DeployNAFNet
    prepared: torch.nn.Module
    simulation: torch.nn.Module  # the calibrated graph in quantize/dequantize form, run by PyTorch
    exported: Exported
    out_dir: Path
    test_inputs: list[torch.Tensor]


@pytest.fixture(scope="module")
def graph() -> DeployNAFNet:
    return deploy(randomize(build_model(CFG)), norm_form="conv-mean", input_size=SIZE)


@pytest.fixture(scope="module")
def artifact(graph: DeployNAFNet, tmp_path_factory: pytest.TempPathFactory) -> Artifact:
    quantizer = get_quantizer("executorch")
    assert isinstance(quantizer, XNNPACKQuantizer)
    quantizer.check_available()
    calibration = [crop(i, 100, 50) for i in range(len(KODAK))]
    prepared = quantizer.prepare(graph, calibration[0], qat=False, calibration=calibration)
    with torch.no_grad():
        for x in calibration:
            prepared(x)
    out_dir = tmp_path_factory.mktemp("xnnpack-int8")
    exported = quantizer.export(prepared, out_dir, calibration[0])
    simulation = convert_pt2e(copy.deepcopy(prepared))
    test_inputs = [crop(i, 300, 300) for i in range(len(KODAK))]  # regions calibration never saw
    return Artifact(quantizer, graph, prepared, simulation, exported, out_dir, test_inputs)


def test_one_xnnpack_partition_with_int8_adds_and_multiplies(artifact: Artifact) -> None:
    info = artifact.exported.info
    assert artifact.exported.files == ["model.pte"]
    assert info["delegated_partitions"] == 1 and info["delegate_backends"] == ["XnnpackBackend"]
    assert info["ops_outside_delegate"] == {} and info["quantize_dequantize_outside_delegate"] == 0
    assert info["quantization_method"] == "ptq" and "per-channel" in info["quantization_scheme"]
    assert info["program_bytes"] == (artifact.out_dir / "model.pte").stat().st_size
    # 5 blocks: 2 residual adds each, 2 skip adds, the global residual; SimpleGate x2 and attention per block
    assert info["int8_ops"] == {"add": 13, "conv2d": 49, "conv_transpose2d": 2, "mean": 5, "mul": 15}
    # only the 10 channel norms stay fp32: mean and variance convs, centring, squaring, rsqrt and scaling
    assert info["fp32_ops"] == {"clamp_max": 10, "conv2d": 20, "mul": 20, "rsqrt": 10, "sub": 10}
    assert info["int8_fp32_conversions"] == 32  # 3 per norm, the graph input and output


def test_pte_runs_in_executorch_close_to_the_fp32_graph(artifact: Artifact) -> None:
    runner = ExecuTorchTarget().load_runner(artifact.out_dir)
    assert runner.info["runtime"] == "executorch"
    for x in artifact.test_inputs:
        y = runner.run(x.numpy())
        assert y.shape == tuple(x.shape) and np.isfinite(y).all()
        with torch.no_grad():
            reference = artifact.graph(x).numpy()
        assert MIN_PSNR_VS_FP32_DB < psnr_db(y, reference) < 80.0  # quantized, not a float program


def test_pte_matches_the_quantize_dequantize_simulation(artifact: Artifact) -> None:
    runner = ExecuTorchTarget().load_runner(artifact.out_dir)
    for x in artifact.test_inputs:
        with torch.no_grad():
            expected = artifact.simulation(x).numpy()
        y = runner.run(x.numpy())
        assert psnr_db(y, expected) > MIN_PSNR_VS_SIMULATION_DB
        assert np.abs(y - expected).max() < MAX_ABS_VS_SIMULATION


def test_auto_times_whole_programs_and_ships_the_one_it_picks(
    artifact: Artifact, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Timed against fp32 norms, fp16 norms with centring convs (picked whatever the timings, so the shipped
    program is the fp16 one): both lowered, both timed, the picked one written, recorded and run."""
    from nafnet_edge.quantization import norm_kernels

    monkeypatch.setattr(norm_kernels, "AUTO", ("fp32", "fp16-centred"))
    monkeypatch.setattr(norm_kernels, "pick", lambda timings: "fp16-centred")  # pick itself: tested below
    info = XNNPACKQuantizer().export(artifact.prepared, tmp_path, artifact.test_inputs[0]).info
    timings = info["norm_timings"]
    assert info["norm_choice"] == "timed on this CPU" and timings["cpu"] and timings["rounds"] >= 5
    assert sorted(timings["median_ms"]) == ["fp16-centred", "fp32"] and all(
        v > 0 for v in timings["median_ms"].values()
    )
    assert info["delegated_partitions"] == 1 and info["ops_outside_delegate"] == {}
    assert info["norm_precision"] == "fp16" and info["norm_kernels"] == {"fp16-centred": NORMS}
    # every norm (C = 8, 16, 32) centred by one C x C conv: no subtract left; all of it fp16, nothing fp32
    assert info["fp16_ops"] == {"clamp_max": NORMS, "conv2d": 2 * NORMS, "mul": 2 * NORMS, "rsqrt": NORMS}
    assert info["fp32_ops"] == {} and info["int8_ops"] == artifact.exported.info["int8_ops"]
    fp16 = ExecuTorchTarget().load_runner(tmp_path)
    fp32 = ExecuTorchTarget().load_runner(artifact.out_dir)
    for x in artifact.test_inputs:
        y = fp16.run(x.numpy())
        with torch.no_grad():
            assert psnr_db(y, artifact.graph(x).numpy()) > MIN_PSNR_VS_FP32_DB
        assert MIN_PSNR_FP16_VS_FP32_NORMS_DB < psnr_db(y, fp32.run(x.numpy())) < 100  # not the same program


def test_a_norm_kernel_replaces_fp32_only_when_clearly_faster() -> None:
    from nafnet_edge.quantization.norm_kernels import MARGIN, pick

    assert pick({"fp32": 10.0, "fp16": 10.0 * MARGIN}) == "fp16"
    assert pick({"fp32": 10.0, "fp16": 10.0 * MARGIN + 0.01}) == "fp32"  # faster, but within the noise margin
    assert pick({"fp32": 10.0, "fp16": 12.0}) == "fp32"


def test_asked_for_norm_precision_is_recorded_and_refused_when_unknown() -> None:
    assert XNNPACKQuantizer(norm_precision="fp32-centred").norm_precision == "fp32-centred"
    with pytest.raises(ValueError, match="norm precision 'bf16' is not one of auto, fp32, fp16"):
        XNNPACKQuantizer(norm_precision="bf16")  # type: ignore[arg-type]


def test_ptq_prepared_module_computes_the_graph_for_any_batch(artifact: Artifact) -> None:
    batch = torch.cat(artifact.test_inputs[:2])
    prepared = copy.deepcopy(artifact.prepared)  # its observers would take these inputs in
    with torch.no_grad():
        torch.testing.assert_close(prepared(batch), artifact.graph(batch), rtol=0, atol=1e-5)
    assert not any(p.requires_grad for p in artifact.prepared.parameters())


def test_qat_prepared_module_trains_every_weight_and_converts_as_trained(graph: DeployNAFNet) -> None:
    """What every quantizer does (a trained copy, frozen ranges) is in test_quantizer_contract.py."""
    quantizer = XNNPACKQuantizer()
    calibration = [crop(i, 100, 50) for i in range(len(KODAK))]
    prepared = quantizer.prepare(graph, calibration[0], qat=True, calibration=calibration)
    held_out = crop(2, 300, 300)
    with torch.no_grad():
        # ranges from all calibration crops at once; batch by batch they would keep the first crop's (19 dB)
        assert MIN_PSNR_VS_FP32_DB < psnr_db(prepared(held_out), graph(held_out)) < 80.0

    x = torch.cat(calibration[:2])
    quantizer.set_training(prepared, True)
    out = prepared(x)
    with torch.no_grad():
        target = graph(x)
    torch.nn.functional.mse_loss(out, target).backward()
    params = dict(prepared.named_parameters())
    assert params.keys() == dict(graph.named_parameters()).keys()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params.values())
    torch.optim.SGD(prepared.parameters(), lr=0.1).step()
    quantizer.freeze_observers(prepared)

    # what QAT trains is what the program computes: the conversion keeps the fake quantizers' scales
    quantizer.set_training(prepared, False)
    simulation = convert_pt2e(copy.deepcopy(prepared).requires_grad_(False))
    with torch.no_grad():
        assert psnr_db(simulation(held_out), prepared(held_out)) > MIN_PSNR_QAT_VS_CONVERSION_DB
