"""Image I/O of the targets exported from PyTorch (ExecuTorch with XNNPACK, ONNX): the uint8-pixel artifact of a
deploy graph restores the same 8-bit Kodak crops as the float artifact of the same graph to within one level, every
pixel format carries the channels in its own order (alpha ignored in, 255 out), the XNNPACK partition still holds
the whole network (fp32 and int8), the int8 program's input is quantized on the 8-bit pixel grid, and a bundled
program carries uint8 test I/O.

Module-scoped exports (ExecuTorch's lowering takes most of this file's time): the tiny two-level model for the
agreement, bundle and int8 checks, a one-block model for the other pixel formats.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from helpers import TINY_CONFIG, require

require("executorch")
require("onnxruntime")
require("torchao")

import torch  # noqa: E402
from helpers import randomize  # noqa: E402

from nafnet_edge.converters import ExportOptions, Session, get_target  # noqa: E402
from nafnet_edge.deploy import deploy  # noqa: E402
from nafnet_edge.errors import OptionError  # noqa: E402
from nafnet_edge.images import read_image  # noqa: E402
from nafnet_edge.model import NAFNet, NAFNetConfig  # noqa: E402
from nafnet_edge.pixels import from_pixels, level_agreement, to_pixels  # noqa: E402

KODAK = sorted(Path(str(resources.files("nafnet_edge") / "data" / "kodak")).glob("*.png"))
SIZE = (64, 64)
ONE_BLOCK = NAFNetConfig(width=8, enc_blk_nums=(), middle_blk_num=1, dec_blk_nums=())
FORMATS = {"executorch": ("rgba", "rgb", "bgra", "bgr"), "onnx": ("rgb", "bgr", "rgba", "bgra")}
MIN_WITHIN_ONE_LEVEL = 0.999  # fp32 image vs tensor artifact; measured: ExecuTorch equal on all 4 crops, ONNX one
# sample of 49152 one level apart
IO_OPS_OUTSIDE = {  # the two conversions, on ExecuTorch's quantized kernels
    "quantized_decomposed.dequantize_per_tensor.default": 1,
    "quantized_decomposed.quantize_per_tensor.default": 1,
}
MIN_INT8_PSNR_DB = 38.0  # int8 image program vs the fp32 graph on 8-bit outputs; measured 48.9-49.6 dB


def kodak(index: int, fmt: str, top: int = 200, left: int = 50) -> np.ndarray:
    """A 64x64 crop of a shipped 8-bit photo as uint8 pixels in ``fmt`` (gray: its green channel)."""
    rgb = read_image(KODAK[index]).pixels[top : top + SIZE[0], left : left + SIZE[1]].transpose(2, 0, 1)[None]
    return to_pixels(rgb[:, 1:2] if fmt == "gray" else rgb, fmt)


def reference(graph: torch.nn.Module, pixels: np.ndarray, fmt: str) -> np.ndarray:
    with torch.no_grad():
        return to_pixels(graph(torch.from_numpy(from_pixels(pixels, fmt))).numpy(), fmt)


def psnr_db(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR of two uint8 arrays, data range 255."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / mse))


@dataclass
class Artifact:
    session: Session
    info: dict
    out_dir: Path


def export(target: str, graph: torch.nn.Module, folder: Path, fmt: str | None, **options) -> Artifact:
    converter = get_target(target)
    exported = converter.export(graph, folder, ExportOptions(input_size=SIZE, pixel_format=fmt, **options))
    return Artifact(converter.open_session(folder, export=exported.info), exported.info, folder)


@pytest.fixture(scope="module")
def model() -> NAFNet:
    return randomize(NAFNet(TINY_CONFIG))


@pytest.fixture(scope="module")
def pairs(model: NAFNet, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Artifact, Artifact]]:
    """Per target, the tensor and the default-format image artifact of one deploy graph of ``model``."""
    found = {}
    for target in FORMATS:
        converter = get_target(target)
        graph = deploy(model, norm_form=converter.norm_form, input_size=SIZE)
        tensor = export(target, graph, tmp_path_factory.mktemp(f"{target}-tensor"), None)
        image = export(target, graph, tmp_path_factory.mktemp(f"{target}-image"), converter.pixel_formats[0])
        found[target] = tensor, image
    return found


@pytest.fixture(scope="module")
def formats(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Artifact]:
    """Every pixel format of both targets, of one one-block graph per target (gray: a one-channel model)."""
    three, one = randomize(NAFNet(ONE_BLOCK), seed=1), randomize(NAFNet(replace(ONE_BLOCK, img_channels=1)), seed=2)
    found = {}
    for target, fmts in FORMATS.items():
        converter = get_target(target)
        for fmt in (*fmts, "gray"):
            graph = deploy(one if fmt == "gray" else three, norm_form=converter.norm_form, input_size=SIZE)
            found[target, fmt] = export(target, graph, tmp_path_factory.mktemp(f"{target}-{fmt}"), fmt)
    return found


@pytest.mark.parametrize("target", list(FORMATS))
def test_image_artifact_restores_kodak_like_the_tensor_artifact(target: str, pairs: dict) -> None:
    tensor, image = pairs[target]
    fmt = get_target(target).pixel_formats[0]
    assert image.info["io"] == "image" and image.info["pixel_format"] == fmt and tensor.info["io"] == "tensor"
    assert image.session.info["io"] == "image" and image.session.info["pixel_format"] == fmt
    for index in range(len(KODAK)):
        pixels = kodak(index, fmt)
        out = image.session.native(pixels)  # the app's call: uint8 pixels in, uint8 pixels out
        assert out.dtype == np.uint8 and out.shape == pixels.shape == (1, *SIZE, 4 if "a" in fmt else 3)
        via_tensor = to_pixels(tensor.session.run(from_pixels(pixels, fmt)), fmt)
        agreement = level_agreement(from_pixels(out, fmt), from_pixels(via_tensor, fmt))
        assert agreement["within_one_level_share"] >= MIN_WITHIN_ONE_LEVEL and agreement["max_level_diff"] <= 1
        # the float adapter validation uses: the same call behind to_pixels/from_pixels
        assert np.array_equal(image.session.run(from_pixels(pixels, fmt)), from_pixels(out, fmt))
    with pytest.raises(ValueError, match="uint8 pixels"):
        image.session.native(kodak(0, fmt).astype(np.float32) / 255.0)


def test_xnnpack_delegates_the_network_of_image_programs(pairs: dict) -> None:
    tensor, image = pairs["executorch"]
    assert tensor.info["delegated_partitions"] == image.info["delegated_partitions"] == 1
    assert tensor.info["ops_outside_delegate"] == {}
    assert image.info["ops_outside_delegate"] == IO_OPS_OUTSIDE


@pytest.mark.parametrize("target", list(FORMATS))
def test_every_pixel_format_keeps_its_channel_order(target: str, formats: dict) -> None:
    rgb = kodak(0, "rgb")
    out = {}
    for fmt in FORMATS[target]:
        pixels = to_pixels(from_pixels(rgb, "rgb"), fmt)  # the same photo in fmt's byte order, alpha 255
        if fmt in ("rgba", "bgra"):
            other_alpha = pixels.copy()
            other_alpha[..., 3] = np.random.default_rng(3).integers(0, 256, other_alpha.shape[:3], dtype=np.uint8)
            out[fmt] = formats[target, fmt].session.native(other_alpha)
        else:
            out[fmt] = formats[target, fmt].session.native(pixels)
        if target == "executorch":
            assert formats[target, fmt].info["ops_outside_delegate"] == IO_OPS_OUTSIDE
    assert not np.array_equal(out["rgb"], rgb)  # the network changed the photo
    assert np.array_equal(out["bgr"], out["rgb"][..., ::-1])
    assert np.array_equal(out["rgba"][..., :3], out["rgb"]) and (out["rgba"][..., 3] == 255).all()
    assert np.array_equal(out["bgra"][..., :3], out["rgb"][..., ::-1]) and (out["bgra"][..., 3] == 255).all()
    gray = formats[target, "gray"]
    pixels = kodak(1, "gray")
    got = gray.session.native(pixels)
    assert gray.info["pixel_format"] == "gray" and got.shape == (1, *SIZE, 1) and got.dtype == np.uint8
    one_channel = randomize(NAFNet(replace(ONE_BLOCK, img_channels=1)), seed=2)
    graph = deploy(one_channel, norm_form=get_target(target).norm_form, input_size=SIZE)
    agreement = level_agreement(from_pixels(got, "gray"), from_pixels(reference(graph, pixels, "gray"), "gray"))
    assert agreement["within_one_level_share"] >= MIN_WITHIN_ONE_LEVEL and agreement["max_level_diff"] <= 1


@pytest.mark.parametrize("target", list(FORMATS))
def test_formats_that_cannot_carry_the_model_are_refused(target: str, tmp_path: Path) -> None:
    converter = get_target(target)
    assert set(converter.pixel_formats) == {"rgb", "bgr", "rgba", "bgra", "gray"}
    three = deploy(NAFNet(ONE_BLOCK), norm_form=converter.norm_form)
    one = deploy(NAFNet(replace(ONE_BLOCK, img_channels=1)), norm_form=converter.norm_form)
    with pytest.raises(OptionError, match="3-channel model takes --pixel-format rgb, bgr, rgba or bgra, not gray"):
        converter.export(three, tmp_path, ExportOptions(input_size=SIZE, pixel_format="gray"))
    with pytest.raises(OptionError, match="1-channel model takes --pixel-format gray, not rgba"):
        converter.export(one, tmp_path, ExportOptions(input_size=SIZE, pixel_format="rgba"))
    with pytest.raises(OptionError, match="--pixel-format"):
        converter.check_options(ExportOptions(input_size=SIZE, pixel_format="argb"))
    assert list(tmp_path.iterdir()) == []


def test_onnx_image_model_rounds_inside_and_is_dynamic_on_nhwc_height_and_width(
    model: NAFNet, pairs: dict, tmp_path: Path
) -> None:
    _, fixed = pairs["onnx"]
    histogram = fixed.info["op_histogram"]
    assert "Round" not in histogram and histogram["Cast"] == 2 and histogram["Clip"] == 1  # rgb: no channel moves
    graph = deploy(model, norm_form="mvn", input_size=SIZE)
    dynamic = export("onnx", graph, tmp_path, "rgb", settings={"dynamic": True})
    assert dynamic.info["dynamic"] and dynamic.info["io"] == "image"
    import onnx

    dims = onnx.load(str(tmp_path / "model.onnx")).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == [1, "height", "width", 3]  # symbolic NHWC height, width
    pixels = kodak(2, "rgb")
    assert np.array_equal(dynamic.session.native(pixels), fixed.session.native(pixels))
    small = pixels[:, :32, :48]
    got = dynamic.session.native(np.ascontiguousarray(small))
    assert got.shape == (1, 32, 48, 3)
    agreement = level_agreement(from_pixels(got, "rgb"), from_pixels(reference(graph, small, "rgb"), "rgb"))
    assert agreement["within_one_level_share"] >= MIN_WITHIN_ONE_LEVEL and agreement["max_level_diff"] <= 1


@pytest.fixture(scope="module")
def bundled(model: NAFNet, tmp_path_factory: pytest.TempPathFactory) -> tuple[Artifact, tuple, tuple]:
    """An rgba program with a bundle whose test case is what the pipeline gives: uint8 crops and the reference
    model's outputs for them as pixels."""
    graph = deploy(model, norm_form="conv-mean", input_size=SIZE)
    inputs = (kodak(0, "rgba"), kodak(1, "rgba", top=300))
    outputs = tuple(reference(model, x, "rgba") for x in inputs)
    options = {"settings": {"bundle": True}, "test_inputs": inputs, "test_outputs": outputs}
    return export("executorch", graph, tmp_path_factory.mktemp("bundle"), "rgba", **options), inputs, outputs


