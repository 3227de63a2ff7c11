"""The NAFNet-SR family (NAFNetSR, stereo NAFSSR) through its deploy graph and every target, in their runtimes.

Tiny x2 models (width 16, two blocks, random weights, small beta/gamma); NAFSSR with a training size small enough
that its TLC pooling is local at the export size. Validation data: the shipped photos' bicubic downscales,
cropped small.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import randomize, require

from nafnet_edge.deploy import deploy
from nafnet_edge.deploy.modules import FixedPool
from nafnet_edge.deploy.passes import fixed_pool
from nafnet_edge.deploy.sr import (
    SR_PASSES,
    DeploySR,
    SRSettings,
    max_attention_score,
    to_deploy_sr,
)
from nafnet_edge.manifest import IOSpec, read_manifest
from nafnet_edge.model import ChannelPool, NAFNetConfig, NAFNetSR, build_model, tlc_kernel_sizes
from nafnet_edge.validation import STEREO_SHIFT_PX, psnr, sr_images

SIZE = (32, 48)  # low-resolution (height, width) of the exported graphs


def tiny(arch: str, seed: int = 0) -> NAFNetSR:
    stereo = arch == "nafssr"
    config = NAFNetConfig(
        arch=arch,  # type: ignore[arg-type]
        enc_blk_nums=(),
        dec_blk_nums=(),
        middle_blk_num=2,
        width=16,
        up_scale=2,
        fusion=stereo,
        train_size=(16, 24) if stereo else None,  # TLC kernel (24, 36): local at SIZE
    )
    model = randomize(build_model(config), seed)  # type: ignore[arg-type]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("beta", "gamma")):
                p.mul_(0.25)
    return model  # type: ignore[return-value]


@pytest.mark.parametrize("arch", ["nafnet-sr", "nafssr"])
def test_each_pass_keeps_the_function(arch: str) -> None:
    model = tiny(arch)
    x = torch.rand(1, model.config.in_channels, *SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(x)
    assert want.shape == (1, model.config.in_channels, 2 * SIZE[0], 2 * SIZE[1])
    graph = to_deploy_sr(model)
    kernel = tlc_kernel_sizes(model.config)[0] if model.config.local else None
    settings = SRSettings("reference", SIZE, 16.0, kernel)
    for name, run in SR_PASSES:
        run(graph, settings)
        with torch.no_grad():
            assert (graph(x) - want).abs().max() <= 1e-5, name
    assert not any(isinstance(m, ChannelPool) for m in graph.modules())
    if arch == "nafssr":
        assert all(isinstance(b.pool, FixedPool) and b.pool.kernel_size for b in graph.blocks())  # local at SIZE
        scam = graph.attentions()[0]
        assert scam.scale is None and scam.beta is None and scam.gamma is None
        assert scam.norm_l.weight is None and scam.norm_r.bias is None


@pytest.mark.parametrize("form", ["reference", "conv-mean", "layer-norm", "mvn"])
def test_deploy_dispatches_sr_models_in_every_norm_form(form: str) -> None:
    model = tiny("nafssr")
    x = torch.rand(1, 6, *SIZE, generator=torch.Generator().manual_seed(2))
    graph = deploy(model, norm_form=form, input_size=SIZE)  # type: ignore[arg-type]
    assert isinstance(graph, DeploySR)
    with torch.no_grad():
        assert (graph(x) - model(x)).abs().max() <= 1e-5
    recipe = graph.recipe
    assert recipe.arch == "NAFSSR" and recipe.is_tlc and recipe.local_pooling == ((24, 36), (24, 36))
    assert recipe.io == IOSpec.image(6, SIZE, scale=2)
    assert recipe.io.input.channels == "RGB+RGB" and recipe.io.output.shape == (1, 6, 64, 96)


def test_fixed_pools_are_channel_pool_at_their_size() -> None:
    """NAFSSR's pools (kernels clipped to one side of the view, as (45, 135) on a 64 px view) in the U-Net's
    FixedPool form."""
    x = torch.randn(1, 5, 20, 33, generator=torch.Generator().manual_seed(3))
    for kernel in ((7, 11), (20, 4), (1, 33), (45, 135), (12, 135)):
        assert (fixed_pool(kernel, (20, 33))(x) - ChannelPool(kernel)(x)).abs().max() <= 1e-6


def test_attention_scores_stay_far_from_fp16_range() -> None:
    """What the fp16 artifacts rely on: the scores SCAM's softmax sees (the deploy graph's, scale folded) are
    small next to fp16's 65504 on a randomized model; trained ones are not measured here (no NAFSSR weights ship)."""
    model = tiny("nafssr")
    graph = deploy(model, input_size=SIZE)
    pair = torch.from_numpy(sr_images(scale=2, views=2)[0].input[: SIZE[0], : SIZE[1]].transpose(2, 0, 1).copy())
    score = max_attention_score(graph, pair[None])  # type: ignore[arg-type]
    assert 0 < score < 1000


