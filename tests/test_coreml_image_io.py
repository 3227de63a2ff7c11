"""Core ML image I/O (``--io image``, nafnet_edge.converters.coreml): ML programs whose input and output are Core ML
images, run through their sessions on uint8 pixels (elsewhere than macOS: the saved program evaluated in numpy,
including the 1/255 scale coremltools writes after the image input), against the same model's tensor-I/O artifact
and PyTorch; BGR and gray; the int8 (W8A8) program behind the same I/O; the USAGE.md Python through the pipeline.

Width-8 model with randomized weights on a 64x64 Kodak crop. "Levels" are 8-bit output values; "within one level"
is the share of samples whose 8-bit values differ by at most one.
"""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from helpers import TINY_CONFIG, randomize, require, run_usage_python

ct = require("coremltools")

import cv2  # noqa: E402
import torch  # noqa: E402

from nafnet_edge.cli import main  # noqa: E402
from nafnet_edge.converters import ExportOptions, SessionSettings, get_target  # noqa: E402
from nafnet_edge.converters import coreml as coreml_module  # noqa: E402
from nafnet_edge.converters.coreml import CoreMLTarget  # noqa: E402
from nafnet_edge.converters.coreml_mil import load_program  # noqa: E402
from nafnet_edge.deploy import DeployNAFNet, deploy  # noqa: E402
from nafnet_edge.errors import OptionError  # noqa: E402
from nafnet_edge.images import read_image  # noqa: E402
from nafnet_edge.model import NAFNetConfig, build_model  # noqa: E402
from nafnet_edge.pixels import from_pixels, level_agreement, to_pixels  # noqa: E402

SIZE = (64, 64)
GRAY_CONFIG = NAFNetConfig(width=8, enc_blk_nums=(1, 1), middle_blk_num=1, dec_blk_nums=(1, 1), img_channels=1)
MIN_WITHIN_ONE_LEVEL = 0.999  # image vs tensor I/O (fp32, fp16, int8) and vs PyTorch (gray fp16)


def _pixels(channels: int = 3) -> np.ndarray:
    """A 64x64 Kodak crop as uint8 (1, H, W, 3) RGB, or (1, H, W, 1) gray."""
    path = Path(str(resources.files("nafnet_edge") / "data" / "kodak" / "kodim23.png"))
    crop = read_image(path).pixels[100 : 100 + SIZE[0], 200 : 200 + SIZE[1]]
    x = np.ascontiguousarray(crop.transpose(2, 0, 1)[None])
    if channels == 1:
        x = x.mean(axis=1, keepdims=True)
    return to_pixels(x, "rgb" if channels == 3 else "gray")


def _torch_levels(graph: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return graph(torch.from_numpy(x)).numpy()


def _level_diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a.astype(np.int16) - b.astype(np.int16))


@pytest.fixture(scope="module")
def graph() -> DeployNAFNet:
    return deploy(randomize(build_model(TINY_CONFIG)), norm_form="layer-norm", input_size=SIZE)


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    return _pixels()


def _export(graph, tmp_path_factory, precision: str, pixel_format: str | None, **settings):
    out = tmp_path_factory.mktemp(f"coreml-{precision}-{pixel_format or 'tensor'}")
    options = ExportOptions(input_size=SIZE, precision=precision, pixel_format=pixel_format, settings=settings)
    exported = CoreMLTarget().export(graph, out, options)
    return out, exported, CoreMLTarget().load_runner(out, export=exported.info)


@pytest.fixture(scope="module")
def artifacts(graph, tmp_path_factory):
    """(precision, pixel format or None) -> (directory, Exported, session)."""
    keys = [("fp32", None), ("fp32", "rgb"), ("fp16", None), ("fp16", "rgb"), ("fp32", "bgr")]
    return {(p, f): _export(graph, tmp_path_factory, p, f) for p, f in keys}


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_image_io_agrees_with_tensor_io(artifacts, pixels, precision):
    """The same pixels through the tensor artifact (rounded outside) and the image artifact (rounded inside)."""
    _, tensor_export, tensor = artifacts[(precision, None)]
    _, image_export, image = artifacts[(precision, "rgb")]
    assert tensor_export.info["io"] == "tensor" and "pixel_format" not in tensor_export.info
    assert image_export.info["io"] == "image" and image_export.info["pixel_format"] == "rgb"
    assert image.info["io"] == "image" and image.info["runtime"] == tensor.info["runtime"]

    restored = image.native(pixels)
    assert restored.dtype == np.uint8 and restored.shape == pixels.shape
    diff = _level_diff(restored, to_pixels(tensor.run(from_pixels(pixels, "rgb")), "rgb"))
    assert np.mean(diff <= 1) >= MIN_WITHIN_ONE_LEVEL
    if precision == "fp32":
        assert diff.max() <= 1  # measured 0: every level equal
    else:
        assert diff.max() <= 2  # measured 1 on 2.1% of samples (fp16 rounds y and y * 255 inside)
    # the float adapter validation uses: the same call, pixels converted on the way in and out
    adapted = image.run(from_pixels(pixels, "rgb"))
    assert adapted.dtype == np.float32 and np.array_equal(to_pixels(adapted, "rgb"), restored)


