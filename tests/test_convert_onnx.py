"""ONNX converter: the file runs in onnxruntime like the PyTorch deploy graph, fixed or dynamic size, checked and
self-describing; options it cannot honour are refused."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import randomize, require

require("onnx")
require("onnxruntime")

import onnx  # noqa: E402

from nafnet_edge.converters import ExportOptions, get_target  # noqa: E402
from nafnet_edge.deploy import deploy  # noqa: E402
from nafnet_edge.images import read_image  # noqa: E402
from nafnet_edge.model import NAFNet, NAFNetConfig, NAFNetLocal  # noqa: E402

KODAK = sorted(Path(str(resources.files("nafnet_edge") / "data" / "kodak")).glob("*.png"))
CFG = NAFNetConfig(width=8, enc_blk_nums=(1, 1), middle_blk_num=1, dec_blk_nums=(1, 1))
MAX_ABS_ERR = 2e-6  # fp32 onnxruntime vs PyTorch; measured up to 4.8e-7 on these crops


def photo(h: int, w: int, index: int = 0) -> np.ndarray:
    pixels = read_image(KODAK[index]).pixels[100 : 100 + h, 50 : 50 + w]
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))[None]


def reference(module: torch.nn.Module, a: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module(torch.from_numpy(a)).numpy()


def max_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).max())


@pytest.fixture(scope="module")
def model() -> NAFNet:
    return randomize(NAFNet(CFG))


def export(graph: torch.nn.Module, out_dir: Path, *, dynamic: bool | None = None, **options: object):
    """(target, Exported); ``dynamic`` is the ONNX target's own setting (``--dynamic``)."""
    converter = get_target("onnx")
    converter.check_available()
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = {} if dynamic is None else {"dynamic": dynamic}
    opts = ExportOptions(**options, settings=settings)  # type: ignore[arg-type]
    converter.check_options(opts)
    return converter, converter.export(graph, out_dir, opts)


def test_fixed_size_file_matches_pytorch_and_describes_itself(model: NAFNet, tmp_path: Path) -> None:
    metadata = {"nafnet_edge.release": "test-width8", "nafnet_edge.arch": "NAFNet"}
    graph = deploy(model, norm_form="mvn", input_size=(64, 96), metadata=metadata)
    converter, exported = export(graph, tmp_path, input_size=(64, 96))
    path = tmp_path / "model.onnx"
    assert exported.files == ["model.onnx"] and path.is_file()
    onnx.checker.check_model(str(path), full_check=True)

    proto = onnx.load(str(path))
    assert proto.opset_import[0].version >= 17
    assert [i.name for i in proto.graph.input] == ["image"] and [o.name for o in proto.graph.output] == ["restored"]
    assert [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim] == [1, 3, 64, 96]
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["nafnet_edge.release"] == "test-width8" and props["nafnet_edge.arch"] == "NAFNet"
    assert props["nafnet_edge.input_size"] == "64x96" and props["nafnet_edge.padding_multiple"] == "4"
    assert props["nafnet_edge.dynamic"] == "false"
    assert "restored" in proto.doc_string

    info = exported.info
    assert info["opset"] == 17 and info["dynamic"] is False and info["file_bytes"] == path.stat().st_size
    assert info["op_histogram"]["Conv"] > 0 and sum(info["op_histogram"].values()) == len(proto.graph.node)
    assert info["onnx_version"] == onnx.__version__

    runner = converter.load_runner(tmp_path)
    assert runner.info["runtime"] == "onnxruntime" and "CPUExecutionProvider" in runner.info["providers"]
    for index in (0, 1):
        x = photo(64, 96, index)
        out = runner.run(x)
        assert out.dtype == np.float32 and out.shape == x.shape
        assert max_err(out, reference(graph, x)) <= MAX_ABS_ERR
        assert max_err(out, reference(model, x)) <= MAX_ABS_ERR


def test_dynamic_file_runs_at_other_sizes(model: NAFNet, tmp_path: Path) -> None:
    graph = deploy(model, norm_form="mvn", input_size=(64, 64))
    converter, exported = export(graph, tmp_path, input_size=(64, 64), dynamic=True)
    assert exported.info["dynamic"] is True
    proto = onnx.load(str(tmp_path / "model.onnx"))
    assert [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim] == [
        1,
        3,
        "height",
        "width",
    ]
    assert {p.key: p.value for p in proto.metadata_props}["nafnet_edge.dynamic"] == "true"
    runner = converter.load_runner(tmp_path)
    for h, w in ((64, 64), (48, 80), (96, 128)):
        x = photo(h, w, 1)
        out = runner.run(x)
        assert out.shape == x.shape
        assert max_err(out, reference(graph, x)) <= MAX_ABS_ERR
        assert max_err(out, reference(model, x)) <= MAX_ABS_ERR  # global pooling: the model's function at any size


def test_tlc_local_pooling_exports_fixed_but_refuses_dynamic(tmp_path: Path) -> None:
    tlc = randomize(NAFNetLocal(CFG.replace(train_size=(32, 32))), seed=1)  # kernel 48 < 96: local pooling
    graph = deploy(tlc, norm_form="mvn", input_size=(96, 128))
    with pytest.raises(ValueError, match="--dynamic needs global pooling.*pools locally at 96x128"):
        export(graph, tmp_path / "dynamic", input_size=(96, 128), dynamic=True)
    assert not (tmp_path / "dynamic" / "model.onnx").exists()

    converter, _ = export(graph, tmp_path / "fixed", input_size=(96, 128))
    x = photo(96, 128, 2)
    out = converter.load_runner(tmp_path / "fixed").run(x)
    assert max_err(out, reference(tlc, x)) <= MAX_ABS_ERR


def test_tlc_pooling_globally_at_the_given_size_still_refuses_dynamic(tmp_path: Path) -> None:
    tlc = randomize(NAFNetLocal(CFG.replace(train_size=(96, 96))), seed=2)  # kernel 144 covers 64x64: global
    graph = deploy(tlc, norm_form="mvn", input_size=(64, 64))  # only its recipe says TLC: every pool is global
    assert graph.recipe.local_pooling == ()
    with pytest.raises(ValueError, match="--dynamic cannot keep TLC.*locally at larger sizes"):
        export(graph, tmp_path, input_size=(64, 64), dynamic=True)


def test_options_it_cannot_honour_are_refused() -> None:
    converter = get_target("onnx")
    assert converter.name == "onnx" and converter.artifact == "model.onnx" and converter.precisions == ("fp32",)
    assert [(o.flag, o.dest, o.kind, o.default) for o in converter.options] == [("--dynamic", "dynamic", "flag", False)]
    with pytest.raises(ValueError, match="precision fp32, not fp16"):
        converter.check_options(ExportOptions(input_size=(64, 64), precision="fp16"))