def test_sr_validation_data_is_a_bicubic_downscale_with_real_parallax() -> None:
    (single, *_) = sr_images(scale=2)
    h, w, c = single.input.shape
    assert single.target is not None and single.target.shape == (2 * h, 2 * w, c)
    bicubic = torch.nn.functional.interpolate(
        torch.from_numpy(single.input.transpose(2, 0, 1).copy())[None], scale_factor=2, mode="bicubic"
    )[0].numpy()
    assert psnr(np.clip(bicubic.transpose(1, 2, 0), 0, 1), single.target) > 22  # a downscale of the target
    (pair, *_) = sr_images(scale=2, views=2)
    assert pair.input.shape[2] == 6 and pair.target is not None and pair.target.shape[2] == 6
    left, right = pair.target[:, :, :3], pair.target[:, :, 3:]
    shift = STEREO_SHIFT_PX
    assert np.array_equal(left[:, shift:], right[:, :-shift])  # the right view is the left one moved by shift
    assert not np.array_equal(left, right)


def convert_sr(tmp_path: Path, arch: str, target: str, precision: str):
    from nafnet_edge import api
    from nafnet_edge.checkpoint import load_checkpoint
    from nafnet_edge.conversion import convert
    from nafnet_edge.converters import ExportOptions

    path = tmp_path / f"{arch}.pth"
    torch.save({"params": tiny(arch).state_dict()}, path)
    loaded = load_checkpoint(path, arch=arch)  # type: ignore[arg-type]
    views = loaded.config.views
    settings = api.validation_settings(channels=3, scale=2, views=views, cache=False, overlap=8)
    crop = [replace(im, input=im.input[:40, :56], target=im.target[:80, :112]) for im in settings.images[:1]]
    settings = replace(settings, images=crop)
    options = ExportOptions(input_size=SIZE, precision=precision)  # type: ignore[arg-type]
    return convert(loaded, target, tmp_path / "out", options, validation=settings)


ARTIFACTS = [
    ("onnx", "fp32"),
    pytest.param("executorch", "fp32", marks=pytest.mark.slow),
    pytest.param("openvino", "fp32", marks=pytest.mark.slow),
    pytest.param("openvino", "fp16", marks=pytest.mark.slow),
    pytest.param("litert", "fp32", marks=pytest.mark.slow),
    pytest.param("litert", "fp16", marks=pytest.mark.slow),
    pytest.param("coreml", "fp32", marks=pytest.mark.slow),
    pytest.param("coreml", "fp16", marks=pytest.mark.slow),
]
BACKENDS = {"onnx": "onnxruntime", "executorch": "executorch", "openvino": "openvino", "litert": "ai_edge_litert"}


