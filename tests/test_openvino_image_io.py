"""OpenVINO image I/O (``--io image``): IRs wrapped by ``PrePostProcessor`` that take and return 8-bit pixels.

Each image IR is compared with the tensor IR of the same deploy graph: the same uint8 Kodak crop (read by OpenCV,
BGR) goes into both, the tensor IR's float output rounded to 8 bits as an app would. Width-8 models with
randomized weights; level differences are in 8-bit levels (0..255).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from helpers import require

ov = require("openvino")

import cv2  # noqa: E402
import torch  # noqa: E402
from helpers import randomize  # noqa: E402

from nafnet_edge.converters import Exported, ExportOptions, Session, get_target  # noqa: E402
from nafnet_edge.converters.openvino import USAGE_IMAGE, OpenVINOTarget  # noqa: E402
from nafnet_edge.deploy import deploy  # noqa: E402
from nafnet_edge.errors import ArtifactError, OptionError  # noqa: E402
from nafnet_edge.model import NAFNetConfig, build_model  # noqa: E402
from nafnet_edge.pixels import from_pixels, level_agreement, to_pixels  # noqa: E402

SIZE = 64
CONFIG = NAFNetConfig(width=8, enc_blk_nums=(1, 1), middle_blk_num=1, dec_blk_nums=(1, 1))
METADATA = {"nafnet_edge.arch": "NAFNet", "nafnet_edge.release": ""}
FORMATS = ("bgr", "rgb", "bgra", "rgba")
# Image IR vs tensor IR rounded to 8 bits, same graph and precision, on a Kodak crop: measured all samples equal
# for fp32, fp16 and int8 (fp16 only because its pixel scale 1/255 stays f32: rounded to f16, 0.05% of the samples
# moved by one level).
MIN_WITHIN_ONE_LEVEL = 0.999
FP32_MAX_LEVEL_DIFF = 1


def _graph(config: NAFNetConfig) -> torch.nn.Module:
    return deploy(randomize(build_model(config)), norm_form="mvn", input_size=(SIZE, SIZE), metadata=METADATA)


def _export(graph: torch.nn.Module, out: Path, precision: str = "fp32", fmt: str | None = None) -> Exported:
    options = ExportOptions(input_size=(SIZE, SIZE), precision=precision, pixel_format=fmt)  # type: ignore[arg-type]
    return OpenVINOTarget().export(graph, out, options)


def _open(out: Path, exported: Exported) -> Session:
    return OpenVINOTarget().open_session(out, export=exported.info)


def _model_rgb(pixels: np.ndarray, fmt: str) -> np.ndarray:
    """uint8 (1, H, W, P) in ``fmt`` -> its R, G, B bytes (1, H, W, 3)."""
    return pixels[..., [fmt.index(c) for c in "rgb"]]


@pytest.fixture(scope="module")
def frame() -> np.ndarray:
    """A 64x64 crop of kodim23 as OpenCV reads it: uint8 (1, H, W, 3), BGR."""
    path = Path(str(resources.files("nafnet_edge") / "data" / "kodak" / "kodim23.png"))
    return np.ascontiguousarray(cv2.imread(str(path))[100 : 100 + SIZE, 200 : 200 + SIZE][None])


@pytest.fixture(scope="module")
def graph() -> torch.nn.Module:
    return _graph(CONFIG)


@pytest.fixture(scope="module")
def tensor_irs(graph, tmp_path_factory) -> dict[str, tuple[Path, Exported]]:
    irs = {}
    for precision in ("fp32", "fp16"):
        out = tmp_path_factory.mktemp(f"openvino-{precision}")
        irs[precision] = out, _export(graph, out, precision)
    return irs


@pytest.fixture(scope="module")
def image_irs(graph, tmp_path_factory) -> dict[tuple[str, str], tuple[Path, Exported]]:
    """fp32 IRs in every 3-channel format, and an fp16 one in the default format."""
    irs = {}
    for precision, fmt in [*(("fp32", f) for f in FORMATS), ("fp16", "bgr")]:
        out = tmp_path_factory.mktemp(f"openvino-{precision}-{fmt}")
        irs[precision, fmt] = out, _export(graph, out, precision, fmt)
    return irs


def test_class_facts():
    target = get_target("openvino")
    assert target.pixel_formats == ("bgr", "rgb", "bgra", "rgba", "gray")
    assert target.default_pixel_format(3) == "bgr"  # OpenCV frames
    assert target.default_pixel_format(1) == "gray"
    assert OpenVINOTarget.usage_image_body is USAGE_IMAGE


def test_ir_takes_and_returns_pixels(image_irs, tensor_irs, graph):
    _, tensor = tensor_irs["fp32"]
    assert tensor.info["io"] == "tensor" and "pixel_format" not in tensor.info
    for (precision, fmt), (out, exported) in image_irs.items():
        assert (exported.info["io"], exported.info["pixel_format"]) == ("image", fmt)
        model = ov.Core().read_model(str(out / "model.xml"))
        depth = len(fmt)
        assert model.input("image").get_names() == {"image"} and model.output("restored").get_names() == {"restored"}
        for port in (model.input("image"), model.output("restored")):
            assert port.get_element_type() == ov.Type.u8
            assert list(port.get_shape()) == [1, SIZE, SIZE, depth]
        rt = {key: value.astype(str) for key, value in model.get_rt_info()["nafnet_edge"].items()}
        assert (rt["io"], rt["pixel_format"], rt["precision"]) == ("image", fmt, precision)
        assert rt["input_size"] == f"{SIZE}x{SIZE}" and rt["padding_multiple"] == str(graph.pad_multiple)
        assert exported.info["ops"]["Round"] == 1 and exported.info["ops"]["Clamp"] >= 1


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_image_ir_matches_the_tensor_ir_rounded(precision, image_irs, tensor_irs, frame):
    tensor = _open(*tensor_irs[precision])
    image = _open(*image_irs[precision, "bgr"])
    y_image = image.native(frame)
    assert y_image.dtype == np.uint8 and y_image.shape == frame.shape
    y_tensor = tensor.run(from_pixels(frame, "bgr"))  # what an app does with a tensor IR: /255, run, round
    agreement = level_agreement(from_pixels(y_image, "bgr"), y_tensor)
    assert agreement["within_one_level_share"] >= MIN_WITHIN_ONE_LEVEL, agreement
    if precision == "fp32":
        assert agreement["max_level_diff"] <= FP32_MAX_LEVEL_DIFF, agreement


def test_fp16_image_ir_keeps_its_pixel_steps_in_f32(image_irs, tensor_irs):
    """Only the network's weights are compressed: the image IR holds exactly the tensor IR's f16 constants."""

    def f16_constants(out: Path) -> int:
        ops = ov.Core().read_model(str(out / "model.xml")).get_ops()
        return sum(op.get_type_name() == "Constant" and op.get_output_element_type(0) == ov.Type.f16 for op in ops)

    image_count, tensor_count = f16_constants(image_irs["fp16", "bgr"][0]), f16_constants(tensor_irs["fp16"][0])
    assert image_count == tensor_count > 0


def test_channel_order_and_alpha(image_irs, frame):
    sessions = {fmt: _open(*image_irs["fp32", fmt]) for fmt in FORMATS}
    bgr = frame
    rgb = np.ascontiguousarray(bgr[..., ::-1])
    alpha = np.random.default_rng(0).integers(0, 256, size=(*frame.shape[:3], 1), dtype=np.uint8)
    inputs = {
        "bgr": bgr,
        "rgb": rgb,
        "bgra": np.concatenate([bgr, alpha], axis=3),
        "rgba": np.concatenate([rgb, alpha], axis=3),
    }
    outputs = {fmt: sessions[fmt].native(inputs[fmt]) for fmt in FORMATS}
    np.testing.assert_array_equal(outputs["bgr"], outputs["rgb"][..., ::-1])
    for fmt in ("bgra", "rgba"):
        assert (outputs[fmt][..., 3] == 255).all()
        np.testing.assert_array_equal(_model_rgb(outputs[fmt], fmt), _model_rgb(outputs["rgb"], "rgb"))
        opaque = inputs[fmt].copy()
        opaque[..., 3] = 0  # the alpha byte in is ignored
        np.testing.assert_array_equal(sessions[fmt].native(opaque), outputs[fmt])
    assert len(np.unique(outputs["rgb"])) > 50  # a restored photo, not a constant


def test_session_runs_floats_for_validation_and_pixels_natively(image_irs, frame):
    out, exported = image_irs["fp32", "bgr"]
    session = _open(out, exported)
    assert (session.info["io"], session.info["pixel_format"], session.info["inference_precision"]) == (
        "image",
        "bgr",
        "f32",
    )
    assert session.call is session.native
    x = from_pixels(frame, "bgr")
    y = session.run(x)  # float NCHW in [0, 1], RGB: the validation and tiling adapter
    assert y.dtype == np.float32 and y.shape == x.shape and y.min() >= 0.0 and y.max() <= 1.0
    np.testing.assert_array_equal(to_pixels(y, "bgr"), session.native(frame))
    with pytest.raises(ValueError, match=r"takes uint8 pixels \(1, H, W, 3\) in bgr"):
        session.native(x)
    profile = session.profile(frame, 1)  # type: ignore[misc]  # the native input: uint8 pixels
    assert profile["total_ms"] > 0 and any(row["op"].startswith("Convolution") for row in profile["top"])
    assert session.throughput(frame, 2)["fps"] > 0  # type: ignore[misc]
    # Without the manifest's export section the IR's rt_info says it takes pixels.
    bare = OpenVINOTarget().load_runner(out)
    np.testing.assert_array_equal(bare.native(frame), session.native(frame))  # type: ignore[misc]


def test_a_tensor_ir_recorded_as_image_io_is_refused(tensor_irs):
    out, _ = tensor_irs["fp32"]
    with pytest.raises(ArtifactError, match="input 'image' is f32, but the artifact records image I/O in bgr"):
        OpenVINOTarget().open_session(out, export={"pixel_format": "bgr"})


def test_gray_model_and_channel_mismatch(tmp_path):
    gray_graph = _graph(CONFIG.replace(img_channels=1))
    exported = _export(gray_graph, tmp_path, fmt="gray")
    session = _open(tmp_path, exported)
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, size=(1, SIZE, SIZE, 1), dtype=np.uint8)
    y = session.native(pixels)
    assert y.dtype == np.uint8 and y.shape == pixels.shape
    with torch.no_grad():
        reference = gray_graph(torch.from_numpy(from_pixels(pixels, "gray"))).numpy()
    agreement = level_agreement(from_pixels(y, "gray"), reference)
    assert agreement["max_level_diff"] <= FP32_MAX_LEVEL_DIFF, agreement
    with pytest.raises(OptionError, match="a 1-channel model takes --pixel-format gray, not rgb"):
        _export(gray_graph, tmp_path / "rgb", fmt="rgb")


def test_three_channel_model_refuses_gray(graph, tmp_path):
    with pytest.raises(OptionError, match="a 3-channel model takes --pixel-format rgb, bgr, rgba or bgra, not gray"):
        _export(graph, tmp_path, fmt="gray")


def test_usage_python_run_takes_an_opencv_tile(image_irs, frame):
    out, _ = image_irs["fp32", "bgr"]
    fields = {"artifact": str(out / "model.xml"), "inp": "image", "out": "restored", "c": 3, "h": SIZE, "w": SIZE}
    fields.update(channels="BGR", inference_precision="f32")  # usage_note fills it from the manifest
    body = USAGE_IMAGE.format(**fields, python_io="", python_save="")
    python = body.split("```python\n", 1)[1].split("```", 1)[0]
    cpp = body.split("```cpp\n", 1)[1]
    assert "ov::element::u8" in cpp and "ov::element::f32))" in cpp  # u8 pixels, f32 inference pinned
    namespace: dict = {}
    exec(compile(python, "USAGE.md", "exec"), namespace)
    y = namespace["run"](frame)
    assert y.dtype == np.uint8 and y.shape == frame.shape
    np.testing.assert_array_equal(y, _open(*image_irs["fp32", "bgr"]).native(frame))


def test_int8_image_ir_exports_and_runs(graph, frame, tmp_path):
    require("nncf")
    from nafnet_edge.quantization.openvino import OpenVINOQuantizer

    calibration = [torch.from_numpy(from_pixels(frame, "bgr")), torch.from_numpy(from_pixels(frame[:, ::-1], "bgr"))]
    quantizer = OpenVINOQuantizer()
    prepared = quantizer.prepare(graph, calibration[0], qat=False, calibration=calibration)
    image = quantizer.export(prepared, tmp_path / "image", calibration[0], pixel_format="bgr")
    tensor = quantizer.export(prepared, tmp_path / "tensor", calibration[0])
    assert (image.info["io"], image.info["pixel_format"], tensor.info["io"]) == ("image", "bgr", "tensor")
    assert image.info["fake_quantize_nodes"] == tensor.info["fake_quantize_nodes"] > 50  # the same calibrated graph
    session = _open(tmp_path / "image", image)
    y = session.native(frame)
    assert y.dtype == np.uint8 and y.shape == frame.shape
    precisions = session.info["runtime_precisions"]
    assert precisions.get("u8", 0) + precisions.get("i8", 0) > 40, precisions  # int8 convolutions
    rt = ov.Core().read_model(str(tmp_path / "image" / "model.xml")).get_rt_info()["nafnet_edge"]
    assert (rt["io"].astype(str), rt["precision"].astype(str)) == ("image", "int8")
    y_tensor = _open(tmp_path / "tensor", tensor).run(from_pixels(frame, "bgr"))
    agreement = level_agreement(from_pixels(y, "bgr"), y_tensor)
    assert agreement["within_one_level_share"] >= MIN_WITHIN_ONE_LEVEL, agreement
