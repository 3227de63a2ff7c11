"""The OpenVINO target (nafnet_edge.converters.openvino): IRs of tiny deploy graphs run by the CPU plugin.

The session pins the inference precision; the bf16 test shows why (this machine's CPU reports bf16, and the
plugin then runs bf16 unless told otherwise). Bounds are measured on Kodak crops, width-8 models.
"""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from helpers import require

ov = require("openvino")

import torch  # noqa: E402
from helpers import randomize  # noqa: E402

from nafnet_edge.converters import ExportOptions, Session, SessionSettings, get_target  # noqa: E402
from nafnet_edge.converters.openvino import OpenVINOTarget  # noqa: E402
from nafnet_edge.deploy import deploy  # noqa: E402
from nafnet_edge.images import read_image  # noqa: E402
from nafnet_edge.model import NAFNetConfig, build_model  # noqa: E402

SIZE = 64
CONFIG = NAFNetConfig(width=8, enc_blk_nums=(1, 1), middle_blk_num=1, dec_blk_nums=(1, 1))
TLC_CONFIG = CONFIG.replace(arch="nafnet-local", train_size=(32, 32))  # local pooling kernel 48 < 64: box means
METADATA = {
    "nafnet_edge.arch": "NAFNet",
    "nafnet_edge.release": "",
    "nafnet_edge.config": '{"width": 8, "note": "<quoted & escaped>"}',
}
FP32_MAX_ABS = 2e-6  # measured 2.4e-7 to 4.8e-7 (pinned f32, two seeds, four Kodak crops)
BF16_MIN_ABS = 1e-3  # measured 4.6e-3 to 7.9e-3: what the pin protects against
FP16_WEIGHTS_MAX_ABS = 1e-3  # f16-compressed weights vs fp32 PyTorch: measured 2.2e-4 to 3.4e-4


def _graph(config: NAFNetConfig) -> torch.nn.Module:
    return deploy(randomize(build_model(config)), norm_form="mvn", input_size=(SIZE, SIZE), metadata=METADATA)


