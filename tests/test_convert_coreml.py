"""Core ML targets (nafnet_edge.converters.coreml): the .mlpackage and the Core ML-delegated .pte, exported
from a tiny deploy graph and run through their own sessions (Core ML on macOS, elsewhere the saved ML program
evaluated in numpy in its own precision), compared with the PyTorch graph on a Kodak crop."""

from __future__ import annotations

import dataclasses
import sys
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from helpers import require

ct = require("coremltools")

import torch  # noqa: E402
from helpers import randomize  # noqa: E402

from nafnet_edge.converters import ExportOptions, NotRunnable, SessionSettings, get_target  # noqa: E402
from nafnet_edge.converters.coreml import CoreMLTarget, ExecuTorchCoreMLTarget  # noqa: E402
from nafnet_edge.deploy import deploy  # noqa: E402
from nafnet_edge.errors import MissingBackendError  # noqa: E402
from nafnet_edge.images import read_image  # noqa: E402
from nafnet_edge.model import NAFNetConfig, build_model  # noqa: E402

SIZE = (64, 64)
EXTRA = (96, 128)
CONFIG = NAFNetConfig(width=8, enc_blk_nums=(1, 1), middle_blk_num=1, dec_blk_nums=(1, 1))
METADATA = {"nafnet_edge.release": "test-release", "nafnet_edge.source_sha256": "ab" * 32}
FP32_MAX_ABS = 2e-6  # measured 2.4e-7 to 3.6e-7 on three Kodak crops (.mlpackage and .pte alike)
FP16_MIN_PSNR = 60.0  # measured 68.2 to 70.1 dB
EVALUATED = sys.platform != "darwin"  # off macOS the runners evaluate the saved ML program in numpy


def _crop(size: tuple[int, int]) -> np.ndarray:
    path = Path(str(resources.files("nafnet_edge") / "data" / "kodak" / "kodim23.png"))
    h, w = size
    crop = read_image(path).pixels[100 : 100 + h, 200 : 200 + w]
    return np.ascontiguousarray(crop.transpose(2, 0, 1)[None])


def _torch(graph: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return graph(torch.from_numpy(x)).numpy()


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)))


@pytest.fixture(scope="module")
def graph() -> torch.nn.Module:
    return deploy(randomize(build_model(CONFIG)), norm_form="layer-norm", input_size=SIZE, metadata=METADATA)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return _crop(SIZE)


def _export(converter, graph, tmp_path_factory, *, settings=None, **options):
    out = tmp_path_factory.mktemp(converter.name)
    exported = converter.export(graph, out, ExportOptions(input_size=SIZE, settings=settings or {}, **options))
    return out, exported


@pytest.fixture(scope="module")
def fp32(graph, tmp_path_factory):
    return _export(CoreMLTarget(), graph, tmp_path_factory, precision="fp32")


@pytest.fixture(scope="module")
def fp16(graph, tmp_path_factory):
    """The default precision, with a second enumerated size."""
    return _export(CoreMLTarget(), graph, tmp_path_factory, precision="fp16", settings={"extra_sizes": (EXTRA,)})


def test_registry_and_class_facts():
    coreml, pte = get_target("coreml"), get_target("executorch-coreml")
    assert isinstance(coreml, CoreMLTarget) and isinstance(pte, ExecuTorchCoreMLTarget)
    assert (coreml.artifact, pte.artifact) == ("model.mlpackage", "model.pte")
    assert coreml.default_precision == pte.default_precision == "fp16"
    assert coreml.norm_form == pte.norm_form == "layer-norm"
    assert [o.flag for o in coreml.options] == ["--sizes", "--min-target", "--weights-only", "--compute-units"]
    assert [o.flag for o in pte.options] == ["--min-target"]
    assert coreml.quantizer_options({"weights_only": True}) == {"mode": "weights"}
    assert coreml.quantizer_options({}) == {} and pte.quantizer is None


