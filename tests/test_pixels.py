"""Image I/O's shared pieces: the pixel formats' conversions, the PyTorch wrapper exported by the PyTorch-based
targets, the manifest's description of uint8 pixels, and validation's 8-bit scoring and its one-level budget."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nafnet_edge.manifest import IOSpec, ManifestError, artifact_dirname
from nafnet_edge.pixels import (
    PIXEL_FORMATS,
    from_pixels,
    image_io_module,
    level_agreement,
    pixel_channels,
    quantized,
    to_pixels,
)
from nafnet_edge.validation import Budgets, ValidationImage, validate_runner

RNG = np.random.default_rng(7)


def _channels(fmt: str) -> int:
    return 1 if fmt == "gray" else 3


@pytest.mark.parametrize("fmt", PIXEL_FORMATS)
def test_pixels_round_trip_and_channel_order(fmt: str) -> None:
    x = RNG.random((1, _channels(fmt), 5, 7), dtype=np.float32) * 1.4 - 0.2  # out of range on both sides
    p = to_pixels(x, fmt)
    assert p.dtype == np.uint8 and p.shape == (1, 5, 7, pixel_channels(fmt))
    expected = np.rint(np.clip(x, 0, 1) * 255)
    if fmt != "gray":
        for c, name in enumerate("rgb"):
            assert np.array_equal(p[..., fmt.index(name)], expected[:, c])
    if fmt in ("rgba", "bgra"):
        assert (p[..., 3] == 255).all()
    assert np.array_equal(from_pixels(p, fmt), quantized(x))
    with pytest.raises(ValueError, match="expected uint8"):
        from_pixels(p.astype(np.float32), fmt)


@pytest.mark.parametrize("fmt", PIXEL_FORMATS)
def test_wrapper_matches_the_numpy_conversions(fmt: str) -> None:
    """The exported wrapper computes on pixels/255 in model order and returns round(clamp(y) * 255) in the
    buffer's order, alpha ignored in and 255 out: exactly what validation's numpy conversions assume."""
    c = _channels(fmt)
    conv = torch.nn.Conv2d(c, c, 3, padding=1)
    torch.nn.init.normal_(conv.weight, 0.0, 0.4)
    p = RNG.integers(0, 256, (1, 9, 11, pixel_channels(fmt)), dtype=np.uint8)
    with torch.no_grad():
        got = image_io_module(conv, fmt)(torch.from_numpy(p)).numpy()
        want = to_pixels(conv(torch.from_numpy(from_pixels(p, fmt))).numpy(), fmt)
        if fmt in ("rgba", "bgra"):  # another alpha in changes nothing
            p2 = p.copy()
            p2[..., 3] = RNG.integers(0, 256, p2.shape[:3], dtype=np.uint8)
            assert np.array_equal(image_io_module(conv, fmt)(torch.from_numpy(p2)).numpy(), got)
    assert got.dtype == np.uint8
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1  # 1/255 vs a multiply by its reciprocal
    assert np.mean(got == want) > 0.999


@pytest.mark.parametrize("fmt", PIXEL_FORMATS)
def test_manifest_describes_pixels(fmt: str) -> None:
    io = IOSpec.image(_channels(fmt), (64, 48), pixel_format=fmt)
    assert io.kind == "image" and io.pixel_format == fmt
    assert io.channels == _channels(fmt) and io.input_size == (64, 48)
    assert io.input.shape == (1, 64, 48, pixel_channels(fmt)) and io.output.shape == io.input.shape
    assert IOSpec.from_dict(io.to_dict()) == io
    tensor = IOSpec.image(3, (64, 48))
    assert tensor.kind == "tensor" and tensor.pixel_format is None
    assert artifact_dirname("onnx", "fp32", io.kind) == "onnx-fp32-image"


def test_manifest_refuses_mixed_or_unknown_io() -> None:
    from nafnet_edge.manifest import Manifest

    pixels = IOSpec.image(3, (16, 16), pixel_format="rgba").to_dict()
    mixed = {**pixels, "outputs": IOSpec.image(3, (16, 16)).to_dict()["outputs"]}
    odd = {**pixels, "inputs": [{**pixels["inputs"][0], "dtype": "uint16"}]}
    for io in (mixed, odd):
        data = {"target": "onnx", "precision": "fp32", "files": ["model.onnx"], "io": io}
        data["source"] = {"config": {}, "sha256": "0" * 64, "checkpoint": "x.pth"}
        with pytest.raises(ManifestError, match="not a manifest written by nafnet-edge"):
            Manifest.from_dict({**data, "manifest_version": 2})


def _validate(run, image: np.ndarray, precision: str = "fp32"):
    ref = image.copy()  # an identity model's reference
    return validate_runner(
        run,
        [(ref, None)],
        [ValidationImage("x", image)],
        tile=(32, 32),
        overlap=8,
        multiple=16,
        budgets=Budgets.for_precision(precision, pixels=True),
        reference_device="cpu",
        data="test",
    )


def test_pixel_budget_is_measured_on_8_bit_outputs() -> None:
    image = quantized(RNG.random((40, 56, 3), dtype=np.float32))
    exact = _validate(lambda x: from_pixels(to_pixels(x, "rgb"), "rgb"), image)
    assert exact.passed, exact.failures
    s = exact.summary()
    assert s["within_one_level_share_min"] == 1.0 and s["max_level_diff"] == 0 and s["fidelity_db_min"] == np.inf

    def off_by_two(x: np.ndarray) -> np.ndarray:  # 2 levels off on every 100th sample
        y = x.copy()
        y.reshape(-1)[::100] += 2 / 255
        return y

    report = _validate(off_by_two, image)
    share = report.summary()["within_one_level_share_min"]
    assert 0.98 < share < 0.999
    assert any("within one level" in f and "99.9%" in f for f in report.failures), report.failures
    assert report.to_dict()["budgets"]["min_within_one_level"] == 0.999
    int8 = _validate(off_by_two, image, "int8")  # int8 is judged by its PSNR budgets
    assert not any("within one level" in f for f in int8.failures)


def test_level_agreement_counts_levels() -> None:
    ref = np.array([0.0, 0.4, 1.0, 0.2], np.float32)
    out = ref + np.array([0.0, 1.0, -2.0, 0.4 / 255], np.float32) / 255
    got = level_agreement(out, ref)
    assert got == {"exact_share": 0.5, "within_one_level_share": 0.75, "max_level_diff": 2}


def test_wrapper_rounds_exact_ties_half_to_even() -> None:
    """The wrapper's rounding (an add and a subtract of 2**23, which delegates run) is numpy's rint on the ties
    themselves, not only between them."""
    levels = np.arange(255, dtype=np.float32)
    y = (levels + np.float32(0.5)) / np.float32(255)
    y = y[y * np.float32(255) == levels + np.float32(0.5)]  # values whose scaled level is exactly a tie
    assert y.size > 100
    fixed = torch.from_numpy(np.broadcast_to(y, (1, 3, 1, y.size)).copy())

    class Constant(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return fixed + 0 * x[..., :1, :1]

    pixels = torch.zeros(1, 1, y.size, 3, dtype=torch.uint8)
    with torch.no_grad():
        got = image_io_module(Constant(), "rgb")(pixels).numpy()[0, 0, :, 0]
    assert np.array_equal(got, np.rint(y * np.float32(255)).astype(np.uint8))
    assert (got % 2 == 0).all()  # every tie went to the even level
