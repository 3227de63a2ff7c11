"""LiteRT converter: the .tflite runs in the LiteRT interpreter like the PyTorch deploy graph (fp32 and float16
weights), and convert exports, validates and describes it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY_CONFIG, randomize, require

require("litert_torch")
require("ai_edge_litert")

from nafnet_edge.converters import Exported, ExportOptions, SessionSettings, get_target  # noqa: E402
from nafnet_edge.deploy import DeployNAFNet, deploy  # noqa: E402
from nafnet_edge.model import NAFNet  # noqa: E402

SIZE = (64, 96)
MAX_ABS_ERR_FP32 = 2e-6  # the interpreter (XNNPACK) vs PyTorch; measured 6e-7 on the width-16 model
MAX_ABS_ERR_FP16 = 2e-2  # float16 weights, float32 compute


@pytest.fixture(scope="module")
def model() -> NAFNet:
    return randomize(NAFNet(TINY_CONFIG))


@pytest.fixture(scope="module")
def graph(model: NAFNet) -> DeployNAFNet:
    target = get_target("litert")
    return deploy(model, norm_form=target.norm_form, input_size=SIZE)


@pytest.fixture(scope="module")
def exported(graph: DeployNAFNet, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Exported]]:
    """One export per precision: (artifact directory, Exported)."""
    target = get_target("litert")
    target.check_available()
    out = {}
    for precision in ("fp32", "fp16"):
        folder = tmp_path_factory.mktemp(f"litert-{precision}")
        out[precision] = folder, target.export(graph, folder, ExportOptions(input_size=SIZE, precision=precision))
    return out


def reference(module: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize(("precision", "bound"), [("fp32", MAX_ABS_ERR_FP32), ("fp16", MAX_ABS_ERR_FP16)])
def test_export_runs_in_the_interpreter_like_pytorch(exported, graph, model, precision, bound) -> None:
    folder, result = exported[precision]
    assert result.files == ["model.tflite"] and (folder / "model.tflite").is_file()
    info = result.info
    assert info["io"] == "tensor" and info["file_bytes"] == (folder / "model.tflite").stat().st_size
    ops = info["op_histogram"]
    assert ops["CONV_2D"] > 0 and ops["TRANSPOSE"] == 2 and "DELEGATE" not in ops  # NCHW kept at the two ends
    session = get_target("litert").open_session(folder, export=info, settings=SessionSettings(threads=1))
    assert session.runtime == "litert" and session.info["delegates"] == 1  # the whole graph in one XNNPACK partition
    rng = np.random.default_rng(0)
    for _ in range(2):
        x = rng.random((1, TINY_CONFIG.img_channels, *SIZE), dtype=np.float32)
        y = session.run(x)
        assert y.dtype == np.float32 and y.shape == x.shape
        assert float(np.abs(y - reference(graph, x)).max()) <= bound
        assert float(np.abs(y - reference(model, x)).max()) <= bound


def test_fp16_stores_float16_weights(exported, model) -> None:
    fp32, fp16 = exported["fp32"][1].info, exported["fp16"][1].info
    conv_weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert fp32["weights"] == "float32" and fp16["weights"] == "float16"
    assert "DEQUANTIZE" not in fp32["op_histogram"] and fp16["op_histogram"]["DEQUANTIZE"] > 0
    assert {k: v for k, v in fp16["op_histogram"].items() if k != "DEQUANTIZE"} == fp32["op_histogram"]
    # two bytes saved per convolution weight, less the DEQUANTIZE operators' overhead (measured 26336 of 37280)
    assert fp32["file_bytes"] - fp16["file_bytes"] >= conv_weights


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
    assert manifest["target"] == "litert" and manifest["files"] == ["model.tflite"]
    assert manifest["export"]["op_histogram"]["CONV_2D"] > 0
    note = (result.directory / "USAGE.md").read_text()
    assert 'Interpreter(model_path="model.tflite"' in note and "CompiledModel" in note and "not compiled" in note