def test_fp32_matches_pytorch(fp32, graph, image):
    out, exported = fp32
    assert exported.files == ["model.mlpackage"] and (out / "model.mlpackage" / "Manifest.json").is_file()
    info = exported.info
    assert info["compute_precision"] == "fp32" and info["minimum_target"] == "iOS17"
    assert info["io_dtypes"] == {"image": "float32", "restored": "float32"}
    assert {"conv", "conv_transpose", "layer_norm", "reduce_mean"} <= info["mil_ops"].keys()
    assert "cast" not in info["mil_ops"]
    runner = CoreMLTarget().load_runner(out, export=info)
    assert runner.info["runtime"] == ("mil-numpy-evaluator" if EVALUATED else "coreml")
    assert runner.info["compute_precision"] == "fp32"
    restored = runner.run(image)
    assert restored.dtype == np.float32 and restored.shape == image.shape
    assert np.abs(restored - _torch(graph, image)).max() <= FP32_MAX_ABS


def test_fp16_is_computed_in_fp16(fp16, fp32, graph, image):
    out, exported = fp16
    assert exported.info["compute_precision"] == "fp16"
    assert exported.info["io_dtypes"] == {"image": "float32", "restored": "float32"}  # casts inside
    assert exported.info["mil_ops"]["cast"] == 2
    runner = CoreMLTarget().load_runner(out, export=exported.info)
    assert runner.info["compute_precision"] == "fp16"
    restored = runner.run(image)
    assert restored.dtype == np.float32 and np.isfinite(restored).all()
    assert _psnr(restored, _torch(graph, image)) >= FP16_MIN_PSNR
    fp32_runner = CoreMLTarget().load_runner(fp32[0], export=fp32[1].info)
    assert np.abs(restored - fp32_runner.run(image)).max() > 1e-4  # fp16 rounding is really there


def test_spec_names_descriptions_and_metadata(fp16, graph):
    model = ct.models.MLModel(str(fp16[0] / "model.mlpackage"), skip_model_load=True)
    spec = model.get_spec()
    assert spec.WhichOneof("Type") == "mlProgram"
    assert spec.specificationVersion == 8  # iOS17 / macOS14
    (inp,), (outp,) = spec.description.input, spec.description.output
    assert (inp.name, outp.name) == ("image", "restored")
    float32 = ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT32
    assert inp.type.multiArrayType.dataType == outp.type.multiArrayType.dataType == float32
    assert "RGB" in inp.shortDescription and "[0, 1]" in inp.shortDescription
    assert f"multiples of {graph.pad_multiple}" in inp.shortDescription
    assert "not clamped" in outp.shortDescription
    assert "test-release" in model.short_description and model.author == "nafnet-edge"
    assert "abab" in model.version
    meta = model.user_defined_metadata
    assert meta["nafnet_edge.input_sizes"] == "64x64,96x128"
    assert meta["nafnet_edge.compute_precision"] == "fp16"
    assert meta["nafnet_edge.minimum_target"] == "iOS17"
    assert meta["nafnet_edge.padding_multiple"] == str(graph.pad_multiple)
    assert meta["nafnet_edge.release"] == "test-release"  # from graph.recipe.metadata


def test_enumerated_sizes(fp16, graph):
    out, exported = fp16
    assert exported.info["input_sizes"] == [[64, 64], [96, 128]] and exported.info["shapes"] == "enumerated"
    array = ct.utils.load_spec(str(out / "model.mlpackage")).description.input[0].type.multiArrayType
    assert [tuple(s.shape) for s in array.enumeratedShapes.shapes] == [(1, 3, 64, 64), (1, 3, 96, 128)]
    assert tuple(array.shape) == (1, 3, 64, 64)  # the default
    runner = CoreMLTarget().load_runner(out, export=exported.info)
    wide = _crop(EXTRA)
    restored = runner.run(wide)
    assert restored.shape == wide.shape and _psnr(restored, _torch(graph, wide)) >= FP16_MIN_PSNR
    with pytest.raises(ValueError, match="not one the model accepts"):
        runner.run(_crop((128, 128)))


