"""ExecuTorch target: one XNNPACK partition, the .pte runs in ExecuTorch's runtime like the PyTorch deploy
graph, and the bundled program verifies itself in the runtime; options it cannot honour are refused.

One module-scoped export (lowering takes most of this file's time) serves every test that needs an artifact.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from helpers import require

require("executorch")

import torch  # noqa: E402
from helpers import randomize  # noqa: E402

from nafnet_edge.converters import Exported, ExportOptions, Target, get_target  # noqa: E402
from nafnet_edge.deploy import DeployNAFNet, deploy  # noqa: E402
from nafnet_edge.images import read_image  # noqa: E402
from nafnet_edge.model import NAFNet, NAFNetConfig, build_model  # noqa: E402

KODAK = sorted(Path(str(resources.files("nafnet_edge") / "data" / "kodak")).glob("*.png"))
CFG = NAFNetConfig(width=8, enc_blk_nums=(1, 1), middle_blk_num=1, dec_blk_nums=(1, 1))
SIZE = (64, 64)
MAX_ABS_ERR = 5e-6  # fp32 XNNPACK vs PyTorch; measured up to 9.5e-7 on these crops
BUNDLE_TOLERANCE = 1e-5  # rtol and atol for the runtime's bundled check (its default atol 1e-8 is below fp32 noise)


def photo(h: int, w: int, index: int = 0, top: int = 100) -> np.ndarray:
    pixels = read_image(KODAK[index]).pixels[top : top + h, 50 : 50 + w]
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))[None]


def reference(module: torch.nn.Module, a: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module(torch.from_numpy(a)).numpy()


def max_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).max())


@dataclass
class Artifact:
    converter: Target
    model: NAFNet
    graph: DeployNAFNet
    exported: Exported
    out_dir: Path
    test_inputs: tuple[np.ndarray, ...]
    test_outputs: tuple[np.ndarray, ...]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Artifact:
    converter = get_target("executorch")
    converter.check_available()
    model = randomize(NAFNet(CFG))
    graph = deploy(model, norm_form=converter.norm_form, input_size=SIZE)  # type: ignore[arg-type]
    inputs = (photo(*SIZE, 0), photo(*SIZE, 1))
    outputs = tuple(reference(model, x) for x in inputs)  # what the pipeline bundles: the original model's outputs
    options = ExportOptions(input_size=SIZE, settings={"bundle": True}, test_inputs=inputs, test_outputs=outputs)
    converter.check_options(options)
    out_dir = tmp_path_factory.mktemp("executorch")
    exported = converter.export(graph, out_dir, options)
    return Artifact(converter, model, graph, exported, out_dir, inputs, outputs)


def test_one_xnnpack_partition_and_nothing_outside(artifact: Artifact) -> None:
    info = artifact.exported.info
    assert artifact.exported.files == ["model.pte", "model.bpte"]
    assert info["delegated_partitions"] == 1 and info["delegate_backends"] == ["XnnpackBackend"]
    assert info["ops_outside_delegate"] == {}
    assert info["program_bytes"] == (artifact.out_dir / "model.pte").stat().st_size
    assert info["executorch_version"].startswith("1.")
    assert info["bundled_test_cases"] == 2 and info["bundle_bytes"] == (artifact.out_dir / "model.bpte").stat().st_size


def test_pte_matches_pytorch_in_the_executorch_runtime(artifact: Artifact) -> None:
    runner = artifact.converter.load_runner(artifact.out_dir)
    assert runner.info["runtime"] == "executorch" and runner.info["backend"] == "XnnpackBackend"
    assert runner.runtime == "executorch" and runner.profile is not None
    assert runner.info.get("threads", 1) >= 1
    for index in range(len(KODAK)):
        x = photo(*SIZE, index, top=200)
        out = runner.run(x)
        assert out.dtype == np.float32 and out.shape == x.shape
        assert max_err(out, reference(artifact.graph, x)) <= MAX_ABS_ERR
        assert max_err(out, reference(artifact.model, x)) <= MAX_ABS_ERR
    with pytest.raises(ValueError, match=r"takes input \(1, 3, 64, 64\), got \(1, 3, 64, 80\)"):
        runner.run(photo(64, 80))
    profile = runner.profile(photo(*SIZE), 1)  # ETDump through executorch.runtime: XNNPACK's own operators
    assert profile["source"].startswith("ExecuTorch ETDump") and profile["top"]
    assert any("NHWC" in op["op"] or "GEMM" in op["op"] for op in profile["top"])


def test_tlc_local_pooling_is_one_partition_too(tmp_path: Path) -> None:
    """TLC pools locally at this size (kernels 48x36 .. 12x9 < the feature maps): separable average pools and
    edges copied by constant products, no replicate pad whose index ops would stay outside XNNPACK."""
    converter = get_target("executorch")
    model = randomize(build_model(CFG.replace(arch="nafnet-local", train_size=(32, 24))), seed=3)
    graph = deploy(model, norm_form=converter.norm_form, input_size=SIZE)  # type: ignore[arg-type]
    assert graph.recipe.local_pooling[0] == (48, 36)
    info = converter.export(graph, tmp_path, ExportOptions(input_size=SIZE)).info
    assert info["delegated_partitions"] == 1 and info["ops_outside_delegate"] == {}
    runner = converter.load_runner(tmp_path)
    for index in (0, 2):
        x = photo(*SIZE, index)
        assert max_err(runner.run(x), reference(model, x)) <= MAX_ABS_ERR


def test_bundled_program_verifies_itself_in_the_runtime(artifact: Artifact) -> None:
    from executorch.devtools.bundled_program.serialize import deserialize_from_flatbuffer_to_bundled_program
    from executorch.extension.pybindings.portable_lib import _load_bundled_program_from_buffer

    data = (artifact.out_dir / "model.bpte").read_bytes()
    bundle = _load_bundled_program_from_buffer(data)
    for case in range(len(artifact.test_inputs)):
        outputs = bundle.verify_result_with_bundled_expected_output(
            "forward", case, rtol=BUNDLE_TOLERANCE, atol=BUNDLE_TOLERANCE
        )
        assert max_err(outputs[0].numpy(), artifact.test_outputs[case]) <= MAX_ABS_ERR

    schema = deserialize_from_flatbuffer_to_bundled_program(data)
    assert bytes(schema.program) == (artifact.out_dir / "model.pte").read_bytes()
    (suite,) = schema.method_test_suites
    assert suite.method_name == "forward" and len(suite.test_cases) == 2
    for case, x, y in zip(suite.test_cases, artifact.test_inputs, artifact.test_outputs, strict=True):
        (stored_in,), (stored_out,) = case.inputs, case.expected_outputs
        assert list(stored_in.val.sizes) == list(x.shape) and list(stored_out.val.sizes) == list(y.shape)
        assert np.array_equal(np.frombuffer(bytes(stored_in.val.data), np.float32).reshape(x.shape), x)
        assert np.array_equal(np.frombuffer(bytes(stored_out.val.data), np.float32).reshape(y.shape), y)

    with pytest.raises(RuntimeError, match="verification failed"):  # the check does compare: a zero tolerance fails
        bundle.verify_result_with_bundled_expected_output("forward", 0, rtol=0.0, atol=0.0)


def test_options_it_cannot_honour_are_refused(tmp_path: Path) -> None:
    converter = get_target("executorch")
    assert converter.name == "executorch" and converter.artifact == "model.pte" and converter.precisions == ("fp32",)
    assert [(o.flag, o.dest, o.kind, o.commands) for o in converter.options] == [
        ("--bundle", "bundle", "flag", ("convert",)),
        ("--norm-precision", "norm_precision", "value", ("quantize",)),  # the int8 program's float norms
    ]
    assert converter.quantizer_options({}) == {"norm_precision": "auto"}
    assert converter.quantizer_options({"norm_precision": "fp16"}) == {"norm_precision": "fp16"}
    with pytest.raises(ValueError, match="precision fp32, not fp16"):
        converter.check_options(ExportOptions(input_size=SIZE, precision="fp16"))
    bundle = {"bundle": True}
    bundle_without_inputs = ExportOptions(input_size=SIZE, settings=bundle)
    assert converter.needs_test_io(bundle_without_inputs) and not converter.needs_test_io(ExportOptions(SIZE))
    converter.check_options(bundle_without_inputs)  # the pipeline adds test inputs after this check ...
    with pytest.raises(ValueError, match="needs test inputs"):  # ... export refuses before the (slow) lowering
        converter.export(torch.nn.Identity(), tmp_path, bundle_without_inputs)
    x = photo(*SIZE)
    with pytest.raises(ValueError, match=r"must be \(1, C, 64, 64\).*got \(1, 3, 32, 64\)"):
        converter.check_options(ExportOptions(input_size=SIZE, settings=bundle, test_inputs=(x[..., :32, :],)))
    with pytest.raises(ValueError, match="one output per input"):
        converter.check_options(ExportOptions(input_size=SIZE, settings=bundle, test_inputs=(x, x), test_outputs=(x,)))
    assert list(tmp_path.iterdir()) == []