def test_bundled_program_carries_uint8_test_io(bundled: tuple[Artifact, tuple, tuple]) -> None:
    from executorch.devtools.bundled_program.serialize import deserialize_from_flatbuffer_to_bundled_program
    from executorch.extension.pybindings.portable_lib import _load_bundled_program_from_buffer

    artifact, inputs, outputs = bundled
    info = artifact.info
    assert info["bundle"] == "model.bpte" and info["bundled_test_cases"] == 2 and info["io"] == "image"
    data = (artifact.out_dir / "model.bpte").read_bytes()
    schema = deserialize_from_flatbuffer_to_bundled_program(data)
    assert bytes(schema.program) == (artifact.out_dir / "model.pte").read_bytes()
    (suite,) = schema.method_test_suites
    for case, x, y in zip(suite.test_cases, inputs, outputs, strict=True):
        (stored_in,), (stored_out,) = case.inputs, case.expected_outputs
        assert np.array_equal(np.frombuffer(bytes(stored_in.val.data), np.uint8).reshape(x.shape), x)
        assert np.array_equal(np.frombuffer(bytes(stored_out.val.data), np.uint8).reshape(y.shape), y)

    got = [artifact.session.native(x) for x in inputs]
    agreement = level_agreement(
        np.concatenate([g.ravel() for g in got]) / 255.0, np.concatenate([y.ravel() for y in outputs]) / 255.0
    )
    assert info["bundle_level_agreement"] == pytest.approx(agreement)
    assert agreement["within_one_level_share"] >= MIN_WITHIN_ONE_LEVEL and agreement["max_level_diff"] <= 1
    # the runtime compares uint8 outputs byte for byte whatever the tolerance: a case verifies where it is exact
    bundle = _load_bundled_program_from_buffer(data)
    for case, (g, y) in enumerate(zip(got, outputs, strict=True)):
        if np.array_equal(g, y):
            bundle.verify_result_with_bundled_expected_output("forward", case, rtol=0.0, atol=0.0)
        else:
            with pytest.raises(RuntimeError, match="verification failed"):
                bundle.verify_result_with_bundled_expected_output("forward", case, rtol=1.0, atol=1.0)


