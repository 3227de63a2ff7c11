"""The OpenVINO int8 quantizer (nafnet_edge.quantization.openvino): NNCF PTQ of a tiny deploy graph, its IR run
by the CPU plugin through ``OpenVINOTarget``'s runner, and the QAT-prepared module's gradients.

Width-8 models with randomized weights, calibrated on Kodak crops of three images and evaluated on crops of the
fourth. PSNR uses data range 1.0 (floats in [0, 1]) against the fp32 deploy graph in PyTorch.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from helpers import require

require("nncf")
ov = require("openvino")

import torch  # noqa: E402
from helpers import randomize  # noqa: E402

from nafnet_edge.converters import ExportOptions  # noqa: E402
from nafnet_edge.converters.base import SessionSettings  # noqa: E402
from nafnet_edge.converters.openvino import OpenVINOTarget  # noqa: E402
from nafnet_edge.deploy import deploy  # noqa: E402
from nafnet_edge.images import read_image  # noqa: E402
from nafnet_edge.model import NAFNetConfig, build_model  # noqa: E402
from nafnet_edge.quantization import get_quantizer  # noqa: E402
from nafnet_edge.quantization.openvino import NotPreparedError, OpenVINOQuantizer  # noqa: E402

SIZE = 64
CONFIG = NAFNetConfig(width=8, enc_blk_nums=(1, 1), middle_blk_num=1, dec_blk_nums=(1, 1))
METADATA = {"nafnet_edge.arch": "NAFNet", "nafnet_edge.release": ""}
CALIBRATION_IMAGES = ("kodim03.png", "kodim05.png", "kodim15.png")
EVALUATION_IMAGE = "kodim23.png"
CORNERS = ((100, 200), (300, 50))  # top, left of the crops taken from each image
INT8_MIN_PSNR_DB = 40.0  # int8 IR (and prepared module) vs the fp32 graph: measured 44.3 to 45.4 dB, two seeds
IR_VS_PREPARED_MIN_PSNR_DB = 42.0  # the IR vs the fake-quantized module it came from: measured 47.3 to 48.4 dB
NORMS = 10  # two channel norms per block, five blocks: each one MVN op in the IR


def _crops(name: str) -> list[torch.Tensor]:
    pixels = read_image(Path(str(resources.files("nafnet_edge") / "data" / "kodak" / name))).pixels
    return [
        torch.from_numpy(np.ascontiguousarray(pixels[top : top + SIZE, left : left + SIZE].transpose(2, 0, 1)[None]))
        for top, left in CORNERS
    ]


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / np.mean((np.asarray(a, np.float64) - b) ** 2)))


def _torch(module: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return module(x).numpy()


@pytest.fixture(scope="module")
def graph() -> torch.nn.Module:
    return deploy(randomize(build_model(CONFIG)), norm_form="mvn", input_size=(SIZE, SIZE), metadata=METADATA)


@pytest.fixture(scope="module")
def calibration() -> list[torch.Tensor]:
    return [crop for name in CALIBRATION_IMAGES for crop in _crops(name)]


@pytest.fixture(scope="module")
def evaluation() -> torch.Tensor:
    return torch.cat(_crops(EVALUATION_IMAGE))


@pytest.fixture(scope="module")
def ptq(graph, calibration):
    return OpenVINOQuantizer().prepare(graph, calibration[0], qat=False, calibration=calibration)


@pytest.fixture(scope="module")
def int8_ir(ptq, calibration, tmp_path_factory):
    out = tmp_path_factory.mktemp("openvino-int8")
    return out, OpenVINOQuantizer().export(ptq, out, calibration[0])


def test_registry_and_class_facts():
    quantizer = get_quantizer("openvino")
    assert isinstance(quantizer, OpenVINOQuantizer)
    assert (quantizer.target, quantizer.norm_form, quantizer.artifact) == ("openvino", "mvn", "model.xml")
    assert (quantizer.modules, quantizer.extra, quantizer.preset) == (("openvino", "nncf"), "openvino", "performance")
    quantizer.check_available()
    with pytest.raises(ValueError, match="choose mixed or performance"):
        OpenVINOQuantizer(preset="transformer")  # type: ignore[arg-type]


def _assert_input_range_is_pinned(prepared: torch.nn.Module) -> None:
    """Every 8-bit pixel value passes the input quantizer exactly ([0, 1] in 255 steps, not the calibration
    crops' largest value) and brighter values clip at 1."""
    from nncf.torch.function_hook.wrapper import get_hook_storage

    (input_quantizer,) = [m for name, m in get_hook_storage(prepared).named_hooks() if ".inp__" in name]
    levels = torch.arange(256, dtype=torch.float32).div(255).view(1, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(input_quantizer(levels), levels, rtol=0, atol=1e-6)
        assert float(input_quantizer(torch.full((1, 1, 1, 1), 1.5))) == pytest.approx(1.0)


def test_prepared_module_is_a_calibrated_copy(ptq, graph, evaluation):
    assert ptq is not graph and not ptq.training
    assert not any(p.requires_grad for p in ptq.parameters())  # PTQ: nothing to train
    _assert_input_range_is_pinned(ptq)  # symmetric unsigned (preset performance)
    assert _psnr(_torch(ptq, evaluation), _torch(graph, evaluation)) > INT8_MIN_PSNR_DB


def test_exported_files_and_info(int8_ir, graph, tmp_path):
    out, exported = int8_ir
    assert exported.files == ["model.xml", "model.bin"]
    info = exported.info
    assert info["file_bytes"] == {name: (out / name).stat().st_size for name in exported.files}
    assert info["openvino"] == ov.get_version()
    import nncf

    assert info["nncf"] == nncf.__version__
    assert "preset performance" in info["quantization_scheme"] and info["preset"] == "performance"
    ops = info["ops"]
    assert ops["FakeQuantize"] == info["fake_quantize_nodes"] > 50
    assert ops["MVN"] == NORMS  # no quantizer inside a norm: the frontend still folds each into one MVN
    assert ops["Parameter"] == ops["Result"] == 1
    fp32 = OpenVINOTarget().export(graph, tmp_path, ExportOptions(input_size=(SIZE, SIZE)))
    assert info["file_bytes"]["model.bin"] < 0.5 * fp32.info["file_bytes"]["model.bin"]  # i8 weights: 0.35x


def test_ir_names_shape_and_rt_info(int8_ir, graph):
    out, _ = int8_ir
    model = ov.Core().read_model(str(out / "model.xml"))
    assert model.input("image").get_names() == {"image"}
    assert model.output("restored").get_names() == {"restored"}
    assert list(model.input("image").get_shape()) == [1, 3, SIZE, SIZE]
    assert model.friendly_name == "NAFNet"
    rt = {key: value.astype(str) for key, value in model.get_rt_info()["nafnet_edge"].items()}
    assert rt["precision"] == "int8" and rt["arch"] == "NAFNet"
    assert rt["input_size"] == f"{SIZE}x{SIZE}" and rt["padding_multiple"] == str(graph.pad_multiple)
    assert rt["quantization_scheme"].startswith("NNCF PyTorch PTQ")


def test_int8_ir_runs_int8_in_openvino(int8_ir, ptq, graph, evaluation):
    out, _ = int8_ir
    runner = OpenVINOTarget().load_runner(out)  # pinned f32: what is not int8 runs f32, not bf16
    info = runner.info
    assert info["inference_precision"] == "f32"
    assert set(info["runtime_precisions"]) <= {"f32", "u8", "i8"}, info["runtime_precisions"]
    int8_nodes = info["runtime_precisions"].get("u8", 0) + info["runtime_precisions"].get("i8", 0)
    assert int8_nodes > 40, info["runtime_precisions"]  # the convolutions at least (39 in this graph)
    x = evaluation.numpy()
    y = np.concatenate([runner.run(x[i : i + 1]) for i in range(len(x))])
    assert y.shape == x.shape and np.isfinite(y).all()
    assert _psnr(y, _torch(graph, evaluation)) > INT8_MIN_PSNR_DB
    assert _psnr(y, _torch(ptq, evaluation)) > IR_VS_PREPARED_MIN_PSNR_DB


def test_qat_prepared_module_gets_gradients_and_freezes_ranges(graph, calibration):
    quantizer = OpenVINOQuantizer(preset="mixed")  # asymmetric activations: the other kind of quantizer
    prepared = quantizer.prepare(graph, calibration[0], qat=True, calibration=calibration[:2])
    _assert_input_range_is_pinned(prepared)
    quantizer.set_training(prepared, True)
    assert prepared.training
    batch = torch.cat(calibration[2:6])  # the loop trains on batches larger than the calibration's
    with torch.no_grad():
        target = graph(batch)
    loss = ((prepared(batch) - target) ** 2).mean()
    loss.backward()
    named = dict(prepared.named_parameters())
    weights = {n: p for n, p in named.items() if "__nncf_hooks" not in n}
    ranges = {n: p for n, p in named.items() if "__nncf_hooks" in n and p.is_floating_point()}
    assert weights and ranges
    for params in (weights, ranges):
        grads = [p.grad for p in params.values()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert sum(float(g.abs().sum()) for g in grads) > 0
    quantizer.freeze_observers(prepared)
    assert not any(p.requires_grad for p in ranges.values())
    assert all(p.requires_grad for p in weights.values())


def test_export_refuses_a_module_it_did_not_prepare(graph, tmp_path):
    with pytest.raises(NotPreparedError, match="OpenVINOQuantizer.prepare"):
        OpenVINOQuantizer().export(graph, tmp_path, torch.rand(1, 3, SIZE, SIZE))


def _capabilities() -> list[str]:
    return list(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def test_int8_ir_ships_the_inference_precision_asked_for_and_runs_with_it(ptq, calibration, evaluation, tmp_path):
    if "BF16" not in _capabilities():
        pytest.skip("this CPU does not report BF16: the plugin cannot run bf16 here")
    exported = OpenVINOQuantizer(inference_precision="bf16").export(ptq, tmp_path, calibration[0])
    assert exported.info["inference_precision"] == "bf16"
    assert exported.info["inference_precision_choice"] == "asked for (bf16)"
    session = OpenVINOTarget().open_session(tmp_path, export=exported.info)  # as validation opens it
    assert session.info["inference_precision"] == "bf16" and "bf16" in session.info["runtime_precisions"]
    pinned = OpenVINOTarget().load_runner(tmp_path)  # no record: f32
    x = evaluation.numpy()[:1]
    assert pinned.info["inference_precision"] == "f32"
    assert INT8_MIN_PSNR_DB < _psnr(session.run(x), pinned.run(x)) < 90  # bf16 moves the float remainder a little


def test_auto_times_each_native_precision_and_keeps_f32_unless_clearly_faster(
    ptq, calibration, tmp_path, timed_float_choices
):
    from nafnet_edge.quantization.openvino import PRECISION_MARGIN

    info = OpenVINOQuantizer().export(ptq, tmp_path, calibration[0]).info
    native = ["f32", *(p for p, name in (("bf16", "BF16"), ("f16", "FP16")) if name in _capabilities())]
    if len(native) == 1:
        assert info["inference_precision"] == "f32" and "only one this CPU runs" in info["inference_precision_choice"]
        return
    timings = info["inference_precision_timings"]
    assert info["inference_precision_choice"] == "timed on this CPU"
    assert sorted(timings["median_ms"]) == sorted(native) and all(ms > 0 for ms in timings["median_ms"].values())
    assert timings["cpu"] and timings["rounds"] >= 5
    assert all(INT8_MIN_PSNR_DB < db < 999 for db in timings["psnr_vs_f32_db"].values())
    best = min(timings["median_ms"], key=timings["median_ms"].get)
    wins = timings["median_ms"][best] <= PRECISION_MARGIN * timings["median_ms"]["f32"]
    assert info["inference_precision"] == (best if wins else "f32")


def test_a_shipped_precision_this_cpu_lacks_falls_back_to_f32(int8_ir):
    out, exported = int8_ir
    missing = next((p for p, name in (("f16", "FP16"), ("bf16", "BF16")) if name not in _capabilities()), None)
    if missing is None:
        pytest.skip("this CPU reports both BF16 and FP16: no precision to miss")
    session = OpenVINOTarget().open_session(out, export={**exported.info, "inference_precision": missing})
    assert session.info["inference_precision"] == "f32"
    assert session.info["inference_precision_fallback"].startswith(f"shipped with {missing}")
    with pytest.raises(ValueError, match=f"asked for {missing} inference but would run"):  # asked for: refused
        OpenVINOTarget().open_session(out, settings=SessionSettings(hints={"inference_precision": missing}))


def test_auto_is_a_quantize_choice_not_a_runtime_hint(int8_ir):
    out, _ = int8_ir
    with pytest.raises(ValueError, match="--inference-precision auto is for quantize"):
        OpenVINOTarget().open_session(out, settings=SessionSettings(hints={"inference_precision": "auto"}))
