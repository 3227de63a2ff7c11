"""INT8 of the super-resolution family (NAFNet-SR, stereo NAFSSR) through every quantizer, validated in each
runtime against the fp32 reference on the bicubic-downscaled photos; the SR units of --keep-float; training pairs
at the output scale."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import require
from PIL import Image
from test_sr_targets import tiny

from nafnet_edge.cli import main
from nafnet_edge.deploy import deploy
from nafnet_edge.errors import EXIT_USAGE, BadInputError
from nafnet_edge.quantization.sensitivity import graph_units
from nafnet_edge.quantization.train import batches, load_training_images

BACKENDS = {"executorch": "executorch", "openvino": "nncf", "coreml": "coremltools", "litert": "litert_torch"}
# measured on tiny random models (PTQ, shipped photos; this machine): NAFNet-SR 46.1-51.6 dB, NAFSSR 45.2-50.1 dB
MIN_FIDELITY_DB = 40.0
KODAK = Path(__file__).parents[1] / "nafnet_edge" / "data" / "kodak"


def _quantize(tmp_path: Path, arch: str, target: str, size: int, *extra: str) -> dict:
    require(BACKENDS[target])
    path = tmp_path / f"{arch}.pth"
    torch.save({"params": tiny(arch).state_dict()}, path)
    argv = ["quantize", str(path), "--target", target, "--method", "ptq", "--train-data", str(KODAK)]
    argv += ["-o", str(tmp_path / "out"), "--input-size", str(size), "--search-rounds", "0", *extra]
    assert main(argv) == 0
    return json.loads((tmp_path / "out" / f"{target}-int8" / "manifest.json").read_text())


@pytest.mark.parametrize("target", list(BACKENDS))
def test_nafnet_sr_int8_on_every_target(tmp_path: Path, target: str) -> None:
    manifest = _quantize(tmp_path, "nafnet-sr", target, 32)
    assert manifest["precision"] == "int8" and manifest["io"]["scale"] == 2
    assert manifest["validation"]["passed"], manifest["validation"]["failures"]
    assert min(i["fidelity_db"] for i in manifest["validation"]["per_image"]) >= MIN_FIDELITY_DB


@pytest.mark.parametrize("target", ["executorch", "openvino"])
def test_nafssr_int8_loads_and_holds_fidelity(tmp_path: Path, target: str) -> None:
    """The two views share their blocks' weights in the model; the int8 program gets one copy per view (XNNPACK
    refuses a conv whose quantized weight feeds another) and the bilinear residual's range is pinned (OpenVINO:
    NNCF's statistics clipped it, 23 dB)."""
    manifest = _quantize(tmp_path, "nafssr", target, 24)
    assert manifest["io"]["inputs"][0]["shape"] == [1, 6, 24, 24] and manifest["io"]["outputs"][0]["shape"][2] == 48
    assert manifest["validation"]["passed"], manifest["validation"]["failures"]
    assert min(i["fidelity_db"] for i in manifest["validation"]["per_image"]) >= MIN_FIDELITY_DB


def test_sr_units_and_their_keep_float_errors(tmp_path: Path, capsys) -> None:
    graph = deploy(tiny("nafssr"), input_size=(24, 24))
    assert graph_units(graph) == ["intro", "body.0.blk", "body.0.fusion", "body.1.blk", "body.1.fusion", "up"]
    assert graph_units(deploy(tiny("nafnet-sr"), input_size=(24, 24))) == ["intro", "body.0.blk", "body.1.blk", "up"]
    require("executorch")
    torch.save({"params": tiny("nafssr").state_dict()}, tmp_path / "s.pth")
    argv = ["quantize", str(tmp_path / "s.pth"), "--target", "executorch", "--method", "ptq"]
    argv += ["--train-data", str(KODAK)]
    assert main([*argv, "-o", str(tmp_path / "o"), "--input-size", "24", "--keep-float", "encoders.0.0"]) == EXIT_USAGE
    assert "this model has intro, body.0.blk, body.0.fusion" in capsys.readouterr().err


def test_super_resolution_pairs_are_cropped_at_the_output_scale(tmp_path: Path) -> None:
    (tmp_path / "low").mkdir()
    (tmp_path / "high").mkdir()
    rng = np.random.default_rng(0)
    low = rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)
    Image.fromarray(low).save(tmp_path / "low" / "a.png")
    Image.fromarray(low.repeat(2, 0).repeat(2, 1)).save(tmp_path / "high" / "a.png")  # each pixel a 2x2 block
    images = load_training_images(tmp_path / "low", 16, pairs=tmp_path / "high", scale=2)
    x, y = next(batches(images, 16, 3, seed=0))
    assert x.shape == (3, 3, 16, 16) and y is not None and y.shape == (3, 3, 32, 32)
    assert torch.equal(y[:, :, ::2, ::2], x)  # each target crop is its input crop's box (flips alike), twice the size
    with pytest.raises(BadInputError, match="a x4 model needs it 160x128"):
        load_training_images(tmp_path / "low", 16, pairs=tmp_path / "high", scale=4)
    with pytest.raises(BadInputError, match="stereo model trains by distillation"):
        load_training_images(tmp_path / "low", 16, pairs=tmp_path / "high", views=2)