def test_program_spec_and_metadata(artifacts):
    out, exported, _ = artifacts[("fp16", "rgb")]
    spec = ct.utils.load_spec(str(out / "model.mlpackage"))
    (inp,), (outp,) = spec.description.input, spec.description.output
    rgb = ct.proto.FeatureTypes_pb2.ImageFeatureType.ColorSpace.Value("RGB")
    for feature in (inp, outp):
        assert feature.type.WhichOneof("Type") == "imageType"
        assert (feature.type.imageType.colorSpace, feature.type.imageType.height) == (rgb, SIZE[0])
        assert feature.type.imageType.width == SIZE[1]
    assert "8 bits" in inp.shortDescription and "rounded to 8-bit levels" in outp.shortDescription
    meta = spec.description.metadata.userDefined
    assert (meta["nafnet_edge.io"], meta["nafnet_edge.pixel_format"]) == ("image", "rgb")
    info = exported.info
    assert info["color_layout"] == "RGB" and info["io_dtypes"] == {"image": "float32", "restored": "float32"}
    assert info["mil_ops"]["round"] == info["mil_ops"]["clip"] == 1 and info["mil_ops"]["cast"] == 2
    program = load_program(out / "model.mlpackage")
    assert program.images == {"image": "RGB", "restored": "RGB"}
    assert [op.type for op in program.ops[-4:]] == ["clip", "mul", "round", "cast"]  # fp16 inside, float32 out


def test_the_evaluator_runs_the_input_scale(artifacts, graph, pixels):
    """The 1/255 scale coremltools writes after the image input is an op of the program, and the evaluator runs it:
    its output is pixels / 255; the whole fp32 program equals PyTorch on pixels / 255, clamped and rounded."""
    out, _, session = artifacts[("fp32", "rgb")]
    program = load_program(out / "model.mlpackage")
    first = program.ops[0]
    assert first.type == "mul" and first.inputs["x"] == "image"
    x = np.ascontiguousarray(pixels.transpose(0, 3, 1, 2), dtype=np.float32)  # what Core ML binds: 0..255
    scaled = program.run({"image": x}, fetch=[first.outputs[0]])[first.outputs[0]]
    assert np.abs(scaled - x / 255.0).max() <= 1e-7
    reference = _torch_levels(graph, from_pixels(pixels, "rgb"))
    agreement = level_agreement(from_pixels(session.native(pixels), "rgb"), reference)
    assert agreement["max_level_diff"] <= 1 and agreement["exact_share"] >= 0.999  # measured 1.0 / 0
    with pytest.raises(ValueError, match="whole numbers 0..255"):
        program.run({"image": x / 255.0})  # floats in [0, 1] are not what an image input holds


def test_identity_model_returns_every_level_unchanged(tmp_path_factory):
    """A model whose output is its input (ending conv zero: only the global residual): in fp16 the pixels go
    through the scale, the network, the clamp, the * 255 and the round and come back exactly."""
    model = randomize(build_model(TINY_CONFIG))
    with torch.no_grad():
        model.ending.weight.zero_()
        model.ending.bias.zero_()
    identity = deploy(model, norm_form="layer-norm", input_size=SIZE)
    _, _, session = _export(identity, tmp_path_factory, "fp16", "rgb")
    levels = np.arange(SIZE[0] * SIZE[1] * 3, dtype=np.int64) * 7 % 256  # every level, in every channel
    pixels = levels.reshape(1, SIZE[0], SIZE[1], 3).astype(np.uint8)
    assert np.array_equal(session.native(pixels), pixels)


def test_bgr_reverses_the_channels_around_the_model(artifacts, pixels):
    out, exported, bgr = artifacts[("fp32", "bgr")]
    _, _, rgb = artifacts[("fp32", "rgb")]
    assert exported.info["color_layout"] == "BGR" and exported.info["mil_ops"]["reverse"] == 2
    assert load_program(out / "model.mlpackage").images == {"image": "BGR", "restored": "BGR"}
    restored = bgr.native(np.ascontiguousarray(pixels[..., ::-1]))
    assert np.array_equal(restored[..., ::-1], rgb.native(pixels))  # fp32: the same levels, channels swapped