@pytest.mark.parametrize("arch", ["nafnet-sr", "nafssr"])
@pytest.mark.parametrize(("target", "precision"), ARTIFACTS)
def test_sr_artifact_validates_in_its_runtime(tmp_path: Path, arch: str, target: str, precision: str) -> None:
    require(BACKENDS.get(target, "coremltools"))
    result = convert_sr(tmp_path, arch, target, precision)
    manifest = read_manifest(result.directory)
    views = 2 if arch == "nafssr" else 1
    assert manifest.io.scale == 2 and manifest.io.channels == 3 * views
    assert manifest.io.output.shape == (1, 3 * views, 64, 96)
    assert manifest.io.input.channels == ("RGB+RGB" if views == 2 else "RGB")
    validation = manifest.validation
    assert validation is not None and validation.passed, validation and validation.failures
    summary = validation.summary
    assert summary["fidelity_db_min"] >= (60 if precision == "fp32" else 45)
    assert math.isfinite(summary["drift_db_mean"]) and abs(summary["drift_db_mean"]) <= 0.05
    assert "bicubic" in validation.data and (views == 1 or "synthetic" in validation.data)
    if target == "executorch":  # the whole graph in one XNNPACK partition: SCAM, TLC box means, resize, shuffle
        assert manifest.export["delegated_partitions"] == 1 and manifest.export["ops_outside_delegate"] == {}


def test_stereo_image_io_is_refused_with_what_to_do(tmp_path: Path) -> None:
    from nafnet_edge.checkpoint import load_checkpoint
    from nafnet_edge.conversion import convert
    from nafnet_edge.converters import ExportOptions
    from nafnet_edge.errors import OptionError

    require("onnxruntime")
    path = tmp_path / "nafssr.pth"
    torch.save({"params": tiny("nafssr").state_dict()}, path)
    loaded = load_checkpoint(path, arch="nafssr")
    with pytest.raises(OptionError, match="--io tensor") as refused:
        convert(loaded, "onnx", tmp_path, ExportOptions(input_size=SIZE, pixel_format="rgb"), validation=None)
    assert refused.value.exit_code == 2


@pytest.mark.parametrize("pixel_format", [None, "rgb"])
def test_sr_usage_python_tiles_a_photo_like_nafnet_edge_run(tmp_path: Path, kodak_data: Path, pixel_format) -> None:
    """A super-resolution artifact's USAGE.md Python, run as written on a photo larger than its tile, places each
    output at twice its tile's origin and blends as `nafnet-edge run` does through the same file (tensor and image
    I/O; run takes square tiles)."""
    import shutil

    import cv2
    from helpers import run_usage_python

    from nafnet_edge.checkpoint import load_checkpoint
    from nafnet_edge.cli import main
    from nafnet_edge.conversion import convert
    from nafnet_edge.converters import ExportOptions

    require("onnxruntime")
    path = tmp_path / "sr.pth"
    torch.save({"params": tiny("nafnet-sr").state_dict()}, path)
    loaded = load_checkpoint(path)
    assert loaded.config.arch == "nafnet-sr" and loaded.config.up_scale == 2
    options = ExportOptions(input_size=(48, 48), pixel_format=pixel_format)  # type: ignore[arg-type]
    result = convert(loaded, "onnx", tmp_path / "out", options, validation=None)
    folder = Path(shutil.copytree(result.directory, tmp_path / "copy"))
    assert read_manifest(folder).tiling.overlap_px < 48
    restored = run_usage_python(folder, kodak_data / "crop0.png")
    photo = cv2.imread(str(folder / "photo.png"))
    assert min(photo.shape[:2]) > 48  # several tiles
    assert restored.shape == (2 * photo.shape[0], 2 * photo.shape[1], 3)
    assert main(["run", str(folder), str(folder / "photo.png"), "-o", str(tmp_path / "run")]) == 0
    by_run = cv2.imread(str(tmp_path / "run" / "photo.png"))
    assert np.abs(restored.astype(int) - by_run.astype(int)).max() <= 1