def test_bundle_test_io_must_be_pixels_of_the_format() -> None:
    converter = get_target("executorch")
    bundle = {"bundle": True}
    x = kodak(0, "rgba")
    converter.check_options(
        ExportOptions(SIZE, settings=bundle, test_inputs=(x,), test_outputs=(x,), pixel_format="rgba")
    )
    for wrong in (from_pixels(x, "rgba"), x[..., :3], x.astype(np.float32)):
        with pytest.raises(ValueError, match=r"uint8 \(1, 64, 64, 4\) rgba pixels"):
            converter.check_options(ExportOptions(SIZE, settings=bundle, test_inputs=(wrong,), pixel_format="rgba"))
    with pytest.raises(ValueError, match=r"must be \(1, C, 64, 64\)"):  # tensor I/O keeps its float NCHW check
        converter.check_options(ExportOptions(SIZE, settings=bundle, test_inputs=(x,)))


@pytest.fixture(scope="module")
def int8(model: NAFNet, tmp_path_factory: pytest.TempPathFactory) -> tuple[Artifact, torch.nn.Module, object]:
    """An int8 rgba program from a PTQ calibration on two crops, its fp32 deploy graph, and the quantizer."""
    from nafnet_edge.quantization import get_quantizer

    graph = deploy(model, norm_form="conv-mean", input_size=SIZE)
    quantizer = get_quantizer("executorch")
    calibration = [torch.from_numpy(from_pixels(kodak(i, "rgb", top=100), "rgb")) for i in range(2)]
    prepared = quantizer.prepare(graph, calibration[0], qat=False, calibration=calibration)
    with torch.no_grad():
        for x in calibration:
            prepared(x)
    folder = tmp_path_factory.mktemp("int8")
    exported = quantizer.export(prepared, folder, calibration[0], pixel_format="rgba")
    session = get_target("executorch").open_session(folder, export=exported.info)
    return Artifact(session, exported.info, folder), graph, (quantizer, prepared)