def test_gray_for_one_channel_models(tmp_path_factory):
    gray_graph = deploy(randomize(build_model(GRAY_CONFIG)), norm_form="layer-norm", input_size=SIZE)
    out, exported, session = _export(gray_graph, tmp_path_factory, "fp16", "gray")
    spec = ct.utils.load_spec(str(out / "model.mlpackage"))
    grayscale = ct.proto.FeatureTypes_pb2.ImageFeatureType.ColorSpace.Value("GRAYSCALE")  # 8-bit, not FLOAT16
    assert spec.description.input[0].type.imageType.colorSpace == grayscale
    assert spec.description.output[0].type.imageType.colorSpace == grayscale
    assert exported.info["io_dtypes"] == {"image": "float32", "restored": "float32"}
    pixels = _pixels(channels=1)
    restored = session.native(pixels)
    assert restored.dtype == np.uint8 and restored.shape == pixels.shape == (1, *SIZE, 1)
    agreement = level_agreement(from_pixels(restored, "gray"), _torch_levels(gray_graph, from_pixels(pixels, "gray")))
    assert agreement["within_one_level_share"] >= MIN_WITHIN_ONE_LEVEL and agreement["max_level_diff"] <= 2

    target = CoreMLTarget()
    with pytest.raises(OptionError, match="1-channel model takes --pixel-format gray"):
        target.export(gray_graph, tmp_path_factory.mktemp("refused"), ExportOptions(SIZE, pixel_format="rgb"))


def test_refused_image_options(graph, tmp_path):
    target = CoreMLTarget()
    assert target.pixel_formats == ("rgb", "bgr", "gray") and target.default_pixel_format(3) == "rgb"
    with pytest.raises(OptionError, match="3-channel model takes --pixel-format"):
        target.export(graph, tmp_path, ExportOptions(SIZE, pixel_format="gray"))
    with pytest.raises(OptionError, match="takes --pixel-format rgb, bgr, gray, not rgba"):
        target.check_options(ExportOptions(SIZE, pixel_format="rgba"))
    with pytest.raises(OptionError, match="--sizes with --io image"):
        target.check_options(ExportOptions(SIZE, pixel_format="rgb", settings={"extra_sizes": ((96, 128),)}))
    target.check_options(ExportOptions(SIZE, pixel_format="rgb", settings={"extra_sizes": (SIZE,)}))  # no 2nd size
    with pytest.raises(OptionError, match="executorch-coreml has tensor I/O only"):
        get_target("executorch-coreml").check_options(ExportOptions(SIZE, pixel_format="rgb"))


def test_session_refuses_what_is_not_pixels(artifacts, pixels):
    out, exported, session = artifacts[("fp32", "rgb")]
    with pytest.raises(ValueError, match=r"expected uint8 pixels \(1, H, W, 3\)"):
        session.native(from_pixels(pixels, "rgb"))
    with pytest.raises(ValueError, match="not a size the model accepts"):
        session.native(np.zeros((1, 32, 32, 3), np.uint8))
    with pytest.raises(Exception, match="tensor I/O"):  # the manifest and the package disagree
        CoreMLTarget().load_runner(out, export={k: v for k, v in exported.info.items() if k != "pixel_format"})


# --- the macOS path and USAGE.md's Python, with Core ML stood in for by the evaluator ---------------------------


class EvaluatedMLModel:
    """``ct.models.MLModel`` for an image-I/O package, off macOS: ``predict`` takes and returns PIL images as
    coremltools does, converting them to and from the model's colour space as Core ML does, and runs the program
    in the numpy evaluator."""

    def __init__(self, path: str, compute_units=None) -> None:
        self.program = load_program(path)
        self.space = self.program.images["image"]

    def predict(self, data):
        from PIL import Image

        mode = "L" if self.space == "GRAYSCALE" else "RGB"
        a = np.atleast_3d(np.asarray(data["image"].convert(mode)))
        a = a[:, :, ::-1] if self.space == "BGR" else a
        y = self.program.run({"image": a.transpose(2, 0, 1)[None].astype(np.float32)})["restored"][0]
        y = y.transpose(1, 2, 0).astype(np.uint8)
        y = y[:, :, ::-1] if self.space == "BGR" else y
        return {"restored": Image.fromarray(np.ascontiguousarray(y).squeeze(), mode)}


