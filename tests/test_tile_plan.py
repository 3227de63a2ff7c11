"""The tile plan an app follows to restore whole frames through a fixed-size artifact: it must be exactly what
validation, ``run`` and the report do (``validation.apply_tiled``), written out as data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nafnet_edge.cli import main
from nafnet_edge.manifest import WINDOW, read_manifest
from nafnet_edge.tiling import tile_plan
from nafnet_edge.validation import apply_tiled


def tile_dependent(t: torch.Tensor) -> torch.Tensor:
    """A stand-in artifact whose output depends on the whole tile (as channel attention does), so a tile at
    another origin, padded differently or blended with other weights gives another frame."""
    return t * t + t.mean(dim=(2, 3), keepdim=True) + 0.1 * t.flip(3)


def blend_by_plan(plan: dict, pixels: np.ndarray, fn) -> np.ndarray:
    """What an app does with the plan's data alone, in float64: pad, run each tile, weight, add, crop."""
    h, w = plan["frame"]
    ph, pw = plan["padded"]
    th, tw = plan["tile"]
    padded = np.zeros((ph, pw, pixels.shape[2]), np.float32)
    padded[:h, :w] = pixels
    out = np.zeros((ph, pw, pixels.shape[2]))
    for row, y in enumerate(plan["ys"]):
        for col, x in enumerate(plan["xs"]):
            tile = torch.from_numpy(np.ascontiguousarray(padded[y : y + th, x : x + tw].transpose(2, 0, 1)))[None]
            restored = fn(tile)[0].numpy().transpose(1, 2, 0)
            weight = np.outer(plan["weights_y"][row], plan["weights_x"][col])[:, :, None]
            out[y : y + th, x : x + tw] += restored * weight
    return out[:h, :w]


@settings(max_examples=40, deadline=None)
@given(
    height=st.integers(1, 300),
    width=st.integers(1, 300),
    tile=st.sampled_from([32, 48, 64, 128]),
    overlap=st.sampled_from([0, 8, 16, 31]),
    align=st.sampled_from([1, 4, 16]),
)
def test_the_plan_reproduces_the_validated_tiler(height, width, tile, overlap, align) -> None:
    if overlap >= tile:
        return
    pixels = np.random.default_rng(height * 1000 + width).random((height, width, 3), dtype=np.float32)
    plan = tile_plan(height, width, tile=(tile, tile), overlap_px=overlap, align_px=align).to_dict()
    expected, calls = apply_tiled(tile_dependent, pixels, (tile, tile), overlap, align)
    assert calls == plan["tiles"] == len(plan["ys"]) * len(plan["xs"])
    np.testing.assert_allclose(blend_by_plan(plan, pixels, tile_dependent), expected, atol=1e-5)
    total = np.zeros(plan["padded"])
    for row, y in enumerate(plan["ys"]):
        for col, x in enumerate(plan["xs"]):
            total[y : y + tile, x : x + tile] += np.outer(plan["weights_y"][row], plan["weights_x"][col])
    np.testing.assert_allclose(total, 1.0, atol=1e-6)  # the weights sum to one on every padded pixel
    if tile - overlap >= align:  # else the tiler cannot keep starts aligned and spaces them by the pixel
        assert all(y % align == 0 for y in plan["ys"]) and all(x % align == 0 for x in plan["xs"])


def test_plan_command_prints_the_artifacts_plan_as_data(converted_artifacts, capsys) -> None:
    directory = converted_artifacts.dir("onnx")
    manifest = read_manifest(directory)
    multiple = manifest.padding_multiple
    assert manifest.tiling.blend == WINDOW and manifest.tiling.align_px == multiple
    assert main(["plan", str(directory / "model.onnx"), "--frame", "150x203", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    expected = tile_plan(
        150, 203, tile=manifest.io.input_size, overlap_px=manifest.tiling.overlap_px, align_px=multiple
    )
    padded = [-(-150 // multiple) * multiple, -(-203 // multiple) * multiple]
    assert plan["tile"] == list(manifest.io.input_size) and plan["overlap_px"] == manifest.tiling.overlap_px
    assert (plan["ys"], plan["xs"]) == (list(expected.ys), list(expected.xs))
    assert plan["padded"] == padded and plan["window"] == WINDOW
    assert len(plan["weights_x"]) == len(plan["xs"]) and len(plan["weights_x"][0]) == plan["tile"][1]

    assert main(["plan", str(directory), "--frame", "150x203"]) == 0
    text = capsys.readouterr().out
    assert f"{len(expected)} of " in text and f"zero-padded right/bottom to {padded[0]}x{padded[1]}" in text
    assert "rows at y  " + ", ".join(map(str, expected.ys)) in text


@pytest.mark.parametrize(
    ("argv", "code", "needle"),
    [
        (["plan", "{dir}", "--frame", "100x100", "--overlap", "64"], 2, "must be smaller than the artifact's"),
        (["plan", "{tmp}", "--frame", "100x100"], 5, "is not an artifact"),
    ],
)
def test_plan_refuses_in_one_line(converted_artifacts, tmp_path, capsys, argv, code, needle) -> None:
    args = [a.format(dir=converted_artifacts.dir("onnx"), tmp=tmp_path) for a in argv]
    assert main(args) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err, err


def test_plan_needs_a_frame_size(converted_artifacts, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["plan", str(converted_artifacts.dir("onnx")), "--frame", "0x100"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--frame" in err and "0x100" in err, err