def test_int8_image_program_runs_on_pixels_in_one_partition(int8: tuple) -> None:
    artifact, graph, _ = int8
    info = artifact.info
    assert info["io"] == "image" and info["pixel_format"] == "rgba"
    assert info["delegated_partitions"] == 1 and info["ops_outside_delegate"] == IO_OPS_OUTSIDE
    assert info["quantize_dequantize_outside_delegate"] == 0
    assert "scale 1/255, zero point -128" in info["input_quantization"]
    for index in range(len(KODAK)):
        pixels = kodak(index, "rgba", top=300, left=300)  # regions calibration never saw
        out = artifact.session.native(pixels)
        assert out.dtype == np.uint8 and out.shape == pixels.shape and (out[..., 3] == 255).all()
        assert MIN_INT8_PSNR_DB < psnr_db(out, reference(graph, pixels, "rgba")) < 80.0  # int8, not a float program


def test_int8_input_quantization_is_exact_on_8_bit_pixels(int8: tuple) -> None:
    """On the pixel grid the int8 input codes are the pixels minus 128 and dequantize to pixels / 255 exactly."""
    from nafnet_edge.quantization.xnnpack import pixel_grid_input

    _, _, (quantizer, prepared) = int8

    def input_grids(module: torch.fx.GraphModule) -> list[tuple]:
        inputs = [n for n in module.graph.nodes if n.op == "placeholder"]
        quantize = torch.ops.quantized_decomposed.quantize_per_tensor.default
        return [tuple(q.args[1:3]) for x in inputs for q in x.users if q.target is quantize]

    converted = quantizer.convert(prepared)
    before = input_grids(converted)
    rewired = copy.deepcopy(converted)
    assert pixel_grid_input(rewired).endswith("exactly pixel - 128")
    assert input_grids(rewired) == [(1.0 / 255.0, -128)]
    pixels = torch.arange(256, dtype=torch.uint8)
    x = pixels.to(torch.float32) * (1.0 / 255.0)  # what the image-I/O wrapper feeds the network
    ops = torch.ops.quantized_decomposed
    codes = ops.quantize_per_tensor.default(x, 1.0 / 255.0, -128, -128, 127, torch.int8)
    assert torch.equal(codes.to(torch.int16), pixels.to(torch.int16) - 128)
    assert torch.equal(ops.dequantize_per_tensor.default(codes, 1.0 / 255.0, -128, -128, 127, torch.int8), x)
    # calibration alone finds nearly that grid, not exactly it
    ((scale, zero_point),) = before
    assert zero_point == -128 and scale != 1.0 / 255.0 and abs(scale * 255.0 - 1.0) < 1e-2