def _torch(module: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module(torch.from_numpy(x)).numpy()


def _session(out: Path, inference_precision: str) -> Session:
    """The IR's session with the CPU plugin's inference precision asked for as a runtime hint."""
    return OpenVINOTarget().open_session(
        out, settings=SessionSettings(hints={"inference_precision": inference_precision})
    )


def _cpu_capabilities() -> list[str]:
    return ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


@pytest.fixture(scope="module")
def crop() -> np.ndarray:
    path = Path(str(resources.files("nafnet_edge") / "data" / "kodak" / "kodim23.png"))
    pixels = read_image(path).pixels[100 : 100 + SIZE, 200 : 200 + SIZE]
    return np.ascontiguousarray(pixels.transpose(2, 0, 1)[None])


@pytest.fixture(scope="module")
def graph() -> torch.nn.Module:
    return _graph(CONFIG)


@pytest.fixture(scope="module")
def fp32_ir(graph, tmp_path_factory):
    out = tmp_path_factory.mktemp("openvino-fp32")
    return out, OpenVINOTarget().export(graph, out, ExportOptions(input_size=(SIZE, SIZE)))


@pytest.fixture(scope="module")
def fp16_ir(graph, tmp_path_factory):
    out = tmp_path_factory.mktemp("openvino-fp16")
    return out, OpenVINOTarget().export(graph, out, ExportOptions(input_size=(SIZE, SIZE), precision="fp16"))


def test_registry_and_class_facts():
    converter = get_target("openvino")
    assert isinstance(converter, OpenVINOTarget)
    assert (converter.artifact, converter.norm_form, converter.precisions) == (
        "model.xml",
        "mvn",
        ("fp32", "fp16"),
    )
    (option,) = converter.options
    assert (option.flag, option.dest, option.choices, option.commands) == (
        "--inference-precision",
        "inference_precision",
        ("auto", "f32", "bf16", "f16"),  # auto: quantize times them
        ("bench", "quantize"),
    )
    assert converter.quantizer_options({}) == {"inference_precision": "auto"}
    converter.check_available()


@pytest.mark.parametrize(
    "options, message",
    [
        (ExportOptions(input_size=(SIZE, SIZE), precision="int8"), "supports precision fp32, fp16"),  # type: ignore[arg-type]
    ],
)
def test_refuses_options_it_cannot_honour(options, message):
    with pytest.raises(ValueError, match=message):
        OpenVINOTarget().check_options(options)


def test_exported_files_and_info(fp32_ir):
    out, exported = fp32_ir
    assert exported.files == ["model.xml", "model.bin"]
    assert exported.info["file_bytes"] == {name: (out / name).stat().st_size for name in exported.files}
    assert exported.info["weight_precision"] == "f32"
    assert exported.info["openvino"] == ov.get_version()
    ops = exported.info["ops"]
    assert ops["Parameter"] == ops["Result"] == 1
    assert ops["MVN"] == 10  # one per channel norm (2 per block, 5 blocks): the deploy graph's mvn form fused
    assert "Convert" not in ops


def test_ir_names_shape_and_rt_info(fp32_ir, graph):
    out, _ = fp32_ir
    model = ov.Core().read_model(str(out / "model.xml"))
    assert model.input("image").get_names() == {"image"}
    assert model.output("restored").get_names() == {"restored"}
    assert list(model.input("image").get_shape()) == [1, 3, SIZE, SIZE]  # static, not the frontend's [?,3,?,?]
    assert model.friendly_name == "NAFNet"
    rt = {key: value.astype(str) for key, value in model.get_rt_info()["nafnet_edge"].items()}
    assert rt == {
        "arch": "NAFNet",
        "release": "",
        "config": METADATA["nafnet_edge.config"],
        "input_size": f"{SIZE}x{SIZE}",
        "padding_multiple": str(graph.pad_multiple),
        "precision": "fp32",
    }


@pytest.mark.parametrize("config", [CONFIG, TLC_CONFIG], ids=["global-pool", "tlc"])
def test_fp32_ir_pinned_f32_matches_pytorch(config, crop, tmp_path):
    graph = _graph(config)
    OpenVINOTarget().export(graph, tmp_path, ExportOptions(input_size=(SIZE, SIZE)))
    runner = OpenVINOTarget().load_runner(tmp_path)
    y = runner.run(crop)
    assert y.dtype == np.float32 and y.shape == crop.shape
    assert np.abs(y - _torch(graph, crop)).max() < FP32_MAX_ABS
    info = runner.info
    assert (info["runtime"], info["device"], info["inference_precision"]) == ("openvino", "CPU", "f32")
    assert isinstance(info["device_name"], str) and info["device_name"]
    assert set(info["runtime_precisions"]) == {"f32"}, info["runtime_precisions"]
    assert set(info["activation_precisions"]) == {"f32"}
    assert info["runtime_precisions"]["f32"] > 50  # the compute nodes of the execution graph, not an empty count


def test_bf16_inference_is_recorded_and_drifts(fp32_ir, graph, crop):
    if "BF16" not in _cpu_capabilities():
        pytest.skip("this CPU does not report BF16: the plugin cannot run bf16 here")
    out, _ = fp32_ir
    runner = _session(out, "bf16")
    assert runner.info["inference_precision"] == "bf16"
    assert set(runner.info["runtime_precisions"]) == {"bf16"}
    assert set(runner.info["activation_precisions"]) == {"bf16"}
    assert np.abs(runner.run(crop) - _torch(graph, crop)).max() > BF16_MIN_ABS


def test_f16_inference_is_refused_where_the_plugin_would_substitute(fp32_ir):
    out, _ = fp32_ir
    if "FP16" in _cpu_capabilities():
        runner = _session(out, "f16")
        assert runner.info["inference_precision"] == "f16"
    else:  # x86 without native f16: the plugin accepts the hint and runs bf16 (or f32) instead
        with pytest.raises(ValueError, match="asked for f16 inference but would run"):
            _session(out, "f16")


def test_unknown_inference_precision_is_refused(fp32_ir):
    out, _ = fp32_ir
    with pytest.raises(ValueError, match="inference_precision 'f64' is not one of f32, bf16, f16"):
        _session(out, "f64")
    with pytest.raises(ValueError, match="inference_precision 'f64' is not one of f32, bf16, f16"):
        OpenVINOTarget().load_runner(out, export={"inference_precision": "f64"})  # as a manifest may record it


def test_the_hint_wins_over_the_export_section(fp32_ir):
    out, _ = fp32_ir
    session = OpenVINOTarget().open_session(
        out, export={"inference_precision": "f64"}, settings=SessionSettings(hints={"inference_precision": "f32"})
    )
    assert session.runtime == "openvino" and session.info["inference_precision"] == "f32"


def test_fp16_ir_halves_the_weights_and_computes_in_f32(fp16_ir, fp32_ir, graph, crop):
    out16, exported16 = fp16_ir
    _, exported32 = fp32_ir
    ratio = exported16.info["file_bytes"]["model.bin"] / exported32.info["file_bytes"]["model.bin"]
    assert 0.45 < ratio < 0.55, ratio
    assert exported16.info["weight_precision"].startswith("f16 compressed")
    assert exported16.info["ops"]["Convert"] > 0  # the decompression the plugin folds at load
    model = ov.Core().read_model(str(out16 / "model.xml"))
    assert model.get_rt_info(["nafnet_edge", "precision"]).astype(str) == "fp16"

    runner = OpenVINOTarget().load_runner(out16)
    y = runner.run(crop)
    assert runner.info["inference_precision"] == "f32"
    assert set(runner.info["activation_precisions"]) == {"f32"}
    assert np.abs(y - _torch(graph, crop)).max() < FP16_WEIGHTS_MAX_ABS
    # Only the weights were rounded: PyTorch with f16-rounded weights agrees to f32 accuracy.
    rounded = copy.deepcopy(graph)
    with torch.no_grad():
        for tensor in [*rounded.parameters(), *rounded.buffers()]:
            if tensor.is_floating_point():
                tensor.copy_(tensor.half().float())
    assert np.abs(y - _torch(rounded, crop)).max() < FP32_MAX_ABS


def test_runner_output_is_not_overwritten_by_the_next_call(fp32_ir, crop):
    out, _ = fp32_ir
    run = OpenVINOTarget().load_runner(out).run
    first = run(crop)
    kept = first.copy()
    run(np.zeros_like(crop))
    np.testing.assert_array_equal(first, kept)