def test_macos_session_glue_matches_the_evaluator(artifacts, pixels, monkeypatch):
    """The session a Mac opens (``MLModel.predict`` on PIL images) gives the evaluator's pixels, for BGR too."""
    for fmt in ("rgb", "bgr"):
        out, exported, evaluated = artifacts[("fp32", fmt)]
        given = np.ascontiguousarray(pixels[..., ::-1]) if fmt == "bgr" else pixels
        with monkeypatch.context() as m:
            m.setattr(coreml_module.sys, "platform", "darwin")
            m.setattr(ct.models, "MLModel", EvaluatedMLModel)
            session = CoreMLTarget().open_session(out, export=exported.info, settings=SessionSettings())
        assert session.runtime == "coreml" and session.info["io"] == "image"
        assert np.array_equal(session.native(given), evaluated.native(given))


def test_usage_python_restores_a_photo_like_nafnet_edge_run(tiny_checkpoint, kodak_data, tmp_path, monkeypatch):
    """Convert through the pipeline (BGR, fp16, validated with the 8-bit budget), then run USAGE.md's Python as
    written on a photo larger than the tile, with Core ML stood in for by the evaluator."""
    from nafnet_edge.api import convert

    monkeypatch.setenv("NAFNET_EDGE_CACHE", str(tmp_path / "cache"))
    result = convert(
        tiny_checkpoint,
        target="coreml",
        output=tmp_path / "out",
        input_size=64,
        val_data=kodak_data,
        io="image",
        pixel_format="bgr",
    )
    assert result.passed and result.directory.name == "coreml-fp16-image"
    assert result.validation is not None
    summary = result.validation.summary
    assert summary["within_one_level_share_min"] >= MIN_WITHIN_ONE_LEVEL  # measured 1.0, max 1 level
    note = (result.directory / "USAGE.md").read_text()
    assert "VNCoreMLRequest" in note and "CVPixelBuffer" in note and "not compiled" in note
    folder = Path(shutil.copytree(result.directory, tmp_path / "snippet"))
    monkeypatch.setattr(ct.models, "MLModel", EvaluatedMLModel)
    restored = run_usage_python(folder, kodak_data / "crop0.png")
    photo = cv2.imread(str(folder / "photo.png"))
    assert restored.shape == photo.shape == (96, 120, 3)
    assert main(["run", str(result.directory), str(folder / "photo.png"), "-o", str(tmp_path / "run")]) == 0
    by_run = cv2.imread(str(tmp_path / "run" / "photo.png"))
    assert _level_diff(restored, by_run).max() <= 1


# --- int8 -------------------------------------------------------------------------------------------------------


def test_int8_w8a8_behind_image_io(graph, pixels, tmp_path):
    """The W8A8 PTQ program with image I/O converts, holds int8, and the evaluator runs it: its levels match the
    tensor-I/O program exported from the same calibrated graph, rounded outside."""
    require("executorch")
    require("torchao")
    from nafnet_edge.quantization import get_quantizer

    quantizer = get_quantizer("coreml")
    x = torch.from_numpy(from_pixels(pixels, "rgb"))
    prepared = quantizer.prepare(graph, x, qat=False, calibration=[x])
    with torch.no_grad():
        prepared(x)
    image_export = quantizer.export(prepared, tmp_path / "image", x, pixel_format="rgb")
    tensor_export = quantizer.export(prepared, tmp_path / "tensor", x)
    info = image_export.info
    assert info["io"] == "image" and info["pixel_format"] == "rgb" and info["quantization_mode"] == "w8a8"
    assert tensor_export.info["io"] == "tensor"
    assert info["int8_ops"] == tensor_export.info["int8_ops"] and info["int8_ops"]["conv"] > 0
    assert info["mil_ops"]["round"] == 1 and info["mil_ops"]["quantize"] == tensor_export.info["mil_ops"]["quantize"]
    image = CoreMLTarget().load_runner(tmp_path / "image", export=info)
    tensor = CoreMLTarget().load_runner(tmp_path / "tensor", export=tensor_export.info)
    restored = image.native(pixels)
    assert restored.dtype == np.uint8 and restored.shape == pixels.shape
    diff = _level_diff(restored, to_pixels(tensor.run(from_pixels(pixels, "rgb")), "rgb"))
    assert np.mean(diff <= 1) >= MIN_WITHIN_ONE_LEVEL and diff.max() <= 2  # measured 1.0, max 1
    with pytest.raises(OptionError, match="3-channel model takes"):
        quantizer.export(prepared, tmp_path / "gray", x, pixel_format="gray")