@pytest.mark.parametrize("converter", [CoreMLTarget(), ExecuTorchCoreMLTarget()], ids=lambda c: c.name)
def test_refused_options(converter):
    options = ExportOptions(input_size=SIZE)
    converter.check_options(options)  # the default minimum target, iOS17
    converter.check_options(dataclasses.replace(options, settings={"minimum_target": "macOS15"}))
    for old in ("iOS16", "macOS13"):
        with pytest.raises(ValueError, match="iOS17 .* is the minimum"):
            converter.check_options(dataclasses.replace(options, settings={"minimum_target": old}))
    with pytest.raises(ValueError, match="unknown Core ML minimum target"):
        converter.check_options(dataclasses.replace(options, settings={"minimum_target": "Android14"}))


def test_extra_sizes_refused_where_wrong(graph, tmp_path):
    converter = CoreMLTarget()
    with pytest.raises(ValueError, match="multiple of the padding multiple"):
        converter.export(graph, tmp_path, ExportOptions(input_size=SIZE, settings={"extra_sizes": ((64, 65),)}))
    recipe = graph.recipe
    local = {**recipe.config, "arch": "nafnet-local"}  # TLC pooling is fixed for one size
    graph.recipe = dataclasses.replace(recipe, arch="NAFNetLocal", config=local)
    try:
        with pytest.raises(ValueError, match="one artifact per size"):
            converter.export(graph, tmp_path, ExportOptions(input_size=SIZE, settings={"extra_sizes": (EXTRA,)}))
    finally:
        graph.recipe = recipe


# --- ExecuTorch delegated to Core ML ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pte(graph, tmp_path_factory):
    require("executorch")
    converter = ExecuTorchCoreMLTarget()
    converter.check_available()
    return _export(converter, graph, tmp_path_factory, precision="fp32")


def test_pte_is_one_coreml_partition(pte, graph, image):
    out, exported = pte
    assert exported.files == ["model.pte"] and (out / "model.pte").stat().st_size > 0
    assert exported.info["delegated_partitions"] == 1 and exported.info["ops_outside_delegate"] == {}
    assert {"conv", "layer_norm"} <= exported.info["mil_ops"].keys()
    (io,) = exported.info["coreml_io_dtypes"]
    assert list(io.values()) == ["float32", "float32"]  # fp32 program: no casts
    runner = ExecuTorchCoreMLTarget().load_runner(out, export=exported.info)
    assert runner.info["runtime"] == ("mil-numpy-evaluator" if EVALUATED else "executorch-coreml")
    restored = runner.run(image)
    assert restored.dtype == np.float32 and restored.shape == image.shape
    assert np.abs(restored - _torch(graph, image)).max() <= FP32_MAX_ABS


@pytest.mark.skipif(not EVALUATED, reason="on macOS the ExecuTorch runtime runs any .pte")
def test_pte_without_a_lone_coreml_delegate_is_refused_off_apple(tmp_path):
    exir = require("executorch.exir")
    program = exir.to_edge(torch.export.export(torch.nn.ReLU(), (torch.rand(1, 3, 8, 8),))).to_executorch()
    (tmp_path / "model.pte").write_bytes(program.buffer)
    with pytest.raises(MissingBackendError, match="cannot execute off Apple platforms"):
        ExecuTorchCoreMLTarget().load_runner(tmp_path)


@pytest.mark.skipif(not EVALUATED, reason="on macOS Core ML runs: a timed session opens")
def test_a_timed_session_is_not_runnable_off_apple(fp32, pte):
    """Validation may evaluate the ML program in numpy; bench (a timed session) says where it can run instead."""
    with pytest.raises(NotRunnable, match="runs only on macOS and iOS"):
        CoreMLTarget().open_session(fp32[0], settings=SessionSettings(timing=True))
    with pytest.raises(NotRunnable, match="exists only on Apple platforms"):
        ExecuTorchCoreMLTarget().open_session(pte[0], settings=SessionSettings(timing=True))