@pytest.mark.parametrize(("target", "pixel_format"), [("executorch", None), ("executorch", "rgba"), ("litert", "rgba")])
def test_android_usage_passes_the_output_scale_to_the_kotlin_tilers(tmp_path: Path, target: str, pixel_format) -> None:
    """The Kotlin in an SR artifact's USAGE.md builds its tiler with the manifest's scale and a Bitmap that much
    larger (the tilers themselves are checked against the Python tiler in test_android_tiler)."""
    from nafnet_edge.checkpoint import load_checkpoint
    from nafnet_edge.conversion import convert
    from nafnet_edge.converters import ExportOptions

    require(target if target == "executorch" else "litert_torch")
    path = tmp_path / "sr.pth"
    torch.save({"params": tiny("nafnet-sr").state_dict()}, path)
    options = ExportOptions(input_size=(32, 32), pixel_format=pixel_format)  # type: ignore[arg-type]
    result = convert(load_checkpoint(path), target, tmp_path / "out", options, validation=None)
    usage = (result.directory / "USAGE.md").read_text()
    kotlin = usage[usage.index("```kotlin") :]
    assert "Tiler(object" in kotlin and ", scale = 2)" in kotlin
    assert "Bitmap.createBitmap(" in kotlin and "bitmap.width * 2" in kotlin and "bitmap.height * 2" in kotlin


@pytest.mark.parametrize("arch", ["nafnet-sr", "nafssr"])
def test_report_compares_sr_artifacts_at_the_output_size(tmp_path: Path, arch: str) -> None:
    """The report runs an SR artifact on the low-resolution validation input (a synthetic pair for NAFSSR) and
    compares at the output size, the two views side by side; the model line says so."""
    import re

    from nafnet_edge.cli import main

    require("onnxruntime")
    torch.save({"params": tiny(arch).state_dict()}, tmp_path / "m.pth")
    argv = ["convert", str(tmp_path / "m.pth"), "--target", "onnx", "-o", str(tmp_path / "a"), "--input-size", "32"]
    assert main([*argv, "--no-validate"]) == 0
    assert main(["report", str(tmp_path / "a" / "onnx-fp32"), "-o", str(tmp_path / "r.html"), "--images", "1"]) == 0
    page = (tmp_path / "r.html").read_text()
    views = 2 if arch == "nafssr" else 1
    assert re.search(rf"64×{64 * views} tile", page)
    assert "super-resolution x2 (images at the output size)" in page
    assert ("views side by side" in page) == (views == 2)
    fidelity = [float(v) for v in re.findall(r"([0-9.]+) dB", page)]
    assert fidelity and max(fidelity) > 60  # fp32 ONNX against the fp32 model, on the right pixels


def test_bench_runs_a_stereo_sr_artifact_and_its_source_on_their_own_input(tmp_path: Path, capsys) -> None:
    import json

    from nafnet_edge.checkpoint import load_checkpoint
    from nafnet_edge.cli import main
    from nafnet_edge.complexity import count_macs

    require("onnxruntime")
    model = tiny("nafssr")
    torch.save({"params": model.state_dict()}, tmp_path / "m.pth")
    argv = ["convert", str(tmp_path / "m.pth"), "--target", "onnx", "-o", str(tmp_path / "a"), "--input-size", "32"]
    assert main([*argv, "--no-validate"]) == 0
    capsys.readouterr()
    assert main(["bench", str(tmp_path / "a" / "onnx-fp32"), "--runs", "2", "--frame", "50x40", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    (artifact,) = report["artifacts"]
    assert report["failures"] == [] and artifact["input"] == report["baseline"]["input"] == [1, 6, 32, 32]
    config = load_checkpoint(tmp_path / "m.pth").config  # as identified from the file (TLC from train size 30x90)
    assert artifact["macs"] == count_macs(config, 32, 32) and artifact["latency_ms"]["median"] > 0
    assert artifact["frame"] is not None
